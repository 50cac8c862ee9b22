"""RAMBlock: one mmap'd region of guest RAM, seen through numpy without copies.

Supports: ``RAMBlock(name, size, *, backing, page_size, hugepages, advice)`` with the
backings ``private`` (anonymous MAP_PRIVATE, the default), ``shared`` (anonymous
MAP_SHARED), ``memfd`` (memfd_create + MAP_SHARED) and ``file:PATH`` (a file mapped
MAP_SHARED, like QEMU's memory-backend-file,share=on); zero-copy views (``array``,
``pages``, ``page(i)``); writes that mark pages dirty (``write``, ``touch``, ``fill``);
``image:PATH`` (a file opened read-only and mapped MAP_PRIVATE, like
memory-backend-file,share=off: the guest sees the file, writes stay private copies, the
file never changes; ``npqfile save`` maps its raw images so, without copying them);
``sync_dirty`` from the block's bitmap or from the kernel's soft-dirty bits; release of
page runs with the primitive that frees the backing; residency measured from pagemap,
mincore and smaps; ``close`` that refuses, clearly, while views are alive.

Goals: QEMU's names (idstr <= 255 bytes, used_length, ram_addr_t offset); correct release
semantics per backing (see release.py); no silent copies; every error names the block.

Plan: the mmap is a ``RAMBlockMmap`` so a QEMUFile handed any view of the block can
release through the right primitive.  Like QEMU's qemu_ram_mmap, it sits between guard
pages (mmap_alloc.py: PROT_NONE pages at both ends, so the kernel never merges a block's
VMA with a neighbour and smaps always reports the block alone); ``mmap``, ``address`` and
every view cover exactly the block.  Like QEMU's ram_block_add, every block gets
MADV_DONTFORK (a fork -- e.g. an exec: channel -- then neither copies nor COW-shares the
guest RAM) and, unless ``hugepages=False``, MADV_HUGEPAGE (transparent huge pages: a
destination filled page by page faults 512 times less, measured 5x faster here); a block
whose size is a multiple of 2 MiB is 2 MiB-aligned so huge pages cover all of it.
"""

from __future__ import annotations

import gc
import hashlib
import mmap
import os
import time
import weakref
from typing import Any

import numpy as np

from . import residency
from .dirty import DirtyBitmap, page_selector
from .mmap_alloc import PMD_SIZE, qemu_ram_mmap
from .release import DEFAULT_ADVICE, RAMBlockMmap, check_advice, coalesce_runs

IDSTR_MAX = 255  # QEMU: char idstr[256], sent as u8 length + bytes
CLOSE_RETRY_DELAYS = (0.0, 0.001, 0.005, 0.02, 0.1)   # close(): waits for views another thread drops


class RAMBlockInUseError(RuntimeError):
    """close() was refused because numpy arrays or memoryviews of the block are alive."""


def parse_backing(backing: str) -> tuple[str, str | None]:
    """Return ``(kind, path)`` for a backing string: ``private``, ``shared``, ``memfd``
    or ``file:PATH`` (path None for the others).  Raises ValueError for anything else."""
    if backing in ("private", "shared", "memfd"):
        return backing, None
    if backing.startswith("file:") and len(backing) > 5:
        return "file", backing[5:]
    if backing.startswith("image:") and len(backing) > 6:
        return "image", backing[6:]
    raise ValueError(f"unknown RAM backing {backing!r} (choose private, shared, memfd, file:PATH or image:PATH)")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"RAM block name must be a non-empty string, not {name!r}")
    if len(name.encode()) > IDSTR_MAX:
        raise ValueError(f"RAM block name {name[:40]!r}... is {len(name.encode())} bytes; "
                         f"QEMU's idstr holds at most {IDSTR_MAX}")


def _check_geometry(name: str, size: int, page_size: int) -> None:
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} of RAM block {name!r} is not a power of two")
    if size <= 0 or size % page_size:
        raise ValueError(f"size {size} of RAM block {name!r} is not a positive multiple of its page size {page_size}")


