"""Caller memory as QEMUFile and the channels see it: flat byte views, owners, addresses.

Supports: ``flat_bytes`` (any C-contiguous buffer as a 1-D unsigned-byte memoryview,
no copy), ``nbytes`` (its size), ``root_of`` (the object that owns the memory behind a
view: an mmap for guest RAM, found through memoryview.obj and ndarray.base),
``address_of`` (the address of a view's first byte), ``span_of`` (one view over a run
of memory inside a root) and ``PageRun`` (pages of one buffer at given offsets, as a
sequence of views that native iovec writes can address without making them).

Goals: QEMU compares iovec pointers to coalesce adjacent buffers and passes raw ranges
to madvise; Python has no pointers, so these answer the same questions for memoryviews
and numpy views -- cheaply, because they sit on the per-page path.  Plan: plain
functions; addresses through ctypes (writable buffers, ~0.2 us) or numpy (read-only).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

__all__ = ["flat_bytes", "nbytes", "root_of", "address_of", "span_of", "flat_or_none", "PageRun"]


def nbytes(buf: Any) -> int:
    """Size in bytes of a buffer object (``len`` is wrong for multi-dimensional or non-byte arrays)."""
    kind = type(buf)
    if kind is memoryview or kind is np.ndarray:
        return buf.nbytes
    if kind is bytes or kind is bytearray:
        return len(buf)
    return memoryview(buf).nbytes


def flat_bytes(buf: Any) -> memoryview:
    """A 1-D unsigned-byte memoryview over ``buf`` without copying.

    Raises ValueError if ``buf`` is not C-contiguous (the kernel needs one run of memory
    per iovec), TypeError if it is not a buffer at all."""
    view = buf if type(buf) is memoryview else memoryview(buf)
    if view.ndim == 1 and view.format == "B":
        return view
    if not view.c_contiguous:
        raise ValueError(f"buffer is not C-contiguous (shape {view.shape}, strides {view.strides})")
    return view.cast("B")


def flat_or_none(root: Any) -> memoryview | None:
    """``flat_bytes(root)``, or None when ``root`` has no flat view (e.g. a Fortran-ordered owner)."""
    try:
        return flat_bytes(root)
    except (TypeError, ValueError):
        return None


def root_of(mv: memoryview) -> Any:
    """The object that owns the memory behind ``mv`` (an mmap for guest RAM).

    Follows memoryview.obj and ndarray.base, so a numpy view of a memoryview slice of
    an mmap resolves to the mmap.
    """
    obj = mv.obj
    while True:
        if type(obj) is memoryview:
            obj = obj.obj
        elif isinstance(obj, np.ndarray) and obj.base is not None:
            obj = obj.base
        else:
            return obj


def address_of(mv: memoryview) -> int:
    """Address of the first byte of ``mv`` (a flat, C-contiguous memoryview)."""
    if not mv.readonly and mv.nbytes:
        return ctypes.addressof(ctypes.c_char.from_buffer(mv))
    return np.frombuffer(mv, dtype=np.uint8).__array_interface__["data"][0]


def span_of(root: Any, start: int, length: int) -> memoryview:
    """The view of ``length`` bytes at address ``start`` inside ``root``'s memory: one
    iovec for a run of adjacent async buffers, as QEMU's coalescing makes."""
    whole = flat_bytes(root)
    base = address_of(whole)
    return whole[start - base:start - base + length]


class PageRun:
    """Pages of one buffer as a sequence: item ``k`` is ``memory[offsets[k]:offsets[k] + page_size]``
    (a memoryview), a slice is a list of them.  ``QEMUFile.put_records`` takes it in place of
    a list of page views; on a channel with native iovecs its whole flush cycles then go out
    without a Python object per page (the addresses are ``base + offsets``).

    ``memory`` is any C-contiguous buffer (guest RAM: a block's mmap or numpy view of it);
    ``offsets`` byte offsets into it.  ValueError when a page would reach outside ``memory``
    or ``page_size`` is not positive: nothing outside the buffer is ever addressed."""

    __slots__ = ("memory", "offsets", "page_size", "_flat")

    def __init__(self, memory: Any, offsets: Any, page_size: int) -> None:
        flat = flat_bytes(memory)
        offs = np.asarray(offsets)
        if offs.ndim != 1 or offs.size and offs.dtype.kind not in "iu":
            raise ValueError("PageRun offsets must be a 1-d array of integers")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, not {page_size}")
        # A read-only copy, checked: native writes address base + offsets, so the caller's
        # array changing after this check must not move a page outside ``memory``.  (A
        # negative offset wraps to a huge uint64: the max check catches it too.)
        owned = offs.astype(np.uint64)
        owned.flags.writeable = False
        if offs.size and (int(offs.min()) < 0 or int(owned.max()) + page_size > flat.nbytes):
            raise ValueError(f"PageRun pages reach outside the {flat.nbytes}-byte buffer "
                             f"(offsets {int(offs.min())}..{int(offs.max())}, page size {page_size})")
        self.memory = memory
        self.offsets = owned
        self.page_size = page_size
        self._flat = flat

    def __len__(self) -> int:
        return self.offsets.size

    def __getitem__(self, k: Any) -> Any:
        flat, ps = self._flat, self.page_size
        if isinstance(k, slice):
            return [flat[o:o + ps] for o in self.offsets[k].tolist()]
        o = int(self.offsets[k])
        return flat[o:o + ps]

    def address(self) -> int:
        """Address of ``memory``'s first byte (valid while the caller keeps ``memory`` mapped)."""
        return address_of(self._flat)
