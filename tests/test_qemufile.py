"""Contract tests for npqfile.qemufile.QEMUFile: one test per promise of the seed's
functions and of each fix listed in the README's "Differences from QEMU"."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import threading
import zlib

import numpy as np
import pytest

from npqfile.channels import FdChannel, MemoryChannel, NullChannel, SocketChannel
from npqfile.errors import FileError
from npqfile.qemufile import (
    IO_BUF_SIZE,
    MAX_IOV_SIZE,
    RAM_CONTROL_HOOK,
    RAM_CONTROL_ROUND,
    RAM_SAVE_CONTROL_DELAYED,
    RAM_SAVE_CONTROL_NOT_SUPP,
    QEMUFile,
)

PAGE = mmap.PAGESIZE


class Recorder:
    """Write channel recording each writev: number of buffers and bytes."""

    def __init__(self, fail_with: int | None = None, short_by: int = 0):
        self.data = bytearray()
        self.calls: list[tuple[int, int]] = []
        self.fail_with = fail_with
        self.short_by = short_by

    def writev(self, buffers, pos):
        n = sum(memoryview(b).nbytes for b in buffers)
        self.calls.append((len(buffers), n))
        if self.fail_with is not None:
            raise OSError(self.fail_with, os.strerror(self.fail_with))
        for b in buffers:
            self.data += memoryview(b).cast("B")
        return n - self.short_by


class ReleaseMap(mmap.mmap):
    """A private anonymous mmap that records release_pages calls (and really releases)."""

    def __new__(cls, size):
        m = super().__new__(cls, -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.released = []
        return m

    def release_pages(self, offset, length):
        self.released.append((offset, length))
        self.madvise(mmap.MADV_DONTNEED, offset, length)


def private_map(pages: int, fill: int = 0xAB) -> tuple[mmap.mmap, np.ndarray]:
    m = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, dtype=np.uint8)
    a[:] = fill
    return m, a


def reader(data: bytes, chunk=None) -> QEMUFile:
    return QEMUFile(MemoryChannel.reader(data, chunk=chunk))


# -- construction ---------------------------------------------------------------------


def test_direction_comes_from_the_channel():
    assert QEMUFile(NullChannel()).is_writable
    assert not reader(b"").is_writable

    class Both:
        def writev(self, b, p):
            return 0

        def readinto(self, b, p):
            return 0

    with pytest.raises(ValueError, match="both writev and readinto"):
        QEMUFile(Both())
    with pytest.raises(ValueError, match="neither"):
        QEMUFile(object())


# -- write side: buffer, iovecs, flush points -----------------------------------------


def test_put_byte_flushes_exactly_at_the_buffer_boundary():
    ch = Recorder()
    f = QEMUFile(ch)
    for i in range(IO_BUF_SIZE):
        f.put_byte(i & 0xFF)
    assert ch.calls == [(1, IO_BUF_SIZE)]
    f.put_byte(7)
    assert f.ftell_fast() == IO_BUF_SIZE + 1
    assert f.fflush() == 0
    assert ch.calls[-1] == (1, 1)


def test_consecutive_small_puts_make_one_iovec_in_big_endian_order():
    ch = Recorder()
    f = QEMUFile(ch)
    f.put_byte(0xFF)
    f.put_be16(0x0200)
    f.put_be32(70000)
    f.put_be64(12121212)
    f.put_be64(-12121212 & (2**64 - 1))
    f.put_counted_string("pc.ram")
    f.fflush()
    assert ch.calls == [(1, 1 + 2 + 4 + 8 + 8 + 7)]
    assert bytes(ch.data) == bytes.fromhex(
        "ff" "0200" "00011170" "0000000000b8f47c" "ffffffffff470b84") + b"\x06pc.ram"


def test_flush_at_max_iov_and_buf_index_not_advanced_after_it():
    """QEMU 4.2 fix: when the 64th iovec (a staged byte) flushes, the staging buffer
    starts again at 0 rather than wasting the byte's slot."""
    m, a = private_map(64)
    ch = Recorder()
    f = QEMUFile(ch)
    for i in range(MAX_IOV_SIZE // 2):
        f.put_buffer_async(a[2 * i * PAGE:(2 * i + 1) * PAGE])  # never adjacent
        f.put_byte(i)
    assert ch.calls == [(MAX_IOV_SIZE, MAX_IOV_SIZE // 2 * (PAGE + 1))]
    assert f._buf_index == 0 and f.ftell_fast() == ch.calls[0][1]
    # The staging buffer holds a whole IO_BUF_SIZE again before it fills.
    f.put_buffer(bytes(IO_BUF_SIZE - 1))
    assert len(ch.calls) == 1
    f.put_byte(1)
    assert ch.calls[1] == (1, IO_BUF_SIZE)


def test_fast_multibyte_puts_flush_where_single_bytes_would():
    """put_be64 is eight put_byte calls in QEMU; check the flush points match when the
    64th iovec or the end of the buffer falls inside the value."""
    m, a = private_map(64)
    for phase in range(10):
        traces = []
        for bytewise in (False, True):
            ch = Recorder()
            f = QEMUFile(ch, io_buf_size=64 + phase, max_iov=7)
            for i in range(40):
                if i % 3 == 0:
                    f.put_buffer_async(a[2 * i * PAGE:(2 * i + 1) * PAGE])
                v = 0x0102030405060708 * (i + 1) & (2**64 - 1)
                if bytewise:
                    for shift in range(56, -8, -8):
                        f.put_byte(v >> shift & 0xFF)
                else:
                    f.put_be64(v)
            f.fflush()
            traces.append((ch.calls, bytes(ch.data)))
        assert traces[0] == traces[1], phase


def test_put_buffer_splits_at_the_staging_buffer():
    ch = Recorder()
    f = QEMUFile(ch)
    data = os.urandom(3 * IO_BUF_SIZE + 5)
    f.put_buffer(data)
    assert [c[1] for c in ch.calls] == [IO_BUF_SIZE] * 3
    f.fflush()
    assert bytes(ch.data) == data


def test_adjacent_async_views_coalesce_into_one_iovec():
    m, a = private_map(8)
    ch = Recorder()
    f = QEMUFile(ch)
    mv = memoryview(m)
    for i in range(4):
        f.put_buffer_async(mv[i * PAGE:(i + 1) * PAGE])
    f.put_buffer_async(a[4 * PAGE:6 * PAGE].reshape(2, PAGE))  # numpy 2-D view, adjacent too
    f.put_buffer_async(a[7 * PAGE:8 * PAGE])  # gap: new iovec
    f.fflush()
    assert ch.calls == [(2, 7 * PAGE)]


def test_async_data_is_read_at_flush_time():
    m, a = private_map(1, fill=1)
    ch = Recorder()
    f = QEMUFile(ch)
    f.put_buffer_async(a)
    a[:] = 2
    f.fflush()
    assert set(ch.data) == {2}


def test_async_rejects_non_contiguous_and_may_free_without_mmap():
    f = QEMUFile(NullChannel())
    with pytest.raises(ValueError, match="C-contiguous"):
        f.put_buffer_async(np.zeros((4, 4), np.uint8)[:, 1])
    with pytest.raises(TypeError, match="mmap"):
        f.put_buffer_async(bytearray(PAGE), may_free=True)
    with pytest.raises(TypeError, match="mmap"):
        f.put_buffer_async(np.zeros(PAGE, np.uint8), may_free=True)


def test_put_records_matches_the_per_call_sequence():
    m, a = private_map(300)
    rng = np.random.default_rng(5)
    order = rng.permutation(300)
    heads = (order.astype(np.uint64) * PAGE | 0x28).astype(">u8").tobytes()
    pages = [a[i * PAGE:(i + 1) * PAGE] for i in order]
    for lead in range(4):  # start with different iovec/buffer states
        traces = []
        for batch in (True, False):
            ch = Recorder()
            f = QEMUFile(ch, max_iov=9, io_buf_size=200 + lead * 3)
            for j in range(lead):
                f.put_byte(j & 0xFF)
            if batch:
                f.put_records(heads, 8, pages)
            else:
                for k, p in enumerate(pages):
                    f.put_be64(int.from_bytes(heads[8 * k:8 * k + 8], "big"))
                    f.put_buffer_async(p)
            f.fflush()
            traces.append((ch.calls, bytes(ch.data)))
        assert traces[0] == traces[1], lead


@pytest.mark.parametrize("max_iov,io_buf_size", [(64, 32768), (8, 32768), (8, 40), (2, 32768)])
def test_put_records_whole_flush_cycles_match_the_per_call_sequence(max_iov, io_buf_size):
    """From an empty queue put_records writes whole flush cycles directly (max_iov/2
    records per writev): the same writev calls, iovecs and bytes as the per-call API."""
    m, a = private_map(300)
    order = np.random.default_rng(8).permutation(300)
    heads = (order.astype(np.uint64) * PAGE | 0x28).astype(">u8").tobytes()
    pages = [a[i * PAGE:(i + 1) * PAGE] for i in order]
    class IovRecorder(Recorder):
        def writev(self, buffers, pos):
            self.iovs = getattr(self, "iovs", []) + [[memoryview(b).nbytes for b in buffers]]
            return super().writev(buffers, pos)

    for lead, cut in ((0, 300), (0, 131), (1, 300), (3, 77)):
        traces = []
        for batch in (True, False):
            ch = IovRecorder()
            f = QEMUFile(ch, max_iov=max_iov, io_buf_size=io_buf_size)
            for j in range(lead):
                f.put_byte(j & 0xFF)
            if batch:
                f.put_records(heads[:8 * cut], 8, pages[:cut])
                f.put_records(heads[8 * cut:], 8, pages[cut:])
            else:
                for k, p in enumerate(pages):
                    f.put_be64(int.from_bytes(heads[8 * k:8 * k + 8], "big"))
                    f.put_buffer_async(p)
            f.fflush()
            traces.append((ch.iovs, bytes(ch.data), f._bytes_xfer))
        assert traces[0] == traces[1], (lead, cut)
    f = QEMUFile(Recorder())
    strided = np.zeros((4, 8), np.uint8)[:, 1]
    with pytest.raises(ValueError, match="page 40 of put_records"):
        f.put_records(heads[:8 * 64], 8, pages[:40] + [strided] + pages[41:64])


@pytest.mark.parametrize("max_iov,io_buf_size", [(64, 32768), (5, 64), (2, 40), (1, 64)])
def test_put_bytes_is_put_byte_of_each_byte(max_iov, io_buf_size):
    """put_bytes (a run of ZERO records in bulk) makes the writev calls, iovecs and bytes
    of one put_byte per byte, whatever the queue held before (pages up to the iovec
    limit, staged bytes up to the buffer's end)."""
    m, a = private_map(80)
    data = np.random.default_rng(2).integers(0, 256, 40000, dtype=np.uint8).tobytes()

    class IovRecorder(Recorder):
        def __init__(self):
            super().__init__()
            self.iovs = []

        def writev(self, buffers, pos):
            self.iovs.append([memoryview(b).nbytes for b in buffers])
            return super().writev(buffers, pos)

    for pages_before in (0, 1, max_iov - 1, max_iov, 2 * max_iov - 1):
        for bytes_before in (0, 1, io_buf_size - 1):
            for size in (1, 9, 100, 9 * 300) + (() if max_iov == 1 else (40000,)):   # 1: a flush a byte
                traces = []
                for bulk in (True, False):
                    ch = IovRecorder()
                    f = QEMUFile(ch, max_iov=max_iov, io_buf_size=io_buf_size)
                    for j in range(bytes_before):
                        f.put_byte(j & 0xFF)
                    for j in range(pages_before):
                        f.put_buffer_async(a[2 * j * PAGE:(2 * j + 1) * PAGE])
                    if bulk:
                        f.put_bytes(data[:size])
                    else:
                        for byte in data[:size]:
                            f.put_byte(byte)
                    f.fflush()
                    traces.append((ch.iovs, bytes(ch.data), f._bytes_xfer))
                assert traces[0] == traces[1], (pages_before, bytes_before, size)


# -- errors ---------------------------------------------------------------------------


def test_first_error_sticks_and_stops_all_io():
    ch = Recorder(fail_with=errno.EPIPE)
    f = QEMUFile(ch)
    f.put_be32(1)
    assert f.fflush() == -errno.EPIPE
    assert isinstance(f.error, FileError) and f.error.errno == errno.EPIPE
    assert "stream offset 0" in str(f.error)
    f.set_error(-errno.EINVAL)
    assert f.get_error() == -errno.EPIPE
    calls = len(ch.calls)
    f.put_buffer(b"x" * 100000)
    f.put_byte(1)
    assert f.fflush() == -errno.EPIPE and len(ch.calls) == calls
    assert f.rate_limit()
    assert f.close() == -errno.EPIPE


def test_short_write_is_eio():
    f = QEMUFile(Recorder(short_by=1))
    f.put_be64(5)
    assert f.fflush() == -errno.EIO
    assert "short write" in str(f.error)


def test_iovec_array_stays_bounded_in_error_state():
    """QEMU 6.1 fix: after a failed flush the iovec list cannot grow past MAX_IOV_SIZE."""
    m, a = private_map(200)
    f = QEMUFile(Recorder(fail_with=errno.EIO))
    f.set_error(0)  # setting 0 records nothing
    assert f.get_error() == 0
    for i in range(100):
        f.put_buffer_async(a[2 * i * PAGE:(2 * i + 1) * PAGE])
        assert len(f._iov) <= MAX_IOV_SIZE
    assert f.get_error() == -errno.EIO


def test_close_reports_channel_close_error():
    class BadClose(Recorder):
        error = "exec:false: command exited with status 1"

        def close(self):
            return -errno.EIO

    f = QEMUFile(BadClose())
    f.put_byte(1)
    assert f.close() == -errno.EIO
    assert "status 1" in str(f.error)
    assert f.close() == -errno.EIO  # idempotent


def test_close_returns_positive_channel_result_and_context_manager_closes():
    class Positive(Recorder):
        closed = False

        def close(self):
            self.closed = True
            return 3

    ch = Positive()
    with QEMUFile(ch) as f:
        f.put_byte(1)
    assert ch.closed and bytes(ch.data) == b"\x01"
    assert QEMUFile(Positive()).close() == 3


def test_shutdown_records_eio_before_shutting_down():
    seen = []

    class Shut(Recorder):
        def shutdown(self, rd, wr):
            seen.append(f.get_error())

    f = QEMUFile(Shut())
    assert f.shutdown() == 0
    assert seen == [-errno.EIO]
    g = QEMUFile(Recorder())
    assert g.shutdown() == -errno.ENOSYS
    assert g.get_error() == -errno.EIO


def test_shutdown_wakes_a_blocked_reader_and_reads_stop():
    a, b = socket.socketpair()
    try:
        f = QEMUFile(SocketChannel(a, "r"))
        result = []
        t = threading.Thread(target=lambda: result.append((f.get_be32(), f.get_error())))
        t.start()
        f.shutdown()
        t.join(5)
        assert not t.is_alive()
        assert result[0][1] == -errno.EIO
    finally:
        a.close()
        b.close()


# -- release-ram ----------------------------------------------------------------------


def test_may_free_pages_are_released_after_a_successful_write():
    m = ReleaseMap(8 * PAGE)
    a = np.frombuffer(m, dtype=np.uint8)
    a[:] = 0x5A
    ch = Recorder()
    f = QEMUFile(ch)
    for i in (0, 1, 2, 5):  # 0-2 are adjacent: one release run
        f.put_be64(i)
        f.put_buffer_async(a[i * PAGE:(i + 1) * PAGE], may_free=True)
    f.put_buffer_async(a[6 * PAGE:7 * PAGE], may_free=False)
    f.fflush()
    assert m.released == [(0, 3 * PAGE), (5 * PAGE, PAGE)]
    assert not a[:3 * PAGE].any() and not a[5 * PAGE:6 * PAGE].any()
    assert (a[6 * PAGE:7 * PAGE] == 0x5A).all() and (a[3 * PAGE:5 * PAGE] == 0x5A).all()
    assert f.released_bytes == 4 * PAGE
    assert bytes(ch.data[8:8 + PAGE]) == b"\x5a" * PAGE  # sent before release


def test_plain_mmap_release_uses_dontneed_on_whole_interior_pages():
    m, a = private_map(4)
    f = QEMUFile(Recorder())
    f.put_buffer_async(memoryview(m)[100:3 * PAGE + 7], may_free=True)
    f.fflush()
    assert (a[:PAGE] == 0xAB).all()  # partial first page kept
    assert not a[PAGE:3 * PAGE].any()  # interior pages released
    assert (a[3 * PAGE:] == 0xAB).all()
    assert f.released_bytes == 2 * PAGE


def test_failed_write_releases_nothing():
    m = ReleaseMap(2 * PAGE)
    a = np.frombuffer(m, dtype=np.uint8)
    a[:] = 9
    f = QEMUFile(Recorder(fail_with=errno.ECONNRESET))
    f.put_buffer_async(a, may_free=True)
    f.fflush()
    assert m.released == [] and (a == 9).all()
    g = QEMUFile(Recorder(short_by=PAGE))
    g.put_buffer_async(a, may_free=True)
    g.fflush()
    assert m.released == [] and (a == 9).all()


def test_may_free_and_plain_views_do_not_coalesce():
    m = ReleaseMap(2 * PAGE)
    a = np.frombuffer(m, dtype=np.uint8)
    ch = Recorder()
    f = QEMUFile(ch)
    f.put_buffer_async(a[:PAGE], may_free=True)
    f.put_buffer_async(a[PAGE:], may_free=False)
    f.fflush()
    assert ch.calls == [(2, 2 * PAGE)] and m.released == [(0, PAGE)]


# -- positions and rate limiting ------------------------------------------------------


def test_ftell_fast_counts_queued_iovecs_and_ftell_flushes():
    m, a = private_map(2)
    ch = Recorder()
    f = QEMUFile(ch)
    f.put_be32(1)
    f.put_buffer_async(a)
    assert f.ftell_fast() == 4 + 2 * PAGE and f.tell() == f.ftell_fast()
    assert ch.calls == []
    assert f.ftell() == 4 + 2 * PAGE and len(ch.calls) == 1
    f.update_position(10)
    assert f.ftell_fast() == 4 + 2 * PAGE + 10


def test_rate_limit():
    f = QEMUFile(NullChannel())
    f.put_buffer(bytes(1000))
    assert not f.rate_limit()  # 0 = unlimited
    f.set_rate_limit(1000)
    assert f.get_rate_limit() == 1000 and not f.rate_limit()
    f.put_byte(0)
    assert f.rate_limit() and f.bytes_xfer == 1001
    f.reset_rate_limit()
    assert not f.rate_limit()
    f.set_error(-errno.EIO)
    assert f.rate_limit()


# -- compression, nested files, hooks -------------------------------------------------


def test_compression_round_trip_and_limits():
    ch = Recorder()
    f = QEMUFile(ch)
    page = (np.arange(PAGE) % 7).astype(np.uint8)
    n = f.put_compression_data(page, level=1)
    f.fflush()
    assert n == len(ch.data)
    blen = int.from_bytes(ch.data[:4], "big")
    assert blen + 4 == n
    assert zlib.decompress(bytes(ch.data[4:])) == page.tobytes()
    c = zlib.compressobj(1)
    assert bytes(ch.data[4:]) == c.compress(page.tobytes()) + c.flush()
    assert f.put_compression_data(os.urandom(IO_BUF_SIZE)) == -1  # cannot fit compressBound


def test_compression_length_never_lands_before_its_data():
    """The seed placed the deflate output first and then put the be32 length through
    put_byte; a flush at the 64th iovec inside the length moved the data.  Here the
    length goes first, whatever the iovec count."""
    m, a = private_map(200)
    page = bytes(range(256)) * 16
    for lead in range(1, 8):
        ch = Recorder()
        f = QEMUFile(ch, max_iov=8)
        for i in range(lead):
            f.put_buffer_async(a[2 * i * PAGE:(2 * i + 1) * PAGE])
            f.put_byte(i)
        f.put_buffer_async(a[150 * PAGE:151 * PAGE])
        n = f.put_compression_data(page, level=1)
        f.fflush()
        tail = bytes(ch.data[-n:])
        assert zlib.decompress(tail[4:]) == page and int.from_bytes(tail[:4], "big") == n - 4


def test_put_qemu_file_moves_staged_bytes():
    src = QEMUFile(NullChannel())
    src.put_be32(0xDEADBEEF)
    src.put_counted_string(b"abc")
    ch = Recorder()
    dst = QEMUFile(ch)
    assert dst.put_qemu_file(src) == 8
    assert dst.put_qemu_file(src) == 0
    dst.fflush()
    assert bytes(ch.data) == bytes.fromhex("deadbeef") + b"\x03abc"


def test_hooks():
    calls = []

    class Hooks:
        def before_ram_iterate(self, f, flags, data):
            calls.append(("before", flags))
            return 0

        def after_ram_iterate(self, f, flags, data):
            calls.append(("after", flags))
            return -errno.EPERM

        def save_page(self, f, block_offset, offset, size):
            return (0, 100) if offset == 0 else (RAM_SAVE_CONTROL_DELAYED, 0)

    f = QEMUFile(NullChannel())
    assert f.ram_control_save_page(0, 0, PAGE) == (RAM_SAVE_CONTROL_NOT_SUPP, 0)
    f.ram_control_load_hook(RAM_CONTROL_ROUND)
    assert f.get_error() == 0
    f.set_hooks(Hooks())
    f.ram_control_before_iterate(RAM_CONTROL_ROUND)
    assert f.ram_control_save_page(0, 0, PAGE) == (0, 100)
    assert f.ftell_fast() == 100 and f.bytes_xfer == PAGE
    f.ram_control_save_page(0, PAGE, PAGE)
    assert f.bytes_xfer == 2 * PAGE
    f.ram_control_after_iterate(RAM_CONTROL_ROUND)
    assert calls == [("before", RAM_CONTROL_ROUND), ("after", RAM_CONTROL_ROUND)]
    assert f.get_error() == -errno.EPERM
    g = QEMUFile(NullChannel())
    g.ram_control_load_hook(RAM_CONTROL_HOOK)
    assert g.get_error() == -errno.EINVAL


# -- read side ------------------------------------------------------------------------


def test_gets_compose_big_endian_and_eof_is_sticky_eio():
    f = reader(bytes.fromhex("82" "0200" "00011170" "0000000000b8f47c" "ab"), chunk=1)
    assert f.get_byte() == 0x82 and f.get_be16() == 512
    assert f.get_be32() == 70000 and f.get_be64() == 12121212
    assert f.get_error() == 0
    assert f.get_be16() == 0xAB00  # half a value, then end of stream
    assert f.get_error() == -errno.EIO
    assert f.get_byte() == 0 and f.get_error() == -errno.EIO


def test_get_buffer_across_buffer_boundaries_with_short_reads():
    data = os.urandom(5 * IO_BUF_SIZE + 123)
    f = reader(data, chunk=[1, 4096, 7, 40000, 3])
    out = np.zeros(len(data), np.uint8)
    assert f.get_buffer(out[:100]) == 100
    assert f.get_buffer(out[100:]) == len(data) - 100
    assert out.tobytes() == data and f.get_error() == 0
    assert f.tell() == len(data)
    assert f.get_buffer(bytearray(1)) == 0 and f.get_error() == -errno.EIO


def test_get_buffer_into_a_numpy_page_view():
    pages = np.zeros((2, PAGE), np.uint8)
    data = os.urandom(PAGE)
    f = reader(data)
    assert f.get_buffer(pages[1]) == PAGE
    assert pages[1].tobytes() == data and not pages[0].any()
    with pytest.raises(TypeError, match="writable"):
        f.get_buffer(b"readonly")


def test_peek_buffer_fills_past_the_buffered_bytes_and_checks_limits():
    data = bytes(range(256)) * 200
    f = reader(data, chunk=3)
    assert bytes(f.peek_buffer(4, 100)) == data[100:104]  # seed returned 0 here
    assert f.tell() == 0
    assert bytes(f.peek_buffer(10)) == data[:10]
    with pytest.raises(ValueError):
        f.peek_buffer(1, IO_BUF_SIZE)
    with pytest.raises(ValueError):
        f.peek_buffer(IO_BUF_SIZE, 1)
    g = reader(b"abc")
    assert bytes(g.peek_buffer(10)) == b"abc" and g.get_error() == -errno.EIO
    with pytest.raises(ValueError, match="writable"):
        QEMUFile(NullChannel()).peek_buffer(1)


def test_a_truncated_stream_gives_its_last_bytes_in_order():
    """At the end of a stream, the fill that fails has still moved the pending bytes to
    the front of the buffer: peek_buffer and get_buffer must read them there.  They used to
    return the bytes at the old position -- a truncated page loaded with wrong bytes."""
    data = bytes(range(20))
    f = reader(data, chunk=[20])
    assert f.get_be64() == int.from_bytes(data[:8], "big")
    out = bytearray(100)
    assert f.get_buffer(out) == 12 and bytes(out[:12]) == data[8:]
    g = reader(data, chunk=[20])
    g.skip(len(g.peek_buffer(8)))
    assert bytes(g.peek_buffer(50)) == data[8:] and g.get_error() == -errno.EIO


def test_peek_byte_and_skip():
    f = reader(b"\x01\x02\x03", chunk=1)
    assert f.peek_byte(2) == 3 and f.peek_byte() == 1
    f.skip(2)
    assert f.get_byte() == 3
    f.skip(5)  # beyond the buffered bytes: nothing happens, as in QEMU
    assert f.tell() == 3
    with pytest.raises(ValueError):
        f.skip(-1)
    assert f.peek_byte(0) == 0 and f.get_error() == -errno.EIO


def test_get_buffer_in_place():
    data = os.urandom(IO_BUF_SIZE * 2)
    f = reader(data)
    own = bytearray(16)
    v = f.get_buffer_in_place(own)
    assert bytes(v) == data[:16] and v.obj is not own and own == bytearray(16)
    big = bytearray(IO_BUF_SIZE)
    v = f.get_buffer_in_place(big)
    assert v.obj is big and bytes(big) == data[16:16 + IO_BUF_SIZE]


def test_counted_strings():
    f = reader(b"\x03abc\x00\x05ab")
    assert f.get_counted_string() == b"abc"
    assert f.get_counted_string() == b"" and f.get_error() == 0
    assert f.get_counted_string() == b"" and f.get_error() == -errno.EIO
    with pytest.raises(ValueError, match="256"):
        QEMUFile(NullChannel()).put_counted_string("x" * 256)


def test_read_error_is_recorded_with_its_errno():
    class Broken:
        def readinto(self, buf, pos):
            raise ConnectionResetError(errno.ECONNRESET, "reset")

    f = QEMUFile(Broken())
    assert f.get_be32() == 0 and f.get_error() == -errno.ECONNRESET


def test_nonblocking_channel_is_waited_on_not_short_read():
    r, w = os.pipe()
    os.set_blocking(r, False)
    f = QEMUFile(FdChannel(r, "r"))
    payload = os.urandom(100000)

    def feed():
        for i in range(0, len(payload), 7000):
            threading.Event().wait(0.002)
            os.write(w, payload[i:i + 7000])
        os.close(w)

    t = threading.Thread(target=feed)
    t.start()
    out = bytearray(len(payload))
    assert f.get_buffer(out) == len(payload)
    t.join()
    assert bytes(out) == payload and f.get_error() == 0
    f.get_byte()
    assert f.get_error() == -errno.EIO
    f.close()


def test_return_path_on_a_socket():
    a, b = socket.socketpair()
    src = QEMUFile(SocketChannel(a, "w"))
    dst = QEMUFile(SocketChannel(b, "r"))
    src.put_be32(0x51455649)
    src.fflush()
    assert dst.get_be32() == 0x51455649
    back = dst.get_return_path()
    assert back is not None and back.is_writable
    back.put_be16(0x0102)
    back.fflush()
    rp = src.get_return_path()
    assert rp is not None and rp.get_be16() == 0x0102
    for f in (src, dst, back, rp):
        assert f.close() == 0
    assert QEMUFile(NullChannel()).get_return_path() is None


def test_put_records_rejects_a_bad_page_without_queuing_anything():
    m, a = private_map(4)
    ch = Recorder()
    f = QEMUFile(ch)
    strided = np.zeros((4, 8), np.uint8)[:, 1]
    with pytest.raises(ValueError, match="page 1"):
        f.put_records(b"A" * 8 + b"B" * 8, 8, [a[:PAGE], strided])
    with pytest.raises(TypeError, match="mmap"):
        f.put_records(b"A" * 8, 8, [bytearray(PAGE)], may_free=True)
    f.put_buffer(b"C" * 16)
    f.fflush()
    assert bytes(ch.data) == b"C" * 16


# -- misuse is an exception, never a corrupted stream ----------------------------------


def test_puts_on_a_reader_and_use_after_close_are_value_errors():
    r = reader(b"ABCDEFGH")
    for put in (lambda: r.put_byte(1), lambda: r.put_be32(1), lambda: r.put_buffer(b"z" * 40000),
                lambda: r.put_compression_data(b"x" * 100), lambda: r.put_records(b"h" * 8, 8, [b"p"])):
        with pytest.raises(ValueError, match="readable"):
            put()
    assert r.get_byte() == ord("A") and r.tell() == 1
    assert r.close() == 0
    with pytest.raises(ValueError, match="closed"):
        r.get_byte()
    ch = MemoryChannel()
    w = QEMUFile(ch)
    w.put_byte(1)
    assert w.close() == 0
    with pytest.raises(ValueError, match="closed"):
        w.put_buffer(b"after")
    with pytest.raises(ValueError, match="closed"):
        w.fflush()
    assert ch.getvalue() == b"\x01"


def test_wrong_value_types_queue_nothing():
    ch = MemoryChannel()
    f = QEMUFile(ch)
    for put, name in ((f.put_be32, "put_be32"), (f.put_be64, "put_be64"), (f.put_byte, "put_byte")):
        with pytest.raises(TypeError, match=name):
            put(1.5)
    for bad in (3, [65, 66]):
        with pytest.raises(TypeError, match="str or bytes"):
            f.put_counted_string(bad)
    with pytest.raises(TypeError, match="QEMUFile"):
        f.put_qemu_file(None)
    with pytest.raises(ValueError, match="level"):
        f.put_compression_data(b"x", level=42)
    f.put_byte(7)
    f.fflush()
    assert ch.getvalue() == b"\x07"


@pytest.mark.parametrize("io_buf_size", [IO_BUF_SIZE, 16])
def test_out_of_range_values_are_value_errors_and_queue_nothing(io_buf_size):
    """QEMU's C types truncate; a Python caller passing such a value has a bug (README
    "Differences from QEMU").  Both the packed fast path and the per-byte path (a put that
    straddles the end of a 16-byte staging buffer) refuse, and nothing is queued."""
    ch = MemoryChannel()
    f = QEMUFile(ch, io_buf_size=io_buf_size)
    for i in range(12):
        f.put_byte(0x41)
    for put, bad in ((f.put_byte, 256), (f.put_byte, -1), (f.put_be16, -1), (f.put_be16, 1 << 16),
                     (f.put_be32, 2**40 + 7), (f.put_be64, 2**64 + 1), (f.put_be64, -1)):
        with pytest.raises(ValueError, match=f"{put.__name__} value {bad}"):
            put(bad)
    for put, good in ((f.put_byte, 255), (f.put_be16, 0xFFFF), (f.put_be32, 2**32 - 1), (f.put_be64, 2**64 - 1)):
        put(good)
    assert f.fflush() == 0 and f.get_error() == 0
    assert ch.getvalue() == b"A" * 12 + b"\xff" * (1 + 2 + 4 + 8)


def test_a_queued_coalesced_run_keeps_its_ram_block_open():
    from npqfile.ram import RAMBlock, RAMBlockInUseError

    block = RAMBlock("c", 8 * PAGE)
    ch = MemoryChannel()
    f = QEMUFile(ch)
    f.put_buffer_async(block.page(1))
    f.put_buffer_async(block.page(2))  # coalesced with page 1 into one iovec
    with pytest.raises(RAMBlockInUseError):
        block.close()
    assert f.fflush() == 0 and len(ch.getvalue()) == 2 * PAGE and ch.writes == [2 * PAGE]
    block.close()


def test_misbehaving_hooks_and_channels_are_reported():
    class BadHooks:
        def before_ram_iterate(self, f, flags, data):
            return "yes"

        def save_page(self, f, block_offset, offset, size):
            return 0

    f = QEMUFile(NullChannel())
    f.set_hooks(BadHooks())
    with pytest.raises(TypeError, match="before_ram_iterate"):
        f.ram_control_before_iterate(RAM_CONTROL_ROUND)
    with pytest.raises(TypeError, match="save_page"):
        f.ram_control_save_page(0, 0, PAGE)

    class Liar:
        def readinto(self, buf, pos):
            return len(buf) + 10

    g = QEMUFile(Liar())
    assert g.get_byte() == 0 and g.get_error() == -errno.EIO
    assert "readinto returned" in str(g.error)


def test_writev_eintr_is_retried_and_eagain_is_waited_on():
    """The read side retries EINTR and waits on EAGAIN; so does the write side now.  A
    BlockingIOError that reports ``characters_written`` had those bytes taken."""

    class Flaky(Recorder):
        def __init__(self, faults):
            super().__init__()
            self.faults = list(faults)

        def writev(self, buffers, pos):
            if self.faults:
                fault = self.faults.pop(0)
                if fault == "partial":
                    first = memoryview(buffers[0]).cast("B")
                    self.data += first[:3]
                    exc = BlockingIOError(errno.EAGAIN, "try again")
                    exc.characters_written = 3
                    raise exc
                raise fault
            return super().writev(buffers, pos)

    for faults in ([InterruptedError(errno.EINTR, "interrupted")] * 3,
                   [BlockingIOError(errno.EAGAIN, "try again")] * 2,
                   ["partial", InterruptedError(errno.EINTR, "interrupted")]):
        ch = Flaky(faults)
        f = QEMUFile(ch)
        f.put_buffer(b"hello world")
        f.put_buffer_async(b"0123456789")
        assert f.fflush() == 0, f.error
        assert bytes(ch.data) == b"hello world0123456789"
        assert f.ftell_fast() == 21


def test_writev_claiming_more_than_it_was_given_is_a_channel_bug_not_a_short_write():
    class Braggart:
        def writev(self, buffers, pos):
            return 10**9

    f = QEMUFile(Braggart())
    f.put_buffer(b"abc")
    assert f.fflush() == -errno.EIO
    assert "channel bug: writev returned 1000000000 for a write of 3 bytes" in str(f.error)
    assert "short write" not in str(f.error)


def test_an_errno_returned_after_a_partial_retry_is_the_error_not_a_byte_count():
    """A custom channel's writev raises BlockingIOError after 5 bytes, then returns -ENOSPC:
    the stream records ENOSPC (adding the 5 bytes made it 0, recorded as a short write, EIO)."""
    class Channel:
        calls = 0

        def writev(self, buffers, pos):
            Channel.calls += 1
            if Channel.calls == 1:
                exc = BlockingIOError(errno.EAGAIN, "again")
                exc.characters_written = 5
                raise exc
            return -errno.ENOSPC

    f = QEMUFile(Channel())
    f.put_buffer(b"0123456789")
    assert f.fflush() == -errno.ENOSPC and f.get_error() == -errno.ENOSPC


def test_a_channel_saying_eagain_on_a_descriptor_above_select_s_limit_is_waited_on():
    """QEMUFile waits for room when a channel's writev raises BlockingIOError; on an fd of
    1024 or more (a process with many files open) that wait must not fail."""
    import fcntl

    a, b = socket.socketpair()
    high = fcntl.fcntl(a.fileno(), fcntl.F_DUPFD_CLOEXEC, 1500)
    got = []

    class Again:
        def fileno(self):
            return high

        def writev(self, buffers, pos):
            if not got:
                got.append(None)
                raise BlockingIOError(errno.EAGAIN, "try again")
            data = b"".join(bytes(x) for x in buffers)
            got.append(data)
            return len(data)

    try:
        f = QEMUFile(Again())
        f.put_be64(7)
        f.fflush()
        assert f.get_error() == 0 and got[-1] == (7).to_bytes(8, "big")
    finally:
        os.close(high)
        a.close()
        b.close()


def test_a_channel_saying_eagain_on_read_on_a_descriptor_above_select_s_limit_is_waited_on():
    """The read side's wait for data (a channel's readinto raised BlockingIOError) on an
    fd of 1024 or more."""
    import fcntl

    a, b = socket.socketpair()
    high = fcntl.fcntl(a.fileno(), fcntl.F_DUPFD_CLOEXEC, 1500)
    b.send(b"x")                                   # readable: the wait returns at once
    calls = []

    class Again:
        def fileno(self):
            return high

        def readinto(self, buf, pos):
            calls.append(pos)
            if len(calls) == 1:
                raise BlockingIOError(errno.EAGAIN, "try again")
            if len(calls) > 2:
                return 0
            buf[:8] = (7).to_bytes(8, "big")
            return 8

    try:
        f = QEMUFile(Again())
        assert f.get_be64() == 7 and f.get_error() == 0
    finally:
        os.close(high)
        a.close()
        b.close()
