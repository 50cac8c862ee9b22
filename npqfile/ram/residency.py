"""Measuring where guest RAM really is: pagemap, smaps, mincore, soft-dirty, process RSS.

Supports: ``read_pagemap(address, length)`` (one uint64 per host page), the pagemap bit
masks, ``smaps_fields(start, end)`` (the kB fields of the VMAs covering a range, in
bytes), ``mincore(address, length)``, ``per_target_page`` (host-page bits to target-page
bits), ``process_rss()`` and soft-dirty support detection (``soft_dirty_supported``,
``soft_dirty_reason``, ``clear_soft_dirty``, ``SoftDirtyUnsupported``).

Goals: measure, never assume (F6, F7).  Costs and pitfalls, measured here for 256 MiB:
  * pagemap: 2.1 ms (8 bytes per host page).  Bit 63 "present" is also set for a private
    page that was only *read* after release: it maps the shared zero page, which costs
    no memory; bit 56 "exclusive" tells the two apart, so private residency is
    present & exclusive.  A page shared with a forked child is not exclusive either (QEMU
    and RAMBlock use MADV_DONTFORK, so that case does not arise for our blocks).  For
    shared mappings "present" only says this mapping has a PTE: after DONTNEED the page
    is gone from pagemap yet still allocated in shmem or the page cache.
  * mincore: 0.11 ms, but for shared/file mappings it reports page-*cache* residency:
    the only cheap way to see that DONTNEED on a shared mapping freed nothing.
  * smaps: 3.1 ms (the kernel walks every VMA of the process).  ``Rss`` counts this
    mapping's pages; ``Anonymous`` only anonymous ones (``Private_Dirty`` also counts
    dirty shmem/file pages); ``LazyFree`` is the only place MADV_FREE shows.  Adjacent
    anonymous VMAs with equal flags merge, so the VMA may be larger than the block:
    ``smaps_fields`` reports ``exact`` for that (RAMBlock prevents it with guard pages, see mmap_alloc.py).
  * psutil ``memory_info().rss`` (statm) is 0.01 ms but process-wide, and includes
    shmem/file pages mapped by the process (RssShmem/RssFile).
  * Re-reading released pages to check their contents faults them back in: shmem and
    file holes get fresh zero pages (RSS rises again), so measure RSS first.
  * Soft-dirty needs CONFIG_MEM_SOFT_DIRTY (off on this machine's kernel, F8); clearing
    it (``echo 4 > /proc/self/clear_refs``) is process-wide.

Plan: plain functions over addresses; RAMBlock wraps them per block.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
from functools import lru_cache
from typing import Any

import numpy as np

HOST_PAGE_SIZE: int = mmap.PAGESIZE

PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PM_FILE = np.uint64(1 << 61)          # file page or shared anonymous
PM_EXCLUSIVE = np.uint64(1 << 56)     # mapped exactly once
PM_SOFT_DIRTY = np.uint64(1 << 55)

_libc = ctypes.CDLL(None, use_errno=True)
_mincore = _libc.mincore
_mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_mincore.restype = ctypes.c_int

_VMA_HEADER = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ", re.M)
_FIELD = re.compile(rb"^(\w+):\s+(\d+) kB$", re.M)


def n_host_pages(length: int) -> int:
    """Return the number of host pages that ``length`` bytes occupy (rounded up)."""
    return -(-length // HOST_PAGE_SIZE)


def read_pagemap(address: int, length: int) -> np.ndarray:
    """Return the ``/proc/self/pagemap`` entries (uint64, one per host page) for the
    range starting at the page-aligned ``address``.  Raises OSError if pagemap cannot be
    read (e.g. no procfs)."""
    n = n_host_pages(length)
    want = n * 8
    out = bytearray(want)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        got = 0
        while got < want:
            chunk = os.pread(fd, want - got, (address // HOST_PAGE_SIZE) * 8 + got)
            if not chunk:
                raise OSError(f"short read of /proc/self/pagemap at address {address:#x}")
            out[got:got + len(chunk)] = chunk
            got += len(chunk)
    finally:
        os.close(fd)
    return np.frombuffer(out, dtype=np.uint64)


def mincore(address: int, length: int) -> np.ndarray:
    """Return a bool per host page: is it resident (page cache for shared/file mappings,
    mapped for private anonymous ones)?  Raises OSError from mincore(2)."""
    vec = np.zeros(n_host_pages(length), dtype=np.uint8)
    if _mincore(address, length, vec.ctypes.data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore at {address:#x}: {os.strerror(err)}")
    return (vec & 1).astype(np.bool_)


def per_target_page(host_bits: np.ndarray, page_size: int, n_pages: int) -> np.ndarray:
    """Map one bool per host page to one bool per target page of ``page_size`` bytes:
    a target page larger than a host page is set if any of its host pages is; a smaller
    one inherits its host page's bit.  Returns a bool array of length ``n_pages``."""
    if page_size == HOST_PAGE_SIZE:
        return host_bits[:n_pages]
    if page_size > HOST_PAGE_SIZE:
        r = page_size // HOST_PAGE_SIZE
        return host_bits[:n_pages * r].reshape(n_pages, r).any(axis=1)
    return np.repeat(host_bits, HOST_PAGE_SIZE // page_size)[:n_pages]


def smaps_fields(start: int, end: int) -> dict[str, int]:
    """Return the smaps kB fields (in bytes) summed over the VMAs overlapping
    ``[start, end)``, plus ``vma_start``/``vma_end`` (their union) and ``exact``: 1 if
    those VMAs cover exactly the range, 0 if a merged neighbour is included.
    Raises LookupError naming the address when no VMA overlaps."""
    with open("/proc/self/smaps", "rb") as fh:
        text = fh.read()
    heads = list(_VMA_HEADER.finditer(text))
    out: dict[str, int] = {}
    lo = hi = None
    for i, head in enumerate(heads):
        s, e = int(head.group(1), 16), int(head.group(2), 16)
        if e <= start or s >= end:
            continue
        lo = s if lo is None else min(lo, s)
        hi = e if hi is None else max(hi, e)
        body_end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        for m in _FIELD.finditer(text, head.end(), body_end):
            key = m.group(1).decode()
            out[key] = out.get(key, 0) + int(m.group(2)) * 1024
    if lo is None:
        raise LookupError(f"no mapping at {start:#x} in /proc/self/smaps")
    out["vma_start"], out["vma_end"] = lo, hi
    out["exact"] = int(lo == start and hi == start + n_host_pages(end - start) * HOST_PAGE_SIZE)
    return out


@lru_cache(maxsize=1)
def _process() -> Any:
    import psutil   # here, not at import: 10 ms that `npqfile save` and `incoming` never need
    return psutil.Process()


def process_rss() -> int:
    """Return this process's resident set size in bytes (psutil, from statm: cheap)."""
    return int(_process().memory_info().rss)


class SoftDirtyUnsupported(RuntimeError):
    """The kernel cannot track soft-dirty pages (the message says why)."""


def clear_soft_dirty() -> None:
    """Clear the soft-dirty bit of every page of this process (``4`` to clear_refs).
    Raises OSError if procfs refuses the write."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("4")


def _probe_soft_dirty() -> str | None:
    """Return None when soft-dirty works, else the reason it does not."""
    probe = mmap.mmap(-1, HOST_PAGE_SIZE, flags=mmap.MAP_PRIVATE)
    try:
        view = (ctypes.c_char * HOST_PAGE_SIZE).from_buffer(probe)
        address = ctypes.addressof(view)
        del view
        probe[0] = 1
        if not read_pagemap(address, HOST_PAGE_SIZE)[0] & PM_SOFT_DIRTY:
            return ("pagemap bit 55 (soft-dirty) stayed 0 after a write: this kernel was built "
                    "without CONFIG_MEM_SOFT_DIRTY")
        try:
            clear_soft_dirty()
        except OSError as exc:
            return f"cannot write /proc/self/clear_refs: {exc}"
        if read_pagemap(address, HOST_PAGE_SIZE)[0] & PM_SOFT_DIRTY:
            return "writing 4 to /proc/self/clear_refs did not clear pagemap bit 55"
        probe[0] = 2
        if not read_pagemap(address, HOST_PAGE_SIZE)[0] & PM_SOFT_DIRTY:
            return "pagemap bit 55 was not set again by a write after clear_refs"
        return None
    except OSError as exc:
        return f"cannot read /proc/self/pagemap: {exc}"
    finally:
        probe.close()


@lru_cache(maxsize=1)
def soft_dirty_reason() -> str | None:
    """Return None if soft-dirty tracking works here, else why not (probed once with a
    one-page mapping: write, check bit 55, clear, check, write, check)."""
    return _probe_soft_dirty()


def soft_dirty_supported() -> bool:
    """Return True if the kernel tracks soft-dirty pages (see ``soft_dirty_reason``)."""
    return soft_dirty_reason() is None


def require_soft_dirty() -> None:
    """Return None if soft-dirty works; raise SoftDirtyUnsupported naming why otherwise."""
    reason = soft_dirty_reason()
    if reason is not None:
        raise SoftDirtyUnsupported(f"soft-dirty tracking unavailable: {reason}; "
                                   "use the block's dirty bitmap (source='bitmap')")
