"""``npqfile migrate`` / ``npqfile incoming``: default run, stream accounting, processes, files, real QEMU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from qemu_support import QemuVM

from npqfile.cli import main
from npqfile.migration.engine import MigrationParams
from npqfile.migration.session import MigrationConfig, fill_guest, run_migration
from npqfile.migration.workloads import make_workload
from npqfile.ram import GuestRAM
from npqfile.stream.devices import none_machine_devices
from npqfile.stream.vmdesc import encode_vmdesc
from proc_support import read_line

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MIB = 1 << 20
PS = 4096


def run_json(capsys, *argv):
    rc = main(["migrate", "--json", "--quiet", *argv])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def expected_ram_bytes(d: dict, block: str = "ram") -> int:
    """QEMU 7.2's ram.transferred from the page counts (one block): every page record
    (header, data, the block's idstr on its first record) and each PART section's EOS;
    ram_save_setup's records and the END section's EOS are not counted (ram.c)."""
    r, x = d["ram"], d["npqfile"]
    pages = r["normal"] * (8 + PS) + r["duplicate"] * (8 + 1)
    idstr = 1 + len(block)                                   # the first page record names the block
    eos = x["part-sections"] * 8                             # every PART, not the END
    return pages + idstr + eos


def expected_stream_bytes(d: dict, machine: str = "none", block: str = "ram") -> int:
    """Everything else a -M none stream holds around the counted RAM bytes."""
    devices = none_machine_devices("running")
    header = 8 + 1 + 4 + len(machine)
    start = 1 + 4 + 1 + 3 + 4 + 4 + 5
    setup = 8 + 1 + len(block) + 8 + 8                       # MEM_SIZE, idstr + used_length, EOS
    end_eos = 8
    part_end = (d["npqfile"]["part-sections"] + 1) * (5 + 5)
    full = sum(1 + 4 + 1 + len(se.idstr) + 4 + 4 + len(payload) + 5 for se, payload, _ in devices)
    vmdesc = 1 + 4 + len(encode_vmdesc([desc for _, _, desc in devices], PS))
    return header + start + setup + end_eos + part_end + full + 1 + vmdesc + d["ram"]["transferred"]


def test_default_run_is_consistent(capsys):
    rc, d = run_json(capsys)
    x = d["npqfile"]
    assert rc == 0 and d["status"] == "completed"
    assert x["verification"]["ok"] is True and x["destination"]["status"] == "completed"
    assert d["ram"]["total"] == 256 * MIB
    assert d["ram"]["transferred"] == expected_ram_bytes(d)
    assert x["stream-bytes"] == expected_stream_bytes(d)
    assert x["destination"]["bytes"] == x["stream-bytes"]      # what the destination read
    assert x["workload"]["kind"] == "hotset" and x["workload"]["writes"] > 0
    assert sum(it["pages"] for it in x["iterations"]) == d["ram"]["normal"] + d["ram"]["duplicate"]
    for key in ("total-time", "setup-time", "downtime", "expected-downtime"):
        assert d[key] >= 0
    for key in ("dirty-sync-count", "mbps", "pages-per-second", "dirty-pages-rate", "normal-bytes"):
        assert key in d["ram"]


def test_file_snapshot_is_readable_by_analyze(tmp_path, capsys):
    path = tmp_path / "snap.bin"
    rc, d = run_json(capsys, "--size", "8M", "--to", f"file:{path}", "--max-bandwidth", "40MB/s", "--downtime-limit", "20",
                     "--workload", "hotset:rate=2000,hot=0.01")
    assert rc == 0 and d["npqfile"]["verification"] == {"method": "sha256", "ok": True, "mismatched": []}
    assert path.stat().st_size == d["npqfile"]["stream-bytes"] == expected_stream_bytes(d)
    assert d["npqfile"]["part-sections"] > 1
    assert main(["analyze", str(path)]) == 0
    assert "globalstate" in capsys.readouterr().out


def test_summary_table_and_plot(tmp_path, capsys):
    png = tmp_path / "m.png"
    rc = main(["migrate", "--quiet", "--size", "8M", "--max-bandwidth", "40MB/s", "--release-ram",
               "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "downtime" in out and "compare: equal" in out and "iterations" in out
    assert "migration completed, verified: converged" in out
    assert "8.0 MiB after the verdict" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_converging_exits_2(capsys):
    rc, d = run_json(capsys, "--size", "2M", "--workload", "uniform:rate=8000", "--max-bandwidth", "8MB/s",
                     "--downtime-limit", "10", "--max-iterations", "3")
    assert rc == 2 and d["status"] == "cancelled" and d["npqfile"]["outcome"] == "max-iterations"


@pytest.mark.parametrize("argv, message", [
    (["--max-bandwidth", "fast"], "not a rate"), (["--workload", "spiky"], "unknown workload"),
    (["--compress", "brotli"], "unknown compression"), (["--to", "ftp:x"], "unknown migration URI"),
    (["--sweep", "colour=red"], "unknown sweep parameter"),
    (["--sweep", "size=2M,4M", "--sweep", "size=8M"], "sweep parameter 'size' given twice"),
    (["--sweep", "size=2M", "--to", "tcp:127.0.0.1:5"], "cannot send its parallel cases to 'tcp:127.0.0.1:5'"),
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--size", "256T"], "cannot allocate the 256.0 TiB guest RAM (block 'ram')"),
    (["--plot", "/nonexistent/dir/p.png"], "plot /nonexistent/dir/p.png: directory /nonexistent/dir does not exist"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(["migrate", "--quiet", "--size", "1M", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_sweep_runs_every_case(capsys):
    rc = main(["migrate", "--json", "--size", "4M", "--workload", "idle", "--sweep", "bandwidth=0,40MB/s",
               "--sweep", "downtime=100,300"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(rows) == 4
    assert {(r["max-bandwidth"], r["downtime-limit"]) for r in rows} == {("0", "100"), ("0", "300"), ("40MB/s", "100"),
                                                               ("40MB/s", "300")}
    assert all(r["converged"] and r["verified"] for r in rows)


# -- other processes ----------------------------------------------------------------------

def _start_incoming(uri: str, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "npqfile", "incoming", uri, "--json", "--timeout", "60", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    line = read_line(proc, proc.stderr, what="listening line")   # with --json, status lines go to stderr
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"incoming did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split("listening on ", 1)[1].strip()


def _migrate_between_processes(uri: str, dest_ram: str, *migrate_args: str, incoming_args: tuple = (),
                               as_json: bool = True):
    """Start ``npqfile incoming URI --ram DEST_RAM``, run ``npqfile migrate --to`` it; returns
    (incoming process, migrate CompletedProcess, incoming stdout, incoming stderr)."""
    proc, real_uri = _start_incoming(uri, "--ram", dest_ram, *incoming_args)
    try:
        src = subprocess.run([sys.executable, "-m", "npqfile", "migrate", "--to", real_uri,
                              *(["--json"] if as_json else ["--quiet"]), *migrate_args],
                             capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60, check=False)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc, src, out, err


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_two_processes_with_verification(scheme, tmp_path):
    uri = "tcp:127.0.0.1:0" if scheme == "tcp" else f"unix:{tmp_path / 'mig.sock'}"
    proc, src, dest_out, _ = _migrate_between_processes(uri, "16M", "--size", "16M", "--max-bandwidth", "200MB/s")
    assert src.returncode == 0, src.stderr
    d = json.loads(src.stdout)
    assert d["npqfile"]["verification"] == {"method": "sha256", "ok": True, "mismatched": []}
    res = json.loads(dest_out)
    assert proc.returncode == 0 and res["status"] == "completed"
    assert res["hashes"] == d["npqfile"]["destination"]["hashes"]
    assert res["bytes"] == d["npqfile"]["stream-bytes"]


def test_incoming_refuses_a_wrong_size(tmp_path):
    proc, src, _, dest_err = _migrate_between_processes("tcp:127.0.0.1:0", "8M", "--size", "4M", "--workload", "idle")
    assert proc.returncode == 1 and "error:" in dest_err
    assert src.returncode == 1 and "Size mismatch: ram: 0x400000 != 0x800000" in src.stderr
    ver = json.loads(src.stdout)["npqfile"]["verification"]
    # nothing was compared: "not done" and why, never a mismatch
    assert ver["ok"] is False and ver["done"] is False
    assert ver["error"].startswith("destination failed: Size mismatch") and "mismatched" not in ver


def test_a_rejected_stream_reports_written_bytes_and_no_verification():
    # the destination gives up at the setup records: most RAM pages are never written
    proc, src, _, _ = _migrate_between_processes("tcp:127.0.0.1:0", "8M", "--size", "16M", "--workload", "idle",
                                                 "--compress", "lz4", as_json=False)
    out = src.stdout
    assert proc.returncode == 1 and src.returncode == 1
    assert "not done: destination failed:" in out and "MISMATCH" not in out
    transferred = int(out.split("transferred (RAM)")[1].split("(")[1].split(" B")[0])
    stream = int(out.split("stream bytes")[1].split("(")[1].split(" B")[0])
    assert 0 < transferred <= stream


def test_compressed_stream_into_a_plain_destination_is_not_a_mismatch():
    proc, src, _, dest_err = _migrate_between_processes("tcp:127.0.0.1:0", "4M", "--size", "4M", "--workload", "idle",
                                                        "--compress", "zstd")
    assert proc.returncode == 1 and "error:" in dest_err
    d = json.loads(src.stdout)
    ver = d["npqfile"]["verification"]
    assert src.returncode == 1 and ver["done"] is False and ver["error"].startswith("destination failed:")
    assert d["ram"]["transferred"] <= d["npqfile"]["stream-bytes"]


def test_exec_transport_is_reported_unverified(tmp_path, capsys):
    out = tmp_path / "s.bin"
    rc, d = run_json(capsys, "--size", "2M", "--workload", "idle", "--to", f"exec:cat > {out}")
    # completed, not verified: exit 3, said by the JSON and the table title too
    assert rc == 3 and d["npqfile"]["verification"] == {"method": None, "ok": None,
                                                        "note": "exec: has no return path"}
    assert d["status"] == "completed" and d["npqfile"]["completion"] == "not-verified"
    assert out.stat().st_size == d["npqfile"]["stream-bytes"]
    assert main(["migrate", "--quiet", "--size", "2M", "--workload", "idle", "--to", "null:"]) == 3
    out = capsys.readouterr().out
    assert "not verified (null: has no return path)" in out and "migration completed, NOT VERIFIED" in out


def test_exec_command_failure_fails_the_migration(capsys):
    rc = main(["migrate", "--quiet", "--size", "2M", "--workload", "idle", "--to", "exec:cat > /dev/null; exit 3"])
    captured = capsys.readouterr()
    assert rc == 1 and "migration failed" in captured.out
    assert "error: migration failed:" in captured.err and "exited with status 3" in captured.err


def test_stream_on_stdout_puts_the_report_on_stderr(tmp_path):
    snap = tmp_path / "snap.bin"
    with open(snap, "wb") as out:
        res = subprocess.run([sys.executable, "-m", "npqfile", "migrate", "--json", "--size", "2M", "--workload", "idle",
                              "--to", "fd:1"], stdout=out, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                             timeout=60, check=False)
    assert res.returncode == 3, res.stderr         # completed, not verified (fd: has no return path)
    d = json.loads(res.stderr)
    assert snap.stat().st_size == d["npqfile"]["stream-bytes"] == expected_stream_bytes(d)
    assert main(["analyze", str(snap)]) == 0


def test_xbzrle_cache_size_is_an_alias(capsys):
    rc, d = run_json(capsys, "--size", "2M", "--workload", "idle", "--xbzrle-cache-size", "1M")
    assert rc == 0 and d["xbzrle-cache"]["cache-size"] == MIB


def test_plot_directory_is_checked_before_migrating(monkeypatch, capsys):
    import npqfile.cli.migrate as cli

    def must_not_run(*a, **k):
        raise AssertionError("migrated before checking the plot path")

    monkeypatch.setattr(cli, "run_migration", must_not_run)
    assert main(["migrate", "--quiet", "--size", "1M", "--plot", "/nonexistent/dir/p.png"]) == 1
    assert "cannot write the plot" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_incoming_timeout_must_be_positive(value, capsys):
    assert main(["incoming", "tcp:127.0.0.1:0", "--ram", "1M", f"--timeout={value}"]) == 1
    captured = capsys.readouterr()
    assert "listening" not in captured.out
    assert captured.err.strip() == f"error: --timeout must be a positive number of seconds, got {value}"


def test_incoming_names_a_guest_too_large_to_map(capsys):
    assert main(["incoming", "file:/dev/null", "--ram", "256T"]) == 1
    assert "cannot allocate the 256.0 TiB guest RAM (block 'ram')" in capsys.readouterr().err


def test_sweep_to_a_file_writes_one_file_per_case_and_plots(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    rc = main(["migrate", "--json", "--workload", "idle", "--to", f"file:{tmp_path / 'snap.bin'}",
               "--sweep", "size=2M,4M", "--plot", str(png), "--jobs", "2"])
    rows = json.loads(capsys.readouterr().out)
    names = ["snap.1.size=2M.bin", "snap.2.size=4M.bin"]      # each case's file is named after it
    assert rc == 0 and [r["to"] for r in rows] == [f"file:{tmp_path / n}" for n in names]
    assert all(r["verified"] is True for r in rows)
    sizes = [(tmp_path / n).stat().st_size for n in names]
    assert sizes[1] > sizes[0] > 2 * MIB // 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- real QEMU -----------------------------------------------------------------------------

@pytest.mark.parametrize("qemu_version, mapped_ram", [("7.2", False), ("10.0", False), ("10.0", True)])
def test_real_qemu_loads_a_live_migration_snapshot(tmp_path, qemu_version, mapped_ram):
    """A live migration to a file (dirtied pages re-sent; with mapped-ram rewritten in
    place at their fixed offsets) is restored by real QEMU with the source's final RAM."""
    size = 16 * MIB
    snap = tmp_path / "snap.bin"
    ram = GuestRAM()
    ram.add_block("ram", size)
    try:
        fill_guest(ram, "mixed", 5)
        cfg = MigrationConfig(size=size, to=f"file:{snap}",
                              params=MigrationParams(max_bandwidth=50e6, downtime_limit=0.02,
                                                     qemu_version=qemu_version, mapped_ram=mapped_ram))
        st = run_migration(cfg, ram=ram, workload=make_workload("hotset:rate=3000,hot=0.02,share=0.8"))
        assert st.status == "completed" and st.part_sections > 1 and st.verification["ok"] is True
        assert len(st.iterations) > 1 or st.ram.normal_pages > size // 4096   # pages were sent again
        source_final = ram.block("ram").array.copy()
    finally:
        ram.close()
    if mapped_ram:
        # every page has one place in the file: re-sent pages did not make it grow
        assert snap.stat().st_size < size + (2 << 20) and st.verification["on-disk-bytes"] < snap.stat().st_size
    ramfile = tmp_path / "ram.img"
    ramfile.write_bytes(b"\0" * size)
    with QemuVM(tmp_path, ramfile, incoming=True, size=size, version=qemu_version) as vm:
        if mapped_ram:
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "mapped-ram", "state": True}])
        vm.cmd("migrate-incoming", uri=f"file:{snap}" if mapped_ram else f"exec:cat {snap}")
        vm.wait_migration()
        err = vm.stderr()
    loaded = np.fromfile(ramfile, dtype=np.uint8)
    assert np.array_equal(loaded, source_final)
    assert "Expected vmdescription" not in err


