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

Plan: a 64 KiB ring in two halves.  A cycle's headers are copied into the current half;
entering a half again requires that the reader has consumed every byte written up to the
moment that half was last left (``written - FIONREAD``).  With a pipe of 1 MiB (256 page
slots) that is always so; when it is not (a huge pipe, a stalled reader) ``place`` says so
and the caller copies that cycle with ``writev`` -- never waiting, never unsafe.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

from npqfile.buffers import address_of

RING_BYTES = 64 << 10


class SpliceHeaders:
    """Header copies for ``vmsplice`` on the pipe channel ``channel`` (which has
    ``pipe_unread()``)."""

    __slots__ = ("channel", "_mm", "_ring", "_addr", "_half", "_at", "_left_at")

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._mm = mmap.mmap(-1, RING_BYTES)
        self._ring = np.frombuffer(self._mm, dtype=np.uint8)
        self._addr = address_of(memoryview(self._mm))
        self._half = 0
        self._at = 0
        self._left_at = [0, 0]      # stream offset written when each half was last left

    def place(self, headers: memoryview, written: int) -> int | None:
        """Copy ``headers`` (one flush cycle's, at most half the ring) into the ring and return
        their address, or None when the space is still referenced by unread pipe data.
        ``written`` is the stream offset the channel has taken so far."""
        n = headers.nbytes
        half = RING_BYTES // 2
        if n > half:
            return None
        if self._at + n > half:             # the current half is full: enter the other one
            other = 1 - self._half
            if written - self.channel.pipe_unread() < self._left_at[other]:
                return None
            self._left_at[self._half] = written
            self._half, self._at = other, 0
        start = self._half * half + self._at
        self._ring[start:start + n] = np.frombuffer(headers, dtype=np.uint8)
        self._at += n
        return self._addr + start

    def close(self) -> None:
        """Drop the ring.  Pages the pipe still references stay valid: the kernel holds them."""
        self._ring = None
        self._mm.close()
