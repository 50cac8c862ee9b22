"""Counters of the RAM section, shared by the saver, the loader and ``npqfile analyze``.

Supports: per-kind page counts (normal, zero, XBZRLE, compressed) with their byte
totals, XBZRLE cache behaviour on the save side, and per-part counts on the load side.
Goals: the names of QEMU's ``query-migrate`` ``ram`` / ``xbzrle-cache`` counters where
they exist (``normal``, ``duplicate`` = zero pages, ``cache-miss``, ``overflow``), so
numbers can be compared with QEMU's side by side.
Plan: a plain dataclass; ``as_dict()`` for JSON output.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RAMStats:
    """What went through a RAM section (either direction)."""
    normal_pages: int = 0          # PAGE records (QEMU: ram.normal)
    zero_pages: int = 0            # ZERO records (QEMU: ram.duplicate)
    xbzrle_pages: int = 0          # XBZRLE records (QEMU: xbzrle-cache.pages)
    xbzrle_bytes: int = 0          # encoded bytes incl. the 3-byte prefix (QEMU: xbzrle-cache.bytes)
    xbzrle_cache_miss: int = 0     # save side: page not cached, sent as PAGE
    xbzrle_overflow: int = 0       # save side: delta too large, sent as PAGE
    xbzrle_unchanged: int = 0      # save side: identical to the cached copy, not sent at all
    compressed_pages: int = 0      # COMPRESS_PAGE records
    compressed_bytes: int = 0      # zlib bytes incl. the be32 length
    multifd_flushes: int = 0       # MULTIFD_FLUSH records
    pages_bytes: int = 0           # all RAM-section payload bytes (headers, idstrs, pages, EOS)
    parts: list[dict] = field(default_factory=list)   # load side: per-section page counts
    parts_not_listed: int = 0      # load side: sections beyond the listed ones (counted only)

    @property
    def pages(self) -> int:
        """Page records of any kind."""
        return self.normal_pages + self.zero_pages + self.xbzrle_pages + self.compressed_pages

    def as_dict(self) -> dict:
        """The counters under QEMU's ``query-migrate`` names where QEMU has one (``normal``,
        ``duplicate``, ``normal-bytes``, ``xbzrle-cache`` with ``pages`` / ``bytes`` /
        ``cache-miss`` / ``overflow``, ``compression`` with ``pages`` /
        ``compressed-size``), lowercase-hyphenated npqfile names elsewhere
        (``pages``, ``pages-bytes``, ``multifd-flushes``, ``parts``); see npqfile/schemas."""
        return {
            "normal": self.normal_pages,
            "duplicate": self.zero_pages,
            "pages": self.pages,
            "pages-bytes": self.pages_bytes,
            "xbzrle-cache": {"pages": self.xbzrle_pages, "bytes": self.xbzrle_bytes,
                             "cache-miss": self.xbzrle_cache_miss, "overflow": self.xbzrle_overflow,
                             "unchanged": self.xbzrle_unchanged},
            "compression": {"pages": self.compressed_pages, "compressed-size": self.compressed_bytes},
            "multifd-flushes": self.multifd_flushes,
            "parts": [{"duplicate" if k == "zero" else k.replace("_", "-"): v for k, v in part.items()}
                      for part in self.parts],
        }
