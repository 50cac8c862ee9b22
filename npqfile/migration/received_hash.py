"""The sha256 of postcopy RAM as it was received, while the destination's guest rewrites it.

Supports :class:`ReceivedHashes`: the destination's guest calls ``first_touch(block, page)``
before it first writes a page; ``hashes()`` at the end gives each block's sha256 as
received (every page with the content it had when it arrived, whatever the guest wrote
since), the figure npqfile compares with the source's RAM at the switch;
``touched_pages`` counts the pages the guest touched (the report's
``guest-touched-pages``); ``kept_bytes`` is the memory it holds.

Goals: the very digest a sha256 of the block as received gives (the same verdict and the
same figure as hashing a copy of it), in memory bounded by about :data:`KEEP_BUDGET`
rather than a copy of every page the guest touches (up to the whole RAM again), and no
change to the migration: no page is read before it is present (a read of a missing page
would fault and ask the source for it) and the loader and fault threads do no extra work.

Plan: sha256 is fed in page order, so each block has a cursor: pages before it are hashed.
A page first touched at or after the cursor keeps its content until the cursor passes
it.  When the kept pages exceed KEEP_BUDGET, the guest's thread (the only writer of
present pages: the loader places only missing ones) moves the cursor over present pages
-- untouched ones hashed from RAM, touched ones from their kept content -- up to the
last kept page or the first missing one, and frees what it passed.  What stays kept
beyond the budget is only the touched pages behind a page that has not arrived yet;
they go as soon as it does.  Presence: pagemap for private RAM (a mapped page, zero
page included, never faults), mincore (page cache) for shared RAM.
"""

from __future__ import annotations

import ctypes
import hashlib
from typing import Any

import numpy as np

from npqfile.ram import residency

KEEP_BUDGET = 8 << 20       # bytes of first contents kept before the cursor is moved on


class _BlockHash:
    """One block's sha256 of pages ``[0, cursor)`` as received, the guest's touched pages,
    and the first content of those touched at or after the cursor (``kept``)."""

    __slots__ = ("block", "h", "cursor", "touched", "kept", "stalled")

    def __init__(self, block: Any):
        self.block = block
        self.h = hashlib.sha256()
        self.cursor = 0
        self.touched = np.zeros(block.n_pages, dtype=bool)
        self.kept: dict[int, bytes] = {}
        self.stalled = -1       # the missing page the cursor last stopped at

    def present(self, start: int, count: int) -> np.ndarray:
        """A bool per page of ``[start, start + count)``: will reading it not fault?"""
        b = self.block
        addr, length = b.address + start * b.page_size, count * b.page_size
        if b.kind == "private":
            bits = (residency.read_pagemap(addr, length) & residency.PM_PRESENT) != 0
        else:
            bits = residency.mincore(addr, length)
        return residency.per_target_page(bits, b.page_size, count)

    def feed(self, h: Any, start: int, end: int, *, drop: bool) -> None:
        """Hash pages ``[start, end)`` into ``h``: kept contents for touched pages, RAM for
        the others (which the guest has not written); ``drop`` frees the kept ones."""
        ps = self.block.page_size
        mv = memoryview(self.block.array)
        pos = start
        for p in sorted(p for p in self.kept if start <= p < end):
            h.update(mv[pos * ps:p * ps])
            h.update(self.kept.pop(p) if drop else self.kept[p])
            pos = p + 1
        h.update(mv[pos * ps:end * ps])


class ReceivedHashes:
    """sha256 of every block of ``ram`` as received (see the module docstring).
    ``received(name)`` may return a bool per page of the block placed since LISTEN (or
    None): a page the cursor stopped at is looked at again only once it is placed or
    touched.  Not thread-safe: ``first_touch`` from the guest's thread only, ``hashes``
    after the guest stopped."""

    def __init__(self, received: Any = None, budget: int | None = None):
        self._blocks: dict[str, _BlockHash] = {}
        self._received = received or (lambda name: None)
        self.budget = KEEP_BUDGET if budget is None else budget
        self.kept_bytes = 0

    @property
    def hashed_pages(self) -> int:
        """Pages hashed so far while the guest runs (the cursors' sum)."""
        return sum(s.cursor for s in self._blocks.values())

    @property
    def touched_pages(self) -> int:
        return sum(int(np.count_nonzero(s.touched)) for s in self._blocks.values())

    def first_touch(self, block: Any, page: int) -> None:
        """Before the guest's first write to ``page``: read it with the GIL released (a
        missing page blocks here until placed) and keep its content if the hash has not
        passed it yet.  Returns None.  Where pagemap / mincore cannot be read, it keeps
        every touched page's content (the unbounded fallback) rather than fail the guest."""
        st = self._blocks.get(block.name)
        if st is None:
            st = self._blocks[block.name] = _BlockHash(block)
        if st.touched[page]:
            return
        ps = block.page_size
        buf = ctypes.create_string_buffer(ps)
        ctypes.memmove(buf, block.address + page * ps, ps)
        st.touched[page] = True
        if page < st.cursor:
            return              # hashed already, from RAM, before the guest touched it
        st.kept[page] = buf.raw
        self.kept_bytes += ps
        if self.kept_bytes > self.budget:
            for s in self._blocks.values():
                if s.kept:
                    self._move_on(s)

    def _move_on(self, st: _BlockHash) -> None:
        """Move ``st``'s cursor over present pages up to its last kept page, freeing the
        kept pages it passes; stops at the first missing page."""
        if st.stalled >= 0:
            placed = self._received(st.block.name)
            if not st.touched[st.stalled] and (placed is None or not placed[st.stalled]):
                return          # still missing: nothing can move
        end = max(st.kept) + 1
        try:
            ok = st.present(st.cursor, end - st.cursor)
        except OSError:
            self.budget = float("inf")     # presence unknowable here: keep pages, as before
            return
        missing = np.flatnonzero(~ok)
        stop = st.cursor + int(missing[0]) if missing.size else end
        st.stalled = stop if missing.size else -1
        before = len(st.kept)
        st.feed(st.h, st.cursor, stop, drop=True)
        self.kept_bytes -= (before - len(st.kept)) * st.block.page_size
        st.cursor = stop

    def hashes(self, blocks: Any) -> dict[str, str]:
        """sha256 hex digest of each of ``blocks`` as received (RAM unregistered: a page
        that never arrived reads as zeros).  Returns {name: digest}; may be called again."""
        out = {}
        for b in blocks:
            st = self._blocks.get(b.name)
            if st is None:
                out[b.name] = hashlib.sha256(memoryview(b.array)).hexdigest()
                continue
            h = st.h.copy()
            st.feed(h, st.cursor, b.n_pages, drop=False)
            out[b.name] = h.hexdigest()
        return out