# -- lifecycle: verdicts, stalls, cancellation, exit status -------------------------------

def _drain_and_close(listener, reply: bytes = b"") -> None:
    """A peer that reads the whole stream, optionally writes ``reply``, then closes:
    what a QEMU destination (or a destination that died at the end) looks like."""
    conn, _ = listener.accept()
    with conn:
        while conn.recv(1 << 16):
            pass
        if reply:
            conn.sendall(reply)


@pytest.mark.parametrize("peer", [None, "qemu"])
def test_a_peer_that_closes_without_a_verdict(peer, capsys):
    import socket
    import threading

    with socket.create_server(("127.0.0.1", 0)) as listener:
        t = threading.Thread(target=_drain_and_close, args=(listener,), daemon=True)
        t.start()
        port = listener.getsockname()[1]
        argv = ["--size", "2M", "--workload", "idle", "--to", f"tcp:127.0.0.1:{port}", "--stall-timeout", "5"]
        rc, d = run_json(capsys, *argv, *(["--peer", peer] if peer else []))
        t.join(30)
    x = d["npqfile"]
    if peer is None:
        # an npqfile destination that ends without its verdict: failed, never completed
        assert rc == 1 and d["status"] == "failed" and x["completion"] is None
        assert "closed the connection without its verdict" in x["outcome"] and x["verification"]["done"] is False
    else:
        # a QEMU destination sends none: completed, not verified, exit 3
        assert rc == 3 and d["status"] == "completed" and x["completion"] == "not-verified"
        assert x["verification"]["note"] == "the destination is QEMU (--peer qemu): no verdict"


