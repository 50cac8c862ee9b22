"""GuestRAM: the list of RAM blocks of one guest, with QEMU-style ram_addr_t offsets.

Supports: ``GuestRAM(blocks)``, ``add``/``add_block``, lookup by idstr (``block``),
iteration in insertion order (QEMU's ram_list order, which is the order the stream's
MEM_SIZE record lists them), ``total_size`` (ram_bytes_total: sum of used_length),
``block_at(ram_addr)``, ``view(ram_addr, length)``, ``sync_dirty`` over all blocks,
``close`` and the context-manager protocol.

Goals: offsets laid out as QEMU's find_ram_offset does for blocks added one after the
other: the first block at 0, each next one after the previous end rounded up to
64 pages (BITS_PER_LONG << TARGET_PAGE_BITS, so a dirty-bitmap word never spans two
blocks).  A ram_addr_t range is only meaningful inside one block, so ``view`` refuses a
range that crosses a block boundary, naming both blocks, instead of returning bytes
from two unrelated mappings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from . import residency
from .block import RAMBlock, RAMBlockInUseError

BITS_PER_LONG = 64


class GuestRAM:
    """An ordered set of uniquely named RAMBlocks; see the module docstring."""

    def __init__(self, blocks: Iterable[RAMBlock] = ()) -> None:
        self._blocks: list[RAMBlock] = []
        self._by_name: dict[str, RAMBlock] = {}
        for b in blocks:
            self.add(b)

    def add(self, block: RAMBlock) -> RAMBlock:
        """Append ``block``, giving it the next ram_addr_t offset; returns it.  Raises
        ValueError for a duplicate idstr, a closed block or one already in a GuestRAM."""
        if block.name in self._by_name:
            raise ValueError(f"duplicate RAM block name {block.name!r}")
        if block.closed:
            raise ValueError(f"RAM block {block.name!r} is closed")
        if block._owner is not None:
            raise ValueError(f"RAM block {block.name!r} already belongs to a GuestRAM")
        if self._blocks:
            last = self._blocks[-1]
            align = BITS_PER_LONG * block.page_size
            block.offset = -(-(last.offset + last.size) // align) * align
        else:
            block.offset = 0
        block._owner = self
        self._blocks.append(block)
        self._by_name[block.name] = block
        return block

    def add_block(self, name: str, size: int, **kwargs: Any) -> RAMBlock:
        """Create ``RAMBlock(name, size, **kwargs)`` and add it; returns the block.
        Raises like RAMBlock() and add() (a duplicate name is refused before mapping)."""
        if name in self._by_name:
            raise ValueError(f"duplicate RAM block name {name!r}")
        return self.add(RAMBlock(name, size, **kwargs))

    @property
    def blocks(self) -> list[RAMBlock]:
        """The blocks in ram_list order (a new list)."""
        return list(self._blocks)

    def block(self, name: str) -> RAMBlock:
        """Return the block with idstr ``name``; KeyError naming it otherwise."""
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._by_name) or "none"
            raise KeyError(f"no RAM block named {name!r} (blocks: {known})") from None

    def __iter__(self) -> Iterator[RAMBlock]:
        return iter(list(self._blocks))

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def total_size(self) -> int:
        """Sum of the blocks' used_length (QEMU ram_bytes_total, the MEM_SIZE value)."""
        return sum(b.size for b in self._blocks)

    def block_at(self, ram_addr: int) -> tuple[RAMBlock, int]:
        """Return ``(block, offset_in_block)`` for a ram_addr_t.  Raises ValueError when
        the address lies in no block (e.g. in the alignment gap between two)."""
        for b in self._blocks:
            if b.offset <= ram_addr < b.offset + b.size:
                return b, ram_addr - b.offset
        raise ValueError(f"ram_addr {ram_addr:#x} is not inside any RAM block")

    def view(self, ram_addr: int, length: int) -> np.ndarray:
        """Return a uint8 numpy view of ``length`` bytes at ``ram_addr`` (no copy).
        Raises ValueError when the range leaves its block, naming both blocks when it
        would straddle two (each block is its own mapping: no contiguous view exists)."""
        block, off = self.block_at(ram_addr)
        if length < 0:
            raise ValueError(f"negative length {length} for a view of RAM block {block.name!r}")
        if off + length > block.size:
            end = ram_addr + length - 1
            try:
                other, _ = self.block_at(end)
                where = f"RAM blocks {block.name!r} and {other.name!r}"
            except ValueError:
                where = f"the end of RAM block {block.name!r}"
            raise ValueError(f"range ram_addr {ram_addr:#x} length {length} straddles {where}; "
                             "views must stay inside one block")
        return block.array[off:off + length]

    def sync_dirty(self, source: str = "bitmap") -> dict[str, np.ndarray]:
        """Return ``{name: dirty page indices}`` for every block and clear them.
        With ``source="soft-dirty"`` all blocks are read first and the process-wide
        soft-dirty bits cleared once.  Raises like RAMBlock.sync_dirty."""
        if source != "soft-dirty":
            return {b.name: b.sync_dirty(source) for b in self._blocks}
        residency.require_soft_dirty()
        out = {b.name: b.soft_dirty_pages() for b in self._blocks}
        residency.clear_soft_dirty()
        return out

    def close(self) -> None:
        """Close every block.  Raises RAMBlockInUseError naming the blocks that still
        have live views; the others are closed."""
        busy = []
        for b in self._blocks:
            try:
                b.close()
            except RAMBlockInUseError:
                busy.append(b.name)
        if busy:
            raise RAMBlockInUseError(f"cannot close RAM blocks {', '.join(map(repr, busy))}: "
                                     "numpy arrays or memoryviews of them are still alive")

    def __enter__(self) -> GuestRAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GuestRAM({[b.name for b in self._blocks]}, total_size={self.total_size})"
