"""The RAM loader's direct page reads (``npqfile.stream.ram_direct``): records predicted to be
the next pages of a fresh block are read straight into RAM, and whatever was mispredicted is given
back.  Every test compares a load with direct reads against the buffered load of the same bytes:
same RAM, same statistics, same errors at the same offsets, and never a page resident that the
buffered load did not fault in."""

from __future__ import annotations

import ctypes
import fcntl
import os
import termios
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require
from npqfile.channels import MemoryReader, iovec, open_channel
from npqfile.errors import StreamError
from npqfile.qemufile import READ_AHEAD, QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream import load_stream, ram_direct
from test_stream_support import PAGE, be64, header, make_ram, page_record, part, ram_start, zero_record

REC = 8 + PAGE


@pytest.fixture(autouse=True)
def _native_iovecs():
    """Direct reads need native iovecs: skipped locally where libc has none, failed in CI."""
    require(iovec.available(), "native iovec reads (64-bit libc readv/preadv through ctypes)")


class ScriptedReader(MemoryReader):
    """MemoryReader with native reads: every call, buffered or direct, gets at most the next
    size of ``chunk``; FIONREAD's answer is ``available`` (what is left, by default)."""

    def readv_iov(self, iov: np.ndarray, pos: int) -> int:
        call = self.calls
        self.calls += 1
        want = sum(int(x) for x in iov[:, 1])
        if self._caps is not None:
            want = min(want, self._caps(call))
        got = 0
        for addr, length in iov.tolist():
            n = min(length, want - got, len(self._data) - self._offset)
            if n <= 0:
                break
            src = (ctypes.c_char * n).from_buffer_copy(self._data[self._offset:self._offset + n])
            ctypes.memmove(addr, src, n)
            self._offset += n
            got += n
        return got


def _small_pages(blocks: dict[str, int]) -> GuestRAM:
    """Private blocks without transparent huge pages: residency is then per 4 KiB page."""
    ram = GuestRAM()
    for name, size in blocks.items():
        ram.add_block(name, size, hugepages=False)
    return ram


def _load(data: bytes, blocks: dict[str, int], fresh: bool, chunk=None, monkeypatch=None):
    """Load ``data`` (direct reads when ``fresh``); returns (arrays, resident pages, stats,
    error text, the DirectPages used or None)."""
    made: list = []
    if monkeypatch is not None:
        real = ram_direct.DirectPages.__init__

        def init(self, *a, **k):
            real(self, *a, **k)
            made.append(self)
        monkeypatch.setattr(ram_direct.DirectPages, "__init__", init)
        monkeypatch.setattr(ram_direct.DirectPages, "_available", lambda self, f: f.channel.remaining)
    ram = _small_pages(blocks)
    ch = ScriptedReader(data, chunk=chunk)
    try:
        res = load_stream(QEMUFile(ch, read_ahead=READ_AHEAD), ram, fresh_ram=fresh)
        stats, err = res.stats.as_dict(), None
    except StreamError as exc:
        stats, err = None, str(exc)
    out = ({b.name: b.array.copy() for b in ram.blocks}, {b.name: b.resident_pages() for b in ram.blocks},
           stats, err, made[0] if made else None)
    ram.close()
    return out


def _same(data: bytes, blocks: dict[str, int], monkeypatch, chunk=None):
    """Load both ways; assert everything a user sees is the same; return the direct load."""
    direct = _load(data, blocks, True, chunk, monkeypatch)
    buffered = _load(data, blocks, False, chunk)
    assert direct[3] == buffered[3]                     # the same error at the same offset, or none
    assert direct[2] == buffered[2]
    for name in blocks:
        assert np.array_equal(direct[0][name], buffered[0][name]), name
        # never resident where the buffered load did not fault a page in
        assert not (direct[1][name] & ~buffered[1][name]).any(), name
    return direct


