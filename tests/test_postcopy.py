"""Postcopy: return-path and command bytes, userfaultfd, the two postcopy phases, release-ram
in postcopy, hostile return paths, a side dying mid-postcopy, and real QEMU 7.2 / 10.0 on
either side."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import QEMU_VERSIONS, require
from proc_support import read_line, reaped, wait_for_eof

from npqfile.errors import StreamError
from npqfile.migration import MigrationConfig, MigrationParams, postcopy_ram, run_migration
from npqfile.migration.workloads import Workload, make_workload
from npqfile.ram import GuestRAM
from npqfile.stream import return_path as rpm

MIB = 1 << 20


def _uffd_ok() -> bool:
    from npqfile.ram.userfaultfd import Userfaultfd, UserfaultfdUnavailable
    try:
        Userfaultfd().close()
        return True
    except UserfaultfdUnavailable:
        return False


def require_uffd() -> None:
    require(_uffd_ok(), "userfaultfd (root, /dev/userfaultfd or vm.unprivileged_userfaultfd=1)")


# -- pure bytes -------------------------------------------------------------------------------
def test_return_path_messages_round_trip_in_any_split():
    data = (rpm.rp_pong(1) + rpm.rp_req_pages(0x3000, 4096, "ram") + rpm.rp_req_pages(0x5000, 8192, None)
            + rpm.rp_shut(False))
    assert data[:8] == b"\x00\x02\x00\x04\x00\x00\x00\x01"        # QEMU's PONG bytes
    p = rpm.ReturnPathParser()
    msgs = [m for i in range(len(data)) for m in p.feed(data[i:i + 1])]
    assert [m.name for m in msgs] == ["PONG", "REQ_PAGES_ID", "REQ_PAGES", "SHUT"]
    assert (msgs[1].block, msgs[1].start, msgs[1].length) == ("ram", 0x3000, 4096)
    assert (msgs[2].block, msgs[2].start, msgs[2].length) == (None, 0x5000, 8192)
    assert msgs[3].value == 0 and msgs[3].offset == len(data) - 8


@pytest.mark.parametrize("data, reason", [
    (b"NPQV\x00\x00\x00\x10", "Received invalid message 0x4e50 length 0x5156"),
    (struct.pack(">HH", rpm.MIG_RP_MSG_SHUT, 5), "'SHUT' message (0x0001) with incorrect length 5 expecting 4"),
    (struct.pack(">HHQIB", rpm.MIG_RP_MSG_REQ_PAGES_ID, 14, 0, 4096, 3) + b"r",
     "Req_Page_id with length 14 expecting 16"),
    (struct.pack(">HH", rpm.MIG_RP_MSG_REQ_PAGES_ID, 600), "with bad length 600"),
    (struct.pack(">HHI", rpm.MIG_RP_MSG_RESUME_ACK, 4, 1), "postcopy recovery and switchover-ack are not supported"),
])
def test_malformed_return_path_messages_are_stream_errors(data, reason):
    with pytest.raises(StreamError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        rpm.ReturnPathParser().feed(data)


def test_discard_messages_carry_at_most_twelve_ranges_and_parse_back():
    ranges = [(i * 8192, 4096) for i in range(30)]
    payloads = rpm.discard_payloads("pc.ram", ranges)
    assert len(payloads) == 3
    assert payloads[0][:9] == b"\x00\x06pc.ram\x00" and len(payloads[0]) == 9 + 12 * 16
    back = [r for p in payloads for r in rpm.parse_discard(p)[1]]
    assert back == ranges
    for bad, why in ((b"\x01\x01r\x00", "invalid version"), (b"\x00\x05r\x00", "missing nil"),
                     (b"\x00\x01r\x00" + b"\x00" * 15, "invalid length remaining 15")):
        with pytest.raises(ValueError, match=why):
            rpm.parse_discard(bad)


# -- userfaultfd ------------------------------------------------------------------------------
def test_userfaultfd_ioctl_numbers_are_the_kernel_headers():
    from npqfile.ram import userfaultfd as u
    # linux/userfaultfd.h on x86-64, as the C preprocessor computes them
    assert (u.UFFDIO_API, u.UFFDIO_REGISTER, u.UFFDIO_UNREGISTER, u.UFFDIO_WAKE, u.UFFDIO_COPY,
            u.UFFDIO_ZEROPAGE, u.USERFAULTFD_IOC_NEW) == (
        0xC018AA3F, 0xC020AA00, 0x8010AA01, 0x8010AA02, 0xC028AA03, 0xC020AA04, 0xAA00)
    assert "vm.unprivileged_userfaultfd" in u.HOW_TO_ALLOW and "/dev/userfaultfd" in u.HOW_TO_ALLOW


def test_userfaultfd_refused_says_what_would_allow_it():
    """An unprivileged process (root drops to nobody in a forked child) with the default
    vm.unprivileged_userfaultfd=0 and a root-only /dev/userfaultfd gets the explanation."""
    require(os.geteuid() == 0, "root (to drop to an unprivileged user)")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as fh:
        require(fh.read().strip() == "0", "vm.unprivileged_userfaultfd=0")
    from npqfile.ram.userfaultfd import Userfaultfd, UserfaultfdUnavailable
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # child: no Python-level cleanup, just report
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                Userfaultfd().close()
                msg = "allowed"
            except UserfaultfdUnavailable as exc:
                msg = str(exc)
            os.write(w, msg.encode()[:60000])
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        msg = fh.read().decode()
    os.waitpid(pid, 0)
    require(msg != "allowed", "a system where unprivileged users may not use userfaultfd")
    for needed in ("CAP_SYS_PTRACE", "/dev/userfaultfd", "vm.unprivileged_userfaultfd=1", "userfaultfd(2)"):
        assert needed in msg, msg


def test_destination_without_userfaultfd_fails_at_advise_and_says_why(monkeypatch):
    from npqfile.ram import userfaultfd as u

    def refuse():
        raise u.UserfaultfdUnavailable(1, u.HOW_TO_ALLOW + " (test)")
    monkeypatch.setattr(u, "open_userfaultfd", refuse)
    cfg = _cfg(postcopy_after=1)
    cfg.workload = "idle"
    st = run_migration(cfg)
    assert st.status == "failed"
    assert "vm.unprivileged_userfaultfd" in st.verification["error"], st.verification


def test_userfaultfd_blocks_a_reader_until_the_page_is_copied():
    require_uffd()
    import ctypes
    from npqfile.ram.userfaultfd import Userfaultfd
    ram = GuestRAM()
    try:
        b = ram.add_block("ram", 1 * MIB)
        b.release([(0, b.size)])
        got = ctypes.create_string_buffer(4096)
        with Userfaultfd() as uf:
            uf.register(b.address, b.size)
            t = threading.Thread(target=ctypes.memmove, args=(got, b.address + 8192, 4096))
            t.start()
            faults = []
            deadline = time.monotonic() + 10
            while not faults and time.monotonic() < deadline:
                faults = uf.read_faults()
            assert [f.address & ~4095 for f in faults] == [b.address + 8192]
            assert t.is_alive()                              # blocked in the kernel, GIL released
            src = ctypes.create_string_buffer(b"\x5a" * 4096, 4096)
            uf.copy(b.address + 8192, ctypes.addressof(src), 4096)
            t.join(10)
            uf.zeropage(b.address, 4096)
            with pytest.raises(OSError, match="File exists"):
                uf.copy(b.address + 8192, ctypes.addressof(src), 4096)
            uf.unregister(b.address, b.size)
        assert got.raw == b"\x5a" * 4096 and bytes(b.page(2)) == b"\x5a" * 4096
    finally:
        ram.close()


# -- the simulator ------------------------------------------------------------------------------
def _cfg(**params) -> MigrationConfig:
    base = dict(max_bandwidth=8e6, max_iterations=3, time_limit=30.0)
    base.update(params)
    return MigrationConfig(size=16 * MIB, init="random", workload="uniform:rate=20000",
                           params=MigrationParams(**base))


def test_a_guest_that_cannot_converge_completes_with_postcopy():
    require_uffd()
    pre = run_migration(_cfg())                   # 80 MB/s of writes over an 8 MB/s link
    assert pre.status == "cancelled" and pre.outcome == "max-iterations"
    st = run_migration(_cfg(postcopy_after=1))
    d = st.as_dict()
    assert st.status == "completed" and st.outcome == "postcopy", st.outcome
    assert d["ram"]["postcopy-requests"] > 0 and d["ram"]["postcopy-bytes"] > 0
    assert st.verification == {"method": "sha256", "ok": True, "mismatched": []}
    dst = st.destination["postcopy"]
    assert dst["postcopy-requests"] == d["ram"]["postcopy-requests"]
    assert dst["fault-latency"]["count"] > 0 and dst["fault-latency"]["p50-ms"] <= dst["fault-latency"]["max-ms"]
    assert d["postcopy-blocktime"] > 0 and dst["npqfile-source"] is True
    assert dst["guest-touched-pages"] > 0          # the guest ran on the destination's RAM


def test_postcopy_auto_switches_at_the_limit_and_plots(tmp_path):
    require_uffd()
    st = run_migration(_cfg(postcopy_after="auto", sample_rss=True))
    assert st.status == "completed" and st.verification["ok"] is True
    from npqfile.migration.plot import plot_postcopy
    plot_postcopy(st, tmp_path / "pc.png")
    assert (tmp_path / "pc.png").stat().st_size > 1000


def test_release_ram_in_postcopy_frees_the_source_and_never_an_unsent_page():
    require_uffd()
    st = run_migration(_cfg(postcopy_after=1, release_ram=True, sample_rss=True))
    assert st.status == "completed", st.outcome
    # random contents: a page released before it was sent would have gone as zeros and
    # the destination's RAM as received would differ from the source's at the switch
    assert st.verification["ok"] is True and st.verification["method"] == "sha256"
    assert st.rss_after <= 64 * 4096 and st.released_bytes >= 16 * MIB
    rss = [r for t, _b, r in st.timeline if t >= st.switchover_time]
    assert rss[0] > 8 * MIB > rss[-1]              # RSS falls as postcopy proceeds


def test_precopy_release_ram_is_unchanged_by_postcopy_support():
    st = run_migration(MigrationConfig(size=8 * MIB, init="random", workload="idle",
                                       params=MigrationParams(release_ram=True)))
    assert st.status == "completed" and st.verification["ok"] is True and not st.postcopy


# -- hostile return paths ----------------------------------------------------------------------
def _hostile(monkeypatch, *messages: bytes, repeat: int = 1):
    """Make the in-process destination send ``messages`` on LISTEN."""
    original = postcopy_ram.PostcopyIncoming._listen

    def listen(self, loader):
        original(self, loader)
        for _ in range(repeat):
            for m in messages:
                self.send(m)
    monkeypatch.setattr(postcopy_ram.PostcopyIncoming, "_listen", listen)


@pytest.mark.parametrize("message, reason", [
    (rpm.rp_req_pages(16 * MIB, 4096, "ram"), "request overrun, start=0x1000000 len=0x1000 blocklen=0x1000000"),
    (rpm.rp_req_pages(0, 4096, "pc.ram"), "ram_save_queue_pages no block 'pc.ram'"),
    (rpm.rp_req_pages(0, 4096, None), "ram_save_queue_pages no previous block"),
    (rpm.rp_req_pages(100, 4096, "ram"), "Misaligned page request"),
    (b"\x4e\x50\x51\x56", "Received invalid message 0x4e50 length 0x5156"),
])
def test_hostile_return_path_messages_end_the_migration_cleanly(monkeypatch, message, reason):
    require_uffd()
    _hostile(monkeypatch, message)
    cfg = _cfg(postcopy_after=0)
    cfg.workload = "idle"
    st = run_migration(cfg)
    assert st.status in ("failed", "postcopy-paused") and reason in st.outcome, st.outcome
    assert st.verification.get("ok") is not True


def test_a_destination_that_shuts_mid_postcopy_fails_the_source(monkeypatch):
    require_uffd()
    _hostile(monkeypatch, rpm.rp_shut(True))
    cfg = _cfg(postcopy_after=0)
    cfg.workload = "idle"
    st = run_migration(cfg)
    assert st.status == "failed" and "SHUT 1" in st.outcome, st.outcome
    assert st.verification.get("ok") is not True


def test_a_flood_of_page_requests_costs_no_memory_and_completes(monkeypatch):
    require_uffd()
    _hostile(monkeypatch, rpm.rp_req_pages(0, 16 * MIB, "ram"), rpm.rp_req_pages(4096, 4096, None), repeat=5000)
    cfg = _cfg(postcopy_after=0)
    cfg.workload = "idle"
    st = run_migration(cfg)
    assert st.status == "completed" and st.verification["ok"] is True, st.outcome
    assert st.postcopy["postcopy-requests"] == 10000


def _stream(*commands: tuple[int, bytes]) -> bytes:
    from npqfile.channels import MemoryChannel
    from npqfile.qemufile import QEMUFile
    from npqfile.stream.devices import RAM
    from npqfile.stream.ram_saver import RAMSaver
    from npqfile.stream.savevm import SaveVMWriter
    ch = MemoryChannel()
    f = QEMUFile(ch)
    ram = GuestRAM()
    try:
        ram.add_block("ram", 1 * MIB)
        w = SaveVMWriter(f)
        w.write_header()
        with w.section(RAM, 1):
            RAMSaver(f, ram).save_setup()
        for cmd, payload in commands:
            w.write_command(cmd, payload)
        w.write_eof()
        f.fflush()
    finally:
        ram.close()
    return ch.getvalue()


ADVISE = (3, rpm.advise_payload(4096, 4096))


@pytest.mark.parametrize("commands, reason", [
    ([(5, b"")], "CMD_POSTCOPY_RUN in wrong postcopy state (none)"),
    ([(4, b"")], "CMD_POSTCOPY_LISTEN in wrong postcopy state (none)"),
    ([ADVISE, ADVISE], "CMD_POSTCOPY_ADVISE in wrong postcopy state (advise)"),
    ([(6, rpm.discard_payloads("ram", [(0, 4096)])[0])], "CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state (none)"),
    ([ADVISE, (6, rpm.discard_payloads("pc.ram", [(0, 4096)])[0])], "Failed to find block 'pc.ram'"),
    ([ADVISE, (6, rpm.discard_payloads("ram", [(1 * MIB, 4096)])[0])], "is not whole pages inside block 'ram'"),
    ([(3, rpm.advise_payload(4096, 8192))], "Postcopy needs matching target page sizes (s=8192 d=4096)"),
    ([(1, b""), (2, b"\0\0\0\1"), ADVISE, (4, b""), (4, b"")],
     "CMD_POSTCOPY_LISTEN in wrong postcopy state (listening)"),
])
def test_postcopy_commands_out_of_order_or_malformed_fail_the_destination(commands, reason):
    require_uffd()
    import socket
    from npqfile.channels import SocketChannel
    from npqfile.migration.destination import Destination
    a, b = socket.socketpair()
    data = _stream(*commands)
    t = threading.Thread(target=a.sendall, args=(data,))
    t.start()
    ram = GuestRAM()
    try:
        ram.add_block("ram", 1 * MIB)
        res = Destination(ram).receive(SocketChannel(b, "r"), reply=False)
    finally:
        t.join()
        a.close()
        ram.close()
    assert res.status in ("failed", "postcopy-paused") and reason in res.error, res.error


# -- a side dies during postcopy ------------------------------------------------------------------
def _incoming(sock: str, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "npqfile", "incoming", f"unix:{sock}", "--ram", "16M", "--json",
                             "--timeout", "60", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = read_line(proc, proc.stderr, what="listening line")   # --json: status lines on stderr
    if not line.startswith("listening on"):
        proc.kill()
        raise AssertionError(f"incoming did not start: {line!r} {proc.stderr.read()}")
    return proc


def test_destination_killed_during_postcopy_leaves_the_source_postcopy_paused(tmp_path):
    require_uffd()
    sock = str(tmp_path / "m.sock")
    with reaped(_incoming(sock, "--workload", "uniform:rate=20000")) as proc:
        def kill_at_postcopy(info):
            if info["status"] == "postcopy-active" and proc.poll() is None:
                proc.kill()
                proc.wait()
        cfg = _cfg(postcopy_after=0)
        cfg.to = f"unix:{sock}"
        st = run_migration(cfg, on_progress=kill_at_postcopy)
        assert proc.returncode is not None, "postcopy never became active"
        assert st.status == "postcopy-paused" and "guest is split" in st.outcome, st.outcome
        assert st.verification.get("ok") is not True


def test_source_gone_during_postcopy_leaves_the_destination_postcopy_paused(tmp_path, monkeypatch):
    require_uffd()
    import npqfile.migration.engine as eng
    engines = []
    original = eng.MigrationEngine.__init__

    def init(self, *a, **k):
        original(self, *a, **k)
        engines.append(self)
    monkeypatch.setattr(eng.MigrationEngine, "__init__", init)

    pongs: list[int] = []

    def drop_at_postcopy(info):
        if info["status"] == "postcopy-active" and not engines[0].f.get_error():
            # once the destination answered the package's PING 3 it listens (QEMU 10.1+
            # waits for this PONG before it counts the destination as running)
            deadline = time.monotonic() + 20
            while engines[0].postcopy.pongs < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            pongs.append(engines[0].postcopy.pongs)
            engines[0].f.channel.shutdown(True, True)     # the source's host vanishes
            engines[0].f.set_error(-32, "source gone")
    sock = str(tmp_path / "m.sock")
    with reaped(_incoming(sock, "--workload", "uniform:rate=20000")) as proc:
        cfg = _cfg(postcopy_after=0)
        cfg.to = f"unix:{sock}"
        st = run_migration(cfg, on_progress=drop_at_postcopy)
        assert pongs and pongs[0] >= 3, f"the destination never answered PING 3 ({pongs})"
        assert st.status == "postcopy-paused", st.outcome
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    res = json.loads(out)
    assert res["status"] == "postcopy-paused" and "guest is split" in res["error"], res
    from test_schemas import check
    check(res, "incoming")
    assert "incoming migration postcopy-paused" in err


def test_source_killed_during_postcopy_leaves_the_destination_postcopy_paused(tmp_path, monkeypatch):
    require_uffd()
    from npqfile.channels import listen
    from npqfile.migration.destination import Destination
    sock = str(tmp_path / "k.sock")
    src: list[subprocess.Popen] = []
    original = postcopy_ram.PostcopyIncoming.command

    def command(self, cmd, data, loader):
        original(self, cmd, data, loader)
        if cmd == 5 and src:                     # POSTCOPY_RUN: the guest now runs here
            src[0].kill()                        # the source cannot be done: it waits for our SHUT
            src[0].wait()
    monkeypatch.setattr(postcopy_ram.PostcopyIncoming, "command", command)
    ram = GuestRAM()
    try:
        ram.add_block("ram", 16 * MIB)
        with listen(f"unix:{sock}") as listener:
            src.append(subprocess.Popen(
                [sys.executable, "-m", "npqfile", "migrate", "--size", "16M", "--workload", "idle", "--quiet",
                 "--postcopy-after", "0", "--to", f"unix:{sock}"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
            channel = listener.accept(60)
        res = Destination(ram, guest=Workload()).receive(channel)
        assert src[0].returncode == -9
        assert res.status == "postcopy-paused" and "guest is split" in res.error, res.error
    finally:
        for p in src:
            if p.poll() is None:
                p.kill()
            p.wait()
        ram.close()


# -- real QEMU ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", QEMU_VERSIONS)
@pytest.mark.parametrize("start_postcopy", [True, False])
def test_real_qemu_postcopy_source_into_npqfile_incoming(tmp_path, version, start_postcopy):
    require_uffd()
    from qemu_support import QemuVM
    ram_file = tmp_path / "src.bin"
    data = np.random.default_rng(3).integers(0, 256, 16 * MIB, dtype=np.uint8)
    data[: 4 * MIB] = 0
    data.tofile(ram_file)
    want = hashlib.sha256(data.tobytes()).hexdigest()
    sock = str(tmp_path / "m.sock")
    with reaped(_incoming(sock)) as proc:
        with QemuVM(tmp_path, ram_file, version=version) as vm:
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
            if start_postcopy:
                vm.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB})    # pre-copy would take 3 s
            else:                       # pre-copy converges, but the return path is open: SHUT ends it
                vm.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
            vm.cmd("migrate", uri=f"unix:{sock}")
            if start_postcopy:
                vm.cmd("migrate-start-postcopy")
            st = vm.wait_migration(60)
            if start_postcopy:
                assert st["ram"]["postcopy-bytes"] > 0      # QEMU 7.0+ reports it
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    res = json.loads(out)
    assert res["hashes"] == {"ram": want}
    assert (res["postcopy"]["placed-pages"] > 0) is start_postcopy
    assert res["postcopy"]["npqfile-source"] is False


@contextlib.contextmanager
def _qemu_postcopy_destination(tmp_path, version: str, name: str):
    """A QEMU ``version`` destination with postcopy-ram, listening on a unix socket, its
    guest RAM a 16 MiB file on tmpfs (QEMU's postcopy wants tmpfs RAM); yields (vm, uri,
    RAM file path) and always removes the file."""
    from qemu_support import QemuVM
    shm = f"/dev/shm/npqfile-{name}-{os.getpid()}-{version}.bin"
    try:
        with open(shm, "wb") as fh:
            fh.truncate(16 * MIB)
        sock = tmp_path / "m.sock"
        with QemuVM(tmp_path, shm, incoming=True, version=version) as vm:
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
            vm.cmd("migrate-incoming", uri=f"unix:{sock}")     # listening once the command returns
            yield vm, f"unix:{sock}", shm
    finally:
        if os.path.exists(shm):
            os.unlink(shm)


@pytest.mark.parametrize("version", QEMU_VERSIONS)
def test_npqfile_postcopy_source_into_real_qemu(tmp_path, version):
    with _qemu_postcopy_destination(tmp_path, version, "pc") as (vm, uri, shm):
        ram = GuestRAM()
        try:
            b = ram.add_block("ram", 16 * MIB)
            b.array[:] = np.random.default_rng(4).integers(0, 256, b.size, dtype=np.uint8)
            b.pages[::5] = 0
            want = b.sha256()
            cfg = MigrationConfig(size=16 * MIB, to=uri, peer="qemu",
                                  params=MigrationParams(max_bandwidth=40e6, postcopy_after=0,
                                                         qemu_version=version))
            st = run_migration(cfg, ram=ram, workload=Workload())
        finally:
            ram.close()
        assert st.status == "completed" and st.outcome == "postcopy", f"{st.outcome}: {vm.stderr()}"
        assert st.postcopy["postcopy-bytes"] > 0 and st.postcopy["shut"] == 0
        assert st.completion == "not-verified" and "--peer qemu" in st.verification["note"]
        vm.wait_migration(30)
        with open(shm, "rb") as fh:                 # shared RAM: what QEMU placed is in the file
            assert hashlib.sha256(fh.read()).hexdigest() == want


# -- command line ---------------------------------------------------------------------------------
def test_cli_postcopy_summary_json_and_plots(tmp_path, capsys):
    require_uffd()
    from npqfile.cli import main
    png = tmp_path / "run.png"
    rc = main(["migrate", "--quiet", "--size", "16M", "--init", "random", "--workload", "uniform:rate=20000",
               "--max-bandwidth", "8MB/s", "--postcopy-after", "1", "--release-ram", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0 and "migration completed, verified: postcopy" in out and "fault latency p50" in out
    assert png.stat().st_size > 1000 and (tmp_path / "run.postcopy.png").stat().st_size > 1000
    assert main(["migrate", "--quiet", "--size", "1M", "--postcopy-after", "soon"]) == 1
    assert "--postcopy-after must be a number of dirty syncs >= 0 or auto, got 'soon'" in capsys.readouterr().err
    assert main(["migrate", "--quiet", "--size", "1M", "--workload", "idle", "--postcopy-after", "0",
                 "--to", "null:"]) == 1
    assert "postcopy needs a return path" in capsys.readouterr().err


def test_postcopy_outputs_follow_the_schemas(tmp_path, capsys):
    """migrate --json and --events of a postcopy run, and incoming's postcopy result."""
    require_uffd()
    from test_schemas import check

    from npqfile.cli import main
    events = tmp_path / "ev.jsonl"
    rc = main(["migrate", "--json", "--quiet", "--size", "4M", "--workload", "uniform:rate=20000",
               "--max-bandwidth", "4MB/s", "--postcopy-after", "1", "--events", str(events)])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["status"] == "completed"
    check(d, "migrate")
    statuses = []
    for line in events.read_text().splitlines():
        ev = json.loads(line)
        check(ev, "events")
        if ev["event"] == "MIGRATION":
            statuses.append(ev["data"]["status"])
        elif ev["event"] == "query-migrate":
            assert "postcopy-requests" in ev["data"]["ram"]
    assert "postcopy-active" in statuses and statuses[-1] == "completed"
    check(d["npqfile"]["destination"], "incoming")


