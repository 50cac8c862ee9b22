"""Mapping guest RAM with guard pages: QEMU's ``qemu_ram_mmap`` (util/mmap-alloc.c).

Supports: ``qemu_ram_mmap(cls, size, fd=..., shared=..., align_thp=...)``, which returns a
new ``cls`` (an ``mmap.mmap`` subclass, RAMBlockMmap) of exactly ``size`` bytes whose
mapping has a PROT_NONE guard page right below and right above it, for every backing
(anonymous private or shared, or an fd mapped shared or private); ``munmap_guards``.

Goals: no other mapping is ever adjacent to a RAM block, so the kernel can never merge a
block's VMA with a neighbour (a merged VMA makes smaps report two mappings as one, and
flag changes such as MADV_NOHUGEPAGE then apply to both).  Why merges happened before:
a fresh block used to fault one page to get "its own" anon_vma, but the kernel's
``find_mergeable_anon_vma`` hands a faulting VMA the anon_vma of an adjacent compatible
VMA instead -- e.g. one of Python's 1 MiB obmalloc arenas, which merge into one VMA with
one anon_vma.  Two blocks placed in a hole between pieces of that arena VMA both reuse its
anon_vma; after their madvises they have equal flags and the same anon_vma, so the second
block's madvise merges it into the first.  QEMU keeps a guard page after each block; we
keep one at both ends, so each block's only neighbours are its own PROT_NONE guards:
they have different protections (no VMA merge) and never an anon_vma (nothing to reuse).
The block's own mapping, its size, its views and everything measured on it are unchanged,
and a block whose size is a multiple of the PMD size keeps the 2 MiB alignment the
kernel gives such anonymous mappings (transparent huge pages cover all of it).

Plan: Python's mmap takes no address, so it cannot be mapped into a reservation as QEMU
does.  Instead ``cls`` is created as an anonymous placeholder a little larger than the
block (by the PMD size when aligning, so the kernel aligns it; else by a page), shrunk
with ``mmap.resize`` (mremap in place, keeping the object's address), and the guards are
put with MAP_FIXED_NOREPLACE (never over anyone's mapping) right below the block and in
the tail the shrink freed.  Where a slot is taken (a hole exactly the placeholder's size,
or another thread mapping between the calls) that placeholder is kept aside while the
next one is tried, so the kernel places it elsewhere; they are unmapped at the end.  Then
the real backing (shared anonymous, memfd, file) is mapped MAP_FIXED over the placeholder
-- our own range.  The guards are unmapped once: by the object's ``unmap_guards`` (a
``weakref.finalize`` that RAMBlock.close calls after closing the mapping) or when the
object is garbage collected.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import weakref
from typing import TypeVar

HOST_PAGE_SIZE: int = mmap.PAGESIZE
GUARD_SIZE: int = HOST_PAGE_SIZE      # one page at each end (QEMU: one after the block)
PLACEMENT_ATTEMPTS = 16               # placeholders tried (a slot is taken only by a hole of the exact size or a race)

PROT_NONE = 0                         # absent from Python 3.11's mmap module
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000                # absent from Python 3.11's mmap module too
MAP_FIXED_NOREPLACE = 0x100000        # Linux 4.17; older kernels treat it as a hint (checked below)


def _pmd_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 2 << 20


PMD_SIZE: int = _pmd_size()

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value

M = TypeVar("M", bound=mmap.mmap)


def _map_at(address: int, length: int, prot: int, flags: int, fd: int = -1) -> int:
    """mmap(2) at ``address``; return 0 if a NOREPLACE request found the range taken,
    else the address.  Raises OSError with the kernel's errno otherwise."""
    got = _mmap(address, length, prot, flags, fd, 0)
    if got == _MAP_FAILED or got is None:
        err = ctypes.get_errno()
        if err == errno.EEXIST and flags & MAP_FIXED_NOREPLACE:
            return 0
        raise OSError(err, f"mmap of {length} bytes at {address:#x}: {os.strerror(err)}")
    if got != address:      # a kernel before 4.17 took NOREPLACE as a hint: not our slot
        _munmap(got, length)
        return 0
    return got


