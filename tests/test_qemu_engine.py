"""The real-QEMU engine: the dirtyguest, `migrate --engine qemu|both`, failures and cleanup.

Real QEMU runs small guests (16-32 MiB) for a few seconds each.  QEMU 10.0 is the peer
for migrations that must verify: QEMU 7.2 under TCG loses guest writes during migration
(see ``qemu_engine.TCG_LOST_WRITES``).  Nothing here depends on timing: rates are the
guest's own (its counter over its own clock), outcomes are chosen far from the edges.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import require, require_module, require_program, require_qemu
from npqfile.guest import IMAGE, build_image, guest_parameters
from npqfile.guest.build import BUILT_WITH, compiler_version
from npqfile.guest.params import zipf_table
from npqfile.migration.compare import compare_dicts
from npqfile.migration.engine import MigrationParams
from npqfile.migration.qemu_engine import QemuMigration, qemu_settings
from npqfile.migration.qemu_vm import QemuVM
from npqfile.migration.session import MigrationConfig
from npqfile.qemu import QemuBinary
from proc_support import reaped

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MIB = 1 << 20


def _npqfile(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``npqfile ARGS``; the result also has the process id (``pid``)."""
    proc = subprocess.Popen([sys.executable, "-m", "npqfile", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    with reaped(proc):
        out, err = proc.communicate(timeout=timeout)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    res.pid = proc.pid
    return res


def _leftover_qemus(*runs: subprocess.CompletedProcess) -> list[int]:
    """QEMU processes the npqfile ``runs`` started that still exist (the engine names its
    QEMUs' working directory after its process id; other suites' QEMUs do not count)."""
    out = []
    for run in runs:
        found = subprocess.run(["pgrep", "-f", f"npqfile-qemu-{run.pid}-"], capture_output=True, text=True)
        out += [int(p) for p in found.stdout.split()]
    return out


def test_guest_image_rebuilds_identically(tmp_path):
    require_program("gcc")
    require(compiler_version() == BUILT_WITH, f"the compiler that built the image ({BUILT_WITH})")
    rebuilt = build_image(tmp_path / "guest.elf")
    assert rebuilt.read_bytes() == IMAGE.read_bytes(), "npqfile/guest/src does not build the shipped image"


def test_parameter_block_and_zipf_quantiles():
    p = guest_parameters("hotset:rate=1234,hot=0.1,share=0.8,bytes=16,seed=3", 32 * MIB)
    raw = p.pack()
    assert raw[:4] == b"NPQG" and p.rate == 1234 and p.write_bytes == 16
    # version 2: field 12 says whether the guest catches up (clock-paced) or not (CPU-bound, default)
    assert raw[4:8] == (2).to_bytes(4, "little") and raw[48:52] == bytes(4)
    assert guest_parameters("uniform", 32 * MIB, catchup=True).pack()[48:52] == (1).to_bytes(4, "little")
    assert p.hot_pages == int(p.n_pages * 0.1) and abs(p.share / 2**32 - 0.8) < 1e-9
    assert np.gcd(p.perm_mul, p.n_pages) == 1
    # the quantile table follows numpy's Zipf law: same median and 90th percentile rank
    table = zipf_table(1.2)
    draws = np.random.default_rng(0).zipf(1.2, 200_000)
    for q in (0.5, 0.9):
        assert table[int(q * 65536)] == pytest.approx(np.quantile(draws, q), rel=0.1, abs=1)
    with pytest.raises(ValueError, match="built-in workloads"):
        guest_parameters(lambda ram: None, 32 * MIB)
    with pytest.raises(ValueError, match="at least 8 MiB"):
        guest_parameters("uniform", 4 * MIB)


def test_options_qemu_lacks_fail_before_anything_starts():
    q72, q10 = QemuBinary("/nonexistent/qemu", "7.2.22"), QemuBinary("/nonexistent/qemu", "10.0.2")
    cfg = MigrationConfig(size=16 * MIB, compress="zstd")
    with pytest.raises(ValueError, match="single-channel zstd"):
        qemu_settings(cfg, q10)
    cfg = MigrationConfig(size=16 * MIB, compress="zlib:3")
    with pytest.raises(ValueError, match="no compress capability"):
        qemu_settings(cfg, q10)
    assert qemu_settings(cfg, q72).capabilities == {"compress": True}
    assert qemu_settings(cfg, q72).parameters["compress-level"] == 3
    cfg = MigrationConfig(size=16 * MIB, params=MigrationParams(zero_page_detection=False))
    with pytest.raises(ValueError, match="zero-page-detection=none needs QEMU 9.0"):
        qemu_settings(cfg, q72)
    assert qemu_settings(cfg, q10).parameters["zero-page-detection"] == "none"
    cfg = MigrationConfig(size=16 * MIB)
    cfg.params.postcopy_after = 2
    with pytest.raises(ValueError, match="pre-copy only"):
        qemu_settings(cfg, q10)
    cfg = MigrationConfig(size=16 * MIB, to="file:/tmp/x")
    with pytest.raises(ValueError, match="tcp:HOST:PORT or unix:PATH"):
        qemu_settings(cfg, q10)
    cfg = MigrationConfig(size=16 * MIB, params=MigrationParams(max_bandwidth=5e6, downtime_limit=0.05,
                                                                xbzrle_cache_size=1 << 20, release_ram=True))
    s = qemu_settings(cfg, q10)
    assert s.capabilities == {"xbzrle": True, "release-ram": True}
    assert s.parameters == {"max-bandwidth": 5_000_000, "downtime-limit": 50, "xbzrle-cache-size": 1 << 20}


def _due(status, rate: int) -> int:
    """The writes the guest owes by its own published clock: rate x credited running
    ticks / HPET Hz, rounded down, computed as guest.c does (integer arithmetic)."""
    run = round(status.running_seconds * status.hpet_hz)
    secs, frac = divmod(run, status.hpet_hz)
    return secs * rate + frac * rate // status.hpet_hz


@pytest.mark.parametrize("version,catchup", [("7.2", False), ("10.0", False), ("10.0", True)])
def test_guest_writes_at_the_requested_rate(tmp_path, version, catchup):
    """By its own counters and clock (the status block at 0x8000), exactly: every published
    count is rate x the guest time credited as running, as the CPU-bound writer (default)
    and clock-paced (which credits all guest time); and the writes are real: the pages it
    changed in its RAM file are as many as uniform writes should touch.  A loaded host
    makes the CPU-bound guest credit less running time, never a different rate; wall time
    only bounds the wait."""
    qemu = require_qemu(version)
    size, rate = 16 * MIB, 20000
    params = guest_parameters(f"uniform:rate={rate},seed=5", size, catchup=catchup)
    (tmp_path / "p.bin").write_bytes(params.pack())
    vm = QemuVM(qemu, tmp_path, "source", size, tmp_path / "p.bin")
    try:
        vm.start()
        first = vm.wait_guest_running()
        deadline = time.monotonic() + 120
        # a second of credited running time; a count the guest has caught up with (it
        # owes more than MAX_BATCH only after a multi-second stall of its vCPU)
        while ((last := vm.guest_status()).running_seconds < first.running_seconds + 1.0
               or last.writes != _due(last, rate)):
            vm.check_alive("running the guest")
            assert time.monotonic() < deadline, f"the guest did not run 1 s of its time: {last}"
            time.sleep(0.05)
        seen = last                        # exactly rate x its credited time, by the loop's exit
        assert seen.writes == _due(seen, rate) >= rate and seen.running_seconds <= seen.seconds, seen
        if catchup:                        # clock-paced: every guest second is credited
            assert seen.running_seconds == seen.seconds, seen
        vm.cmd("stop")
        last = vm.guest_status()
        assert seen.writes <= last.writes <= _due(last, rate), (seen, last)    # never ahead of its clock
        ram = np.fromfile(vm.ram_file, dtype=np.uint8).reshape(-1, 4096)
        region = ram[params.region_start // 4096:params.region_start // 4096 + params.n_pages]
        touched = int(np.count_nonzero(region.any(axis=1)))
        n = params.n_pages
        expected = n * (1 - np.exp(-last.writes / n))     # distinct pages of uniform writes
        assert touched == pytest.approx(expected, rel=0.1), (touched, expected, last.writes)
    finally:
        vm.close()
    assert vm.proc.poll() is not None


def test_engine_both_easy_converges_and_hopeless_does_not():
    require_qemu("10.0")
    easy = _npqfile("migrate", "--engine", "both", "--qemu", "10.0", "--size", "32M", "--workload",
                    "uniform:rate=500", "--json", "--quiet")
    assert easy.returncode == 0, easy.stderr
    both = json.loads(easy.stdout)
    assert both["qemu-version"].startswith("10.0")
    for side in ("simulator", "qemu"):
        run = both[side]
        assert run["status"] == "completed" and run["npqfile"]["outcome"] == "converged", run["npqfile"]
        assert run["npqfile"]["verification"]["ok"] is True
        assert run["npqfile"]["iterations"][-1]["final"]
    assert both["qemu"]["qemu"]["version"].startswith("10.0")
    assert both["qemu"]["npqfile"]["stream-bytes"] is None          # QEMU does not report it: not invented
    figures = {r["figure"]: r for r in both["comparison"]}
    assert figures["outcome"]["simulator"] == figures["outcome"]["qemu"] == "converged"
    assert figures["transferred"]["relative-difference"] is not None
    wl = both["qemu"]["npqfile"]["workload"]
    # by the guest's own clock: rate x credited running time (+-1 page at each end, and the
    # rounding of running-seconds); a loaded host lowers the running time, not the rate
    assert abs(wl["writes"] - 500 * wl["running-seconds"]) <= 3, wl

    hopeless = _npqfile("migrate", "--engine", "both", "--qemu", "10.0", "--size", "32M", "--workload",
                        "uniform:rate=60000", "--max-bandwidth", "8MB/s", "--downtime-limit", "5",
                        "--time-limit", "1.5", "--quiet")
    assert hopeless.returncode == 2, hopeless.stdout + hopeless.stderr
    assert "simulator vs QEMU 10.0" in hopeless.stdout
    assert "simulator: cancelled (time-limit)" in hopeless.stdout
    assert re.search(r"QEMU 10\.0(\.\d+)?: cancelled \(time-limit\)", hopeless.stdout), hopeless.stdout
    assert _leftover_qemus(easy, hopeless) == []


def test_a_qemu_that_fails_to_start_is_a_clear_error(tmp_path):
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'QEMU emulator version 10.0.2'; exit 0; fi\n"
                    "echo 'qemu-system-x86_64: -object memory-backend-file: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    res = _npqfile("migrate", "--engine", "qemu", "--qemu", str(fake), "--size", "16M", "--quiet")
    assert res.returncode == 1
    assert res.stderr.startswith("error: source QEMU exited with status 1 while starting"), res.stderr
    assert "boom" in res.stderr and "Traceback" not in res.stderr
    res = _npqfile("migrate", "--engine", "qemu", "--qemu", str(tmp_path / "none"), "--size", "16M")
    assert res.returncode == 1 and "no such QEMU binary" in res.stderr, res.stderr


def test_a_qemu_dying_mid_migration_fails_the_run_and_leaves_nothing(started):
    qemu = require_qemu("10.0")
    killed = []

    def progress(info):
        if info["status"] == "active" and not killed:
            dst = next(vm for vm in started if vm.role == "destination")
            os.kill(dst.proc.pid, signal.SIGKILL)
            killed.append(dst.proc.pid)

    cfg = MigrationConfig(size=32 * MIB, workload="uniform:rate=1000",
                          params=MigrationParams(max_bandwidth=4e6))
    st = QemuMigration(cfg, qemu, on_progress=progress).run()
    assert killed
    assert st.status == "failed", st.outcome
    # "error: destination QEMU exited ..." or the source QEMU's own error-desc (a broken pipe)
    assert st.outcome.startswith("error: "), st.outcome
    assert not st.verification.get("ok")
    for vm in started:
        assert vm.proc.poll() is not None, f"{vm.role} QEMU still running"
        assert not vm.ram_file.parent.exists()          # the run's folder is gone


def test_iteration_rows_from_polls_and_events():
    """Rows per dirty-sync-count from synthetic polls; the last pre-copy row ends at
    precopy-bytes, the final row is QEMU's downtime figures; QEMU's MIGRATION_PASS times
    move the boundaries (interpolated between polls) and add counts no poll saw; a poll
    that saw the final sync's count while "active" (QEMU 7.2) adds no pre-copy row."""
    m = QemuMigration.__new__(QemuMigration)
    m.passes = {}

    def poll(t, count, transferred, normal, remaining, status="active"):
        return {"_t": t, "status": status, "ram": {"dirty-sync-count": count, "transferred": transferred,
                                                   "normal": normal, "duplicate": 0, "remaining": remaining}}
    m.samples = [poll(0.05, 1, 1000, 10, 90 * 4096), poll(0.1, 1, 5000, 50, 50 * 4096),
                 poll(0.15, 2, 9000, 90, 30 * 4096), poll(0.2, 2, 12000, 120, 20 * 4096),
                 poll(0.26, 4, 16000, 140, 0)]
    final = {"status": "completed", "total-time": 300, "downtime": 50,
             "ram": {"dirty-sync-count": 4, "transferred": 20000, "precopy-bytes": 14000, "downtime-bytes": 6000,
                     "normal": 150, "duplicate": 0, "remaining": 0, "total": 100 * 4096}}
    rows = m._iterations(final)
    assert [(r.index, r.sync, r.final) for r in rows] == [(1, 1, False), (2, 2, False), (3, 4, True)]
    assert rows[0].dirty_pages == 100 and rows[0].bytes_sent == 9000 and rows[0].pages_sent == 90
    assert rows[1].bytes_sent == 14000 - 9000 and rows[1].duration == pytest.approx(0.25 - 0.15)
    # pages after the last poll are split by bytes: 30 pages for 8000 bytes, 2000 of them pre-copy
    assert rows[1].pages_sent == 128 - 90
    assert rows[2].bytes_sent == 6000 and rows[2].pages_sent == 150 - 128 and rows[2].duration == 0.05
    assert sum(r.bytes_sent for r in rows) == 20000
    m.passes = {2: 0.125, 3: 0.175, 4: 0.25}
    final["ram"]["dirty-sync-count"] = 5        # 3 started a pass, 4 decided to complete, 5 is the final sync
    rows = m._iterations(final)
    assert [(r.sync, r.final) for r in rows] == [(1, False), (2, False), (3, False), (5, True)]
    assert rows[0].bytes_sent == 7000 and rows[0].pages_sent == 70 and rows[0].duration == pytest.approx(0.125)
    assert rows[1].bytes_sent == 10500 - 7000 and rows[2].bytes_sent == 14000 - 10500
    assert sum(r.bytes_sent for r in rows) == 20000
    # multifd: QEMU's precopy-bytes / downtime-bytes count the main channel only, so
    # pre-copy ends at the last poll and the final row holds the rest of transferred
    final["ram"].update({"multifd-bytes": 19000, "precopy-bytes": 8, "downtime-bytes": 0})
    rows = m._iterations(final)
    assert rows[-2].bytes_sent == 12000 - 10500 and rows[-1].bytes_sent == 20000 - 12000
    assert sum(r.bytes_sent for r in rows) == 20000


def test_compare_rows_relative_differences():
    def run(outcome, transferred, pages):
        return {"status": "completed", "total-time": 100.0, "downtime": 10.0, "expected-downtime": 5.0,
                "ram": {"dirty-sync-count": 3, "transferred": transferred, "mbps": 8.0, "normal": 1, "duplicate": 0},
                "npqfile": {"outcome": outcome, "iterations": [{"pages": p, "final": i == len(pages) - 1}
                                                               for i, p in enumerate(pages)]}}
    rows = {r["figure"]: r for r in compare_dicts(run("converged", 110, [10, 4, 2]), run("converged", 100, [10, 5]))}
    assert rows["transferred"]["relative-difference"] == pytest.approx(0.1)
    assert rows["outcome"]["relative-difference"] is None
    assert rows["pages, iteration 2"]["simulator"] == 4 and rows["pages, iteration 2"]["qemu"] is None
    assert rows["pages, final"]["relative-difference"] == pytest.approx(-0.6)


def test_ctrl_c_ends_both_qemus():
    import psutil
    require_qemu("10.0")
    proc = subprocess.Popen([sys.executable, "-m", "npqfile", "migrate", "--engine", "qemu", "--qemu", "10.0",
                             "--size", "32M", "--workload", "uniform:rate=1000", "--max-bandwidth", "2MB/s",
                             "--time-limit", "600", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    qemus: list = []
    left: list[int] = []

    def running(q) -> bool:
        try:
            return q.is_running() and q.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    with reaped(proc):
        try:
            deadline = time.monotonic() + 60
            while len(qemus) < 2 and proc.poll() is None and time.monotonic() < deadline:
                qemus = [c for c in psutil.Process(proc.pid).children() if "qemu" in c.name()]
                time.sleep(0.05)
            assert len(qemus) == 2, "both QEMUs should be running"
            time.sleep(0.5)                      # into the migration (2 MB/s: it lasts ~15 s)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            # in their own session: an engine that failed to end them leaves them running,
            # whether it was killed or exited (the assertion below); never leave them behind
            left = [q.pid for q in qemus if running(q)]
            for q in qemus:
                if running(q):
                    q.kill()
    assert proc.returncode == 130 and "interrupted" in err, err
    assert not left, f"QEMUs left running after the engine ended: {left}"


def test_sweep_with_the_qemu_engine():
    require_qemu("10.0")
    res = _npqfile("migrate", "--engine", "qemu", "--qemu", "10.0", "--size", "16M", "--workload", "idle",
                   "--sweep", "downtime-limit=300,500", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["downtime-limit"] for r in rows] == ["300", "500"]
    assert all(r["status"] == "completed" and r["verified"] is True for r in rows), rows
    assert all(isinstance(r["total-time"], float) and r["dirty-sync-count"] >= 2 for r in rows), rows


def test_auto_converge_and_multifd_parameters_pass_through():
    q10 = QemuBinary("/nonexistent/qemu", "10.0.2")
    params = MigrationParams()
    params.auto_converge, params.cpu_throttle_initial, params.max_cpu_throttle = True, 30, 80
    s = qemu_settings(MigrationConfig(size=16 * MIB, params=params), q10)
    assert s.capabilities == {"auto-converge": True}
    assert s.parameters["cpu-throttle-initial"] == 30 and s.parameters["max-cpu-throttle"] == 80
    params = MigrationParams()
    params.multifd_channels, params.multifd_compression = 2, "zstd"
    s = qemu_settings(MigrationConfig(size=16 * MIB, params=params), q10)
    assert s.capabilities == {"multifd": True}
    assert s.parameters["multifd-channels"] == 2 and s.parameters["multifd-compression"] == "zstd"
    assert s.parameters["zero-page-detection"] == "multifd"


def test_qemu_throttle_slows_the_cpu_bound_guest_and_makes_it_converge():
    """dirtyguest writes only while its vCPU runs (the simulator's writer): QEMU 10.0's
    auto-converge throttle lowers its writes per guest-second, and a migration that is
    cancelled without auto-converge completes with it.  Load-independent facts only, from
    QEMU's own cpu-throttle-percentage and the guest's own counters over the span QEMU
    reported throttling: at >= 60% QEMU runs the vCPU at most 10 ms of every 25 ms, and
    the guest credits itself at most 2 ms of each sleep (share <= 0.48); a host too busy
    to run the vCPU only lowers the share further, so no second run is compared."""
    require_qemu("10.0")
    common = ("migrate", "--engine", "qemu", "--qemu", "10.0", "--size", "16M", "--workload",
              "uniform:rate=15000", "--max-bandwidth", "10MB/s", "--downtime-limit", "50", "--json", "--quiet")
    plain = _npqfile(*common, "--max-iterations", "4")
    assert plain.returncode == 2, plain.stdout + plain.stderr
    free = json.loads(plain.stdout)
    assert free["status"] == "cancelled" and free["npqfile"]["outcome"] == "max-iterations"
    assert "throttled-guest-seconds" not in free["npqfile"]["workload"]       # QEMU never throttled
    throttled = _npqfile(*common, "--time-limit", "60", "--auto-converge", "--cpu-throttle-initial", "60",
                         "--cpu-throttle-increment", "20")
    assert throttled.returncode == 0, throttled.stdout + throttled.stderr
    ac = json.loads(throttled.stdout)
    assert ac["status"] == "completed" and ac["npqfile"]["verification"]["ok"] is True
    assert ac["cpu-throttle-percentage"] >= 60
    wl = ac["npqfile"]["workload"]
    # a pass at 10 MB/s lasts >= 1 s, and convergence needs QEMU to step past 60%: the
    # throttled span holds many 25 ms throttle periods on any machine
    assert wl["throttled-min-percentage"] >= 60 and wl["throttled-guest-seconds"] > 0, wl
    assert wl["throttled-running-seconds"] < 0.8 * wl["throttled-guest-seconds"], wl
    assert wl["throttled-achieved-rate-pages"] < 0.8 * wl["rate-pages"], wl    # its own asked rate
    assert _leftover_qemus(plain, throttled) == []


def test_collect_maps_query_migrate_to_the_simulators_statistics():
    """QEMU's answers become the same MigrationStats: a cancelled run keeps the time
    measured to its last poll and its last pre-copy figures; a failed run names QEMU's
    error; nothing QEMU does not report is invented."""
    cfg = MigrationConfig(size=16 * MIB)
    m = QemuMigration(cfg, QemuBinary("/nonexistent/qemu", "10.0.2"))
    m.samples = [{"_t": 0.5, "status": "active", "expected-downtime": 42,
                  "ram": {"dirty-sync-count": 5, "transferred": 9000, "normal": 2, "duplicate": 1,
                          "remaining": 8192, "mbps": 80.0, "total": 4096 * 100}}]
    m._collect({"status": "cancelled", "_t": 0.55})
    st = m.st
    assert st.status == "cancelled" and st.outcome == "cancelled" and not st.converged
    assert st.total_time == pytest.approx(0.55) and st.dirty_sync_count == 5 and st.remaining == 8192
    assert st.expected_downtime == pytest.approx(0.042) and st.transferred == 9000
    d = st.as_dict()
    assert d["npqfile"]["stream-bytes"] is None and d["qemu"]["version"] == "10.0.2"
    m = QemuMigration(cfg, QemuBinary("/nonexistent/qemu", "10.0.2"))
    m._collect({"status": "failed", "error-desc": "Unable to write to socket: Broken pipe", "_t": 0.1})
    assert m.st.status == "failed" and m.st.outcome == "error: Unable to write to socket: Broken pipe"


def test_qemu_engine_json_follows_the_schema_and_feeds_events(tmp_path):
    require_qemu("10.0")
    require_module("jsonschema", "test")
    from npqfile.migration.events import read_events
    from npqfile.schemas import validate

    events = tmp_path / "events.jsonl"
    res = _npqfile("migrate", "--engine", "qemu", "--qemu", "10.0", "--size", "16M", "--workload",
                   "hotset:rate=5000", "--max-bandwidth", "20MB/s", "--json", "--quiet", "--events", str(events))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    validate(doc, "migrate")
    lines = read_events(str(events))
    assert lines[-1]["event"] == "result" and lines[-1]["data"] == doc
    states = [e["data"]["status"] for e in lines if e["event"] == "MIGRATION"]
    assert "active" in states and states[-1] == "completed"      # QEMU's own answers
    assert any(e["event"] == "query-migrate" for e in lines)


@pytest.mark.parametrize("asked", ["cancelled", "time-limit", "max-iterations"])
def test_a_cancel_that_qemu_completed_anyway_reports_the_completion(asked):
    """migrate_cancel sent (Ctrl-C or a limit) after QEMU had already switched over:
    QEMU says completed, and so does the run -- its outcome must not say it was
    cancelled at a limit while its status says completed."""
    cfg = MigrationConfig(size=16 * MIB)
    m = QemuMigration(cfg, QemuBinary("/nonexistent/qemu", "10.0.2"))
    m.st.outcome = asked                     # what _poll records as it sends migrate_cancel
    m._collect({"status": "completed", "total-time": 900, "downtime": 20, "_t": 0.9,
                "ram": {"dirty-sync-count": 3, "transferred": 9000, "total": 4096 * 100}})
    assert m.st.status == "completed" and m.st.converged
    assert m.st.outcome == f"converged (migrate_cancel for {asked} came too late)"
