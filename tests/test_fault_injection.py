"""Faults over real TCP: kill -9 and SIGSTOP of either side at several points of a migration.

The destination is always an ``npqfile incoming`` process.  Destination faults: the
source runs in this process (so its RAM can be hashed before and after), and its
progress hooks kill or stop the destination early (the first rate-limit window),
mid-stream (half the RAM sent), at pre-switchover, or after the last write (while
the source awaits the verdict), with and without release-ram.  Every failure must
leave the source's RAM as it was, none may be reported as a success, and none may
hang beyond the stall timeout.  Source faults: the source is a child process that
stops or kills itself at those points; the destination must give up with a clear
error (a stalled source after its stall timeout) and never report success.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import require
from proc_support import fail, read_line

from npqfile.migration.engine import MigrationParams
from npqfile.migration.session import MigrationConfig, fill_guest, run_migration
from npqfile.migration.workloads import Workload
from npqfile.ram import GuestRAM

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MIB = 1 << 20
SIZE = 16 * MIB
STALL = 2.0            # seconds: both sides' stall timeout in these tests
HANG = 60.0            # a run still going after this long is hung (far above STALL)
POINTS = ("early", "mid", "pre-switchover", "after-last-write")


def start_incoming(*extra: str, ram: int = SIZE, stall: float = STALL) -> tuple[subprocess.Popen, str]:
    """``npqfile incoming tcp:127.0.0.1:0 --json`` and the URI it listens on (its
    ``listening on`` line, looked for on stdout and stderr)."""
    require(hasattr(signal, "SIGSTOP"), "POSIX signals")
    proc = subprocess.Popen([sys.executable, "-m", "npqfile", "incoming", "tcp:127.0.0.1:0", "--json",
                             "--ram", str(ram), "--timeout", "60", "--stall-timeout", str(stall), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    while True:
        line = read_line(proc, proc.stdout, proc.stderr, timeout=HANG, what="'listening on' line")
        if line.startswith("listening on "):
            return proc, line.split("listening on ", 1)[1].strip()
        if not line:
            fail(proc, "incoming exited before it listened")


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """Resume (if stopped) and end the process; returns (status, stdout, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        try:
            out, err = proc.communicate(timeout=HANG)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    else:
        out, err = proc.communicate()
    return proc.returncode, out, err


def run_with_hang_guard(fn):
    """fn() in a thread; fails if it is still running after HANG seconds."""
    out: list = []
    errors: list = []

    def target():
        try:
            out.append(fn())
        except BaseException as exc:     # pragma: no cover - reported below
            errors.append(exc)
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(HANG)
    assert not t.is_alive(), f"the source hung for {HANG} s"
    if errors:
        raise errors[0]
    return out[0]


@pytest.mark.parametrize("release", [False, True], ids=["keep", "release-ram"])
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("action", ["kill", "stop"])
def test_destination_fault_never_loses_the_source_nor_reports_success(action, point, release):
    proc, uri = start_incoming()
    sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
    hit: list[str] = []

    def fault(where: str) -> None:
        if not hit:
            hit.append(where)
            proc.send_signal(sig)

    def progress(info: dict) -> None:
        if point == "early" and info["status"] == "active":
            fault(point)
        elif point == "mid" and info["status"] == "active" and info["bytes"] >= SIZE // 2:
            fault(point)
        elif point == "after-last-write" and info["status"] == "wait-verdict":
            fault(point)

    ram = GuestRAM()
    try:
        ram.add_block("ram", SIZE)
        fill_guest(ram, "random", 7)
        before = ram.block("ram").sha256()
        params = MigrationParams(max_bandwidth=40e6, downtime_limit=0.01, release_ram=release,
                                 pause_before_switchover=point == "pre-switchover")
        cfg = MigrationConfig(size=SIZE, to=uri, params=params, stall_timeout=STALL)
        st = run_with_hang_guard(lambda: run_migration(
            cfg, ram=ram, workload=Workload(), on_progress=progress,
            pre_switchover=(lambda engine: fault("pre-switchover")) if point == "pre-switchover" else None))
        assert hit == [point]
        d = st.as_dict()
        if st.status == "completed":
            # only possible if the destination had loaded, hashed and answered before
            # the signal landed: then it did hold the guest, and said so
            assert st.verification["ok"] is True and st.destination["status"] == "completed"
        else:
            assert st.status == "failed" and d["npqfile"]["completion"] is None, st.outcome
            assert st.outcome.startswith("error: ") and st.verification.get("ok") is not True
            assert ram.block("ram").sha256() == before, "the source's RAM changed after a failure"
            assert st.released_bytes == 0 and d["npqfile"]["release-ram"]["released-bytes"] == 0
            if release:
                assert "releases nothing: the source keeps its RAM" in d["npqfile"]["release-ram"]["reason"]
    finally:
        finish(proc)
        ram.close()


SOURCE = """
import os, signal, sys
from npqfile.migration.engine import MigrationParams
from npqfile.migration.session import MigrationConfig, run_migration
from npqfile.migration.workloads import Workload
uri, point, action, size, stall = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
def fault(where):
    print("fault", where, flush=True)
    os.kill(os.getpid(), sig)
def progress(info):
    if point == "early" and info["status"] == "active":
        fault(point)
    elif point == "mid" and info["status"] == "active" and info["bytes"] >= size // 2:
        fault(point)
params = MigrationParams(max_bandwidth=40e6, downtime_limit=0.01, pause_before_switchover=point == "pre-switchover")
cfg = MigrationConfig(size=size, init="random", to=uri, params=params, stall_timeout=stall)
run_migration(cfg, workload=Workload(), on_progress=progress,
              pre_switchover=(lambda engine: fault(point)) if point == "pre-switchover" else None)
"""


@pytest.mark.parametrize("point", ["early", "mid", "pre-switchover"])
@pytest.mark.parametrize("action", ["kill", "stop"])
def test_source_fault_fails_the_destination_without_hanging(action, point):
    proc, uri = start_incoming()
    src = subprocess.Popen([sys.executable, "-c", SOURCE, uri, point, action, str(SIZE), str(STALL)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        try:
            out, err = proc.communicate(timeout=HANG)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the destination hung for {HANG} s on a {action}ped source")
        res = json.loads(out)
        assert proc.returncode == 1 and res["status"] == "failed", out
        assert "error: incoming migration failed" in err
        if action == "stop":
            assert "stall timeout" in res["error"] and f"sent nothing for {STALL:g} s" in res["error"]
    finally:
        if src.poll() is None:
            src.kill()
        src_out, _ = src.communicate()
        finish(proc)
    assert src_out.split() == ["fault", point]


def test_socket_stall_timeout_names_the_peer_and_the_timeout():
    import errno
    import socket

    from npqfile.channels import SocketChannel

    a, b = socket.socketpair()
    writer, reader = SocketChannel(a, "w"), SocketChannel(b, "r")
    try:
        writer.set_stall_timeout(0.2, "the destination")
        with pytest.raises(OSError) as exc:               # nobody reads: the buffer fills, then no progress
            writer.writev([bytes(1 << 20)] * 64, 0)
        assert exc.value.errno == errno.ETIMEDOUT
        assert str(exc.value.strerror) == "the destination accepted no data for 0.2 s (stall timeout)"
        reader.set_stall_timeout(0.2, "the source")
        while True:                                        # drain what was sent, then nothing comes
            try:
                reader.readinto(memoryview(bytearray(1 << 20)), 0)
            except OSError as err:
                assert err.errno == errno.ETIMEDOUT and "the source sent nothing for 0.2 s" in str(err)
                break
    finally:
        writer.close()
        reader.close()


def test_blocking_mode_keeps_the_stall_timeout():
    """set_blocking(True) after set_stall_timeout: the timeout stays (socket.setblocking alone
    drops it, and a stopped peer would block the migration forever again)."""
    import socket as _socket

    from npqfile.channels import SocketChannel
    a, b = _socket.socketpair()
    ch = SocketChannel(a, "r")
    guard = threading.Timer(10, b.shutdown, (_socket.SHUT_RDWR,))   # without the timeout: EOF, not a hang
    try:
        ch.set_stall_timeout(0.2, "the source")
        ch.set_blocking(False)
        ch.set_blocking(True)
        guard.start()
        with pytest.raises(OSError, match=r"the source .* for 0\.2 s \(stall timeout\)"):
            ch.readinto(memoryview(bytearray(16)), 0)
    finally:
        guard.cancel()          # also when the read did not fail: no timer left to fire later
        guard.join()
        ch.close()
        b.close()
