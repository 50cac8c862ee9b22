"""The load side of QEMU's RAM section v4: block list, page records, EOS.

Supports: ``MEM_SIZE`` (the block list, with the per-block fields capabilities add:
x-ignore-shared's ``mr_addr``, postcopy's ``page_size``), ``PAGE``, ``ZERO`` (any fill
byte, as QEMU 7.2 accepts), ``CONTINUE`` (the current block persists across sections),
``XBZRLE`` (decoded in place over the page), ``COMPRESS_PAGE`` (zlib, at most one page),
``MULTIFD_FLUSH`` and ``EOS``; with the mapped-ram capability each declared block's
header, bitmap and pages at fixed file offsets (``mapped_ram.load_block``).  The destination is a caller's GuestRAM (each declared
block must exist there with the same size) or one created from the declarations, capped
by ``max_ram_bytes`` (lazy anonymous mmaps: untouched pages cost no memory).

Goals: QEMU's ``ram_load_precopy`` acceptance, made strict: an undeclared block, a page
beyond its block, a size mismatch, an unknown flag, a truncated record, a bad XBZRLE
delta or an over-long zlib stream is a StreamError naming the record's byte offset, the
section and the reason.  Nothing is written outside the declared blocks, nothing is
allocated beyond what the stream declares (and the cap allows).

Plan: one loop per section payload, reading a be64 header and dispatching on
``flags & ~CONTINUE``; a PAGE goes from QEMUFile straight into the block's mmap
(``get_buffer`` into a memoryview slice: no intermediate copy); a ZERO page is written
only if the page is not already all zero (QEMU's ``ram_handle_zero``: never fault in
an untouched page).  Runs of ``PAGE|CONTINUE`` records already in QEMUFile's read-ahead
buffer take a vectorised path (``_page_run``): their headers are checked at the record
stride with numpy and their pages copied in one numpy assignment; the first record
that is anything else (another flag, a page outside the block, an address not above the
previous one) ends the run and goes through the per-record path, which raises the same
errors at the same offsets.  The postcopy ``page_size`` field is not self-describing: it is
present for blocks whose page size differs from the host's, which a stream reader
cannot see, so it is recognised by peeking (a power of two >= 4 KiB where a block name
or a record would start; see README "Differences from QEMU").
"""

from __future__ import annotations

import zlib

import numpy as np

from npqfile.ram import IDSTR_MAX, GuestRAM
from npqfile.ram.bufferiszero import buffer_is_zero
from npqfile.stream import mapped_ram
from npqfile.stream.constants import (
    ENCODING_FLAG_XBZRLE, RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK, RAM_SAVE_FLAG_MEM_SIZE, RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO, TARGET_PAGE_SIZE, compress_bound,
)
from npqfile.stream.ram_hash import BlockHash, LoadHasher
from npqfile.stream.ram_stats import RAMStats
from npqfile.stream.reader import StreamReader, shown
from npqfile.stream.xbzrle import XBZRLEError, decode_page

DEFAULT_MAX_RAM_BYTES = 64 << 30
MAX_BLOCKS = 1024                  # a PC has about ten; each block is a mapping and its bookkeeping
MAX_LISTED_PARTS = 10000           # per-section counts kept in stats.parts; beyond, only counted
COMPRESSED_CHUNK = 1 << 16         # compressed page data is read and inflated this much at a time
# Buffered PAGE|CONTINUE records below this count go one by one: numpy's fixed cost per
# call (~10 us) is worth paying only over many pages.
PAGE_RUN_MIN_RECORDS = 16
PAGE_RUN_MAX_RECORDS = 512   # bounds the numpy work per call (a 1 MiB read-ahead holds ~255)
ZERO_RUN_MAX_RECORDS = 8192  # the same for 9-byte ZERO records (a 1 MiB read-ahead holds ~116000)