def test_peer_and_stall_timeout_are_checked_before_migrating(capsys):
    assert main(["migrate", "--quiet", "--size", "1M", "--to", "null:", "--peer", "qemu"]) == 1
    assert "--peer applies to tcp: and unix: destinations" in capsys.readouterr().err
    assert main(["migrate", "--quiet", "--size", "1M", "--stall-timeout", "0"]) == 1
    assert "--stall-timeout must be a positive number of seconds" in capsys.readouterr().err
    assert main(["migrate", "--quiet", "--size", "1M", "--to", "null:", "--release-ram"]) == 1
    err = capsys.readouterr().err
    assert "--release-ram needs the destination's verdict" in err and "null:" in err
    assert main(["incoming", "tcp:127.0.0.1:0", "--stall-timeout", "-1"]) == 1
    assert "--stall-timeout must be a positive number of seconds" in capsys.readouterr().err


def test_help_documents_the_exit_status():
    out = subprocess.run([sys.executable, "-m", "npqfile", "migrate", "--help"], capture_output=True, text=True,
                         env=ENV, cwd=ROOT, timeout=60, check=True).stdout
    assert "exit status:" in out and "3    completed, not verified" in out and "130  cancelled by Ctrl-C" in out


def test_machine_mismatch_fails_at_the_configuration_section():
    from test_fault_injection import finish, start_incoming

    proc, uri = start_incoming("--machine", "pc", ram=64 * MIB, stall=30)
    try:
        src = subprocess.run([sys.executable, "-m", "npqfile", "migrate", "--to", uri, "--size", "64M", "--init",
                              "random", "--workload", "idle", "--json"],
                             capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120, check=False)
    finally:
        rc, out, err = finish(proc)
    assert rc == 1 and "Machine type received is 'none' and local is 'pc'" in err
    d = json.loads(src.stdout)
    assert src.returncode == 1 and d["status"] == "failed" and d["npqfile"]["completion"] is None
    assert "Machine type received is 'none'" in src.stderr
    # the destination refused the stream at its start: the source stopped long before its end
    assert d["npqfile"]["stream-bytes"] < 32 * MIB
    assert json.loads(out)["bytes"] < 1024                       # header and configuration only


