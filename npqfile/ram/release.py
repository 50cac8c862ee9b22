"""Release of guest RAM pages: the primitive that really frees each backing.

Supports: the advice names ``dontneed``, ``free``, ``remove``, ``punch``, ``pageout`` and
``cold``; the default primitive per backing (QEMU's ``ram_block_discard_range`` logic);
coalescing of byte ranges into whole-page runs; and ``RAMBlockMmap``, the ``mmap.mmap``
subclass whose ``release_pages(offset, length)`` is the hook QEMUFile calls for
``put_buffer_async(..., may_free=True)`` (see CONTRACTS.md, release-ram protocol).

Goals: never claim a release that did not happen.  ``MADV_DONTNEED`` only frees private
anonymous memory; on a shared mapping it merely unmaps (the data and the memory stay in
shmem or the page cache, F3/F4/F5), so shared anonymous memory and memfds default to
``MADV_REMOVE`` and files to a punched hole (``fallocate(PUNCH_HOLE|KEEP_SIZE)``) plus
``MADV_DONTNEED`` to drop this mapping's pages.  The other advices are experiment knobs:
the kernel decides what they do and its errors (EINVAL for ``free`` on a shared mapping,
``remove`` on a private one) are raised as OSError naming the block, never hidden.

Plan: the mmap subclass carries the block's name, backing, fd and chosen advice itself
(no reference back to the RAMBlock, so a view kept by a QEMUFile does not keep the block
alive); ``coalesce_runs`` is vectorised with numpy so releasing a million ranges is a
few array operations plus one syscall per run.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

HOST_PAGE_SIZE: int = mmap.PAGESIZE

# Values from <asm-generic/mman-common.h>; Python 3.11's mmap lacks COLD and PAGEOUT (F2).
MADV_COLD = 20
MADV_PAGEOUT = 21
MADVISE: dict[str, int] = {
    "dontneed": mmap.MADV_DONTNEED,
    "free": mmap.MADV_FREE,
    "remove": mmap.MADV_REMOVE,
    "pageout": MADV_PAGEOUT,
    "cold": MADV_COLD,
}
# fallocate(2) modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

#: Every advice the release path accepts; "punch" is fallocate, the rest are madvise.
ADVICES: tuple[str, ...] = ("dontneed", "free", "remove", "punch", "pageout", "cold")

#: What really frees each backing kind (QEMU ram_block_discard_range; F5).
DEFAULT_ADVICE: dict[str, str] = {
    "private": "dontneed",  # anonymous private: zero-fill on next touch
    "shared": "remove",     # shmem: DONTNEED would only unmap
    "memfd": "remove",      # shmem behind an fd: MADV_REMOVE punches the hole
    "file": "punch",        # fallocate hole + DONTNEED of the mapping's pages
    "image": "dontneed",    # private copy of a read-only file: drops the copies, the file stays
}

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def check_advice(advice: str, kind: str, block: str) -> str:
    """Return ``advice`` if it names a release primitive usable on ``kind`` backing.

    Raises ValueError for an unknown name, or for ``punch`` on an anonymous mapping
    (there is no file descriptor to punch; the kernel is never asked)."""
    if advice not in ADVICES:
        raise ValueError(f"unknown release advice {advice!r} for RAM block {block!r} "
                         f"(choose from {', '.join(ADVICES)})")
    if advice == "punch" and kind not in ("memfd", "file"):
        raise ValueError(f"advice 'punch' needs an fd-backed RAM block (memfd or file:PATH); "
                         f"block {block!r} is {kind}")
    return advice


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(fd, PUNCH_HOLE|KEEP_SIZE, offset, length): free a file range.

    Returns None; raises OSError with the kernel's errno (EOPNOTSUPP on file systems
    without hole punching).  ``os.posix_fallocate`` cannot punch, hence ctypes (F5)."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class RAMBlockMmap(mmap.mmap):
    """The mmap of one RAMBlock, able to release its own pages.

    Attributes set by ``RAMBlock``: ``block_name``, ``kind`` (private/shared/memfd/file),
    ``fd`` (-1 for anonymous), ``file_offset`` (where the mapping starts in the file),
    ``advice``; counters ``released_bytes`` (bytes advised: handed to madvise /
    fallocate), ``freed_bytes`` (of those, bytes that held memory before the call and no
    longer do: what the release really gave back; a never-touched page costs nothing and
    frees nothing) and ``release_calls``.  ``freed_bytes`` counts resident host pages as
    ``RAMBlock.resident_pages`` does (private: present and exclusive in pagemap; image:
    present anonymous copy-on-write copies; shared, memfd, file: in the page cache,
    mincore); ``freed_unmeasured`` counts bytes released
    where that could not be read.  ``guards`` and ``unmap_guards`` are set by
    mmap_alloc.qemu_ram_mmap, which creates it: the mapping itself is exactly the block.
    """

    block_name: str
    kind: str
    fd: int
    file_offset: int
    advice: str
    released_bytes: int
    release_calls: int

    def setup(self, block_name: str, kind: str, fd: int, file_offset: int, advice: str) -> None:
        """Attach the release state (called once by RAMBlock after mapping)."""
        self.block_name, self.kind, self.fd, self.file_offset = block_name, kind, fd, file_offset
        self.advice = advice
        self.released_bytes = 0
        self.release_calls = 0
        self.freed_bytes = 0
        self.freed_unmeasured = 0
        probe = np.frombuffer(self, dtype=np.uint8, count=1)
        self._address = int(probe.__array_interface__["data"][0])
        del probe

    def _resident_host_pages(self, offset: int, length: int) -> int | None:
        """Host pages of [offset, offset+length) holding memory now, or None if unreadable."""
        from npqfile.ram import residency   # residency reads /proc; imported on first use
        try:
            if self.kind == "private":
                pm = residency.read_pagemap(self._address + offset, length)
                want = residency.PM_PRESENT | residency.PM_EXCLUSIVE
                return int(np.count_nonzero((pm & want) == want))
            if self.kind == "image":
                # a private file mapping: only its copy-on-write copies are memory the
                # release frees (the file's pages stay in the page cache)
                pm = residency.read_pagemap(self._address + offset, length)
                return int(np.count_nonzero(((pm & residency.PM_PRESENT) != 0) & ((pm & residency.PM_FILE) == 0)))
            return int(np.count_nonzero(residency.mincore(self._address + offset, length)))
        except OSError:
            return None

    def release_pages(self, offset: int, length: int, advice: str | None = None) -> None:
        """Release ``length`` bytes at byte ``offset`` of this mapping with ``advice``
        (default: the block's advice).  Both must be multiples of the host page size and
        the range must lie inside the mapping.

        Returns None.  Raises ValueError for a misaligned or out-of-range request (the
        kernel is not asked) and OSError, naming the block and the primitive, when the
        kernel refuses (e.g. EINVAL for ``free`` on a shared mapping).  Nothing is
        counted as released when it raises."""
        if length == 0:
            return
        size = len(self)
        if offset % HOST_PAGE_SIZE or length % HOST_PAGE_SIZE or offset < 0 or length < 0:
            raise ValueError(f"release of RAM block {self.block_name!r} at offset {offset} length {length}: "
                             f"not aligned to the host page size {HOST_PAGE_SIZE}")
        if offset + length > -(-size // HOST_PAGE_SIZE) * HOST_PAGE_SIZE:
            raise ValueError(f"release of RAM block {self.block_name!r} at offset {offset} length {length}: "
                             f"outside the block (size {size})")
        how = self.advice if advice is None else advice
        span = min(length, size - offset)
        before = self._resident_host_pages(offset, span)
        try:
            if how == "punch":
                if self.fd < 0:
                    raise OSError(errno.EBADF, "no file descriptor to punch")
                punch_hole(self.fd, self.file_offset + offset, length)
                # The hole already unmapped the pages; DONTNEED also drops private COW copies.
                self.madvise(mmap.MADV_DONTNEED, offset, min(length, size - offset))
            else:
                self.madvise(MADVISE[how], offset, min(length, size - offset))
        except OSError as exc:
            prim = "fallocate(PUNCH_HOLE)" if how == "punch" else f"madvise({how})"
            raise OSError(exc.errno, f"{prim} on RAM block {self.block_name!r} ({self.kind} backing) at offset "
                                     f"{offset} length {length} failed: {exc.strerror}") from None
        self.released_bytes += length
        self.release_calls += 1
        after = None if before is None else self._resident_host_pages(offset, span)
        if after is None:
            self.freed_unmeasured += length
        else:
            self.freed_bytes += max(0, before - after) * HOST_PAGE_SIZE


def coalesce_runs(ranges: Any, size: int, block: str, granule: int = HOST_PAGE_SIZE) -> np.ndarray:
    """Merge byte ranges into disjoint runs of whole ``granule`` pages.

    ``ranges`` is an iterable of ``(offset, length)`` pairs or an ``(N, 2)`` integer
    array.  Overlapping and adjacent ranges are merged first, then each run is shrunk
    to the whole pages it contains (a partial page at either end is kept).  Returns an
    ``(M, 2)`` int64 array of ``(offset, length)`` runs sorted by offset, M <= N.
    Raises ValueError naming the block for a negative length or a range outside
    ``[0, size)``."""
    arr = np.asarray(ranges if isinstance(ranges, np.ndarray) else list(_pairs(ranges)), dtype=np.int64)
    if arr.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"release ranges for RAM block {block!r} must be (offset, length) pairs")
    starts, lengths = arr[:, 0], arr[:, 1]
    bad = np.flatnonzero((lengths < 0) | (starts < 0) | (starts + lengths > size))
    if bad.size:
        o, n = arr[bad[0]]
        raise ValueError(f"release range offset {o} length {n} is outside RAM block {block!r} (size {size})")
    keep = lengths > 0
    starts, ends = starts[keep], (starts + lengths)[keep]
    if starts.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    # A new run starts where a range begins after everything before it has ended.
    new = np.empty(starts.size, dtype=bool)
    new[0] = True
    new[1:] = starts[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, starts.size - 1)
    run_start = -(-starts[first] // granule) * granule
    run_end = reach[last] // granule * granule
    whole = run_end > run_start
    return np.stack([run_start[whole], (run_end - run_start)[whole]], axis=1)


def _pairs(ranges: Iterable) -> Iterable[tuple[int, int]]:
    for item in ranges:
        try:
            offset, length = item
        except (TypeError, ValueError):
            raise ValueError(f"release range {item!r} is not an (offset, length) pair") from None
        yield int(offset), int(length)
