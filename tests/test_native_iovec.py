"""Native iovec writes (issue 12): ``put_records`` of a ``PageRun`` on a channel with
``writev_iov`` must make exactly the writev calls -- same iovecs, same bytes, same flush
points -- that the per-page views make, over every OS channel, with short writes, EAGAIN,
stall timeouts and broken pipes handled as ``writev`` handles them.  Timings are never tested."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from npqfile.buffers import PageRun
from npqfile.channels import ExecChannel, FdChannel, FileChannel, MemoryChannel, SocketChannel, iovec
from npqfile.qemufile import QEMUFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PS = 4096

from conftest import require


@pytest.fixture(autouse=True)
def _native_iovecs():
    """Every test here needs native iovecs: skipped locally where libc has none, failed in CI."""
    require(iovec.available(), "native iovec writes (64-bit libc writev/pwritev/readv through ctypes)")


class Recorder:
    """A write channel that records every call: ('views' | 'iov', [iovec lengths], bytes)."""

    def __init__(self, native: bool):
        self.calls: list[tuple[str, list[int], bytes]] = []
        if native:
            self.writev_iov = self._writev_iov

    def writev(self, buffers, pos):
        mvs = [memoryview(b).cast("B") for b in buffers]
        self.calls.append(("views", [m.nbytes for m in mvs], b"".join(bytes(m) for m in mvs)))
        return sum(m.nbytes for m in mvs)

    def _writev_iov(self, iov, total, pos):
        lens = [int(n) for n in iov[:, 1]]
        data = b"".join(ctypes.string_at(int(a), int(n)) for a, n in iov)
        assert sum(lens) == total
        self.calls.append(("iov", lens, data))
        return total

    def close(self):
        return 0


def _ram(pages: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, pages * PS, dtype=np.uint8)


def _records(f: QEMUFile, ram: np.ndarray, idx: np.ndarray, as_run: bool, lead: int) -> None:
    for i in range(lead):                 # bytes already queued: the cycles start mid-queue
        f.put_byte(i)
    offsets = idx.astype(np.int64) * PS
    headers = (offsets | 0x28).astype(">u8")
    pages = PageRun(ram, offsets, PS) if as_run else [memoryview(ram)[o:o + PS] for o in offsets.tolist()]
    f.put_records(headers, 8, pages)
    f.put_be64(0x10)
    f.fflush()


@pytest.mark.parametrize("max_iov,io_buf", [(64, 32768), (8, 32768), (64, 64), (7, 32768)])
@pytest.mark.parametrize("lead", [0, 1, 5])
def test_native_cycles_make_the_same_writev_calls(max_iov, io_buf, lead):
    ram = _ram(300)
    idx = np.r_[np.arange(0, 150), np.arange(299, 150, -1)]     # ascending, then scattered
    seen = []
    for native, as_run in ((False, False), (True, True)):
        ch = Recorder(native)
        _records(QEMUFile(ch, io_buf_size=io_buf, max_iov=max_iov), ram, idx, as_run, lead)
        seen.append(ch.calls)
    reference, native_calls = seen
    assert [(lens, data) for _, lens, data in native_calls] == [(lens, data) for _, lens, data in reference]
    if max_iov % 2 == 0 and io_buf > 64:
        assert any(kind == "iov" for kind, _, _ in native_calls)   # the native path was taken


def test_page_run_is_the_list_of_page_views_and_refuses_pages_outside_memory():
    ram = _ram(4)
    run = PageRun(ram, [3 * PS, 0, PS], PS)
    assert len(run) == 3
    assert bytes(run[0]) == ram[3 * PS:].tobytes()
    assert [bytes(p) for p in run[1:]] == [ram[:PS].tobytes(), ram[PS:2 * PS].tobytes()]
    with pytest.raises(ValueError, match="outside the 16384-byte buffer"):
        PageRun(ram, [3 * PS + 1], PS)
    with pytest.raises(ValueError, match="outside"):
        PageRun(ram, [-PS], PS)
    with pytest.raises(ValueError, match="page_size"):
        PageRun(ram, [0], 0)
    with pytest.raises(ValueError, match="integers"):
        PageRun(ram, [0.5], PS)


def test_page_run_keeps_its_checked_offsets_when_the_caller_changes_the_array():
    """Native writes address base + offsets: an offsets array changed after the bounds
    check must not move a page outside the buffer (or change which page is sent)."""
    ram = _ram(4)
    offsets = np.array([PS, 2 * PS], dtype=np.uint64)
    run = PageRun(ram, offsets, PS)
    offsets[0] = 1 << 40                    # far outside the 4-page buffer
    assert int(run.offsets[0]) == PS and bytes(run[0]) == ram[PS:2 * PS].tobytes()
    with pytest.raises(ValueError):
        run.offsets[0] = 1 << 40


def _reference_stream(ram: np.ndarray, idx: np.ndarray) -> bytes:
    ch = MemoryChannel()
    _records(QEMUFile(ch), ram, idx, False, 0)
    return ch.getvalue()


def _drain(fd_or_sock, out: bytearray) -> threading.Thread:
    def run():
        while True:
            chunk = fd_or_sock.recv(1 << 16) if isinstance(fd_or_sock, socket.socket) else os.read(fd_or_sock, 1 << 16)
            if not chunk:
                return
            out.extend(chunk)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("kind", ["pipe", "file", "socket", "socket-stall"])
def test_native_writes_over_real_channels_carry_the_reference_bytes(kind, tmp_path):
    ram = _ram(512, seed=2)
    idx = np.arange(512)[::-1].copy()
    want = _reference_stream(ram, idx)
    got = bytearray()
    if kind == "pipe":
        r, w = os.pipe()
        t = _drain(r, got)
        ch = FdChannel(w, "w")
    elif kind == "file":
        path = tmp_path / "s.bin"
        ch = FileChannel(path, "w")
        assert ch.positional
    else:
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # many short writes / EAGAINs
        t = _drain(b, got)
        ch = SocketChannel(a, "w")
        if kind == "socket-stall":
            ch.set_stall_timeout(60)          # a non-blocking fd underneath: EAGAIN is waited on
    f = QEMUFile(ch)
    _records(f, ram, idx, True, 0)
    assert f.close() == 0
    if kind == "file":
        got = bytearray((tmp_path / "s.bin").read_bytes())
    else:                                 # the close ended the stream: the reader sees EOF
        t.join(30)
        assert not t.is_alive()
        os.close(r) if kind == "pipe" else b.close()
    assert bytes(got) == want


def test_write_iov_resumes_partial_writes_inside_an_iovec():
    """A non-blocking socket with a tiny buffer: the kernel takes part of an iovec, the rest
    is re-based in place and written after EAGAIN waits."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.setblocking(False)
    got = bytearray()
    t = _drain(b, got)
    data = np.random.default_rng(5).integers(0, 256, 3 << 20, dtype=np.uint8)
    sizes = [1, 7, 4096, 100000, 3, 65536] * 8
    iov = iovec.iovec_array(len(sizes))
    base, off = data.ctypes.data, 0
    for i, n in enumerate(sizes):
        iov[i] = (base + off, n)
        off += n
    fd = a.fileno()
    assert iovec.write_iov(fd, iov, off, lambda: __import__("select").select([], [fd], [])) == off
    a.close()
    t.join(30)
    b.close()
    assert bytes(got) == data[:off].tobytes()