@pytest.mark.parametrize("version", QEMU_VERSIONS)
def test_real_qemu_destination_killed_during_postcopy_pauses_the_source(tmp_path, version):
    with _qemu_postcopy_destination(tmp_path, version, "pck") as (vm, uri, _shm):
        def kill_at_postcopy(info):
            if info["status"] == "postcopy-active" and vm.proc.poll() is None:
                vm.proc.kill()
                vm.proc.wait()
        cfg = MigrationConfig(size=16 * MIB, init="random", workload="idle", to=uri, peer="qemu",
                              params=MigrationParams(postcopy_after=0, qemu_version=version))
        st = run_migration(cfg, on_progress=kill_at_postcopy)
        assert vm.proc.returncode is not None, "postcopy never became active"
        assert st.status == "postcopy-paused" and "guest is split" in st.outcome, st.outcome


def test_a_switch_to_postcopy_that_fails_to_go_out_releases_nothing(monkeypatch):
    """release-ram frees the clean pages only once the package (LISTEN, devices, RUN) is
    written, as QEMU's postcopy_start does: a switch whose write fails leaves the source
    every page (it used to free them first)."""
    require_uffd()
    from npqfile.migration import postcopy as pc
    from npqfile.migration.session import fill_guest
    from npqfile.ram import GuestRAM

    def broken_package(self):
        self.e.f.set_error(-32, "the destination vanished at the switch")
    monkeypatch.setattr(pc.PostcopySource, "_send_package", broken_package)
    ram = GuestRAM()
    ram.add_block("ram", 16 * MIB)
    try:
        fill_guest(ram, "random", 1)
        # a small hot set: most pages are clean at the switch, so there is RAM to release
        cfg = _cfg(postcopy_after=1, release_ram=True, downtime_limit=0.001)
        wl = make_workload("hotset:rate=2000,hot=0.05", seed=1)
        st = run_migration(cfg, ram=ram, workload=wl)
        assert st.status == "failed" and "vanished at the switch" in st.outcome, st.outcome
        # the guest wrote until it stopped at the switch: what is left must be all of its
        # RAM, nothing released (a released page of random contents reads back as zeros)
        zero_pages = int((~ram.blocks[0].pages.any(axis=1)).sum())
        assert st.released_bytes == 0 and zero_pages == 0
    finally:
        ram.close()