def _pages(first: int, last: int, seed: int, block: str | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    return b"".join(page_record(p * PAGE, rng.integers(1, 256, PAGE, dtype=np.uint8).tobytes(),
                                block if p == first else None) for p in range(first, last))


def _mixed_stream() -> tuple[bytes, dict[str, int]]:
    """In-order runs across a section break, a ZERO page, a gap, pages re-sent below the
    frontier, another block and back."""
    blocks = {"ram": 2048 * PAGE, "vga": 64 * PAGE}
    first = _pages(0, 700, 1, "ram")
    second = _pages(700, 900, 2) + zero_record(900 * PAGE, 0, None) + _pages(901, 1200, 3)
    second += _pages(100, 151, 4) + _pages(1300, 2048, 5)
    second += page_record(3 * PAGE, bytes([9]) * PAGE, "vga") + _pages(10, 64, 6, "ram")
    return header() + ram_start(blocks) + part(first) + part(second) + b"\x00", blocks


@pytest.mark.parametrize("chunk, most", [(None, True), (20 * REC + 3, True), ([17 * REC + 9, PAGE, 5], True),
                                         ([1 << 20, 7], False)],
                         ids=["whole", "20-records-and-3", "odd-sizes", "mib-and-7"])
def test_direct_reads_load_what_the_buffered_path_loads(monkeypatch, chunk, most):
    """``most``: most pages go straight to RAM.  Not when every other read returns 7
    bytes: a read that ends inside a header ends the direct reads there (the header may
    be an EOS the source waits after), and the 7-byte reads fall to them."""
    data, blocks = _mixed_stream()
    direct = _same(data, blocks, monkeypatch, chunk)
    pages = direct[4]
    assert pages is not None
    if most:
        assert pages.records > 1000 and pages.misses >= 1   # the section break was given back


@pytest.mark.parametrize("bad", ["flag", "beyond", "not-continue", "truncated-header", "truncated-page",
                                 "truncated-in-run"])
def test_a_bad_record_after_a_predicted_run_fails_as_the_buffered_path(monkeypatch, bad):
    blocks = {"ram": 1024 * PAGE}
    body = _pages(0, 300, 7, "ram")
    tail = {"flag": be64(300 * PAGE | 0x28 | 0x200) + bytes(PAGE),
            "beyond": be64(1024 * PAGE | 0x28) + bytes(PAGE),
            "not-continue": be64(300 * PAGE | 0x08) + bytes(PAGE),
            "truncated-header": be64(300 * PAGE | 0x28)[:5],
            "truncated-page": be64(300 * PAGE | 0x28) + bytes([3]) * 1000,
            "truncated-in-run": _pages(300, 400, 8)[:50 * REC + 20]}[bad]
    data = header() + ram_start(blocks) + bytes([2]) + (2).to_bytes(4, "big") + body + tail
    if not bad.startswith("truncated"):
        data += _pages(301, 400, 9) + be64(0x10)
    for chunk in (None, 64 * REC + 11):
        direct = _same(data, blocks, monkeypatch, chunk)
        assert direct[3] is not None


def test_mispredicted_pages_go_back_to_untouched():
    """Pages read on a wrong prediction (the stream went on with ZERO records, then far
    away) are zero and not resident afterwards."""
    blocks = {"ram": 4096 * PAGE}
    body = _pages(0, 300, 10, "ram") + b"".join(zero_record(p * PAGE, 0, None) for p in range(300, 800))
    body += _pages(3000, 3100, 11)
    data = header() + ram_start(blocks) + part(body) + b"\x00"
    mp = pytest.MonkeyPatch()
    try:
        direct = _same(data, blocks, mp)
    finally:
        mp.undo()
    assert direct[4].misses >= 1
    resident = direct[1]["ram"]
    assert not direct[0]["ram"][300 * PAGE:3000 * PAGE].any()
    assert resident[:300].all() and not resident[300:3000].any()


@st.composite
def _streams(draw):
    """A random RAM section of in-order runs, gaps, re-sent pages, ZERO records, section
    breaks and maybe a bad or truncated end, read in random chunk sizes."""
    n_pages = 512
    body, sections, at = b"", [], 0
    seed = draw(st.integers(0, 1000))
    named = False
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["run", "run", "gap", "resend", "zero", "break"]))
        if kind == "break" and body:
            sections.append(body)
            body = b""
            continue
        if kind == "gap":
            at = min(n_pages - 1, at + draw(st.integers(1, 40)))
            continue
        start = draw(st.integers(0, max(0, at - 1))) if kind == "resend" else at
        count = draw(st.integers(1, 120))
        end = min(n_pages, start + count)
        if kind == "zero":
            body += b"".join(zero_record(p * PAGE, 0, None if named else "ram") for p in range(start, end))
        else:
            body += _pages(start, end, seed, None if named else "ram")
        named = True
        at = max(at, end)
    sections.append(body)
    data = header() + ram_start({"ram": n_pages * PAGE}) + b"".join(part(s) for s in sections)
    end = draw(st.sampled_from(["clean", "bad-flag", "truncated"]))
    if end == "clean":
        data += b"\x00"
    elif end == "bad-flag":
        data = data[:-len(part(sections[-1]))] + bytes([2]) + (2).to_bytes(4, "big") + sections[-1]
        data += be64(0x28 | 0x400) + bytes(PAGE)
    else:
        data = data[:draw(st.integers(len(data) // 2, len(data) - 1))]
    # short reads anywhere (inside headers too), but not so many that a case takes long
    chunk = draw(st.lists(st.one_of(st.integers(1, 16), st.integers(4000, 300_000)), min_size=1, max_size=4)
                 .filter(lambda c: sum(c) >= 4096 * len(c)))
    return data, chunk


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(_streams())
def test_any_stream_loads_the_same_with_direct_reads(monkeypatch, case):
    data, chunk = case
    _same(data, {"ram": 512 * PAGE}, monkeypatch, chunk)


def test_a_real_pipe_loads_what_the_buffered_path_loads(tmp_path):
    """``exec:cat FILE``: a pipe another process fills at its own pace (partial reads
    wherever the scheduler puts them) -- the same RAM, most of it read directly."""
    data, blocks = _mixed_stream()
    path = tmp_path / "stream.bin"
    path.write_bytes(data)
    results = []
    for fresh in (True, False):
        ram = make_ram(dict(blocks))
        f = QEMUFile(open_channel(f"exec:cat {path}", "r"), read_ahead=READ_AHEAD)
        try:
            res = load_stream(f, ram, fresh_ram=fresh)
        finally:
            f.close()
        results.append(({b.name: b.array.copy() for b in ram.blocks}, res.stats.as_dict()))
        ram.close()
    assert results[0][1] == results[1][1]
    for name in blocks:
        assert np.array_equal(results[0][0][name], results[1][0][name])


def test_read_direct_and_unread_keep_the_stream_position():
    """``QEMUFile.read_direct`` reads past the (empty) buffer into native iovecs and
    ``unread`` gives bytes back: ``tell`` and the bytes the gets return follow."""
    data = bytes(range(256)) * 64
    f = QEMUFile(ScriptedReader(data, chunk=[1000, 50]), read_ahead=READ_AHEAD)
    assert f.get_be64() == int.from_bytes(data[:8], "big")
    f.skip(len(f.buffered()))                       # empty the read-ahead buffer
    at = f.tell()
    target = np.zeros(3000, dtype=np.uint8)
    iov = iovec.iovec_array(2)
    iov[0] = (target.ctypes.data, 100)
    iov[1] = (target.ctypes.data + 100, 2900)
    assert f.read_direct(iov, 3000) == 50           # one read: the script's next cap
    assert f.tell() == at + 50 and bytes(target[:50]) == data[at:at + 50]
    f.unread([target[:20], target[20:50]])
    assert f.tell() == at
    out = bytearray(60)
    assert f.get_buffer(out) == 60 and bytes(out) == data[at:at + 60]
    assert f.read_direct(iov, 3000) == 0            # bytes are buffered: refused, nothing read
    at = f.tell() + len(f.buffered())
    f.skip(len(f.buffered()))
    iov[0] = (target.ctypes.data, 100)
    iov[1] = (target.ctypes.data + 100, 2900)
    assert f.read_direct(iov, 3000, complete=True) == 3000      # as many reads as it takes
    assert bytes(target) == data[at:at + 3000] and f.tell() == at + 3000
    with pytest.raises(ValueError, match="give back"):
        f.get_byte()
        f.unread([bytes(10)])                       # the buffer holds bytes: refused


def test_advance_rebases_the_iovecs_past_a_byte_count():
    iov = iovec.iovec_array(3)
    iov[:] = [(1000, 8), (5000, 4096), (2000, 8)]
    rest = iovec.advance(iov, 8 + 100)
    assert rest.tolist() == [[5100, 3996], [2000, 8]]
    assert iovec.advance(iov.copy(), 0).tolist() == iov.tolist()
    assert iovec.advance(iov, 8 + 3996).tolist() == [[2000, 8]]     # from the re-based array
    assert iovec.advance(iov, 8 + 3996 + 8).tolist() == []
    with pytest.raises(ValueError, match="fewer than"):
        iovec.advance(iovec.iovec_array(0), 1)


def test_read_once_reads_a_pipe_into_scattered_memory_and_never_waits():
    r, w = os.pipe()
    try:
        fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK)
        a, b = np.zeros(10, np.uint8), np.zeros(10, np.uint8)
        iov = iovec.iovec_array(2)
        iov[0] = (a.ctypes.data, 10)
        iov[1] = (b.ctypes.data, 10)
        assert iovec.read_once(r, iov) == 0         # empty, non-blocking: 0, no exception
        os.write(w, bytes(range(1, 16)))
        assert iovec.read_once(r, iov) == 15
        assert a.tolist() == list(range(1, 11)) and b[:5].tolist() == list(range(11, 16))
        os.close(w)
        w = -1
        assert iovec.read_once(r, iov) == 0         # end of stream: 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_rss_is_not_grown_by_a_stream_that_stops():
    """Only records the channel already holds are predicted: a stream whose writer has
    sent 40 pages and waits leaves no page beyond them faulted in."""
    blocks = {"ram": 2048 * PAGE}
    data = header() + ram_start(blocks) + bytes([2]) + (2).to_bytes(4, "big") + _pages(0, 40, 12, "ram")
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 1 << 20)                   # F_SETPIPE_SZ: room for the whole prefix
    os.write(w, data)
    ram = _small_pages(blocks)
    errors: list = []

    def load():
        try:
            load_stream(QEMUFile(open_channel(f"fd:{r}", "r"), read_ahead=READ_AHEAD), ram, fresh_ram=True)
        except StreamError as exc:
            errors.append(exc)
    t = threading.Thread(target=load)
    t.start()
    try:
        # wait (no timing: a condition) until the loader has taken every byte and waits for more
        unread = np.zeros(1, dtype=np.int32)
        for _ in range(30000):
            fcntl.ioctl(r, termios.FIONREAD, unread)
            if unread[0] == 0 and ram.block("ram").resident_pages()[39]:
                break
            threading.Event().wait(0.001)
        resident = ram.block("ram").resident_pages()
        assert resident[:40].all() and not resident[40:].any()
    finally:
        os.close(w)
        t.join(30)
    assert not t.is_alive() and errors, errors
    assert "truncated" in str(errors[0]) or "end of stream" in str(errors[0]), errors
    ram.close()


def test_a_page_sent_ahead_of_a_run_below_it_is_never_predicted_over(monkeypatch):
    """A page sent ahead of the in-order ones (QEMU's background snapshot sends a page the
    guest is about to write at once, then its scan resumes below it), followed by a
    buffered run below it: the frontier stays above that page, so a misprediction that
    follows the run cannot zero it."""
    blocks = {"ram": 1024 * PAGE}
    start = header() + ram_start(blocks)
    ahead = _pages(0, 1, 1, "ram") + _pages(100, 101, 2) + _pages(1, 21, 3)
    data = start + part(ahead + _pages(300, 500, 4)) + b"\x00"
    first = len(start) + 5 + len(ahead)             # the run ends where the read-ahead does
    direct = _same(data, blocks, monkeypatch, chunk=lambda k: first if k == 0 else 1 << 30)
    assert direct[4].misses >= 1 and direct[0]["ram"][100 * PAGE:101 * PAGE].any()


@pytest.mark.parametrize("page_size,read_ahead", [(1 << 16, READ_AHEAD), (PAGE, None), (1024, READ_AHEAD),
                                                  (2048, READ_AHEAD)],
                         ids=["64k-pages", "qemu-sized-buffer", "1k-pages", "2k-pages"])
def test_direct_reads_fit_the_read_ahead_buffer_and_the_host_pages(monkeypatch, page_size, read_ahead):
    """What a misprediction gives back fits the read-ahead buffer, whatever the target page
    size (a vmdesc's 64 KiB) and the buffer (QEMU's 32 KiB by default); pages smaller than
    the host's are never predicted (a host page is released whole).  The load ends as the
    buffered one: the same RAM, no error."""
    monkeypatch.setattr(ram_direct.DirectPages, "_available", lambda self, f: f.channel.remaining)
    rng = np.random.default_rng(13)
    ps = page_size
    pages = {p: rng.integers(1, 256, ps, dtype=np.uint8).tobytes() for p in [*range(0, 43), *range(100, 140)]}
    recs = [be64(p * ps | 0x28) + d for p, d in pages.items()]
    recs[0] = be64(0x08) + bytes([3]) + b"ram" + pages[0]
    prefix = header() + ram_start({"ram": 1024 * ps}) + bytes([2]) + (2).to_bytes(4, "big") + recs[0]
    data = prefix + b"".join(recs[1:]) + be64(0x10) + b"\x7e" + (2).to_bytes(4, "big") + b"\x00"
    # the read-ahead ends after the named page, then after 20 more: the run there is read directly
    caps = [len(prefix), 20 * (8 + ps)]
    f = QEMUFile(ScriptedReader(data, chunk=lambda k: caps[k] if k < 2 else 1 << 30), read_ahead=read_ahead)
    res = load_stream(f, None, vmdesc={"page_size": ps})
    got = res.ram.block("ram").array.reshape(-1, ps)
    assert res.stats.normal_pages == len(pages)
    assert all(bytes(got[p]) == d for p, d in pages.items()) and not got[43:100].any() and not got[140:].any()
    del got
    res.ram.close()
