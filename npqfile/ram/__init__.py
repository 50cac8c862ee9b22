"""Guest RAM: mmap'd RAM blocks seen through numpy, dirty tracking, real release, residency.

Supports: ``RAMBlock`` (one mapping: private / shared / memfd / file:PATH backing),
``GuestRAM`` (blocks with ram_addr_t offsets), ``DirtyBitmap``, the release primitives
(``ADVICES``, ``DEFAULT_ADVICE``, ``RAMBlockMmap.release_pages`` -- the hook QEMUFile's
release-ram path calls), and residency measurement (pagemap, mincore, smaps, psutil,
soft-dirty detection).
Goals: what QEMU's RAMBlock / ram_block_discard_range do, verified against the kernel
rather than assumed.  Plan: one concept per module -- ``block``, ``mmap_alloc`` (guard
pages), ``guest``, ``dirty``, ``release``, ``residency`` -- re-exported here.
"""

from __future__ import annotations

from .block import IDSTR_MAX, RAMBlock, RAMBlockInUseError, parse_backing
from .dirty import DirtyBitmap, page_selector
from .guest import GuestRAM
from .release import (ADVICES, DEFAULT_ADVICE, HOST_PAGE_SIZE, MADV_COLD, MADV_PAGEOUT, RAMBlockMmap,
                      coalesce_runs, punch_hole)
from .residency import (SoftDirtyUnsupported, mincore, process_rss, read_pagemap, smaps_fields,
                        soft_dirty_reason, soft_dirty_supported)

__all__ = [
    "IDSTR_MAX", "RAMBlock", "RAMBlockInUseError", "parse_backing",
    "DirtyBitmap", "page_selector", "GuestRAM",
    "ADVICES", "DEFAULT_ADVICE", "HOST_PAGE_SIZE", "MADV_COLD", "MADV_PAGEOUT", "RAMBlockMmap",
    "coalesce_runs", "punch_hole",
    "SoftDirtyUnsupported", "mincore", "process_rss", "read_pagemap", "smaps_fields",
    "soft_dirty_reason", "soft_dirty_supported",
]
