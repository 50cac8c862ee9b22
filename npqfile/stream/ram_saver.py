"""The save side of QEMU's RAM section v4: setup record, page records, EOS.

Supports: ``RAMSaver.save_setup()`` (``MEM_SIZE`` total, each block's idstr and used
length, the x-ignore-shared ``mr_addr`` when asked, ``EOS``); ``save_pages(block,
indices)`` sending ZERO, PAGE, XBZRLE (against a page cache keyed by ram_addr) or
COMPRESS_PAGE records, with ``RAM_SAVE_FLAG_CONTINUE`` whenever the block is the last
one sent, across section boundaries as in QEMU (``pss->last_sent_block``); optional rate
limiting (stop as soon as ``f.rate_limit()`` is true after a page); release of sent
pages (``may_free``) for postcopy-like use; ``write_eos()``.  With ``mapped_ram=True``
(QEMU 9.0+, a seekable ``file:`` only) the setup record carries each block's
mapped-ram header and pages go to their fixed file offsets instead of records
(``npqfile.stream.mapped_ram``); ``write_mapped_ram_bitmaps()`` ends such a file.

Goals: QEMU's bytes (``ram_save_setup``, ``save_page_header``, ``save_zero_page``,
``save_normal_page``, ``save_xbzrle_page``) and speed: pages leave zero-copy with
``put_buffer_async`` straight from the block's mmap, zero pages are found with numpy a
batch at a time, and runs of normal pages go to ``QEMUFile.put_records`` as one call.

Plan: indices are cut into batches; a batch that is a contiguous run is examined through
a slice of ``block.pages`` (no copy), a scattered one through a gathered copy (for zero
detection only; pages still leave from RAM).  Headers for the batch are computed as one
numpy array.  XBZRLE and compression take a per-page path, since each needs its own
encoder call anyway.  Differences from QEMU: see README (compression is single-threaded,
so the first page of a block need not go uncompressed).
"""

from __future__ import annotations

import numpy as np

from npqfile.buffers import PageRun
from npqfile.qemufile import MAX_IOV_SIZE
from npqfile.ram.bufferiszero import buffer_is_zero
from npqfile.stream.constants import (
    ENCODING_FLAG_XBZRLE, RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO,
)
from npqfile.stream.mapped_ram import MappedRamWriter
from npqfile.stream.ram_stats import RAMStats
from npqfile.stream.xbzrle import PageCache, encode_page

# 8 MiB of 4 KiB pages per zero-detection batch: amortises the numpy calls (measured here,
# 256-page batches cost a save of all-zero RAM 25% more CPU than 2048)
BATCH_PAGES = 2048
# Runs of normal pages from this length go to put_records as a PageRun: only whole flush
# cycles (MAX_IOV_SIZE / 2 records) take its native path, and its checks cost ~9 us, a
# list of views of a short run (pages scattered between zero ones) ~1 us
PAGE_RUN_MIN_PAGES = MAX_IOV_SIZE // 2


