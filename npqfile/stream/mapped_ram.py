"""QEMU 9.0+'s mapped-ram file layout: every guest page at a fixed offset of a ``file:`` stream.

Supports: the per-block ``MappedRamHeader`` (packed, big-endian: ``u32 version`` (1),
``u64 page_size``, ``u64 bitmap_offset``, ``u64 pages_offset``) written after each
block's idstr and used length in the RAM setup record; the block's bitmap of pages
present (host ``unsigned long`` words, little-endian here: bit i of byte i/8 is page
i); the pages region (page i at ``pages_offset + i * page_size``, aligned to 1 MiB;
zero pages are never written, so they stay holes of a sparse file).  Writing
(:class:`MappedRamWriter`, used by ``RAMSaver(mapped_ram=True)``) and reading
(:func:`load_block`, used by ``RAMLoader`` when the configuration lists the
``mapped-ram`` capability).  With multifd the file is the same bytes (the channels
write the pages at the same offsets; no ``MULTIFD_FLUSH`` appears), so one reader
serves both.

Goals: QEMU 10.0's bytes (``mapped_ram_setup_ramblock``, ``ram_save_file_bmap``,
``parse_ramblock_mapped_ram``, ``read_ramblock_mapped_ram`` in ``migration/ram.c``):
a file written here equals QEMU 10.0's for the same RAM, and QEMU 10.0 restores it.  A
page re-dirtied during a live migration is rewritten in place and its bit set again; a
page that became zero only loses its bit (as QEMU does; the stale bytes stay in the
file but are never read).  Bad input is a StreamError naming the block, the byte
offset and the reason: a header version other than 1, a page size other than the
stream's, a bitmap or pages region that points past the file, overlaps the header or
the other region or is not page aligned, bitmap bits set past the block.  Memory
stays bounded by the declared RAM: the bitmap is one bit per declared page, pages
are read straight into the destination block.

Plan: the writer keeps one numpy bool bitmap per block and writes pages with
``QEMUFile.put_buffer_at`` a run of consecutive normal pages at a time; the bitmaps
are written by ``write_bitmaps()`` at completion.  The reader finds runs of set bits
with numpy and reads each run with ``get_buffer_at`` into the block, then moves the
stream to ``pages_offset + length`` (``set_offset``), where the next block's record or
the rest of the stream starts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from npqfile.errors import StreamError
from npqfile.ram.runs import mask_runs
from npqfile.stream.reader import shown

MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 0x100000     # ram.c: pages regions start on 1 MiB
MAPPED_RAM_LOAD_BUF_SIZE = 0x100000            # ram.c: bytes read per call when loading
_HEADER = struct.Struct(">IQQQ")
HEADER_SIZE = _HEADER.size                     # 28: the struct is packed
BITS_PER_LONG = 64


def bitmap_size(n_pages: int) -> int:
    """BITS_TO_LONGS(n_pages) * sizeof(unsigned long): the bitmap's bytes in the file."""
    return -(-n_pages // BITS_PER_LONG) * (BITS_PER_LONG // 8)


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


@dataclass(frozen=True)
class MappedRamHeader:
    """One block's header as on the wire (offsets are absolute file offsets)."""
    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    def pack(self) -> bytes:
        return _HEADER.pack(self.version, self.page_size, self.bitmap_offset, self.pages_offset)

    @classmethod
    def unpack(cls, data: bytes) -> MappedRamHeader:
        return cls(*_HEADER.unpack(data))

    @classmethod
    def layout(cls, header_offset: int, used_length: int, page_size: int) -> MappedRamHeader:
        """mapped_ram_setup_ramblock: the header written at ``header_offset`` for a block of
        ``used_length`` bytes: its bitmap right after it, its pages on the next 1 MiB."""
        bitmap_offset = header_offset + HEADER_SIZE
        pages_offset = round_up(bitmap_offset + bitmap_size(used_length // page_size),
                                MAPPED_RAM_FILE_OFFSET_ALIGNMENT)
        return cls(MAPPED_RAM_HDR_VERSION, page_size, bitmap_offset, pages_offset)


def bitmap_bytes(present: np.ndarray) -> bytes:
    """The file bitmap of the bool array ``present`` (one entry per page), padded to whole longs."""
    out = np.zeros(bitmap_size(present.size), dtype=np.uint8)
    packed = np.packbits(present.astype(bool), bitorder="little")
    out[:packed.size] = packed
    return out.tobytes()


# -- save side ------------------------------------------------------------------------
class MappedRamWriter:
    """Places the pages of ``ram``'s blocks at fixed offsets of the seekable writable QEMUFile ``f``.

    ``setup_block(block)`` writes the block's header into the setup record and moves the
    stream past its pages region; ``save_pages(block, idx, zero)`` writes the normal pages
    in place; ``write_bitmaps()`` (at completion) writes every block's bitmap.  Errors are
    the file's sticky error (check ``f.get_error()``); ValueError if ``f`` is not a
    seekable file (mapped-ram needs ``file:``, as in QEMU).
    """

    def __init__(self, f):
        if not getattr(f, "seekable", False):
            raise ValueError("mapped-ram needs a seekable file: write it to a regular file (file:PATH), "
                             "not a pipe, socket or exec: command")
        self.f = f
        self.headers: dict[str, MappedRamHeader] = {}
        self.present: dict[str, np.ndarray] = {}

    def setup_block(self, block) -> int:
        """After the block's idstr and length: its header; then skip its bitmap and pages.
        Returns the header bytes put into the stream (28)."""
        f = self.f
        hdr = MappedRamHeader.layout(f.tell(), block.size, block.page_size)
        self.headers[block.name] = hdr
        self.present[block.name] = np.zeros(block.n_pages, dtype=bool)
        f.put_buffer(hdr.pack())
        f.set_offset(hdr.pages_offset + block.size)
        return HEADER_SIZE

    def save_pages(self, block, idx: np.ndarray, zero: np.ndarray) -> int:
        """Write the pages ``idx`` of ``block`` whose ``zero`` entry is False at their
        offsets and set their bits; clear the bits of the zero ones (never written: holes).
        Returns the page bytes written."""
        hdr = self.headers[block.name]
        present = self.present[block.name]
        ps = block.page_size
        present[idx[zero]] = False
        normal = idx[~zero]
        present[normal] = True
        if not normal.size:
            return 0
        flat = memoryview(block.array)
        # runs of consecutive page numbers: one positional write each
        breaks = np.flatnonzero(np.diff(normal) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [normal.size])).tolist()
        written = 0
        for a, b in zip(starts, ends):
            first, count = int(normal[a]), b - a
            n = self.f.put_buffer_at(flat[first * ps:(first + count) * ps], hdr.pages_offset + first * ps)
            if n < 0:
                break
            written += n
        return written

    def write_bitmaps(self) -> None:
        """ram_save_file_bmap: every block's bitmap at its bitmap offset."""
        for name, hdr in self.headers.items():
            self.f.put_buffer_at(bitmap_bytes(self.present[name]), hdr.bitmap_offset)


# -- load side --------------------------------------------------------------------------
def load_block(r, view, name: str, length: int, page_size: int) -> tuple[int, int, dict]:
    """parse_ramblock_mapped_ram: read the header at the stream position of the StreamReader
    ``r``, then the block's bitmap and present pages into ``view`` (the block's memory,
    ``length`` bytes), and move the stream past the pages region.

    Returns ``(pages read, pages left as holes, report)`` where ``report`` is the header
    as a dict plus the counts.  Raises StreamError naming the block, the offset and the
    reason for any inconsistency (see the module docstring); pages outside ``view`` are
    never touched."""
    f = r.f
    shown_name = shown(name)
    at = r.offset
    hdr = MappedRamHeader.unpack(r.read(HEADER_SIZE, f"the mapped-ram header of block '{shown_name}'"))

    def bad(reason: str, offset: int = at) -> StreamError:
        return r.error(f"mapped-ram block '{shown_name}': {reason}", offset)

    if hdr.version != MAPPED_RAM_HDR_VERSION:
        raise bad(f"header version {hdr.version} is not supported (expected {MAPPED_RAM_HDR_VERSION})")
    if hdr.page_size != page_size:
        raise bad(f"header page size {hdr.page_size} differs from the stream's page size {page_size}")
    if not getattr(f, "seekable", False):
        raise bad("mapped-ram needs a seekable file (file:PATH); this input is a pipe or socket")
    n_pages = length // page_size
    bm_size = bitmap_size(n_pages)
    end_of_header = at + HEADER_SIZE
    file_size = f.file_size()
    if hdr.bitmap_offset < end_of_header:
        raise bad(f"bitmap offset {hdr.bitmap_offset} overlaps the header or the stream before it "
                  f"(the header ends at {end_of_header})")
    if hdr.bitmap_offset + bm_size > file_size:
        raise bad(f"bitmap at {hdr.bitmap_offset} ({bm_size} bytes) points past the end of the file "
                  f"({file_size} bytes)")
    if hdr.pages_offset % page_size:
        raise bad(f"pages offset {hdr.pages_offset} is not aligned to the page size {page_size}")
    if hdr.pages_offset < hdr.bitmap_offset + bm_size:
        raise bad(f"pages region at {hdr.pages_offset} overlaps the bitmap "
                  f"({hdr.bitmap_offset}..{hdr.bitmap_offset + bm_size})")
    if hdr.pages_offset + length > file_size:
        raise bad(f"pages region {hdr.pages_offset}..{hdr.pages_offset + length} points past the end "
                  f"of the file ({file_size} bytes)")
    raw = np.zeros(bm_size, dtype=np.uint8)
    if f.get_buffer_at(raw, hdr.bitmap_offset) != bm_size:
        raise bad("cannot read the bitmap", hdr.bitmap_offset)
    bits = np.unpackbits(raw, bitorder="little")
    extra = np.flatnonzero(bits[n_pages:])
    if extra.size:
        first = n_pages + int(extra[0])
        raise bad(f"bitmap bit {first} is set but the block has only {n_pages} pages",
                  hdr.bitmap_offset + first // 8)
    present = bits[:n_pages].astype(bool)
    for a, b in mask_runs(present).tolist():
        for start in range(a * page_size, b * page_size, MAPPED_RAM_LOAD_BUF_SIZE):
            end = min(start + MAPPED_RAM_LOAD_BUF_SIZE, b * page_size)
            got = f.get_buffer_at(view[start:end], hdr.pages_offset + start)
            if got != end - start:
                raise bad(f"failed to read page {start + max(got, 0):#x} from file offset "
                          f"{hdr.pages_offset + start + max(got, 0)}", hdr.pages_offset + start)
    if f.set_offset(hdr.pages_offset + length):
        raise bad("cannot move past the pages region")
    n_read = int(np.count_nonzero(present))
    report = {"name": name, "header-offset": at, "version": hdr.version, "page-size": hdr.page_size,
              "bitmap-offset": hdr.bitmap_offset, "pages-offset": hdr.pages_offset,
              "pages-present": n_read, "holes": n_pages - n_read}
    return n_read, n_pages - n_read, report
