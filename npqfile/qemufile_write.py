"""The write side of QEMUFile: staging buffer, iovecs, flush points, release-ram.

Supports: ``fflush`` and every put of the seed (``put_byte``, ``put_be16/32/64``,
``put_buffer``, ``put_buffer_async`` with ``may_free``, ``put_counted_string``,
``put_compression_data``, ``put_qemu_file``) plus the batch ``put_records``.

Goals: the seed's bytes and flush points with QEMU's later fixes (``add_to_iovec``
returns "flushed" and is bounded before appending; no I/O after an error; length before
data in compressed records; release only after a write that succeeded), at the lowest
Python cost per page.

Plan: a mixin of ``QEMUFile`` (which holds the state; see its module for the iovec
entry layout).  Small puts are copied into ``_buf`` and described by internal entries,
``put_buffer_async`` queues caller memory; ``fflush`` hands every entry to the channel
in one ``writev`` and then releases the may_free runs.
"""

from __future__ import annotations

import errno
import logging
import mmap
import operator
import struct
import time
import zlib
from collections.abc import Callable
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np

from npqfile.buffers import PageRun, address_of, flat_bytes, flat_or_none, root_of, span_of
from npqfile.channels import iovec
from npqfile.channels.base import wait_writable

if TYPE_CHECKING:
    from npqfile.qemufile import QEMUFile

log = logging.getLogger("npqfile.qemufile")

_PAGE = mmap.PAGESIZE
_C_CONTIGUOUS = operator.attrgetter("c_contiguous")
_OBJ = operator.attrgetter("obj")
_NBYTES = operator.attrgetter("nbytes")


def compress_bound(size: int) -> int:
    """zlib's compressBound(): the most deflate can produce from ``size`` bytes."""
    return size + (size >> 12) + (size >> 14) + (size >> 25) + 13


def _skip_bytes(views: list, n: int) -> list:
    """``views`` without their first ``n`` bytes."""
    out = []
    for v in views:
        size = v.nbytes
        if n >= size:
            n -= size
            continue
        out.append(flat_bytes(v)[n:] if n else v)
        n = 0
    return out


def _bad_value(name: str, bits: int, v: Any) -> Exception:
    """The exception for a put of ``v`` that is not an int in 0..2**bits-1: TypeError for a
    non-int, ValueError for an int out of range (QEMU's C types would truncate it)."""
    if not isinstance(v, int) and not hasattr(v, "__index__"):
        return TypeError(f"{name} needs an int, not {type(v).__name__}")
    return ValueError(f"{name} value {v!r} is outside 0..{(1 << bits) - 1}")


def _put_be(n: int, fmt: str, doc: str) -> Callable[[QEMUFile, int], None]:
    """Build put_be16/32/64.  QEMU composes them of put_byte calls; the fast path packs
    all ``n`` bytes at once when no flush can fall inside them (no new iovec that would
    fill the array, no end of the staging buffer), which queues exactly what ``n``
    put_byte calls would; otherwise it makes those calls.  ``struct`` refuses a value
    that does not fit (the check costs nothing on the fast path): ValueError/TypeError,
    nothing queued."""
    pack_into = struct.Struct(fmt).pack_into
    name = f"put_be{8 * n}"
    bits = 8 * n
    limit = 1 << bits
    shifts = tuple(range(8 * (n - 1), -8, -8))

    def put_be(self: QEMUFile, v: int) -> None:
        if self._no_puts:
            return self._refuse_put()
        i = self._buf_index
        if i + n < self._io_buf_size:
            try:
                pack_into(self._buf, i, v)   # beyond _buf_index: harmless until accounted below
            except struct.error:
                raise _bad_value(name, bits, v) from None
            tail = self._tail
            if tail is not None:
                tail[2] += n
            elif len(self._iov) + 1 < self._max_iov:
                self._tail = tail = [None, i, n, False, None]
                self._iov.append(tail)
            else:
                i = -1
            if i >= 0:
                self._bytes_xfer += n
                self._buf_index = i + n
                return
        try:
            ok = 0 <= v < limit
        except TypeError:
            ok = False
        if not ok or not isinstance(v, int) and not hasattr(v, "__index__"):
            raise _bad_value(name, bits, v)
        for shift in shifts:
            self.put_byte((v >> shift) & 0xFF)

    put_be.__name__ = put_be.__qualname__ = name
    put_be.__doc__ = doc
    return put_be