def test_time_limit_cancels_a_source_blocked_on_a_stopped_destination():
    import signal

    from test_fault_injection import finish, start_incoming

    proc, uri = start_incoming(ram=64 * MIB, stall=60)
    proc.send_signal(signal.SIGSTOP)
    try:
        src = subprocess.run([sys.executable, "-m", "npqfile", "migrate", "--to", uri, "--size", "64M", "--init",
                              "random", "--workload", "idle", "--json", "--time-limit", "2",
                              "--stall-timeout", "60"],
                             capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=50, check=False)
    finally:
        proc.kill()
        finish(proc)
    d = json.loads(src.stdout)
    assert src.returncode == 2 and d["status"] == "cancelled" and d["npqfile"]["outcome"] == "time-limit"
    assert d["npqfile"]["stream-bytes"] < 64 * MIB


@pytest.mark.parametrize("as_json", [True, False])
def test_ctrl_c_cancels_and_prints_the_cancelled_runs_summary(as_json):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "npqfile", "migrate", "--size", "8M", "--workload", "idle",
                             "--pause-before-switchover", "60", "--release-ram",
                             *(["--json"] if as_json else ["--quiet"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        line = read_line(proc, proc.stderr, what="pre-switchover line")
        assert line.startswith("pre-switchover: guest stopped"), line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "error: migration cancelled (interrupted)" in err and "Traceback" not in err
    if as_json:
        d = json.loads(out)
        assert d["status"] == "cancelled" and d["npqfile"]["outcome"] == "cancelled"
        assert d["npqfile"]["release-ram"]["released-bytes"] == 0
        assert d["npqfile"]["stream-bytes"] > 0
    else:
        assert "migration cancelled: cancelled" in out and "nothing released" in out


def test_ctrl_c_wakes_a_source_blocked_on_a_stopped_destination(capsys):
    import signal
    import threading
    import time

    from test_fault_injection import finish, start_incoming

    proc, uri = start_incoming(ram=64 * MIB, stall=60)
    proc.send_signal(signal.SIGSTOP)             # the source fills the socket, then blocks in sendmsg
    sent = []

    def interrupt_once_handled() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:       # migrate installs its SIGINT handler
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                time.sleep(0.5)
                sent.append(True)
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    t = threading.Thread(target=interrupt_once_handled, daemon=True)
    t.start()
    try:
        rc = main(["migrate", "--json", "--quiet", "--to", uri, "--size", "64M", "--init", "random",
                   "--workload", "idle", "--stall-timeout", "60", "--time-limit", "60"])
    finally:
        t.join(30)
        proc.kill()
        finish(proc)
    captured = capsys.readouterr()
    d = json.loads(captured.out)
    assert sent and rc == 130 and d["status"] == "cancelled" and d["npqfile"]["outcome"] == "cancelled"
    assert d["npqfile"]["stream-bytes"] < 64 * MIB and "migration cancelled (interrupted)" in captured.err


@pytest.mark.parametrize("peer", ["qemu", None])
def test_real_qemu_destination_is_completed_not_verified_only_when_declared(tmp_path, peer, capsys):
    # a real QEMU -incoming sends no verdict: with --peer qemu the run is "completed, not
    # verified" (exit 3); taken for an npqfile destination, its silence is a failure
    size = 16 * MIB
    ramfile = tmp_path / "ram.img"
    ramfile.write_bytes(b"\0" * size)
    sock = tmp_path / "mig.sock"
    with QemuVM(tmp_path, ramfile, incoming=True, size=size) as vm:
        vm.cmd("migrate-incoming", uri=f"unix:{sock}")
        rc, d = run_json(capsys, "--size", "16M", "--workload", "idle", "--to", f"unix:{sock}",
                         "--stall-timeout", "5", *(["--peer", "qemu"] if peer else []))
        vm.wait_migration()
    x = d["npqfile"]
    if peer:
        assert rc == 3 and d["status"] == "completed" and x["completion"] == "not-verified"
    else:
        assert rc == 1 and d["status"] == "failed" and x["completion"] is None
        assert "closed the connection without its verdict" in x["outcome"] or "no verdict" in x["outcome"]


def test_sweep_without_a_verdict_exits_3_like_a_single_run(capsys):
    rc = main(["migrate", "--json", "--quiet", "--workload", "idle", "--to", "null:", "--sweep", "size=1M,2M",
               "--jobs", "1"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 3 and [r["status"] for r in rows] == ["completed", "completed"]
    assert all(r["verified"] is None for r in rows)


def test_incoming_json_is_json_only_and_its_ram_limit_is_named_as_the_option(tmp_path, capsys):
    """``incoming --json``: stdout is the JSON document alone (status lines go to stderr);
    a stream declaring more RAM than ``--max-ram`` is refused naming ``--max-ram``."""
    from npqfile.cli import main
    img = tmp_path / "ram.img"
    img.write_bytes(bytes(range(256)) * (4 * 4096))     # 4 MiB
    stream = tmp_path / "s.bin"
    assert main(["save", f"ram={img}", "-o", str(stream)]) == 0
    capsys.readouterr()
    assert main(["incoming", f"file:{stream}", "--ram", "4M", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["status"] == "completed"
    assert main(["incoming", f"file:{stream}", "--max-ram", "1M", "--machine", "any", "--json"]) == 1
    captured = capsys.readouterr()
    assert "--max-ram" in captured.err + captured.out and "max_ram_bytes" not in captured.err + captured.out


def test_engine_both_takes_pause_before_switchover(monkeypatch, capsys):
    # --engine both with --pause-before-switchover built its hook with one argument of two
    # (a TypeError traceback before anything ran); the hook must reach run_and_report and wait
    import npqfile.migration.compare as compare
    seen = []

    def fake_run_and_report(cfg, args, pre_switchover=None, control=None):
        pre_switchover(None)
        seen.append(cfg.engine)
        return 0

    monkeypatch.setattr(compare, "run_and_report", fake_run_and_report)
    assert main(["migrate", "--quiet", "--size", "1M", "--engine", "both", "--pause-before-switchover", "0"]) == 0
    assert seen == ["both"]
    assert "pre-switchover: guest stopped" in capsys.readouterr().err