def test_a_stalled_socket_peer_fails_a_native_write_with_the_stall_timeout():
    a, b = socket.socketpair()
    try:
        ch = SocketChannel(a, "w")
        ch.set_stall_timeout(0.2, "the destination")
        f = QEMUFile(ch)
        ram = _ram(2048)                 # 8 MiB: more than the socket buffers hold
        _records(f, ram, np.arange(2048), True, 0)
        assert f.get_error() == -errno.ETIMEDOUT
        assert "the destination accepted no data for 0.2 s" in str(f.error)
    finally:
        a.close()
        b.close()


def test_a_broken_exec_pipe_names_the_command_and_the_offset():
    ch = ExecChannel("exit 3", "w")
    f = QEMUFile(ch)
    ram = _ram(1024)
    _records(f, ram, np.arange(1024), True, 0)
    assert f.get_error() == -errno.EPIPE
    assert "exec:exit 3: Broken pipe: command exited with status 3" in str(f.error)
    assert "stream offset" in str(f.error)
    f.close()


def test_save_imports_neither_the_loader_nor_psutil():
    """``npqfile save`` runs without the loader (its own ~10 ms) and psutil (~10 ms): both
    were imported inside the command's time before."""
    code = ("import sys, npqfile.cli.save\n"
            "print(sorted(m for m in ('npqfile.stream.loader', 'psutil') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- zero_copy_send: pages into a pipe by reference --------------------------------------

@pytest.fixture
def needs_vmsplice():
    require(iovec.splice_available(), "vmsplice(2) in libc")


@pytest.mark.usefixtures("needs_vmsplice")
def test_zero_copy_send_into_a_pipe_carries_the_reference_bytes_across_many_ring_laps():
    """64 MiB of records: the header ring (64 KiB, 128 cycles a half) is entered again 16
    times while a slow reader (4 KiB reads) still has earlier data in the pipe."""
    ram = _ram(16384, seed=7)
    idx = np.arange(16384)
    want = _reference_stream(ram, idx)
    r, w = os.pipe()
    got = bytearray()

    def slow():
        while chunk := os.read(r, 4096):
            got.extend(chunk)
    t = threading.Thread(target=slow, daemon=True)
    t.start()
    ch = FdChannel(w, "w")
    f = QEMUFile(ch, zero_copy_send=True)
    assert f._splice is not None
    _records(f, ram, idx, True, 0)
    assert f.close() == 0
    t.join(60)
    os.close(r)
    assert bytes(got) == want


@pytest.mark.usefixtures("needs_vmsplice")
def test_zero_copy_send_headers_are_copies_the_caller_may_reuse():
    """The pipe holds the pages by reference but never the caller's header buffer: headers
    changed after ``put_records`` returned, before anything was read, do not reach the stream."""
    ram = _ram(64, seed=8)
    offsets = np.arange(64, dtype=np.int64) * PS
    headers = (offsets | 0x28).astype(">u8")
    want = b"".join(headers[i:i + 1].tobytes() + ram[i * PS:(i + 1) * PS].tobytes() for i in range(64))
    r, w = os.pipe()
    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)   # 256 slots: 64 records (128) fit unread
    f = QEMUFile(FdChannel(w, "w"), zero_copy_send=True)
    f.put_records(headers, 8, PageRun(ram, offsets, PS))
    headers[:] = 0xFFFFFFFFFFFFFFFF        # the caller reuses its buffer
    got = bytearray()
    t = _drain(r, got)
    assert f.close() == 0
    t.join(30)
    os.close(r)
    assert bytes(got) == want