class WriteSide:
    """The puts and ``fflush`` of ``QEMUFile`` (a mixin: the state lives there)."""

    __slots__ = ()

    def fflush(self) -> int:
        """qemu_fflush: hand every queued iovec to the channel in one ``writev``.

        Returns 0 or the sticky error.  With an error already recorded it does no I/O.
        A write that fails or comes back short records the error (-EIO for short).
        may_free memory is released only after a write that succeeded in full."""
        if self._closed:
            raise ValueError("QEMUFile is closed")
        if not self._writable or self._last_error:
            return self._last_error
        iov = self._iov
        if iov:
            bufmv = self._bufmv
            views = [bufmv[e[1]:e[1] + e[2]] if e[0] is None
                     else e[0] if type(e[0]) is memoryview
                     else span_of(e[4], e[1], e[2]) for e in iov]
            self._write_views(views, self._queued)
            del views
        self._buf_index = 0
        iov.clear()
        self._tail = None
        self._has_free = False
        self._last_obj = self._last_root = None  # hold no exports of caller memory
        return self._last_error

    def _write_views(self, views: list, expect: int) -> None:
        """fflush's I/O: ``views`` (``expect`` bytes) in one ``writev``; records a failed
        or short write; releases may_free memory after a full one."""
        try:
            try:
                ret = self._channel.writev(views, self._pos)
            except (BlockingIOError, InterruptedError) as exc:
                ret = self._writev_again(views, exc)
        except OSError as exc:
            self._write_failed(exc, expect)
            return
        self._wrote(ret, expect)

    def _write_failed(self, exc: OSError, expect: int) -> None:
        self.set_error(-(exc.errno or errno.EIO),
                       f"write of {expect} bytes at stream offset {self._pos} failed: {exc.strerror or exc}")

    def _wrote(self, ret: Any, expect: int) -> None:
        """Account a channel write of ``expect`` bytes that returned ``ret``."""
        if not isinstance(ret, int):
            self.set_error(-errno.EIO, f"channel writev returned {ret!r}, not a byte count")
        elif ret > expect:
            self.set_error(-errno.EIO, f"channel bug: writev returned {ret} for a write of {expect} "
                                       f"bytes at stream offset {self._pos}")
        else:
            if ret >= 0:
                self._pos += ret
            if ret != expect:
                self.set_error(ret if ret < 0 else -errno.EIO,
                               f"short write at stream offset {self._pos}: {ret} of {expect} bytes")
            elif self._has_free:
                self._release_ram()

    def _writev_again(self, views: list, exc: OSError) -> Any:
        """The channel's ``writev`` raised EINTR or EAGAIN (``exc``): retry as the read
        side retries ``readinto``, at once for EINTR, after waiting until the channel can
        take more for EAGAIN (a non-blocking channel).  The channel protocol says a
        raising writev wrote nothing, unless it reports ``characters_written`` (as
        BlockingIOError does): those bytes are skipped.  Returns what the last call
        returned plus the bytes written before it; other OSErrors propagate."""
        done = 0
        while True:
            partial = getattr(exc, "characters_written", 0) or 0
            if partial:
                done += partial
                views = _skip_bytes(views, partial)
            if isinstance(exc, BlockingIOError):
                self._wait_writable()
            try:
                ret = self._channel.writev(views, self._pos + done)
            except (BlockingIOError, InterruptedError) as again:
                exc = again
                continue
            # a negative return is an -errno: adding the bytes skipped would hide it
            return ret + done if isinstance(ret, int) and ret >= 0 and done else ret

    def _wait_writable(self) -> None:
        fileno = getattr(self._channel, "fileno", None)
        if fileno is None:
            time.sleep(0.001)
            return
        wait_writable(fileno(), 1.0)     # poll: select refuses an fd of 1024 or more

    def _release_ram(self) -> None:
        """qemu_iovec_release_ram: coalesce the may_free iovecs that are adjacent in
        memory and release the whole pages inside each run."""
        run_root = None
        run_start = run_end = 0
        for e in self._iov:
            if not e[3]:
                continue
            root, start = e[4], e[1]
            if root is run_root and start == run_end:
                run_end += e[2]
                continue
            if run_root is not None:
                self._release_run(run_root, run_start, run_end)
            run_root, run_start, run_end = root, start, start + e[2]
        if run_root is not None:
            self._release_run(run_root, run_start, run_end)

    def _release_run(self, root: Any, start_addr: int, end_addr: int) -> None:
        base = address_of(memoryview(root))
        start = -(-(start_addr - base) // _PAGE) * _PAGE
        end = (end_addr - base) // _PAGE * _PAGE
        if end <= start:
            return
        release = getattr(root, "release_pages", None)
        try:
            if release is not None:
                release(start, end - start)
            else:
                root.madvise(mmap.MADV_DONTNEED, start, end - start)
        except OSError as exc:
            # QEMU only reports a failed madvise; the stream itself is fine.
            self.release_errors += 1
            log.warning("migrate: release of %d bytes at offset %d failed: %s", end - start, start, exc)
        else:
            self.released_bytes += end - start

    def _add_buf_to_iovec(self, n: int) -> None:
        """add_buf_to_iovec: describe ``n`` bytes just copied to ``_buf[_buf_index:]``.

        The buffer index advances only when the add did not flush (QEMU 4.2 fix).  The
        list cannot be full here (QEMU 6.1 guards it): every append that fills it flushes,
        a flush empties it even when the write fails, and after an error puts stop."""
        tail = self._tail
        if tail is not None:
            tail[2] += n
        else:
            iov = self._iov
            self._tail = tail = [None, self._buf_index, n, False, None]
            iov.append(tail)
            if len(iov) >= self._max_iov:
                self.fflush()
                return
        self._buf_index += n
        if self._buf_index == self._io_buf_size:
            self.fflush()

    def _refuse_put(self) -> None:
        """Called when ``_no_puts`` is set: after an error a put is a no-op (as in QEMU);
        on a closed or a readable file it is a mistake, reported as ValueError."""
        if self._closed:
            raise ValueError("QEMUFile is closed")
        if not self._writable:
            raise ValueError("cannot write to a readable QEMUFile")

    def put_byte(self, v: int) -> None:
        """qemu_put_byte: queue the byte ``v``; ValueError unless 0 <= v <= 255 (QEMU's
        C type would truncate it), TypeError for a non-int."""
        if self._no_puts:
            return self._refuse_put()
        try:
            self._buf[self._buf_index] = v   # bytearray checks the range itself
        except (TypeError, ValueError):
            raise _bad_value("put_byte", 8, v) from None
        self._bytes_xfer += 1
        self._add_buf_to_iovec(1)

    put_be16 = _put_be(2, ">H", "qemu_put_be16: two bytes, most significant first.")
    put_be32 = _put_be(4, ">I", "qemu_put_be32: four bytes, most significant first.")
    put_be64 = _put_be(8, ">Q", "qemu_put_be64: eight bytes, most significant first.")

    def put_buffer(self, buf: Any) -> None:
        """qemu_put_buffer: copy ``buf`` (any C-contiguous buffer) into the stream,
        at most IO_BUF_SIZE bytes per iovec, flushing when the buffer fills."""
        if self._no_puts:
            return self._refuse_put()
        mv = flat_bytes(buf)
        size = mv.nbytes
        off = 0
        while size > 0:
            i = self._buf_index
            n = min(self._io_buf_size - i, size)
            self._bufmv[i:i + n] = mv[off:off + n]
            self._bytes_xfer += n
            self._add_buf_to_iovec(n)
            if self._last_error:
                break
            off += n
            size -= n

    def put_bytes(self, buf: Any) -> None:
        """``put_byte`` of each byte of ``buf`` in turn (QEMU's byte-by-byte puts of record
        headers: a run of ZERO records), with the same iovecs and flush points, in bulk.
        Only a byte that opens a new iovec can flush on the iovec count; once the last
        iovec is the staging buffer's (or none is queued), more bytes extend it and a
        flush falls exactly where the buffer fills, as ``put_buffer`` does.  Not in QEMU."""
        if self._no_puts:
            return self._refuse_put()
        mv = flat_bytes(buf)
        n = mv.nbytes
        k = 0
        while k < n and not self._last_error and (self._max_iov < 2 or self._tail is None and self._iov):
            self.put_byte(mv[k])
            k += 1
        if k < n and not self._last_error:
            self.put_buffer(mv[k:])

    def put_buffer_async(self, buf: Any, may_free: bool = False) -> None:
        """qemu_put_buffer_async: queue ``buf`` itself, without copying.

        The memory must stay alive and unchanged until the next flush: the bytes sent
        are the ones it holds at flush time.  With ``may_free`` the memory must belong
        to an ``mmap.mmap`` (directly, a memoryview slice or a numpy view of one), else
        TypeError; after the write that carried it succeeds in full, the whole pages
        inside it are released (see ``_release_ram``).  Raises ValueError for a
        non-contiguous buffer."""
        if self._no_puts:
            return self._refuse_put()
        mv = buf if type(buf) is memoryview else memoryview(buf)
        if not mv.c_contiguous:
            raise ValueError("put_buffer_async needs a C-contiguous buffer")
        obj = mv.obj
        if obj is self._last_obj:
            root = self._last_root
        else:
            root = root_of(mv)
            self._last_obj, self._last_root = obj, root
        if may_free and not isinstance(root, mmap.mmap):
            raise TypeError(
                f"put_buffer_async(may_free=True) needs memory backed by an mmap.mmap, not {type(root).__name__}")
        n = mv.nbytes
        self._bytes_xfer += n
        iov = self._iov
        addr = None
        if iov and self._tail is None:
            last = iov[-1]
            if last[4] is root and last[3] == bool(may_free):
                # Possibly adjacent to the previous view: only now is an address worth taking.
                if last[1] is None:
                    last[1] = address_of(last[0])
                addr = address_of(mv)
                if addr == last[1] + last[2] and flat_or_none(root) is not None:
                    # A run: one iovec, cut from root at flush time.  The views stay
                    # referenced, so their memory cannot be unmapped while queued.
                    if type(last[0]) is memoryview:
                        last[0] = [last[0], mv]
                    else:
                        last[0].append(mv)
                    last[2] += n
                    return
        if may_free:
            iov.append([mv, address_of(mv) if addr is None else addr, n, True, root])
            self._has_free = True
        else:
            iov.append([mv, addr, n, False, root])
        self._tail = None
        if len(iov) >= self._max_iov:
            self.fflush()

    def put_records(self, headers: Any, header_size: int, pages: Any, may_free: bool = False) -> None:
        """Batch form of "put each byte of header_k (``put_be64`` for an 8-byte header),
        then ``put_buffer_async(pages[k], may_free)``" for k in order -- the RAM
        section's per-page pattern, QEMU's ``save_page_header`` + ``save_normal_page``
        -- with exactly the same iovecs, flush points and releases as those calls, for a
        fraction of their Python cost.  ``headers`` holds ``len(pages)`` headers of
        ``header_size`` bytes back to back; ``pages`` are C-contiguous buffers, or a
        ``PageRun`` (pages of one buffer by offset): then, on a channel with native iovecs
        (``writev_iov``), whole flush cycles go out as the same writev calls without a
        Python object per page.  Not in QEMU (C needs no batching); see README."""
        if self._no_puts:
            return self._refuse_put()
        hdr = flat_bytes(headers)
        n = len(pages)
        h = header_size
        if h < 1 or hdr.nbytes != h * n:
            raise ValueError(f"headers hold {hdr.nbytes} bytes, expected {n} x {h}")
        k = 0
        cycle = self._max_iov // 2
        cycles = not may_free and self._max_iov % 2 == 0 and cycle * h < self._io_buf_size
        native = (getattr(self._channel, "writev_iov", None)
                  if cycles and type(pages) is PageRun and iovec.available() else None)
        while k < n and not self._last_error:
            if cycles and n - k >= cycle and not self._iov and self._buf_index == 0:
                # the queue is empty: whole cycles
                if native is not None:
                    k = self._put_page_cycles_native(native, hdr, h, pages, k, n)
                else:
                    k = self._put_record_cycles(hdr, h, pages, k, n)
                continue
            # Records that fit before the next flush: each adds a header iovec (the
            # first one coalesces into a staging-buffer tail) and a page iovec.  Take
            # all but the record during which QEMU would flush in one go ...
            room = self._max_iov - len(self._iov) + (0 if self._tail is None else 1)
            fast = min((room - 1) // 2, n - k, (self._io_buf_size - 1 - self._buf_index) // h)
            if fast > 0:
                self._put_records_unflushed(hdr, h, pages, k, fast, may_free)
                k += fast
                if k == n:
                    break
            # ... and that record the slow, exact way: QEMU puts a header byte by byte,
            # so a flush may fall inside it.
            for byte in hdr[k * h:(k + 1) * h]:
                self.put_byte(byte)
            self.put_buffer_async(pages[k], may_free)
            k += 1

    def _put_page_cycles_native(self, writev_iov: Callable, hdr: memoryview, h: int, run: PageRun,
                                k: int, n: int) -> int:
        """``_put_record_cycles`` for a PageRun on a channel with native iovecs: the same
        writev calls with the same iovecs (header, page, header, page, ...), their addresses
        computed by numpy -- the headers from the caller's header buffer rather than copies
        in the staging buffer: the same bytes.  Returns as ``_put_record_cycles``."""
        cycle = self._max_iov // 2
        ps = run.page_size
        expect = cycle * (h + ps)
        hbase = address_of(hdr)
        pbase = run.address()
        # At most 64 cycles' iovecs at a time: 64 KiB of array, whatever the run's length.
        while n - k >= cycle and not self._last_error:
            count = min((n - k) // cycle, 64) * cycle
            iov = iovec.iovec_array(2 * count)
            iov[0::2, 0] = np.arange(hbase + k * h, hbase + (k + count) * h, h, dtype=np.uint64)
            iov[0::2, 1] = h
            iov[1::2, 0] = run.offsets[k:k + count] + np.uint64(pbase)
            iov[1::2, 1] = ps
            splice = self._splice
            for c in range(0, 2 * count, 2 * cycle):
                if self._last_error:
                    break
                self._bytes_xfer += expect
                send = writev_iov
                try:
                    if splice is not None:     # zero_copy_send: headers from memory that stays put
                        at = splice.place(hdr[k * h:(k + cycle) * h])   # OSError: no ring mapped
                        if at is not None:
                            iov[c:c + 2 * cycle:2, 0] = np.arange(at, at + cycle * h, h, dtype=np.uint64)
                            send = self._channel.splice_iov
                    ret = send(iov[c:c + 2 * cycle], expect, self._pos)
                except OSError as exc:
                    self._write_failed(exc, expect)
                    break
                self._wrote(ret, expect)
                k += cycle
        return k

    def _put_record_cycles(self, hdr: memoryview, h: int, pages: Any, k: int, n: int) -> int:
        """From an empty queue, the general path queues max_iov/2 records -- header iovec
        (staging buffer), page iovec, ... -- and the last page's iovec is the max_iov-th,
        which flushes: the queue is empty again.  Do those whole cycles directly: the same
        bytes in the same writev calls with the same iovecs, without queue entries.
        Returns the index after the last record written: ``k`` plus whole cycles, as
        many as fit before ``n``; stops at an error."""
        cycle = self._max_iov // 2
        bufmv = self._bufmv
        hviews = [bufmv[j * h:(j + 1) * h] for j in range(cycle)]
        while n - k >= cycle and not self._last_error:
            mvs = [p if type(p) is memoryview else memoryview(p) for p in pages[k:k + cycle]]
            if not all(map(_C_CONTIGUOUS, mvs)):
                bad = next(j for j, mv in enumerate(mvs) if not mv.c_contiguous)
                raise ValueError(f"page {k + bad} of put_records is not C-contiguous")
            bufmv[:cycle * h] = hdr[k * h:(k + cycle) * h]
            views: list = [None] * (2 * cycle)    # a new list each time: a channel may keep it
            views[0::2] = hviews
            views[1::2] = mvs
            expect = cycle * h + sum(map(_NBYTES, mvs))
            self._bytes_xfer += expect
            self._write_views(views, expect)
            k += cycle
        return k

    def _put_records_unflushed(self, hdr: memoryview, h: int, pages: Any, k: int, count: int,
                               may_free: bool) -> None:
        """Queue records k..k+count-1, which the caller has checked cause no flush.
        Every page is checked before anything is queued, so a bad page (ValueError,
        TypeError) leaves the stream as it was.  The iovec entries are built with
        map/zip (C loops); entries that can no longer change are tuples."""
        mvs = [p if type(p) is memoryview else memoryview(p) for p in pages[k:k + count]]
        if not all(map(_C_CONTIGUOUS, mvs)):
            bad = next(j for j, mv in enumerate(mvs) if not mv.c_contiguous)
            raise ValueError(f"page {k + bad} of put_records is not C-contiguous")
        objs = list(map(_OBJ, mvs))
        last_obj, last_root = self._last_obj, self._last_root
        if objs[0] is not last_obj:
            last_obj, last_root = objs[0], root_of(mvs[0])
        if all(map(operator.is_, objs, repeat(last_obj))):
            roots: Any = repeat(last_root, count)      # the usual case: one block's views
        else:
            roots = []
            for mv, obj in zip(mvs, objs):
                if obj is not last_obj:
                    last_obj, last_root = obj, root_of(mv)
                roots.append(last_root)
        sizes = list(map(_NBYTES, mvs))
        if may_free:
            roots = list(roots)
            for j, root in enumerate(roots):
                if not isinstance(root, mmap.mmap):
                    raise TypeError(f"put_records(may_free=True): page {k + j} is not backed by an mmap.mmap")
            addrs: Any = map(address_of, mvs)
        else:
            addrs = repeat(None)
        page_entries = list(zip(mvs, addrs, sizes, repeat(bool(may_free)), roots))
        bi = self._buf_index
        self._bufmv[bi:bi + count * h] = hdr[k * h:(k + count) * h]
        iov = self._iov
        if self._tail is not None:
            self._tail[2] += h
        else:
            iov.append((None, bi, h, False, None))
        # page, header, page, header, ..., page; the last page may still coalesce
        # with a later put_buffer_async, so it is a (mutable) list.
        chunk: list = [None] * (2 * count - 1)
        chunk[0::2] = page_entries
        chunk[1::2] = zip(repeat(None), range(bi + h, bi + count * h, h), repeat(h), repeat(False), repeat(None))
        chunk[-1] = list(chunk[-1])
        iov.extend(chunk)
        self._last_obj, self._last_root = last_obj, last_root
        self._tail = None
        self._buf_index = bi + count * h
        self._bytes_xfer += count * h + sum(sizes)
        if may_free:
            self._has_free = True

    def put_counted_string(self, s: bytes | str) -> None:
        """qemu_put_counted_string: one length byte, then the bytes (no NUL).
        Raises ValueError for strings of 256 bytes or more."""
        if isinstance(s, str):
            data = s.encode()
        elif isinstance(s, (bytes, bytearray, memoryview)):
            data = bytes(s)
        else:
            raise TypeError(f"put_counted_string needs str or bytes, not {type(s).__name__}")
        if len(data) >= 256:
            raise ValueError(f"counted string too long: {len(data)} bytes (at most 255)")
        self.put_byte(len(data))
        self.put_buffer(data)

    def put_compression_data(self, buf: Any, level: int = zlib.Z_DEFAULT_COMPRESSION) -> int:
        """qemu_put_compression_data: ``be32 length`` + zlib stream of ``buf``.

        The compressed bytes must fit the staging buffer after the length (flushing
        first if needed).  Returns the bytes queued (length + 4), or -1 when they
        cannot fit, compression fails, or an error is already recorded.  Raises
        ValueError for a level outside -1..9."""
        if not -1 <= level <= 9:
            raise ValueError(f"zlib compression level must be -1..9, not {level}")
        if self._no_puts:
            self._refuse_put()
            return -1
        data = flat_bytes(buf)
        bound = compress_bound(data.nbytes)
        if self._io_buf_size - self._buf_index - 4 < bound:
            self.fflush()
            if self._last_error or self._io_buf_size - 4 < bound:
                return -1
        try:
            comp = zlib.compressobj(level)
            out = comp.compress(data) + comp.flush()
        except zlib.error:
            return -1
        # Length first, through the put path, then the data: never pre-place data.
        self.put_be32(len(out))
        self.put_buffer(out)
        return len(out) + 4

    def put_qemu_file(self, src: QEMUFile) -> int:
        """qemu_put_qemu_file: copy ``src``'s staged bytes into this stream and empty
        ``src``'s buffer (its queued iovecs are dropped, as in QEMU).  Returns the
        number of bytes copied.  TypeError when ``src`` is not a QEMUFile."""
        if not isinstance(src, WriteSide):
            raise TypeError(f"put_qemu_file needs a QEMUFile, not {type(src).__name__}")
        n = src._buf_index
        if n > 0:
            self.put_buffer(src._bufmv[:n])
            src._buf_index = 0
            src._iov.clear()
            src._tail = None
            src._has_free = False
        return n