# -- the return path: where npqfile differs from QEMU -----------------------------------------------
def test_a_postcopy_source_waits_for_shut_only_so_long(monkeypatch):
    """QEMU's source joins its return-path thread for SHUT without a time limit; npqfile's
    gives up after SHUT_TIMEOUT (shortened here) and reports postcopy-paused: the guest
    runs on a destination that never confirmed it has every page."""
    require_uffd()
    from npqfile.migration import postcopy as pc
    monkeypatch.setattr(pc, "SHUT_TIMEOUT", 0.5)
    real_finish = postcopy_ram.PostcopyIncoming.finish

    def finish_after_the_source_hangs_up(self, ok, verdict):
        wait_for_eof(self.main.channel.fileno())    # holds SHUT back until the source closes the stream
        real_finish(self, ok, verdict)
    monkeypatch.setattr(postcopy_ram.PostcopyIncoming, "finish", finish_after_the_source_hangs_up)
    cfg = _cfg(postcopy_after=0)
    cfg.workload = "idle"
    st = run_migration(cfg)
    assert st.status == "postcopy-paused", st.outcome
    assert "no SHUT from the destination within 0.5 s" in st.outcome and "guest is split" in st.outcome
    assert st.verification.get("ok") is not True


def test_open_return_path_in_a_replayed_stream_is_a_warning_without_a_guest(tmp_path):
    """QEMU fails a stream whose OPEN_RETURN_PATH meets a channel without a return path
    (CMD_OPEN_RETURN_PATH failed); npqfile loads a saved postcopy stream (a file, a
    command) when no guest is to run, with a warning, its PINGs unanswered.  A destination
    that would run the guest still fails."""
    from npqfile.channels import open_channel
    from npqfile.migration.destination import Destination
    path = tmp_path / "pc.stream"
    path.write_bytes(_stream((1, b""), (2, b"\0\0\0\1")))
    ram = GuestRAM()
    try:
        ram.add_block("ram", 1 * MIB)
        res = Destination(ram).receive(open_channel(f"file:{path}", "r"), reply=False)
        assert res.status == "completed", res.error
        assert any("OPEN_RETURN_PATH on a channel without one" in w for w in res.warnings), res.warnings
        res = Destination(ram, guest=make_workload("idle")).receive(open_channel(f"file:{path}", "r"), reply=False)
        assert res.status == "failed" and "Unable to open return-path for postcopy" in res.error, res.error
    finally:
        ram.close()