def test_the_header_ring_never_rewrites_placed_headers():
    """Placed headers stay as placed, lap after lap (a fresh ring when one is full), and a
    cycle larger than a ring is refused (the caller copies it)."""
    from npqfile.qemufile_zerocopy import RING_BYTES, SpliceHeaders

    ring = SpliceHeaders()
    cycles = [memoryview(bytes([i % 251]) * 3000) for i in range(3 * RING_BYTES // 3000)]
    placed = [ring.place(c) for c in cycles[:RING_BYTES // 3000 + 1]]
    assert all(at is not None for at in placed)
    assert ring.place(memoryview(bytes(RING_BYTES + 1))) is None
    # the current ring's earlier placements are unchanged by later ones
    last = placed[-1]
    assert ctypes.string_at(last, 3000) == bytes(cycles[len(placed) - 1])
    ring.close()


@pytest.mark.usefixtures("needs_vmsplice")
def test_zero_copy_send_headers_survive_a_reader_that_splices_them_onward():
    """A reader may splice(2) the pipe's buffers into another pipe (``tee``, ``pv``, a
    ``splice``-based relay): the pipe then reports them read (FIONREAD 0) while the next
    pipe still references the header memory.  The headers of 6 cycles (16 KiB each: more
    than a 64 KiB ring) sit in the second pipe until the end; they must arrive as written,
    not as the later cycles' headers (the old ring reused its first half: they did not)."""
    h, ps, cycle = 1024, 16, 16                     # max_iov 32: 16 records a cycle
    n = 6 * cycle
    rng = np.random.default_rng(12)
    memory = rng.integers(0, 256, n * ps, dtype=np.uint8)
    headers = rng.integers(0, 256, n * h, dtype=np.uint8)
    want = b"".join(headers[k * h:(k + 1) * h].tobytes() + memory[k * ps:(k + 1) * ps].tobytes()
                    for k in range(n))
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    try:
        fcntl.fcntl(a_w, fcntl.F_SETPIPE_SZ, 64 << 10)   # 16 slots: the writer waits on the relay
        assert fcntl.fcntl(b_w, fcntl.F_SETPIPE_SZ, 1 << 20) >= 1 << 20   # 256 slots hold all 192 iovecs

        def relay():
            while os.splice(a_r, b_w, 1 << 20):
                pass
        t = threading.Thread(target=relay, daemon=True)
        t.start()
        f = QEMUFile(FdChannel(a_w, "w"), max_iov=32, zero_copy_send=True)
        a_w = -1                                    # the QEMUFile closes it: the relay then ends
        try:
            assert f._splice is not None
            f.put_records(headers, h, PageRun(memory, np.arange(n) * ps, ps))
        finally:
            assert f.close() == 0
        t.join(60)
        assert not t.is_alive()
        os.close(b_w)
        b_w = -1
        got = bytearray()
        while chunk := os.read(b_r, 1 << 20):
            got += chunk
        assert bytes(got) == want
    finally:
        for fd in (a_r, a_w, b_r, b_w):
            if fd >= 0:
                os.close(fd)


def test_zero_copy_send_is_ignored_on_channels_that_are_not_pipes(tmp_path):
    ram = _ram(256, seed=9)
    idx = np.arange(256)
    f = QEMUFile(FileChannel(tmp_path / "s.bin", "w"), zero_copy_send=True)
    assert f._splice is None
    _records(f, ram, idx, True, 0)
    assert f.close() == 0
    assert (tmp_path / "s.bin").read_bytes() == _reference_stream(ram, idx)


@pytest.mark.usefixtures("needs_vmsplice")
def test_save_zero_copy_send_writes_the_same_stream(tmp_path):
    img = tmp_path / "ram.img"
    img.write_bytes(_ram(2048, seed=10).tobytes())
    out = {}
    for name, extra in (("copy", ["--no-zero-copy-send"]), ("zc", [])):
        dst = tmp_path / f"{name}.bin"
        subprocess.run([sys.executable, "-m", "npqfile", "save", f"ram={img}", "-o", f"exec:cat > {dst}", *extra],
                       cwd=ROOT, check=True, capture_output=True, timeout=120)
        out[name] = dst.read_bytes()
    assert out["copy"] == out["zc"] and len(out["zc"]) > 2048 * PS


def test_save_hands_pages_by_reference_by_default_only_into_exec_commands(tmp_path, monkeypatch):
    """``save``: zero-copy-send is on by default for ``exec:`` (npqfile waits for the
    command, which has read every page by then) and off for ``fd:``/``-`` and files; both
    flags override it; the bytes are the same either way."""
    import npqfile.cli as cli
    import npqfile.cli.save as save

    img = tmp_path / "ram.img"
    img.write_bytes(_ram(512, seed=11).tobytes())
    seen = []
    real = save.QEMUFile
    monkeypatch.setattr(save, "QEMUFile", lambda ch, **kw: seen.append(kw["zero_copy_send"]) or real(ch, **kw))
    outs = []
    for k, (out, extra) in enumerate(((f"exec:cat > {tmp_path}/0.bin", []),
                                      (f"exec:cat > {tmp_path}/1.bin", ["--no-zero-copy-send"]),
                                      (f"{tmp_path}/2.bin", []), (f"{tmp_path}/3.bin", ["--zero-copy-send"]))):
        assert cli.main(["save", f"ram={img}", "-o", out, *extra]) == 0
        outs.append((tmp_path / f"{k}.bin").read_bytes())
    assert seen == [True, False, False, True]
    assert outs[0] == outs[1] == outs[2] == outs[3]
    assert save.zero_copy_default("fd:5", None) is False and save.zero_copy_default("fd:5", True) is True
    assert save.zero_copy_default("exec:cat", None) is True and save.zero_copy_default("exec:cat", False) is False


def test_short_runs_of_normal_pages_go_as_views_and_long_ones_as_page_runs(monkeypatch):
    """A PageRun's checks cost more than a list of views of a few pages, and only whole flush
    cycles take its native path: pages scattered between zero ones go as views, runs of a
    flush cycle or more as PageRuns -- the same stream either way."""
    from npqfile.stream import ram_saver
    from test_stream_support import make_ram, snapshot_bytes

    pages = np.zeros((400, PS), dtype=np.uint8)
    pages[:200:2] = 7                         # runs of one normal page
    pages[300:] = 9                           # one run of 100
    made = []
    monkeypatch.setattr(ram_saver, "PageRun", lambda *a: made.append(a[1].size) or PageRun(*a))
    ram = make_ram({"ram": pages.reshape(-1)})
    try:
        data = snapshot_bytes(ram)
        assert made == [100]
        monkeypatch.setattr(ram_saver, "PAGE_RUN_MIN_PAGES", 10 ** 9)
        assert snapshot_bytes(ram) == data
    finally:
        ram.close()


def test_writes_wait_on_descriptors_above_select_s_limit():
    """A process with many files open gets descriptors of 1024 and more, which select(2)
    refuses (ValueError): the channels' waits for room must work there too, stall timeout
    included."""
    from npqfile.channels.base import wait_writable

    a, b = socket.socketpair()
    high = fcntl.fcntl(a.fileno(), fcntl.F_DUPFD_CLOEXEC, 1500)
    a.close()
    a = socket.socket(fileno=high)
    try:
        assert a.fileno() >= 1024 and wait_writable(a.fileno()) is True
        ch = SocketChannel(a, "w")
        ch.set_stall_timeout(0.2, "the destination")
        f = QEMUFile(ch)
        _records(f, _ram(2048), np.arange(2048), True, 0)     # more than the socket buffers hold
        assert f.get_error() == -errno.ETIMEDOUT
        assert "the destination accepted no data for 0.2 s" in str(f.error)
        assert wait_writable(a.fileno(), 0.05) is False       # still full: the timeout answers
    finally:
        a.close()
        b.close()


@pytest.mark.usefixtures("needs_vmsplice")
def test_zero_copy_send_without_memory_for_a_header_ring_fails_the_stream_at_its_offset(monkeypatch):
    """A header ring that cannot be mapped is a write error of the stream, sticky and naming
    the stream offset, as any failed write -- not an exception out of put_records."""
    from npqfile.qemufile_zerocopy import SpliceHeaders

    def no_memory(self, headers):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(SpliceHeaders, "place", no_memory)
    r, w = os.pipe()
    try:
        f = QEMUFile(FdChannel(w, "w"), zero_copy_send=True)
        _records(f, _ram(64), np.arange(64), True, 0)
        assert f.get_error() == -errno.ENOMEM
        assert "at stream offset 0" in str(f.error)
        f.close()
    finally:
        os.close(r)
