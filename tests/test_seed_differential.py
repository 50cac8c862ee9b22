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
import random
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import require
from npqfile.qemufile import IO_BUF_SIZE, QEMUFile

sys.path.insert(0, str(Path(__file__).resolve().parent / "seed"))
import seed_build  # noqa: E402
from seed_driver import SeedDummy, SeedLib, SeedReader, SeedWriter  # noqa: E402
from seed_ops import (  # noqa: E402
    PAGE, RAM_PAGES, RAM_SIZE, ChunkedReader, PeekRule, Ram, RecordingChannel, RecordingMmap, drive_npq,
    drive_seed, page_set, payload, read_npq, resolve, result_of, run_ops)

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


@pytest.fixture(scope="session")
def ram():
    mm = RecordingMmap(-1, RAM_SIZE)
    mm.write(random.Random(7).randbytes(RAM_SIZE))
    mm.released = []
    anchor = ctypes.c_char.from_buffer(mm)
    yield Ram(mm, ctypes.addressof(anchor))
    del anchor
    mm.close()


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
    st.tuples(st.just("put_byte"), st.integers(0, 255)),   # out-of-range values: ValueError here,
    st.tuples(st.just("put_be16"), st.integers(0, 2**16 - 1)),  # truncated by the seed (README)
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
            at = f.tell()
            ours, theirs = read_npq(f, name, args), getattr(r, name)(*args)
            if ours != theirs and r.get_error() and name in STALE_AT_EOF:
                # README difference 18: the seed returns bytes from before qemu_fill_buffer
                # moved them; npqfile returns the stream's own bytes, as many as the seed
                start = at + (args[1] if name == "peek_buffer" else 0)
                assert len(ours) == len(theirs) and ours == data[start:start + len(ours)], f"op {i}: {name}"
                ours = theirs
            assert (ours, f.get_error()) == (theirs, r.get_error()), f"op {i}: {name}{tuple(args)}"
            rule.update(name, args, theirs)


@pytest.mark.component
@SETTINGS
@given(before=st.sampled_from([62, 63, 64]),
       ops=st.lists(st.one_of(put_ops, st.tuples(st.just("put_buffer"), st.integers(30000, 70000), st.just(1))),
                    min_size=1, max_size=6))
@example(before=63, ops=[("put_byte", 1), ("put_buffer", 40000, 1)])
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
    ch = RecordingChannel()
    f, side = QEMUFile(ch), QEMUFile(RecordingChannel())
    with SeedWriter(libs["seed"]) as dest, SeedDummy(libs["seed"]) as src:
        theirs, ours = [], []
        for addr, level, kind, seed in pages:
            data = payload(PAGE, seed, kind)
            for target, side_file, out in ((dest, src, theirs), (f, side, ours)):
                side_file.put_be64(addr << 12 | 0x100)
                out.append(side_file.put_compression_data(data, level))
                out.append(target.put_qemu_file(side_file))
        assert ours == theirs
        assert (f.ftell(), f.get_error()) == (dest.ftell(), dest.get_error())
        assert bytes(ch.data) == dest.written


# -- where npqfile differs from the seed on purpose ---------------------------------------


@pytest.mark.component
def test_difference_seed_advances_buffer_after_iovec_flush(libs, ram):
    """§2.1 (QEMU 4.2): when the 64th iovec flushes inside add_to_iovec, the seed still
    advances buf_index, wasting buffer space: its next 32 KiB flush comes a byte early.
    Same bytes; npqfile's flush points are the fixed seed's."""
    ops = resolve([("fragment", 63, 5, False, True), ("put_byte", 1), ("put_buffer", 40000, 1)])
    seed, fixed, npq = drive_seed(libs["seed"], ram, ops), drive_seed(libs["fixed"], ram, ops), drive_npq(ram, ops)
    assert seed.written == fixed.written == npq.written
    assert seed.calls == [(316, 64), (IO_BUF_SIZE - 1, 1), (7233, 1)]
    assert npq.calls == fixed.calls == [(316, 64), (IO_BUF_SIZE, 1), (7232, 1)]


