"""Page records read straight into guest RAM at the addresses a pre-copy source sends next.

Supports: ``DirectPages(page_size).run(f, dest, start)``: the RAM loader has just written the
page below ``start`` of a fresh block, at its frontier (every page from ``start`` up is still
zero and untouched).  A QEMU source's next records are most likely ``PAGE|CONTINUE`` records
of the following pages, in order; ``run`` reads them with one readv -- the 8-byte headers into
a scratch array, each page straight to the address it predicts -- then checks every header,
and repeats while the prediction holds.  Returns the records loaded.

Goals: a single-pass stream (``npqfile save``, QEMU's first RAM iteration, a paused guest's
migration) is copied once, from the channel into RAM, instead of twice (into the read-ahead
buffer, then into RAM): about 0.17 s of a 0.6 s load of 1 GiB here.  Nothing else changes:
every record the prediction did not match -- a section's end, another block, a ZERO page, a
bad record -- is given back to QEMUFile's read-ahead (``QEMUFile.unread``) and goes through
the loader's ordinary path, which raises the same errors at the same offsets; nothing is
written outside the declared block; a mispredicted page gets back the zero it held.

Plan: only pages at or above the block's frontier (``_Dest.clean_from`` in ``ram_loader``:
the caller said the RAM was fresh and the loader has written nothing there) are predicted,
so a wrong prediction only ever overwrites zero pages; and only as many records as the
channel already holds (FIONREAD), so a stream that stops or goes elsewhere leaves no page
faulted in.  The pages are faulted in first (MADV_POPULATE_WRITE): a pipe's reader copies
while holding the pipe's lock, and zeroing fresh pages inside that copy stalled the writer
(``cat``) in profiles.  Mispredicted pages, once their bytes are given back, return to zero
and to the untouched state (MADV_DONTNEED for private anonymous memory, MADV_REMOVE for
shared memory: QEMU's ram_handle_zero never faults a page in; neither do we).  Where a
transparent huge page held both loaded and mispredicted pages, it is split and the
mispredicted part freed: residency can then be lower than a buffered load's, never higher.
A read that ends inside a record whose header matched is completed with blocking reads of
that record only, as the ordinary path would wait for it.  After a miss, the next few
chances are skipped (doubling, up to ``MAX_COOLDOWN``): a stream of mixed records does not
pay for reads given back at every turn.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
import termios

import numpy as np

from npqfile.channels import iovec
from npqfile.stream.constants import RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_PAGE

__all__ = ["DirectPages", "RUN_RECORDS"]

# Records per read: a miss gives back at most this many, and they must fit in the loader's
# read-ahead buffer (READ_AHEAD, 1 MiB: 255 records of 4 KiB pages; fewer in a smaller one).
RUN_RECORDS = 255
MIN_RECORDS = 16        # fewer pages left in the block: not worth a read's set-up
MAX_COOLDOWN = 64       # chances skipped after repeated misses, at most
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)     # Linux's value; Python 3.11 lacks it


class DirectPages:
    """Direct page reads for one loader (``page_size``: the target page size).  Scratch
    memory: the headers of one read (``RUN_RECORDS`` * 8 bytes) and its iovecs."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.rec = 8 + page_size
        self.flags = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
        self.heads = np.zeros(RUN_RECORDS, dtype=">u8")
        self.head_bytes = self.heads.view(np.uint8)
        self.steps = np.arange(RUN_RECORDS, dtype=np.uint64) * np.uint64(page_size)
        self.head_iov = np.uint64(self.heads.ctypes.data) + np.arange(RUN_RECORDS, dtype=np.uint64) * np.uint64(8)
        self.iov = iovec.iovec_array(2 * RUN_RECORDS)
        self.tail = iovec.iovec_array(2)
        self.cooldown = 0       # chances to skip after the next miss
        self.skip = 0           # chances still to skip
        self.records = 0        # records loaded this way (statistics, tests)
        self.misses = 0         # reads that gave bytes back
        self.populate = True    # MADV_POPULATE_WRITE works here (Linux 5.14+)

    def run(self, f, dest, start: int) -> int:
        """Load records predicted to be ``PAGE|CONTINUE`` of ``dest`` at ``start``,
        ``start + page_size``, ... for as long as the prediction holds.  ``dest`` is the
        loader's ``_Dest`` (``block``, ``view``, ``size``); ``start`` its ``clean_from``,
        every page from there up zero and untouched (the caller's check).  Returns the
        records loaded: their pages are written, the caller advances ``clean_from`` and
        the hash.  Never raises for what the stream holds: whatever did not match is back
        in ``f``'s read-ahead for the ordinary path."""
        if self.skip:
            self.skip -= 1
            return 0
        total = 0
        while True:
            got, more = self._read(f, dest, start + total * self.page_size)
            total += got
            if not more:
                self.records += total
                return total

    def _read(self, f, dest, start: int) -> tuple[int, bool]:
        """One read of predicted records at ``start``: (records loaded, whether every byte
        read was loaded, so that the next read may follow)."""
        ps, rec = self.page_size, self.rec
        held = f.buffered()
        b = len(held)
        if b >= rec or (b >= 8 and int.from_bytes(held[:8], "big") != start | self.flags):
            return 0, False         # the next record is already known not to be predicted
        # as many records as the channel holds now: pages are only faulted in for bytes
        # that are there (a stream that stops or goes elsewhere leaves no pages behind)
        k = min(RUN_RECORDS, f.read_ahead_size // rec, (dest.size - start) // ps,
                (b + self._available(f)) // rec)       # (a miss gives back up to k records)
        if k < MIN_RECORDS:
            return 0, False
        if self.populate:
            # fault the pages in before the read: a pipe's reader holds the pipe's lock
            # while it copies, so zeroing fresh pages inside the read stalls the writer
            try:
                dest.block.mmap.madvise(MADV_POPULATE_WRITE, start, k * ps)
            except OSError:
                self.populate = False
        iov = self.iov[:2 * k]
        iov[0::2, 0] = self.head_iov[:k]
        iov[0::2, 1] = 8
        iov[1::2, 0] = self.steps[:k] + np.uint64(dest.block.address + start)
        iov[1::2, 1] = ps
        if b:                       # a record's first bytes are buffered: they start the run
            self.head_bytes[:min(b, 8)] = held[:8]
            if b > 8:
                dest.view[start:start + b - 8] = held[8:]
            del held
            f.skip(b)
        else:
            del held
        n = b + f.read_direct(iovec.advance(iov, b), k * rec - b)
        whole, rem = divmod(n, rec)
        if rem >= 8 and int(self.heads[whole]) == start + whole * ps | self.flags:
            # the read ended inside a page whose header matched: finish that record only
            # (a header read in part may be an EOS the source waits after: given back)
            self.tail[0] = (self.head_iov[whole], 8)
            self.tail[1] = (dest.block.address + start + whole * ps, ps)
            n += f.read_direct(iovec.advance(self.tail, rem), rec - rem, complete=True)
            whole, rem = divmod(n, rec)
        seen = whole + (1 if rem >= 8 else 0)
        ok = self.heads[:seen] == self.steps[:seen] + np.uint64(start | self.flags)
        good = min(whole, seen if ok.all() else int(np.argmin(ok)))
        hit = good * rec == n
        if not hit:
            self._give_back(f, dest, start, good, n)
        if good < seen:             # a header that is not the predicted one: a miss
            self.misses += 1
            self.skip = self.cooldown
            self.cooldown = min(max(1, 2 * self.cooldown), MAX_COOLDOWN)
        elif good:
            self.cooldown = 0       # (a read that ended inside a record is no miss)
        if good < k:
            # pages faulted in or written but not loaded: back to zero and untouched
            # (nothing stays resident that the stream did not write)
            first, length = start + good * ps, (k - good) * ps
            advice = mmap.MADV_DONTNEED if dest.block.kind == "private" else mmap.MADV_REMOVE
            dest.block.mmap.madvise(advice, first, length)
        return good, hit and n > 0

    def _available(self, f) -> int:
        """Bytes the channel under ``f`` can give without waiting: a regular file's size
        past the read position, else FIONREAD (pipes, sockets); 0 when unknown, or when
        the channel has no native reads (nothing to predict for)."""
        ch = f.channel
        fileno = getattr(ch, "fileno", None)
        if fileno is None or not hasattr(ch, "readv_iov"):
            return 0
        try:
            fd = fileno()
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):    # (FIONREAD's int wraps past 2 GiB there)
                # a positional channel reads at the stream offset (past the read-ahead)
                pos = f.tell() + len(f.buffered()) if f.seekable else os.lseek(fd, 0, os.SEEK_CUR)
                return max(0, st.st_size - pos)
            return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return 0

    def _give_back(self, f, dest, start: int, good: int, n: int) -> None:
        """Hand the ``n - good * rec`` bytes read after record ``good`` back to ``f``, in
        stream order: each record's header (or its start) from the scratch array, then
        what reached its predicted page."""
        ps, rec = self.page_size, self.rec
        parts = []
        at, i = good * rec, good
        while at < n:
            h = min(8, n - at)
            parts.append(self.head_bytes[8 * i:8 * i + h])
            at += h
            if at < n:
                p = min(ps, n - at)
                parts.append(dest.view[start + i * ps:start + i * ps + p])
                at += p
            i += 1
        f.unread(parts)
