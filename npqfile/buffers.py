"""Caller memory as QEMUFile and the channels see it: flat byte views, owners, addresses.

Supports: ``flat_bytes`` (any C-contiguous buffer as a 1-D unsigned-byte memoryview,
no copy), ``nbytes`` (its size), ``root_of`` (the object that owns the memory behind a
view: an mmap for guest RAM, found through memoryview.obj and ndarray.base),
``address_of`` (the address of a view's first byte) and ``span_of`` (one view over a run
of memory inside a root).

Goals: QEMU compares iovec pointers to coalesce adjacent buffers and passes raw ranges
to madvise; Python has no pointers, so these answer the same questions for memoryviews
and numpy views -- cheaply, because they sit on the per-page path.  Plan: plain
functions; addresses through ctypes (writable buffers, ~0.2 us) or numpy (read-only).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

__all__ = ["flat_bytes", "nbytes", "root_of", "address_of", "span_of", "flat_or_none"]


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