@pytest.mark.component
@pytest.mark.parametrize("variant", seed_build.VARIANTS)
def test_difference_compression_length_flush(libs, ram, variant):
    """§2.1: qemu_put_compression_data deflates into buf + buf_index + 4, then writes the
    length with put_byte; when that put_byte is the 64th iovec, the flush moves buf_index
    and the seed sends the wrong bytes as the payload.  npqfile's record decompresses."""
    page = payload(PAGE, 5, "text")
    ops = resolve([("put_buffer", 10, 3), ("fragment", 62, 5, False, False),
                   ("put_compression_data", 1, "text", PAGE, 5)])
    seed, npq = drive_seed(libs[variant], ram, ops), drive_npq(ram, ops)
    blen = result_of(npq.results, "put_compression_data") - 4
    expected = payload(10, 3) + b"".join(bytes(ram.view(off, n)) for _, off, n, _ in ops[1:-1])
    comp = zlib.compressobj(1)
    record = comp.compress(page) + comp.flush()
    assert len(record) == blen
    assert npq.written == expected + blen.to_bytes(4, "big") + record
    assert zlib.decompress(npq.written[-blen:]) == page
    assert len(seed.written) == len(npq.written) and seed.results == npq.results
    assert seed.written[-blen:] != record  # corrupt: not the deflate output


@pytest.mark.component
def test_difference_no_io_after_error(libs, ram):
    """§2.3 (QEMU 5.0/8.1): after an error the seed still writes queued data at close and
    still reads; npqfile, like the fixed seed, does no I/O."""
    ops = [("put_buffer", payload(100, 1)), ("set_error", -errno.EINVAL)]
    seed, fixed, npq = (drive_seed(libs["seed"], ram, ops), drive_seed(libs["fixed"], ram, ops),
                        drive_npq(ram, ops))
    assert seed.calls == [(100, 1)] and seed.written == payload(100, 1)
    assert fixed.calls == npq.calls == [] and npq.written == b""
    assert seed.results[-1] == fixed.results[-1] == npq.results[-1] == ("close", -errno.EINVAL)

    data = b"\x2a" * 8
    ch = ChunkedReader(data, [])
    f = QEMUFile(ch)
    f.set_error(-errno.EINVAL)
    assert (f.get_byte(), ch.calls) == (0, 0)
    for variant, value, reads in (("seed", 0x2a, 1), ("fixed", 0, 0)):
        with SeedReader(libs[variant], data) as r:
            r.set_error(-errno.EINVAL)
            assert (r.get_byte(), r.calls, r.get_error()) == (value, reads, -errno.EINVAL)


@pytest.mark.component
@pytest.mark.parametrize("variant", seed_build.VARIANTS)
def test_difference_compression_after_error(libs, ram, variant):
    """With an error recorded, the seed's qemu_put_compression_data still queues the
    payload (its length put is gated, the payload is not) and reports success; the
    unfixed seed then writes that length-less payload at close.  npqfile returns -1."""
    ops = [("set_error", -errno.EIO), ("put_compression_data", 1, "random", PAGE, 1)]
    seed, npq = drive_seed(libs[variant], ram, ops), drive_npq(ram, ops)
    queued = result_of(seed.results, "put_compression_data")
    assert queued > 4 and result_of(npq.results, "put_compression_data") == -1
    assert npq.written == b""
    assert len(seed.written) == (queued - 4 if variant == "seed" else 0)


@pytest.mark.component
def test_difference_compression_counts_payload_for_rate_limit(libs, ram):
    """The seed's qemu_put_compression_data adds the payload with add_to_iovec, so only
    the 4 length bytes count towards the rate limit.  npqfile counts the whole record
    (QEMU 2.x did too, once qemu_put_qemu_file copied it to the real stream)."""
    ops = [("set_rate_limit", 100), ("put_compression_data", 1, "random", PAGE, 1)]
    seed, npq = drive_seed(libs["seed"], ram, ops), drive_npq(ram, ops)
    assert seed.written == npq.written
    assert seed.results[-2][1:] == (False, 0)  # (ftell_fast, rate_limit, error) after the put
    assert npq.results[-2][1:] == (True, 0)