def test_ctrl_c_while_a_converged_precopy_waits_for_shut_cancels_at_once(monkeypatch):
    """Postcopy advised, pre-copy converged: the source waits for the destination's SHUT
    (await_return_path_close_on_source), its status still QEMU's ``device`` there, so
    migrate_cancel cancels it.  The cancel used to change nothing: the wait ran to
    SHUT_TIMEOUT and the run ended ``failed``."""
    require_uffd()
    from npqfile.migration import postcopy as pc
    from npqfile.migration.control import MigrationControl
    monkeypatch.setattr(pc, "SHUT_TIMEOUT", 30.0)     # the old code's failure, sooner
    real_finish = postcopy_ram.PostcopyIncoming.finish
    control = MigrationControl()

    def cancel_then_hold_shut_back(self, ok, verdict):
        control.cancel()                         # Ctrl-C while the source waits for SHUT
        wait_for_eof(self.main.channel.fileno())    # SHUT only once the source closed the stream
        real_finish(self, ok, verdict)
    monkeypatch.setattr(postcopy_ram.PostcopyIncoming, "finish", cancel_then_hold_shut_back)
    cfg = _cfg(postcopy_after=1000)              # never switches: pre-copy converges
    cfg.workload = "idle"
    try:
        st = run_migration(cfg, control=control)
    finally:
        control.close()
    assert st.status == "cancelled", st.outcome
    assert st.verification.get("ok") is not True and st.release.get("when") is None
