"""Dirty-page tracking for one RAM block: a numpy bitmap and QEMU's sync semantics.

Supports: ``DirtyBitmap(n_pages)`` with ``mark(pages)``, ``mark_range(offset, length,
page_size)``, ``sync()`` (return the dirty page indices and clear them, as QEMU's
``migration_bitmap_sync`` hands the pages dirtied since the last sync to the migration
thread) and ``count()``; ``page_selector`` turns what users pass as "pages" (an int,
a slice, a range, an index array, a bool mask) into a validated numpy index.

Goals: vectorised (marking a million pages is one numpy assignment); safe against a
writer thread and a migration thread sharing the bitmap: ``mark`` and ``sync`` hold one
lock, so ``sync`` is atomic with respect to marks made through this API -- a mark lands
either in this sync's result or in the next one, never lost.  Writers must write the
data *before* marking (RAMBlock does): a sync between the write and the mark then only
defers the page to the next round, whereas mark-then-write could clear the bit before
the new bytes exist and lose the update.

Plan: a numpy bool array (one byte per page: faster to set by fancy index than packed
bits, and 1/4096 of the RAM it describes).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

PageSelector = slice | np.ndarray


def page_selector(pages: Any, n_pages: int, block: str) -> PageSelector:
    """Validate ``pages`` against ``n_pages`` and return a slice or an int64 index array.

    Accepts an int, a slice, a range, a sequence or array of ints, or a bool mask of
    length ``n_pages``.  Negative indices are refused rather than wrapped (a negative
    guest page number is a bug).  Raises ValueError naming the block and the bad index."""
    if isinstance(pages, slice):
        start, stop, step = pages.indices(n_pages)
        if (pages.start is not None and pages.start < 0) or (pages.stop is not None and pages.stop < 0):
            raise ValueError(f"negative page slice {pages} for RAM block {block!r}")
        return slice(start, stop, step)
    if isinstance(pages, range):
        pages = np.arange(pages.start, pages.stop, pages.step, dtype=np.int64)
    arr = np.asarray(pages)
    if arr.dtype == np.bool_:
        if arr.shape != (n_pages,):
            raise ValueError(f"page mask for RAM block {block!r} has shape {arr.shape}, expected ({n_pages},)")
        return np.flatnonzero(arr)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"page indices for RAM block {block!r} must be integers, not {arr.dtype}")
    idx = arr.astype(np.int64, copy=False).reshape(-1)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n_pages:
        bad = lo if lo < 0 else hi
        raise ValueError(f"page index {bad} out of range for RAM block {block!r} ({n_pages} pages)")
    return idx


class DirtyBitmap:
    """One dirty bit per target page, with a lock shared by ``mark`` and ``sync``."""

    def __init__(self, n_pages: int, block: str = "?") -> None:
        self.bits = np.zeros(n_pages, dtype=np.bool_)
        self.block = block
        self._lock = threading.Lock()

    @property
    def n_pages(self) -> int:
        return self.bits.size

    def mark(self, pages: Any) -> None:
        """Mark ``pages`` (see ``page_selector``) dirty.  Raises ValueError for bad indices."""
        sel = page_selector(pages, self.bits.size, self.block)
        with self._lock:
            self.bits[sel] = True

    def mark_range(self, offset: int, length: int, page_size: int) -> None:
        """Mark every page touched by bytes ``[offset, offset + length)`` dirty (no-op for
        ``length == 0``).  The caller has checked the range lies inside the block."""
        if length <= 0:
            return
        with self._lock:
            self.bits[offset // page_size:(offset + length - 1) // page_size + 1] = True

    def sync(self) -> np.ndarray:
        """Return the sorted int64 indices of the dirty pages and clear them, atomically
        with respect to ``mark``/``mark_range``."""
        with self._lock:
            idx = np.flatnonzero(self.bits)
            self.bits[idx] = False
        return idx.astype(np.int64, copy=False)

    def count(self) -> int:
        """Return the number of dirty pages (QEMU's migration_dirty_pages for this block)."""
        return int(np.count_nonzero(self.bits))
