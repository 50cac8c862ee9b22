"""Differential tests: npqfile's QEMUFile against the seed it was rebuilt from.

The seed (QEMU 2.10/2.12 migration/qemu-file.c: $NPQFILE_SEED, else shared/seed/ beside the
repository) is compiled at test time with our stand-in headers (tests/seed/) in two variants:
as is ("seed"), and with the upstream fixes that move flush points and stop I/O after an
error ("fixed": QEMU 4.2/5.0/6.1/8.1, see tests/seed/seed_build.py).  The same operation
sequences (hypothesis) go through both:

* writes vs the seed: same bytes, same results (ftell, ftell_fast, rate limit, error, close),
  same released pages;
* writes vs the fixed seed: all that, plus the same writev calls (bytes and iovec count of
  each: the flush points), also with injected write failures and recorded errors;
* reads vs both: same values, same errors, under random short-read patterns;
* compression: same bytes and results (same zlib).

Where npqfile differs from the seed on purpose, a test below shows the seed's behaviour next
to npqfile's (names start with test_difference_).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import random
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require
from npqfile.qemufile import IO_BUF_SIZE, QEMUFile

sys.path.insert(0, str(Path(__file__).resolve().parent / "seed"))
import seed_build  # noqa: E402
from seed_driver import SeedDummy, SeedLib, SeedReader, SeedWriter  # noqa: E402

PAGE = mmap.PAGESIZE
RAM_PAGES = 40
RAM_SIZE = RAM_PAGES * PAGE
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SeedLib]:
    """Both seed variants, compiled once per session."""
    missing = seed_build.missing_tools()
    require(not missing, "seed build prerequisites: " + ", ".join(missing))
    out = tmp_path_factory.mktemp("seedlib")
    return {v: SeedLib(seed_build.build(out, v)) for v in seed_build.VARIANTS}


class RecordingMmap(mmap.mmap):
    """Guest RAM stand-in: ``release_pages`` (npqfile's release protocol) records instead
    of releasing, so both implementations keep reading the same bytes."""

    def release_pages(self, offset: int, length: int) -> None:
        self.released.append((offset, length))


@dataclass
class Ram:
    mm: RecordingMmap
    base: int  # address of byte 0, for the C side

    def view(self, off: int, n: int) -> memoryview:
        return memoryview(self.mm)[off:off + n]


@pytest.fixture(scope="session")
def ram():
    mm = RecordingMmap(-1, RAM_SIZE)
    mm.write(random.Random(7).randbytes(RAM_SIZE))
    mm.released = []
    anchor = ctypes.c_char.from_buffer(mm)
    yield Ram(mm, ctypes.addressof(anchor))
    del anchor
    mm.close()


# -- npqfile channels mirroring the C harness's backends ------------------------------


class RecordingChannel:
    """Write channel: records each writev call as (bytes, buffers) and the bytes.  Call
    ``fail_call`` (0-based) raises OSError(-fail_ret) when fail_ret < 0, else returns the
    short count fail_ret (keeping that many bytes) -- as the C sink does."""

    def __init__(self, fail_call: int = -1, fail_ret: int = 0, close_ret: int = 0):
        self.fail_call, self.fail_ret, self.close_ret = fail_call, fail_ret, close_ret
        self.data = bytearray()
        self.calls: list[tuple[int, int]] = []
        self.close_calls = 0

    def writev(self, buffers, pos: int) -> int:
        chunk = b"".join(bytes(b) for b in buffers)
        index = len(self.calls)
        self.calls.append((len(chunk), len(buffers)))
        if index == self.fail_call:
            if self.fail_ret < 0:
                raise OSError(-self.fail_ret, "injected write failure")
            self.data += chunk[:self.fail_ret]
            return self.fail_ret
        self.data += chunk
        return len(chunk)

    def close(self) -> int:
        self.close_calls += 1
        return self.close_ret


class ChunkedReader:
    """Read channel serving ``data`` in a cycle of ``chunks`` sizes, then 0 (EOF) or
    OSError(-end_ret) -- as the C source does."""

    def __init__(self, data: bytes, chunks: list[int], end_ret: int = 0):
        self.data, self.chunks, self.end_ret = data, chunks, end_ret
        self.off = self.next = self.calls = 0

    def readinto(self, buf: memoryview, pos: int) -> int:
        self.calls += 1
        if self.off >= len(self.data):
            if self.end_ret:
                raise OSError(-self.end_ret, "injected read failure")
            return 0
        n = len(buf)
        if self.chunks:
            n = min(n, self.chunks[self.next % len(self.chunks)])
            self.next += 1
        n = min(n, len(self.data) - self.off)
        buf[:n] = self.data[self.off:self.off + n]
        self.off += n
        return n


# -- one operation sequence, two implementations ---------------------------------------

QUERIES = {"ftell", "get_rate_limit"}


def payload(n: int, seed: int, kind: str = "random") -> bytes:
    """n reproducible bytes: random (incompressible), zeros, or text-like (compressible)."""
    if kind == "zeros":
        return bytes(n)
    rnd = random.Random(seed)
    if kind == "text":
        return bytes(rnd.choices(b"abc \n", k=n))
    return rnd.randbytes(n)


def resolve(ops: list[tuple]) -> list[tuple]:
    """Expand macro ops into the primitive ops both implementations run:
    ("put_buffer", n, seed) gets its bytes; ("put_buffer_async", None, n, free) continues
    where the previous async put ended (wrapping to 0), so runs of RAM coalesce;
    ("pages", first, count, free) is QEMU's RAM loop: be64 header + one async page each;
    ("fragment", count, size, free, flush_first) queues `count` async pieces that cannot
    coalesce, after an fflush if flush_first."""
    out, cursor = [], 0
    for op in ops:
        name = op[0]
        if name == "put_buffer":
            out.append(("put_buffer", payload(op[1], op[2])))
        elif name == "put_buffer_async":
            off, n, free = op[1:]
            off = cursor if off is None else off
            if off + n > RAM_SIZE:
                off = 0
            out.append(("put_buffer_async", off, n, free))
            cursor = off + n
        elif name == "fragment":
            count, size, free, flush_first = op[1:]
            if flush_first:  # iovec count known: 62/63 puts the next put at the 64-iovec flush
                out.append(("fflush",))
            for i in range(count):  # separate iovecs: a gap after each piece
                out.append(("put_buffer_async", (i * 2 * size) % (RAM_SIZE - size), size, free))
        elif name == "pages":
            first, count, free = op[1:]
            for i in range(count):
                page = (first + i) % RAM_PAGES
                out.append(("put_be64", page * PAGE | 0x08))
                out.append(("put_buffer_async", page * PAGE, PAGE, free))
        else:
            out.append(op)
    return out


def run_ops(f, ops: list[tuple], put_async) -> list[tuple]:
    """Apply resolved ops to a file (npqfile or seed).  Returns the results of the queries
    and, after every op, (ftell_fast, rate_limit, get_error)."""
    results = []
    for name, *args in ops:
        if name == "put_buffer_async":
            put_async(*args)
        elif name in QUERIES:
            results.append((name, getattr(f, name)()))
        elif name == "put_compression_data":
            level, kind, n, seed = args
            results.append((name, f.put_compression_data(payload(n, seed, kind), level)))
        else:
            getattr(f, name)(*args)
        results.append((f.ftell_fast(), f.rate_limit(), f.get_error()))
    return results


def page_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges of RAM -> the (first, end) whole pages inside each, dropping empty ones."""
    out = []
    for start, length in ranges:
        first, end = -(-start // PAGE), (start + length) // PAGE
        if end > first:
            out.append((first, end))
    return out


def page_set(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for first, end in ranges for p in range(first, end)}


@dataclass
class Outcome:
    written: bytes
    calls: list[tuple[int, int]]
    results: list[tuple]
    released: list[tuple[int, int]] = field(default_factory=list)  # page ranges


def drive_npq(ram: Ram, ops: list[tuple], fail_call: int = -1, fail_ret: int = 0,
              close_ret: int = 0) -> Outcome:
    ram.mm.released.clear()
    ch = RecordingChannel(fail_call, fail_ret, close_ret)
    f = QEMUFile(ch)
    results = run_ops(f, ops, lambda off, n, free: f.put_buffer_async(ram.view(off, n), free))
    results.append(("close", f.close()))
    return Outcome(bytes(ch.data), ch.calls, results, page_ranges(ram.mm.released))


def drive_seed(lib: SeedLib, ram: Ram, ops: list[tuple], fail_call: int = -1, fail_ret: int = 0,
               close_ret: int = 0) -> Outcome:
    """Run ops through the seed.  Released pages exclude the madvise calls that followed a
    failed writev (npqfile releases only after a successful write: §2.8)."""
    with SeedWriter(lib, fail_call=fail_call, fail_ret=fail_ret, close_ret=close_ret) as w:
        results = run_ops(w, ops, lambda off, n, free: w.put_buffer_at(ram.base + off, n, free))
        results.append(("close", w.fclose()))
        madv = [(addr - ram.base, n) for addr, n, after in lib.madvise_log() if after - 1 != fail_call]
        return Outcome(w.written, w.calls, results, page_ranges(madv))


# -- strategies -----------------------------------------------------------------------

u8 = st.integers(0, 255)
lengths = st.one_of(st.integers(0, 64), st.integers(0, 5000), st.integers(30000, 70000))
aligned_async = st.builds(
    lambda k, m, free: ("put_buffer_async", k * PAGE, min(m, RAM_PAGES - k) * PAGE, free),
    st.integers(0, RAM_PAGES - 1), st.integers(0, 4), st.booleans())
unaligned_async = st.builds(
    lambda off, n, free: ("put_buffer_async", off, n, free),
    st.integers(0, RAM_SIZE - 1), st.integers(0, 9000), st.booleans())
next_async = st.builds(lambda n, free: ("put_buffer_async", None, n, free),
                       st.sampled_from([0, 1, 100, PAGE - 1, PAGE, 2 * PAGE, 3000]), st.booleans())
put_ops = st.one_of(
    st.tuples(st.just("put_byte"), st.integers(0, 2**31 - 1)),
    st.tuples(st.just("put_be16"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("put_be32"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("put_be64"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("put_buffer"), lengths, st.integers(0, 2**16)),
    st.tuples(st.just("put_counted_string"), st.binary(max_size=255).map(lambda b: b.replace(b"\0", b"#"))),
)
async_ops = st.one_of(aligned_async, unaligned_async, next_async,
                      st.tuples(st.just("pages"), st.integers(0, RAM_PAGES - 1),
                                st.one_of(st.integers(1, 8), st.integers(30, 80)), st.booleans()),
                      st.tuples(st.just("fragment"), st.one_of(st.integers(1, 70), st.sampled_from([62, 63])),
                                st.integers(1, 3 * PAGE), st.booleans(), st.booleans()))
limits = st.one_of(st.just(0), st.integers(1, 300), st.integers(1, 200000))
control_ops = st.one_of(
    st.sampled_from([("fflush",), ("ftell",), ("get_rate_limit",), ("reset_rate_limit",)]),
    st.tuples(st.just("set_rate_limit"), limits),
    st.tuples(st.just("update_position"), st.integers(0, 5000)),
)
write_ops = st.builds(lambda limit, ops: [("set_rate_limit", limit), *ops],
                      limits, st.lists(st.one_of(put_ops, async_ops, control_ops), min_size=3, max_size=80))
errors = st.sampled_from([-errno.EPIPE, -errno.EIO, -errno.ENOSPC])
failures = st.one_of(
    st.just((-1, 0)),
    st.tuples(st.integers(0, 2), errors),
    st.tuples(st.integers(0, 2), st.integers(0, 100)),  # short count (the seed: -EIO)
)


# -- the seed alone ---------------------------------------------------------------------


@pytest.mark.component
@pytest.mark.parametrize("variant", seed_build.VARIANTS)
def test_seed_builds_and_writes_known_bytes(libs, variant):
    """The compiled seed itself: known bytes, QEMU's flush at a full 32 KiB buffer."""
    with SeedWriter(libs[variant]) as w:
        w.put_byte(0x1FF)
        w.put_be16(0x0102)
        w.put_be32(0x03040506)
        w.put_be64(0x0708090A0B0C0D0E)
        w.put_counted_string(b"pc.ram")
        assert w.ftell_fast() == 22 and w.calls == []
        w.put_buffer(b"x" * IO_BUF_SIZE)
        assert w.calls == [(IO_BUF_SIZE, 1)]
        assert w.ftell() == 22 + IO_BUF_SIZE
        assert w.written == bytes.fromhex("ff0102030405060708090a0b0c0d0e") + b"\x06pc.ram" + b"x" * IO_BUF_SIZE
        assert w.fclose() == 0 and w.close_calls == 1


@pytest.mark.component
def test_seed_reads_known_values(libs):
    data = bytes(range(1, 20))
    with SeedReader(libs["seed"], data, chunks=[3]) as r:
        assert (r.get_byte(), r.get_be16(), r.get_be32()) == (1, 0x0203, 0x04050607)
        assert r.peek_buffer(4) == bytes([8, 9, 10, 11]) and r.get_be64() == 0x08090A0B0C0D0E0F
        assert r.get_buffer(10) == bytes(range(16, 20)) and r.get_error() == -errno.EIO


# -- writes -----------------------------------------------------------------------------


@pytest.mark.component
@SETTINGS
@given(ops=write_ops)
def test_writes_match_seed(libs, ram, ops):
    """Same bytes, query results and released pages as the unmodified seed.  (Its flush
    points differ by §2.1, so writev boundaries are compared against the fixed seed.)"""
    ops = resolve(ops)
    npq, seed = drive_npq(ram, ops), drive_seed(libs["seed"], ram, ops)
    assert npq.written == seed.written
    assert npq.results == seed.results
    assert page_set(npq.released) == page_set(seed.released)


@pytest.mark.component
@SETTINGS
@given(ops=st.builds(lambda limit, ops: [("set_rate_limit", limit), *ops], limits,
                     st.lists(st.one_of(put_ops, async_ops, control_ops, st.tuples(st.just("set_error"), errors)),
                              min_size=3, max_size=80)),
       failure=failures, close_ret=st.sampled_from([0, 0, -errno.EBADF]))
def test_flush_points_match_fixed_seed(libs, ram, ops, failure, close_ret):
    """Against the seed with the upstream fixes: the same writev calls (bytes and iovec
    count of each), bytes, results and released page ranges -- with write failures, short
    writes, recorded errors and failing closes too."""
    ops = resolve(ops)
    npq = drive_npq(ram, ops, *failure, close_ret=close_ret)
    seed = drive_seed(libs["fixed"], ram, ops, *failure, close_ret=close_ret)
    assert npq.calls == seed.calls
    assert npq.written == seed.written
    assert npq.results == seed.results
    assert npq.released == seed.released


# -- reads ------------------------------------------------------------------------------

read_ops = st.lists(st.one_of(
    st.sampled_from([("get_byte",), ("get_be16",), ("get_be32",), ("get_be64",), ("get_counted_string",),
                     ("ftell",)]),
    st.tuples(st.just("peek_byte"), st.integers(0, 2**16)),
    st.tuples(st.just("get_buffer"), st.one_of(st.integers(0, 100), st.integers(0, 70000))),
    st.tuples(st.just("get_buffer_in_place"), st.one_of(st.integers(0, 100), st.integers(0, 40000))),
    st.tuples(st.just("skip"), st.integers(0, 40)),
    st.tuples(st.just("peek_buffer"), st.one_of(st.integers(0, 100), st.integers(0, IO_BUF_SIZE)),
              st.integers(0, 2**16)),
), max_size=40)

CONSUMED = {"get_byte": 1, "get_be16": 2, "get_be32": 4, "get_be64": 8}


class PeekRule:
    """QEMU's rule for peeks: "you can only peek continuous bytes from where the current
    pointer is".  The seed never reads for a peek that starts past the buffered bytes (it
    returns nothing, see test_difference_peek_past_buffered_data); the random sequences
    follow the rule, tracking a lower bound of the bytes known to be buffered."""

    def __init__(self) -> None:
        self.ahead = 0

    def legal(self, name: str, args: list) -> list:
        """The op's arguments with the peek offset brought inside the rule."""
        if name == "peek_byte":
            return [args[0] % (self.ahead + 1)]
        if name == "peek_buffer":
            off = args[1] % (self.ahead + 1)
            return [min(args[0], IO_BUF_SIZE - off), off]
        return args

    def update(self, name: str, args: list, result) -> None:
        if name == "peek_buffer":
            self.ahead = max(self.ahead, args[1] + len(result))
        elif name == "peek_byte":
            self.ahead = max(self.ahead, args[0] + 1) if self.ahead >= args[0] else self.ahead
        elif name == "skip":
            self.ahead = max(0, self.ahead - args[0])
        else:
            self.ahead = max(0, self.ahead - CONSUMED.get(name, 1 << 30))


def read_npq(f: QEMUFile, name: str, args: list):
    if name in ("get_buffer", "get_buffer_in_place"):
        buf = bytearray(args[0])
        got = getattr(f, name)(buf)
        return bytes(buf[:got]) if name == "get_buffer" else bytes(got)
    if name == "peek_buffer":
        return bytes(f.peek_buffer(*args))
    return getattr(f, name)(*args)


@pytest.mark.component
@pytest.mark.parametrize("variant", seed_build.VARIANTS)
@SETTINGS
@given(n=st.one_of(st.integers(0, 64), st.integers(0, 100000)), seed=st.integers(0, 2**16),
       chunks=st.lists(st.one_of(st.integers(1, 16), st.integers(1, 40000)), max_size=4),
       end_ret=st.sampled_from([0, 0, -errno.ECONNRESET]), ops=read_ops)
def test_reads_match_seed(libs, variant, n, seed, chunks, end_ret, ops):
    """Same values and the same error after every read, over random short-read patterns."""
    data = payload(n, seed)
    f = QEMUFile(ChunkedReader(data, chunks, end_ret))
    rule = PeekRule()
    with SeedReader(libs[variant], data, chunks, end_ret) as r:
        for i, (name, *args) in enumerate(ops):
            args = rule.legal(name, args)
            ours, theirs = read_npq(f, name, args), getattr(r, name)(*args)
            assert (ours, f.get_error()) == (theirs, r.get_error()), f"op {i}: {name}{tuple(args)}"
            rule.update(name, args, theirs)


@pytest.mark.component
@SETTINGS
@given(before=st.sampled_from([62, 63, 64]), ops=st.lists(put_ops, min_size=1, max_size=6))
def test_flush_points_at_the_iovec_limit(libs, ram, before, ops):
    """Puts that land on the 64th iovec, the flush inside add_to_iovec: writev calls equal
    the fixed seed's; bytes equal the seed's."""
    ops = resolve([("fragment", before, 5, False, True), *ops])
    npq = drive_npq(ram, ops)
    assert npq.calls == drive_seed(libs["fixed"], ram, ops).calls
    assert npq.written == drive_seed(libs["seed"], ram, ops).written


# -- compression ------------------------------------------------------------------------

levels = st.sampled_from([-1, 0, 1, 6, 9])
compress_ops = st.tuples(st.just("put_compression_data"), levels, st.sampled_from(["random", "zeros", "text"]),
                         st.one_of(st.integers(0, 5000), st.integers(0, IO_BUF_SIZE)), st.integers(0, 2**16))
staging_ops = st.one_of(put_ops, st.sampled_from([("fflush",), ("ftell",)]))


@pytest.mark.component
@pytest.mark.parametrize("variant", seed_build.VARIANTS)
@SETTINGS
@given(ops=st.lists(st.one_of(staging_ops, compress_ops), min_size=1, max_size=30))
def test_compression_matches_seed(libs, ram, variant, ops):
    """put_compression_data: same bytes and results as qemu_put_compression_data (same
    zlib), including the flush when the staging buffer lacks room and -1 when even an
    empty buffer cannot hold compressBound(size).  Staging puts only: the 64-iovec case
    is test_difference_compression_length_flush.  Rate limit off: see
    test_difference_compression_counts_payload_for_rate_limit."""
    ops = [("set_rate_limit", 0), *resolve(ops)]
    npq, seed = drive_npq(ram, ops), drive_seed(libs[variant], ram, ops)
    assert npq.written == seed.written
    assert npq.results == seed.results
    if variant == "fixed":
        assert npq.calls == seed.calls


@pytest.mark.component
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(pages=st.lists(st.tuples(st.integers(0, 2**40), levels, st.sampled_from(["random", "zeros", "text"]),
                                st.integers(0, 2**16)), min_size=1, max_size=12))
def test_put_qemu_file_matches_seed(libs, pages):
    """QEMU 2.x's compression thread flow: header + compressed page into a side file,
    then qemu_put_qemu_file into the stream -- same bytes and results."""
    dest = SeedWriter(libs["seed"])
    src = SeedDummy(libs["seed"])
    ch = RecordingChannel()
    f, side = QEMUFile(ch), QEMUFile(RecordingChannel())
    theirs, ours = [], []
    for addr, level, kind, seed in pages:
        data = payload(PAGE, seed, kind)
        for target, side_file, out in ((dest, src, theirs), (f, side, ours)):
            side_file.put_be64(addr << 12 | 0x100)
            out.append(side_file.put_compression_data(data, level))
            out.append(target.put_qemu_file(side_file))
    src.fclose()
    assert ours == theirs
    assert (f.ftell(), f.get_error()) == (dest.ftell(), dest.get_error())
    assert bytes(ch.data) == dest.written
    dest.free()