@pytest.mark.component
@pytest.mark.parametrize("variant", seed_build.VARIANTS)
def test_difference_release_only_after_successful_write(libs, ram, variant):
    """§2.8 (still upstream): the seed madvises may_free pages even when the writev that
    should have carried them failed.  npqfile releases only after a full write."""
    ops = [("put_buffer_async", 0, 2 * PAGE, True)]
    with SeedWriter(libs[variant], fail_call=0, fail_ret=-errno.EPIPE) as w:
        run_ops(w, ops, lambda off, n, free: w.put_buffer_at(ram.base + off, n, free))
        assert w.ftell() == 0 and w.get_error() == -errno.EPIPE
        assert libs[variant].madvise_log() == [(ram.base, 2 * PAGE, 1)]
    npq = drive_npq(ram, ops, fail_call=0, fail_ret=-errno.EPIPE)
    assert npq.results[-1] == ("close", -errno.EPIPE) and npq.released == []
    ok = drive_npq(ram, ops)
    assert ok.released == [(0, 2)]


@pytest.mark.component
@pytest.mark.parametrize("off, size, pages", [(100, 3 * PAGE, [(PAGE, 2 * PAGE)]),
                                              (0, PAGE + 100, [(0, PAGE)]),
                                              (100, PAGE, [])])
def test_difference_release_whole_pages_only(libs, ram, off, size, pages):
    """The seed madvises the raw coalesced range.  Linux refuses an unaligned start
    (EINVAL: nothing released) and rounds the length up (the page holding the unsent
    bytes after the range is discarded too).  npqfile releases the whole pages inside."""
    ops = [("put_buffer_async", off, size, True)]
    with SeedWriter(libs["seed"]) as w:
        run_ops(w, ops, lambda o, n, free: w.put_buffer_at(ram.base + o, n, free))
        w.fflush()
        assert libs["seed"].madvise_log() == [(ram.base + off, size, 1)]
    ram.mm.released.clear()
    f = QEMUFile(RecordingChannel())
    f.put_buffer_async(ram.view(off, size), True)
    f.fflush()
    assert ram.mm.released == pages and f.released_bytes == sum(n for _, n in pages)


STALE_AT_EOF = ("get_buffer", "get_buffer_in_place", "peek_buffer")


@pytest.mark.component
def test_difference_last_bytes_at_the_end_of_stream(libs):
    """A read that meets the end of the stream with pending bytes not at the front of the
    buffer: the seed's qemu_fill_buffer moves them to the front, but qemu_peek_buffer keeps
    the index it computed before, so qemu_get_buffer copies stale bytes (a truncated page
    loaded with wrong bytes).  npqfile returns the stream's bytes."""
    data = bytes(range(1, 21))
    f = QEMUFile(ChunkedReader(data, [20]))
    with SeedReader(libs["seed"], data, [20]) as r:
        assert r.get_be64() == f.get_be64()
        theirs = r.get_buffer(100)
        assert r.get_error() == -errno.EIO
    ours = bytearray(100)
    assert f.get_buffer(ours) == len(theirs) == 12
    assert bytes(ours[:12]) == data[8:] != theirs


@pytest.mark.component
def test_difference_peek_past_buffered_data(libs):
    """A peek that starts past the buffered bytes: the seed's qemu_peek_buffer never reads
    (ssize_t vs size_t compare) and its qemu_peek_byte reads once; both then return
    nothing/0 with no error -- a silent wrong value.  npqfile reads until the bytes are
    there (or an error is recorded)."""
    data = bytes(range(10))
    f = QEMUFile(ChunkedReader(data, [2]))
    with SeedReader(libs["seed"], data, [2]) as r:
        assert (r.get_byte(), r.peek_byte(3), r.get_error()) == (0, 0, 0)
    assert (f.get_byte(), f.peek_byte(3), f.get_error()) == (0, 4, 0)
    f = QEMUFile(ChunkedReader(data, [2]))
    with SeedReader(libs["seed"], data, [2]) as r:
        assert (r.peek_buffer(2, 5), r.get_error(), r.calls) == (b"", 0, 0)
    assert (bytes(f.peek_buffer(2, 5)), f.get_error()) == (b"\x05\x06", 0)