class _Dest:
    """A declared block as the loader sees it: the RAMBlock plus a flat view of its memory."""
    __slots__ = ("block", "name", "size", "view", "mr_addr", "page_size", "hash")

    def __init__(self, block, name: str, size: int):
        self.block = block
        self.name = name
        self.size = size
        self.view = memoryview(block.array)
        self.mr_addr: int | None = None
        self.page_size: int | None = None
        self.hash: BlockHash | None = None      # its running sha256 (a LoadHasher's), if any


class RAMLoader:
    """Loads RAM section payloads into ``ram`` (or a GuestRAM it creates).

    ``ignore_shared`` says the x-ignore-shared capability is on (the stream's
    configuration says so); ``postcopy_pagesize_summary`` is the first field of a
    16-byte POSTCOPY_ADVISE (None: no advise seen).  After loading, ``ram`` holds the
    destination, ``declared`` the blocks in declaration order, ``stats`` the counts.
    ``hasher``: a LoadHasher fed with each block's pages as they complete in order.
    """

    def __init__(self, ram: GuestRAM | None = None, *, max_ram_bytes: int = DEFAULT_MAX_RAM_BYTES,
                 page_size: int = TARGET_PAGE_SIZE, max_ram_name: str = "max_ram_bytes",
                 hasher: LoadHasher | None = None):
        self.ram = ram
        self.hasher = hasher
        self.max_ram_name = max_ram_name   # how errors name the limit (a CLI says its option)
        self.created = ram is None
        self.max_ram_bytes = max_ram_bytes
        self.page_size = page_size
        self.ignore_shared = False
        self.mapped_ram = False                   # the configuration lists mapped-ram
        self.mapped_ram_blocks: list[dict] = []   # one report per block read that way
        self.postcopy_pagesize_summary: int | None = None
        self.declared: dict[str, _Dest] = {}
        self.last_recv_block: _Dest | None = None
        self.stats = RAMStats()
        self.on_multifd_flush = None    # multifd destination: (offset, eos=False) at MULTIFD_FLUSH and EOS
        # In postcopy (after LISTEN) pages are placed atomically through this object's
        # place_page(block, offset, data) / place_zero(block, offset, fill), never written
        # directly: the guest may be running on them (npqfile.migration.postcopy)
        self.placer = None

    def release_views(self) -> None:
        """Drop the loader's views of the destination, so its owner can close the blocks."""
        for dest in self.declared.values():
            dest.view = None
        self.last_recv_block = None

    # -- the record loop ----------------------------------------------------------------
    def load(self, r: StreamReader, section_type: str, section_id: int) -> None:
        """Consume one RAM section payload up to and including its EOS. Raises StreamError."""
        st = self.stats
        before = (st.normal_pages, st.zero_pages, st.xbzrle_pages, st.compressed_pages)
        start = r.offset
        ps = self.page_size
        mask = ps - 1
        f = r.f
        get_be64, get_buffer, get_error = f.get_be64, f.get_buffer, f.get_error
        continue_page = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
        while True:
            r.begin()
            if r.limit is None and self.placer is None:
                # The hot path, inlined: one header and one page per normal record.
                hdr = get_be64()
                if get_error():
                    raise r._fail("a RAM record header")
                dest = self.last_recv_block
                addr = hdr & ~mask
                if hdr & mask == continue_page and dest is not None and addr + ps <= dest.size:
                    if dest.hash is not None and addr < dest.hash.next:
                        dest.hash.stale = True
                    if get_buffer(dest.view[addr:addr + ps]) != ps or get_error():
                        raise r._fail("a page")
                    st.normal_pages += 1 + self._page_run(f, dest)
                    continue
            else:
                hdr = r.be64("a RAM record header")
            flags = hdr & mask
            addr = hdr & ~mask
            kind = flags & ~RAM_SAVE_FLAG_CONTINUE
            if kind == RAM_SAVE_FLAG_PAGE:
                dest = self._block_from_stream(r, flags, addr)
                if self.placer is None:
                    r.read_into(dest.view[addr:addr + ps], "a page")
                else:
                    self.placer.place_page(dest.block, addr, r.read(ps, "a page"))
                st.normal_pages += 1
            elif kind == RAM_SAVE_FLAG_ZERO:
                dest = self._block_from_stream(r, flags, addr)
                fill = r.u8("a zero page's fill byte")
                if self.placer is None:
                    self._handle_zero(dest, addr, fill)
                    if r.limit is None and fill == 0:
                        st.zero_pages += self._zero_run(f, dest)
                else:
                    self.placer.place_zero(dest.block, addr, fill)
                st.zero_pages += 1
            elif kind == RAM_SAVE_FLAG_EOS:
                if self.on_multifd_flush is not None:
                    self.on_multifd_flush(r.offset, eos=True)
                break
            elif kind == RAM_SAVE_FLAG_MEM_SIZE:
                self._parse_ramblocks(r, addr)
            elif kind in (RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_COMPRESS_PAGE) and self.placer is not None:
                # ram_load_postcopy places whole pages only (QEMU refuses XBZRLE there too)
                raise r.error(f"Unknown combination of migration flags: {flags:#x} (in postcopy)")
            elif kind == RAM_SAVE_FLAG_XBZRLE:
                self._load_xbzrle(r, self._block_from_stream(r, flags, addr), addr)
            elif kind == RAM_SAVE_FLAG_COMPRESS_PAGE:
                self._load_compressed(r, self._block_from_stream(r, flags, addr), addr)
            elif kind == RAM_SAVE_FLAG_MULTIFD_FLUSH:
                st.multifd_flushes += 1
                if self.on_multifd_flush is not None:
                    self.on_multifd_flush(r.offset)
            elif kind == RAM_SAVE_FLAG_HOOK:
                raise r.error("RAM_SAVE_FLAG_HOOK: RDMA control records cannot appear in a byte stream")
            else:
                raise r.error(f"Unknown combination of migration flags: {flags:#x}")
        st.pages_bytes += r.offset - start
        after = (st.normal_pages, st.zero_pages, st.xbzrle_pages, st.compressed_pages)
        normal, zero, xbz, comp = (a - b for a, b in zip(after, before))
        if len(st.parts) >= MAX_LISTED_PARTS:
            st.parts_not_listed += 1
            return
        st.parts.append({"type": section_type, "section_id": section_id, "offset": start,
                         "bytes": r.offset - start, "normal": normal, "zero": zero,
                         "xbzrle": xbz, "compressed": comp})

    def _page_run(self, f, dest: _Dest) -> int:
        """Consume the longest run of buffered ``PAGE|CONTINUE`` records for ``dest`` whose
        pages lie inside it at strictly increasing addresses, copying the pages there.
        Returns the records consumed (0 when fewer than PAGE_RUN_MIN_RECORDS are buffered
        or an error is recorded); never raises: whatever ends the run is left to the
        per-record path, so errors and their offsets are the per-record path's own."""
        ps = self.page_size
        rec = 8 + ps
        view = f.buffered()
        n = min(len(view) // rec, PAGE_RUN_MAX_RECORDS)
        if n < PAGE_RUN_MIN_RECORDS or f.get_error():
            return 0
        # a stream of mixed records (ZERO pages between pages, EOS) would otherwise pay
        # the numpy set-up below after every page: look at the run's two ends first
        run_flags = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
        last = (PAGE_RUN_MIN_RECORDS - 1) * rec
        if (int.from_bytes(view[:8], "big") & (ps - 1) != run_flags
                or int.from_bytes(view[last:last + 8], "big") & (ps - 1) != run_flags):
            return 0
        hdr = np.ndarray((n,), dtype=">u8", buffer=view, strides=(rec,))
        mask = np.uint64(ps - 1)
        addr = hdr & ~mask
        ok = (hdr & mask) == np.uint64(RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE)
        ok &= addr <= np.uint64(dest.size - ps)
        ok[1:] &= addr[1:] > addr[:-1]      # distinct pages: one assignment writes each once
        k = n if ok.all() else int(np.argmin(ok))
        if k == 0:
            return 0
        pages = np.ndarray((k, ps), dtype=np.uint8, buffer=view, offset=8, strides=(rec, 1))
        first = int(addr[0])
        bh = dest.hash
        if bh is not None and first < bh.next:
            bh.stale = True
        last = int(addr[k - 1])
        if last - first == (k - 1) * ps:      # adjacent pages: one slice
            np.frombuffer(dest.view, np.uint8, k * ps, first).reshape(k, ps)[...] = pages
        else:
            rows = np.frombuffer(dest.view, np.uint8).reshape(-1, ps)
            rows[(addr[:k] // np.uint64(ps)).astype(np.intp)] = pages
        del hdr, addr, pages, view       # release the buffer's exports before skipping
        f.skip(k * rec)
        if bh is not None:
            self.hasher.advance(bh, last + ps)
        return k

    def _zero_run(self, f, dest: _Dest) -> int:
        """``_page_run`` for ZERO records: consume the longest run of buffered
        ``ZERO|CONTINUE`` records with fill byte 0 for ``dest``, at strictly increasing
        addresses inside it, and zero those of their pages that are not zero already
        (``ram_handle_zero``, one gather per run).  Returns the records consumed (0 below
        PAGE_RUN_MIN_RECORDS); never raises: whatever ends the run -- another record, a bad
        one -- is left to the per-record path, with its errors and offsets."""
        ps = self.page_size
        rec = 9
        view = f.buffered()
        n = min(len(view) // rec, ZERO_RUN_MAX_RECORDS)
        if n < PAGE_RUN_MIN_RECORDS or f.get_error():
            return 0
        run_flags = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
        # mixed records (a few ZERO pages between normal ones, common in guest RAM) would
        # otherwise pay the numpy set-up below after every ZERO record: look at both ends
        for at in (0, (PAGE_RUN_MIN_RECORDS - 1) * rec):
            if int.from_bytes(view[at:at + 8], "big") & (ps - 1) != run_flags or view[at + 8] != 0:
                return 0
        recs = np.ndarray((n, rec), dtype=np.uint8, buffer=view)
        hdr = np.ndarray((n,), dtype=">u8", buffer=view, strides=(rec,))
        addr = hdr & ~np.uint64(ps - 1)
        ok = (hdr & np.uint64(ps - 1)) == np.uint64(run_flags)
        ok &= recs[:, 8] == 0
        ok &= addr <= np.uint64(dest.size - ps)
        ok[1:] &= addr[1:] > addr[:-1]
        k = n if ok.all() else int(np.argmin(ok))
        if k == 0:
            return 0
        idx = (addr[:k] // np.uint64(ps)).astype(np.intp)
        first, last = int(addr[0]), int(addr[k - 1])
        del recs, hdr, addr, ok, view    # release the buffer's exports before skipping
        rows = np.frombuffer(dest.view, np.uint8).reshape(-1, ps)
        rows[idx[~buffer_is_zero(rows, idx)]] = 0
        del rows
        f.skip(k * rec)
        bh = dest.hash
        if bh is not None:
            if first < bh.next:
                bh.stale = True
            self.hasher.advance(bh, last + ps)
        return k

    def _block_from_stream(self, r: StreamReader, flags: int, addr: int) -> _Dest:
        """ram_block_from_stream + the offset check: the record's block, page inside it."""
        if flags & RAM_SAVE_FLAG_CONTINUE:
            dest = self.last_recv_block
            if dest is None:
                raise r.error("Ack, bad migration stream! (CONTINUE record with no previous block)")
        else:
            name = r.name("a RAM block name")
            dest = self.declared.get(name)
            if dest is None:
                raise r.error(f'RAM record names block "{shown(name)}", which the stream did not declare')
            self.last_recv_block = dest
        if addr + self.page_size > dest.size:
            raise r.error(f"page {addr:#x} is beyond the end of block '{shown(dest.name)}' "
                          f"({dest.size:#x} bytes)")
        if dest.hash is not None and addr < dest.hash.next:
            dest.hash.stale = True       # written again below what is queued for hashing
        return dest

    # -- record bodies --------------------------------------------------------------
    def _handle_zero(self, dest: _Dest, addr: int, fill: int) -> None:
        """ram_handle_zero / the old ram_handle_compressed: memset only when it changes something."""
        page = np.frombuffer(dest.view[addr:addr + self.page_size], dtype=np.uint64)
        if fill == 0:
            if page.any():
                page[:] = 0
        else:
            page.view(np.uint8)[:] = fill

    def _load_xbzrle(self, r: StreamReader, dest: _Dest, addr: int) -> None:
        """load_xbzrle: u8 encoding flag (1), be16 length <= page, delta decoded over the page."""
        flag = r.u8("an XBZRLE encoding flag")
        if flag != ENCODING_FLAG_XBZRLE:
            raise r.error(f"Failed to load XBZRLE page - wrong compression! (flag {flag:#x})")
        n = r.be16("an XBZRLE length")
        if n > self.page_size:
            raise r.error(f"Failed to load XBZRLE page - len overflow! ({n} > {self.page_size})")
        data_at = r.offset
        data = r.read(n, "XBZRLE data")
        page = np.frombuffer(dest.view[addr:addr + self.page_size], dtype=np.uint8)
        try:
            decode_page(data, page)
        except XBZRLEError as exc:
            raise r.error(f"bad XBZRLE page for '{shown(dest.name)}' offset {addr:#x}: {exc.reason}",
                          data_at + exc.position) from None
        self.stats.xbzrle_pages += 1
        self.stats.xbzrle_bytes += n + 3

    def _load_compressed(self, r: StreamReader, dest: _Dest, addr: int) -> None:
        """COMPRESS_PAGE: be32 length <= compressBound(page), one zlib stream of exactly one page."""
        n = r.be32("a compressed page length")
        bound = compress_bound(self.page_size)
        if n > bound:
            raise r.error(f"Invalid compressed data length: {n} (at most {bound})")
        # Read and inflate in chunks: a be32 length allocates nothing before its bytes arrive.
        ps = self.page_size
        d = zlib.decompressobj()
        out = bytearray()
        remaining = n
        try:
            while remaining > 0:
                chunk = r.read(min(remaining, COMPRESSED_CHUNK), "compressed page data")
                remaining -= len(chunk)
                if not d.eof:
                    out += d.decompress(chunk, ps + 1 - len(out))   # one byte more shows an overflow
                    if len(out) > ps:
                        raise r.error(f"compressed page for '{shown(dest.name)}' offset {addr:#x} inflates past a page")
            if not d.eof and len(out) == ps and d.decompress(b"", 1):
                raise r.error(f"compressed page for '{shown(dest.name)}' offset {addr:#x} inflates past a page")
        except zlib.error as exc:
            raise r.error(f"compressed page for '{shown(dest.name)}' offset {addr:#x} is not valid zlib: {exc}") from None
        if not d.eof:
            raise r.error(f"compressed page for '{shown(dest.name)}' offset {addr:#x}: zlib stream is incomplete")
        if len(out) != ps:
            raise r.error(f"compressed page for '{shown(dest.name)}' offset {addr:#x} inflates to "
                          f"{len(out)} bytes, not {ps}")
        dest.view[addr:addr + self.page_size] = out
        self.stats.compressed_pages += 1
        self.stats.compressed_bytes += n + 4

    # -- the block list ---------------------------------------------------------------
    def _parse_ramblocks(self, r: StreamReader, total: int) -> None:
        """MEM_SIZE: blocks until their lengths add up to ``total``; creates or checks each."""
        if self.created and total > self.max_ram_bytes:
            raise r.error(f"stream declares {total:#x} bytes of RAM, more than the "
                          f"{self.max_ram_bytes:#x}-byte limit ({self.max_ram_name})")
        remaining = total
        while remaining > 0:
            at = r.offset
            name = r.name("a RAM block name")
            length = r.be64("a RAM block length")
            if length > remaining:
                raise r.error(f"block '{shown(name)}' declares {length:#x} bytes, more than the {remaining:#x} "
                              f"left of the MEM_SIZE total {total:#x}", at)
            if length == 0 or length % self.page_size:
                raise r.error(f"block '{shown(name)}' length {length:#x} is not a positive multiple of "
                              f"the page size", at)
            dest = self._declare(r, name, length, at)
            if self.mapped_ram:
                self._load_mapped_ram(r, dest)
            elif self._has_page_size_field(r):
                dest.page_size = r.be64("a block page size")
            if self.ignore_shared:
                dest.mr_addr = r.be64("a block's mr_addr")
            remaining -= length

    def _load_mapped_ram(self, r: StreamReader, dest: _Dest) -> None:
        """parse_ramblock: x-ignore-shared's mr_addr (written first), then the mapped-ram
        header; a shared block skipped by x-ignore-shared has both offsets 0."""
        if self.ignore_shared:
            dest.mr_addr = r.be64("a block's mr_addr")
            head = r.peek(mapped_ram.HEADER_SIZE)
            if len(head) == mapped_ram.HEADER_SIZE and head[12:] == bytes(16):
                r.skip(mapped_ram.HEADER_SIZE, "a skipped block's mapped-ram header")
                return
        n_read, holes, report = mapped_ram.load_block(r, dest.view, dest.name, dest.size, self.page_size)
        self.stats.normal_pages += n_read
        self.stats.zero_pages += holes
        self.mapped_ram_blocks.append(report)

    def _has_page_size_field(self, r: StreamReader) -> bool:
        """Postcopy's per-block page size: only possible after an advise naming other page sizes."""
        summary = self.postcopy_pagesize_summary
        if summary is None or summary == self.page_size:
            return False
        head = r.peek(8)
        if len(head) < 8:
            return False
        v = int.from_bytes(head, "big")
        return v > self.page_size and v & (v - 1) == 0 and v & summary != 0

    def _declare(self, r: StreamReader, name: str, length: int, at: int) -> _Dest:
        old = self.declared.get(name)
        if old is not None:
            if old.size != length:
                raise r.error(f"Size mismatch: {shown(name)}: {length:#x} != {old.size:#x}", at)
            return old
        if len(self.declared) >= MAX_BLOCKS:
            raise r.error(f"stream declares more than {MAX_BLOCKS} RAM blocks", at)
        if self.created:
            if self.ram is None:
                self.ram = GuestRAM()
            if len(name.encode()) > IDSTR_MAX:
                # only possible for a name of control or non-UTF-8 bytes, escaped to printable text
                raise r.error(f"block name '{shown(name)}' is not a usable RAM block name "
                              f"({len(name.encode())} bytes once made printable, at most {IDSTR_MAX})", at)
            used = sum(d.size for d in self.declared.values())
            if used + length > self.max_ram_bytes:
                raise r.error(f"block '{shown(name)}' would take the RAM past the {self.max_ram_bytes:#x}-byte "
                              f"limit ({self.max_ram_name})", at)
            try:
                block = self.ram.add_block(name, length)
            except (ValueError, OSError) as exc:
                raise r.error(f"cannot create RAM block '{shown(name)}' of {length:#x} bytes: {exc}", at) from None
        else:
            try:
                block = self.ram.block(name)
            except KeyError:
                raise r.error(f'Unknown ramblock "{shown(name)}", cannot accept migration', at) from None
            if block.size != length:
                raise r.error(f"Size mismatch: {shown(name)}: {length:#x} != {block.size:#x}", at)
        dest = _Dest(block, name, length)
        if self.hasher is not None:
            dest.hash = self.hasher.track(name, dest.view)
        self.declared[name] = dest
        return dest