def munmap_guards(guards: tuple[tuple[int, int], ...]) -> None:
    """Unmap the guard ranges ``(address, length)`` (the caller's own: run once).  Returns
    None; munmap only fails for a bad range, which these never are."""
    for address, length in guards:
        _munmap(address, length)


def _address(mm: mmap.mmap) -> int:
    view = (ctypes.c_char * 1).from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _place(cls: type[M], size: int, align_thp: bool, placeholder_flags: int) -> tuple[M, tuple[tuple[int, int], ...]]:
    """One attempt: a placeholder of ``cls`` shrunk to ``size``, with both guards mapped.
    Returns ``(mm, guards)`` or ``(mm, ())`` when a guard slot was taken (the caller keeps
    that ``mm`` aside and retries).  Raises OSError, nothing left mapped, when the kernel
    refuses a mapping."""
    extra = PMD_SIZE if align_thp else GUARD_SIZE
    mm = cls(-1, size + extra, flags=placeholder_flags)
    below = 0
    try:
        mm.resize(size)                  # mremap in place: frees the tail for the upper guard
        start = _address(mm)
        anon = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
        below = _map_at(start - GUARD_SIZE, GUARD_SIZE, PROT_NONE, anon)
        above = _map_at(start + size, GUARD_SIZE, PROT_NONE, anon) if below else 0
    except BaseException:
        if below:
            _munmap(below, GUARD_SIZE)
        mm.close()
        raise
    if not above:
        if below:
            _munmap(below, GUARD_SIZE)
        return mm, ()
    return mm, ((below, GUARD_SIZE), (above, GUARD_SIZE))


def qemu_ram_mmap(cls: type[M], size: int, *, fd: int = -1, shared: bool = False,
                  align_thp: bool = False) -> M:
    """Map ``size`` bytes (a multiple of the host page size) of guest RAM between two
    PROT_NONE guard pages, as a new ``cls`` instance covering exactly the block.

    ``fd`` -1 maps anonymous memory, else the file from offset 0 (the caller checked its
    size); ``shared`` chooses MAP_SHARED over MAP_PRIVATE.  ``align_thp`` (for a size
    that is a multiple of the PMD size) lets the kernel align the block for transparent
    huge pages.  The returned object has ``guards`` (the ``(address, length)`` pairs)
    and ``unmap_guards`` (call once the mapping is closed; it also runs when the object
    is collected).  Raises OSError, with nothing left mapped, when the kernel refuses a
    mapping or no placement is found."""
    kept: list[M] = []
    # a placeholder another backing replaces is never used: no commit charge for it
    placeholder_flags = mmap.MAP_PRIVATE | (MAP_NORESERVE if fd >= 0 or shared else 0)
    try:
        for _ in range(PLACEMENT_ATTEMPTS):
            mm, guards = _place(cls, size, align_thp, placeholder_flags)
            if guards:
                break
            kept.append(mm)
        else:
            raise OSError(errno.ENOMEM, f"no room for a {size}-byte RAM mapping with guard pages "
                                        f"after {PLACEMENT_ATTEMPTS} attempts")
    finally:
        for other in kept:
            other.close()
    mm.guards = guards                   # type: ignore[attr-defined]
    mm.unmap_guards = weakref.finalize(mm, munmap_guards, guards)   # type: ignore[attr-defined]
    if fd < 0 and not shared:
        return mm                        # the placeholder is the private anonymous block itself
    start = _address(mm)
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | MAP_FIXED
    if fd < 0:
        flags |= mmap.MAP_ANONYMOUS
    try:
        _map_at(start, size, rw, flags, fd)      # over our own placeholder
    except OSError:
        # A failed MAP_FIXED may have unmapped the placeholder: cover the range again so
        # closing the object unmaps only ours.
        try:
            _map_at(start, size, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)
        finally:
            mm.close()
            mm.unmap_guards()
        raise
    return mm