class RAMSaver:
    """Writes the RAM section payloads of ``ram`` (a GuestRAM) into the QEMUFile ``f``.

    ``zero_page_detection=False`` sends zero pages as normal pages (QEMU 9.0's
    ``zero-page-detection=none``).  ``xbzrle_cache_size > 0`` enables XBZRLE with a page
    cache of that many bytes (a power of two); ``xbzrle_enabled`` can be cleared by an
    engine that wants QEMU's "no XBZRLE during the bulk stage" and set after the first
    pass.  ``compress_level`` (0..9) sends non-zero pages as COMPRESS_PAGE while XBZRLE
    is not active, like QEMU's legacy ``compress`` capability.  ``release_ram`` hands
    normal pages over with ``may_free=True``.  ``mr_addr`` ({block name: guest physical
    address}) writes the x-ignore-shared setup layout.
    """

    def __init__(self, f, ram, *, zero_page_detection: bool = True, xbzrle_cache_size: int = 0,
                 compress_level: int | None = None, release_ram: bool = False,
                 mr_addr: dict[str, int] | None = None, mapped_ram: bool = False):
        if not hasattr(ram, "blocks"):
            raise TypeError(f"RAMSaver needs a GuestRAM, not {type(ram).__name__}")
        self.f = f
        self.ram = ram
        self.zero_page_detection = zero_page_detection
        self.release_ram = release_ram
        self.mr_addr = mr_addr
        if compress_level is not None and not -1 <= compress_level <= 9:
            raise ValueError(f"compress level must be 0..9, got {compress_level}")
        self.compress_level = compress_level
        if mapped_ram and (xbzrle_cache_size or compress_level is not None):
            raise ValueError("mapped-ram cannot be combined with XBZRLE or page compression (QEMU refuses both)")
        self.mapped_ram = MappedRamWriter(f) if mapped_ram else None
        page_sizes = {b.page_size for b in ram.blocks}
        self.page_size = page_sizes.pop() if len(page_sizes) == 1 else 4096
        self.cache = PageCache(xbzrle_cache_size, self.page_size) if xbzrle_cache_size else None
        self.xbzrle_enabled = self.cache is not None
        self.last_stage = False     # engine sets it for the final round: misses no longer fill the cache
        self.generation = 0         # engine sets QEMU's dirty_sync_count here (cache ageing)
        self.last_sent_block = None
        self.sent_zero = np.zeros(0, dtype=bool)   # of the last save_pages call
        self.stats = RAMStats()
        self._zero_page = np.zeros(self.page_size, dtype=np.uint8)

    # -- setup and end ---------------------------------------------------------------
    def save_setup(self, before_eos=None) -> None:
        """Write the START payload: MEM_SIZE total, the block list, EOS. Resets CONTINUE state.
        ``before_eos()`` runs just before the EOS (multifd's first flush goes there)."""
        f = self.f
        blocks = list(self.ram.blocks)
        total = sum(b.size for b in blocks)
        f.put_be64(total | RAM_SAVE_FLAG_MEM_SIZE)
        n = 8
        for b in blocks:
            name = b.name.encode()
            f.put_byte(len(name))
            f.put_buffer(name)
            f.put_be64(b.size)
            n += 1 + len(name) + 8
            if self.mr_addr is not None:
                f.put_be64(self.mr_addr.get(b.name, 0))
                n += 8
            if self.mapped_ram is not None:
                n += self.mapped_ram.setup_block(b)
        self.last_sent_block = None      # ram_state_reset: the next page names its block
        self.stats.pages_bytes += n
        if before_eos is not None:
            before_eos()
        self.write_eos()

    def write_mapped_ram_bitmaps(self) -> None:
        """ram_save_complete with mapped-ram: write every block's bitmap (no-op otherwise)."""
        if self.mapped_ram is not None:
            self.mapped_ram.write_bitmaps()

    def write_eos(self) -> None:
        """End this section's RAM payload (``be64 RAM_SAVE_FLAG_EOS``)."""
        self.f.put_be64(RAM_SAVE_FLAG_EOS)
        self.stats.pages_bytes += 8

    # -- pages -------------------------------------------------------------------------
    def save_pages(self, block, indices, *, rate_limited: bool = False) -> int:
        """Send the pages ``indices`` (page numbers in ``block``) in order.

        Returns how many indices were consumed: all of them, or fewer when
        ``rate_limited``: like QEMU's ``ram_save_iterate``, ``f.rate_limit()`` is checked
        before each page, so the page that crossed the limit is sent and none after it
        (none at all if the limit was already exceeded).  Afterwards ``sent_zero``
        marks which of the consumed pages went as ZERO records.  Raises ValueError for
        a block the saver's RAM does not hold or an index outside the block (a caller
        bug: nothing is written).
        """
        if not any(b is block for b in self.ram.blocks):
            raise ValueError(f"block {block.name!r} is not one of this saver's RAM blocks "
                             f"(its setup record did not declare it)")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= block.n_pages):
            raise ValueError(f"page index out of range for block {block.name!r} ({block.n_pages} pages)")
        general = self.cache is not None or self.compress_level is not None
        done = 0
        zeros = []
        for start in range(0, idx.size, BATCH_PAGES):
            if rate_limited and self.f.rate_limit():
                break
            chunk = idx[start:start + BATCH_PAGES]
            zero = self._zero_mask(block, chunk)
            if self.mapped_ram is not None:    # pages at their file offsets, no records
                n, limit = chunk.size, self.f.get_rate_limit()
                if rate_limited and limit > 0:  # as _save_plain: stop after the page that crosses
                    over = np.flatnonzero(self.f.bytes_xfer + np.cumsum(np.where(zero, 0, block.page_size)) > limit)
                    n = int(over[0]) + 1 if over.size else n
                written = self.mapped_ram.save_pages(block, chunk[:n], zero[:n])
                nz = int(np.count_nonzero(zero[:n]))
                self.stats.zero_pages += nz
                self.stats.normal_pages += n - nz
                self.stats.pages_bytes += written
            elif general:
                n = self._save_general(block, chunk, zero, rate_limited)
            else:
                n = self._save_plain(block, chunk, zero, rate_limited)
            done += n
            zeros.append(zero[:n])
            if n < chunk.size:
                break
        self.sent_zero = np.concatenate(zeros) if zeros else np.zeros(0, dtype=bool)
        return done

    def _zero_mask(self, block, chunk: np.ndarray) -> np.ndarray:
        """Bool array: which pages of ``chunk`` are all zero (all False when detection is
        off); the scan is QEMU's buffer_is_zero (npqfile.ram.bufferiszero)."""
        if not self.zero_page_detection:
            return np.zeros(chunk.size, dtype=bool)
        return buffer_is_zero(block.pages, chunk)

    def _put_idstr(self, block) -> int:
        """After a non-CONTINUE header: the block's counted idstr; it becomes last_sent_block."""
        name = block.name.encode()
        self.f.put_byte(len(name))
        self.f.put_buffer(name)
        self.last_sent_block = block
        return 1 + len(name)

    def _save_plain(self, block, chunk: np.ndarray, zero: np.ndarray, rate_limited: bool) -> int:
        """The hot path: ZERO or PAGE per page, pages zero-copy from RAM.

        Runs of normal pages go through ``f.put_records`` (the same bytes, iovecs and
        flush points as ``put_be64`` + ``put_buffer_async`` per page).  With
        ``rate_limited`` the number of pages is worked out first from the record sizes:
        QEMU checks the limit before each page, so it stops after the page that crossed
        it (``save_pages`` has checked that the limit was not exceeded already)."""
        f, st = self.f, self.stats
        ps = block.page_size
        offsets = chunk * ps
        flags = np.where(zero, RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE)
        headers = (offsets | flags | RAM_SAVE_FLAG_CONTINUE).astype(">u8")
        n = chunk.size
        # The block's first record names it: sent the general way, below.
        idstr = 0 if block is self.last_sent_block else 1 + len(block.name.encode())
        limit = f.get_rate_limit()
        if rate_limited and limit > 0:   # not exceeded yet: save_pages checked
            sizes = np.where(zero, 9, 8 + ps)
            sizes[0] += idstr
            over = np.flatnonzero(f.bytes_xfer + np.cumsum(sizes) > limit)
            if over.size:
                n = int(over[0]) + 1
        first = 0
        if idstr:
            self._save_one(block, int(chunk[0]), bool(zero[0]))
            first = 1
        flat = memoryview(block.array)
        may_free = self.release_ram
        # runs of zero and of normal pages, found with numpy
        edges = (np.flatnonzero(np.diff(zero[first:n].view(np.int8))) + first + 1).tolist()
        for a, b in zip([first, *edges], [*edges, n]):
            if a == b:
                continue
            if zero[a]:    # ZERO records: be64 header + fill byte, byte by byte as QEMU puts them
                recs = np.zeros((b - a, 9), dtype=np.uint8)
                recs[:, :8] = headers[a:b].view(np.uint8).reshape(-1, 8)
                f.put_bytes(recs)
            else:
                pages = (PageRun(flat, offsets[a:b], ps) if b - a >= PAGE_RUN_MIN_PAGES
                         else [flat[o:o + ps] for o in offsets[a:b].tolist()])
                f.put_records(headers[a:b], 8, pages, may_free)
        sent = n - first
        nz = int(np.count_nonzero(zero[first:n]))
        st.zero_pages += nz
        st.normal_pages += sent - nz
        st.pages_bytes += sent * 8 + nz + (sent - nz) * ps
        return n

    def _save_general(self, block, chunk: np.ndarray, zero: np.ndarray, rate_limited: bool) -> int:
        """Per page: ZERO, or XBZRLE / COMPRESS_PAGE / PAGE as the capabilities decide."""
        f = self.f
        n = 0
        for i, is_zero in zip(chunk.tolist(), zero.tolist()):
            if n and rate_limited and f.rate_limit():   # the first was checked by save_pages
                break
            self._save_one(block, i, is_zero)
            n += 1
        return n

    def _header(self, block, offset: int, flag: int) -> None:
        if block is self.last_sent_block:
            self.f.put_be64(offset | flag | RAM_SAVE_FLAG_CONTINUE)
            self.stats.pages_bytes += 8
        else:
            self.f.put_be64(offset | flag)
            self.stats.pages_bytes += 8 + self._put_idstr(block)

    def _save_one(self, block, i: int, is_zero: bool) -> None:
        f, st, ps = self.f, self.stats, block.page_size
        offset = i * ps
        use_xbzrle = self.cache is not None and self.xbzrle_enabled
        # With XBZRLE, work on one snapshot of the page (QEMU's current_buf): the guest
        # may write it meanwhile, and the cache must hold exactly what was sent.
        page = block.pages[i].copy() if use_xbzrle else block.pages[i]
        if is_zero:
            self._header(block, offset, RAM_SAVE_FLAG_ZERO)
            f.put_byte(0)
            st.zero_pages += 1
            st.pages_bytes += 1
            if use_xbzrle:   # xbzrle_cache_zero_page: the cache must learn the page is now zero
                self.cache.insert(block.offset + offset, self._zero_page, self.generation)
            return
        if use_xbzrle and self._save_xbzrle(block, offset, page):
            return
        if self.compress_level is not None and not use_xbzrle:
            self._header(block, offset, RAM_SAVE_FLAG_COMPRESS_PAGE)
            ret = f.put_compression_data(page, self.compress_level)
            if ret > 0:
                st.compressed_pages += 1
                st.compressed_bytes += ret
                st.pages_bytes += ret
            elif not f.get_error():
                f.set_error(-5, f"page {i} of {block.name!r} does not fit QEMUFile's buffer compressed")
            return
        self._header(block, offset, RAM_SAVE_FLAG_PAGE)
        if use_xbzrle:
            # Send the snapshot the cache now holds, copied (put_buffer) as QEMU does:
            # never a view the guest may still change.
            f.put_buffer(page)
        else:
            f.put_buffer_async(memoryview(block.array)[offset:offset + ps], self.release_ram)
        st.normal_pages += 1
        st.pages_bytes += ps

    def _save_xbzrle(self, block, offset: int, page: np.ndarray) -> bool:
        """save_xbzrle_page: True when the page is dealt with (sent as XBZRLE, or unchanged).

        False means "send it as a normal page" (cache miss or overflow); the cache then
        holds the new contents (unless this is the last stage and the page missed).
        """
        cache, st = self.cache, self.stats
        addr = block.offset + offset
        old = cache.lookup(addr, self.generation)
        if old is None:
            st.xbzrle_cache_miss += 1
            if not self.last_stage:
                cache.insert(addr, page, self.generation)
            return False
        encoded = encode_page(old, page, max_len=block.page_size)
        if encoded is None:
            st.xbzrle_overflow += 1
            old[:] = page
            return False
        if not encoded:
            st.xbzrle_unchanged += 1
            return True
        old[:] = page
        self._header(block, offset, RAM_SAVE_FLAG_XBZRLE)
        f = self.f
        f.put_byte(ENCODING_FLAG_XBZRLE)
        f.put_be16(len(encoded))
        f.put_buffer(encoded)
        st.xbzrle_pages += 1
        st.xbzrle_bytes += len(encoded) + 3
        st.pages_bytes += len(encoded) + 3
        return True