class RAMBlock:
    """One region of guest RAM (QEMU's RAMBlock); see the module docstring."""

    def __init__(self, name: str, size: int, *, backing: str = "private", page_size: int = 4096,
                 hugepages: bool = True, advice: str | None = None) -> None:
        _check_name(name)
        size, page_size = int(size), int(page_size)
        _check_geometry(name, size, page_size)
        kind, path = parse_backing(backing)
        self.name = name
        self.size = size              # QEMU used_length
        self.page_size = page_size
        self.n_pages = size // page_size
        self.backing = backing
        self.kind = kind
        self.path = path
        self.hugepages = hugepages
        self.offset = 0               # ram_addr_t, set by GuestRAM.add
        self._owner: Any = None
        self._fd = -1
        self._array: np.ndarray | None = None
        self._pages: np.ndarray | None = None
        self._mv: memoryview | None = None
        self._closed = False
        chosen = check_advice(DEFAULT_ADVICE[kind] if advice is None else advice, kind, name)
        self.mmap = self._map(kind, path)
        self._finalizer = weakref.finalize(self, _close_fd, self._fd)
        self.mmap.setup(name, kind, self._fd, 0, chosen)
        self.address = self._host_address()
        self._dirty = DirtyBitmap(self.n_pages, name)

    # -- mapping ------------------------------------------------------------------------

    def _map(self, kind: str, path: str | None) -> RAMBlockMmap:
        if kind == "image":
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot open image {path!r} of RAM block {self.name!r}: "
                                         f"{exc.strerror}") from None
            try:
                if os.fstat(self._fd).st_size < self.size:
                    raise ValueError(f"image {path!r} of RAM block {self.name!r} is shorter than {self.size} bytes")
            except (OSError, ValueError):
                os.close(self._fd)
                raise
        elif kind in ("memfd", "file"):
            if kind == "memfd":
                self._fd = os.memfd_create(self.name.encode()[:249].decode(errors="ignore") or "ram",
                                           os.MFD_CLOEXEC)
            else:
                try:
                    self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot open backing file {path!r} of RAM block "
                                             f"{self.name!r}: {exc.strerror}") from None
            try:
                if os.fstat(self._fd).st_size < self.size:
                    os.ftruncate(self._fd, self.size)
            except OSError:
                os.close(self._fd)
                raise
        try:
            # guard pages at both ends (mmap_alloc.py); the kernel's THP alignment kept
            mm = qemu_ram_mmap(RAMBlockMmap, self.size, fd=self._fd, shared=kind in ("shared", "memfd", "file"),
                               align_thp=self.hugepages and self.size % PMD_SIZE == 0)
        except OSError as exc:
            if self._fd >= 0:
                os.close(self._fd)
            raise OSError(exc.errno, f"cannot map {self.size} bytes for RAM block {self.name!r}: "
                                     f"{exc.strerror}") from None
        try:
            mm.madvise(mmap.MADV_DONTFORK)
            if self.hugepages:
                mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError as exc:
            mm.close()
            mm.unmap_guards()
            if self._fd >= 0:
                os.close(self._fd)
            raise OSError(exc.errno, f"madvise on new RAM block {self.name!r} failed: {exc.strerror}") from None
        return mm

    def _host_address(self) -> int:
        probe = np.frombuffer(self.mmap, dtype=np.uint8, count=1)
        address = int(probe.__array_interface__["data"][0])
        del probe
        return address

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"RAM block {self.name!r} is closed")

    # -- views --------------------------------------------------------------------------

    @property
    def array(self) -> np.ndarray:
        """The whole block as a writable uint8 numpy array (a view of the mmap)."""
        self._check_open()
        if self._array is None:
            self._array = np.frombuffer(self.mmap, dtype=np.uint8, count=self.size)
        return self._array

    @property
    def pages(self) -> np.ndarray:
        """The block as an ``(n_pages, page_size)`` uint8 view."""
        if self._pages is None:
            self._pages = self.array.reshape(self.n_pages, self.page_size)
        return self._pages

    def page(self, i: int) -> memoryview:
        """Return page ``i`` as a writable memoryview (``.obj`` is the block's mmap).
        Raises ValueError for an index outside the block."""
        self._check_open()
        if not 0 <= i < self.n_pages:
            raise ValueError(f"page index {i} out of range for RAM block {self.name!r} ({self.n_pages} pages)")
        if self._mv is None:
            self._mv = memoryview(self.mmap)
        start = i * self.page_size
        return self._mv[start:start + self.page_size]

    # -- writes and dirty tracking --------------------------------------------------------

    def write(self, offset: int, data: Any) -> None:
        """Copy ``data`` (any C-contiguous buffer) to byte ``offset`` and mark the pages it
        touches dirty.  Raises ValueError, writing nothing, if it would leave the block."""
        try:
            src = np.frombuffer(data, dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"data written to RAM block {self.name!r} must be a contiguous buffer: {exc}") from None
        n = src.size
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"write of {n} bytes at offset {offset} is outside RAM block {self.name!r} "
                             f"(size {self.size})")
        self.array[offset:offset + n] = src
        self._dirty.mark_range(offset, n, self.page_size)

    def touch(self, pages: Any) -> None:
        """Change one byte (the first, incremented mod 256) of each page in ``pages``
        (index, slice, index array or bool mask) and mark them dirty; one numpy
        operation per call.  Raises ValueError for indices outside the block."""
        sel = page_selector(pages, self.n_pages, self.name)
        self.pages[sel, 0] += np.uint8(1)
        self._dirty.mark(sel)

    def sha256(self) -> str:
        """The sha256 hex digest of the block's bytes (hashlib releases the GIL while
        hashing, so a migration thread keeps running)."""
        self._check_open()
        return hashlib.sha256(self.array).hexdigest()

    def scribble(self, pages: Any, nbytes: int, rng: np.random.Generator) -> None:
        """Overwrite ``nbytes`` consecutive bytes at a random offset of each page in
        ``pages`` with random bytes (a guest write of that size), and mark the pages
        dirty; vectorised.  Raises ValueError for ``nbytes`` outside 1..page_size or
        indices outside the block."""
        if not 1 <= nbytes <= self.page_size:
            raise ValueError(f"write size {nbytes} for RAM block {self.name!r} is not in 1..{self.page_size}")
        sel = page_selector(pages, self.n_pages, self.name)
        idx = np.arange(self.n_pages)[sel] if isinstance(sel, slice) else sel
        offsets = rng.integers(0, self.page_size - nbytes + 1, idx.size)
        cols = offsets[:, None] + np.arange(nbytes)
        self.pages[idx[:, None], cols] = rng.integers(0, 256, (idx.size, nbytes), dtype=np.uint8)
        self._dirty.mark(idx)

    def fill(self, pages: Any, value: int) -> None:
        """Set every byte of ``pages`` to ``value`` (0..255) and mark them dirty.
        Raises ValueError for a bad value or indices outside the block."""
        if not 0 <= int(value) <= 255:
            raise ValueError(f"fill value {value} for RAM block {self.name!r} is not a byte")
        sel = page_selector(pages, self.n_pages, self.name)
        self.pages[sel] = np.uint8(value)
        self._dirty.mark(sel)

    def mark_dirty(self, pages: Any) -> None:
        """Mark ``pages`` dirty without writing (for writes made behind the API's back)."""
        self._dirty.mark(pages)

    @property
    def dirty(self) -> np.ndarray:
        """The live dirty bitmap (numpy bool, one per page); prefer ``sync_dirty``."""
        return self._dirty.bits

    def sync_dirty(self, source: str = "bitmap") -> np.ndarray:
        """Return the int64 indices of the pages dirtied since the last sync and clear them.

        ``source="bitmap"``: the block's own bitmap (writes through this API), atomic
        with respect to concurrent marks.  ``source="soft-dirty"``: the kernel's
        soft-dirty bits, which see every write by this process; clearing them is
        process-wide, and a write between the read and the clear is lost (the race KVM's
        dirty log avoids), so prefer GuestRAM.sync_dirty for several blocks.  Raises
        SoftDirtyUnsupported (saying why) where the kernel lacks soft-dirty, ValueError
        for an unknown source."""
        self._check_open()
        if source == "bitmap":
            return self._dirty.sync()
        if source != "soft-dirty":
            raise ValueError(f"unknown dirty source {source!r} (choose bitmap or soft-dirty)")
        residency.require_soft_dirty()
        idx = self.soft_dirty_pages()
        residency.clear_soft_dirty()
        return idx

    def soft_dirty_pages(self) -> np.ndarray:
        """Return the int64 indices of pages whose soft-dirty bit is set (no clearing).
        Raises SoftDirtyUnsupported where the kernel lacks soft-dirty."""
        residency.require_soft_dirty()
        host = (residency.read_pagemap(self.address, self.size) & residency.PM_SOFT_DIRTY) != 0
        return np.flatnonzero(residency.per_target_page(host, self.page_size, self.n_pages)).astype(np.int64)

    # -- release ------------------------------------------------------------------------

    @property
    def advice(self) -> str:
        """The release primitive used by ``release`` and by QEMUFile (settable)."""
        return self.mmap.advice

    @advice.setter
    def advice(self, value: str | None) -> None:
        self.mmap.advice = check_advice(DEFAULT_ADVICE[self.kind] if value is None else value, self.kind, self.name)

    @property
    def released_bytes(self) -> int:
        """Bytes released so far, by ``release`` and by QEMUFile together."""
        return self.mmap.released_bytes

    def release(self, ranges: Any, advice: str | None = None) -> int:
        """Release the whole host pages inside byte ``ranges`` (``(offset, length)`` pairs
        or an (N, 2) array).  Overlapping and adjacent ranges are coalesced first, so each
        run costs one syscall.  ``advice`` overrides the block's primitive for this call.

        Returns the number of bytes released.  Raises ValueError for a range outside the
        block or an unusable advice, OSError (naming the block) when the kernel refuses;
        runs before the failing one stay released."""
        self._check_open()
        how = None if advice is None else check_advice(advice, self.kind, self.name)
        runs = coalesce_runs(ranges, self.size, self.name)
        total = 0
        for start, length in runs.tolist():
            self.mmap.release_pages(start, length, how)
            total += length
        return total

    # -- residency ----------------------------------------------------------------------

    def resident_pages(self) -> np.ndarray:
        """Return a bool per page: does this mapping hold memory for it (pagemap)?

        Private blocks count present *and* exclusive pages, so a released page that was
        merely read (it maps the shared zero page) is not resident; shared ones count
        present pages.  Raises OSError if pagemap is unreadable."""
        self._check_open()
        pm = residency.read_pagemap(self.address, self.size)
        mask = residency.PM_PRESENT | residency.PM_EXCLUSIVE if self.kind == "private" else residency.PM_PRESENT
        return residency.per_target_page((pm & mask) == mask, self.page_size, self.n_pages)

    def cached_pages(self) -> np.ndarray:
        """Return a bool per page from mincore(2): for shared, memfd and file blocks, is
        the page still in shmem / the page cache (i.e. not freed)?  For private blocks,
        is it mapped.  Raises OSError from mincore."""
        self._check_open()
        return residency.per_target_page(residency.mincore(self.address, self.size), self.page_size, self.n_pages)

    def rss_bytes(self) -> dict[str, int]:
        """Return this mapping's smaps fields in bytes (``Rss``, ``Anonymous``,
        ``LazyFree``, ``Shared_Dirty``, ``AnonHugePages``, ...) plus ``exact`` (1 when
        the VMA is exactly this block).  Raises OSError/LookupError if smaps is unreadable."""
        self._check_open()
        return residency.smaps_fields(self.address, self.address + self.size)

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the block and its guard pages and close its fd (a file backing's file is
        kept).  Idempotent.

        Raises RAMBlockInUseError, leaving the block open and usable, while numpy arrays
        or memoryviews of it are alive elsewhere (e.g. queued in a QEMUFile)."""
        if self._closed:
            return
        self._array = self._pages = None
        if self._mv is not None:
            try:
                self._mv.release()
            except BufferError:
                pass  # views exported from it: mmap.close below reports them
            self._mv = None
        try:
            self.mmap.close()
        except BufferError:
            # Views that only garbage cycles still hold (an exception's traceback frames, a
            # finished thread's closure) die with a collection; views another thread holds for
            # a moment (seen: Dask's statistical profiler, which walks a running task's frames
            # every 10 ms on the worker's event loop) are gone within milliseconds.  Collect,
            # then retry briefly (0.13 s at most) before refusing.
            gc.collect()
            for delay in CLOSE_RETRY_DELAYS:
                time.sleep(delay)
                try:
                    self.mmap.close()
                    break
                except BufferError:
                    continue
            else:
                raise RAMBlockInUseError(
                    f"cannot close RAM block {self.name!r}: numpy arrays or memoryviews of it are still alive; "
                    "drop them (and flush any QEMUFile holding its pages) first") from None
        self.mmap.unmap_guards()
        self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> RAMBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"offset={self.offset:#x}"
        return f"RAMBlock({self.name!r}, size={self.size}, backing={self.backing!r}, {state})"


def _close_fd(fd: int) -> None:
    if fd >= 0:
        os.close(fd)
