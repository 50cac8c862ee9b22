"""Zero-copy send into a pipe (``QEMUFile(zero_copy_send=True)``): RAM pages by reference.

Supports: ``SpliceHeaders``, the record headers of the native page path copied into memory
of their own that stays unchanged until the pipe's reader has consumed them.

Goals: QEMU's ``zero-copy-send`` capability sends guest pages without copying them (multifd
sockets, MSG_ZEROCOPY).  npqfile offers the same idea where its streams mostly go and where
the copy is the whole cost: a pipe to an ``exec:`` command or an ``fd:``.  A pipe serialises
the writer's copy-in and the reader's copy-out on its lock; ``vmsplice`` hands the kernel
page references instead, so only the reader copies.  The bytes and the calls (one per
flush) are those of ``writev``; what changes is *when* a page's bytes are read: when the
reader reads them, up to a pipe-full later.  Guest RAM allows that, as QEMU's
``put_buffer_async`` does until its flush: a page written meanwhile is dirty and sent again,
a stopped guest writes nothing, and an ``image:`` block never changes.  Memory that is
reused -- the headers -- must not change until read: hence this module.

Plan: a 64 KiB ring that is never reused.  A cycle's headers are copied into the ring's
next free bytes; when it is full, it is unmapped and a fresh one mapped.  Unmapping is
always safe: vmsplice took references to the ring's pages, which the kernel keeps until
every reader of them is done -- including readers the pipe's reader spliced them on to
(another pipe, a socket), which the pipe's FIONREAD cannot see.  One mmap per 64 KiB of
headers (8192 records): nothing next to the pages' bytes.
"""

from __future__ import annotations

import mmap

import numpy as np

from npqfile.buffers import address_of

RING_BYTES = 64 << 10


class SpliceHeaders:
    """Header copies for ``vmsplice``: memory that is never written again once placed."""

    __slots__ = ("_mm", "_ring", "_addr", "_at")

    def __init__(self) -> None:
        self._mm: mmap.mmap | None = None
        self._ring: np.ndarray | None = None
        self._addr = 0
        self._at = RING_BYTES        # no ring yet: the first place() maps one

    def place(self, headers: memoryview) -> int | None:
        """Copy ``headers`` (one flush cycle's) into memory of their own and return its
        address; None when they exceed a ring (the caller then copies that cycle with
        ``writev``).  OSError if a new ring cannot be mapped."""
        n = headers.nbytes
        if n > RING_BYTES:
            return None
        if self._at + n > RING_BYTES:       # full: a fresh ring; the pipe keeps the old pages
            self.close()
            self._mm = mmap.mmap(-1, RING_BYTES)
            self._ring = np.frombuffer(self._mm, dtype=np.uint8)
            self._addr = address_of(memoryview(self._mm))
            self._at = 0
        start = self._at
        self._ring[start:start + n] = np.frombuffer(headers, dtype=np.uint8)
        self._at += n
        return self._addr + start

    def close(self) -> None:
        """Drop the ring.  Pages the pipe still references stay valid: the kernel holds them."""
        self._ring = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self._at = RING_BYTES
