"""Sweeps: exit status, table, per-case files and progress; the Dask backend on a real LocalCluster."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import sys

import pytest
from conftest import require

from npqfile.cli import main
from npqfile.migration.session import MigrationConfig
from npqfile.migration.sweep import SweepCase, plan_sweep, run_sweep, sweep_exit_status

MIB = 1 << 20
# columns that measure time, not behaviour: they differ from run to run on any backend
TIMED = ("total-time", "downtime", "dirty-sync-count", "transferred", "outcome", "converged")


def _have_dask() -> bool:
    return importlib.util.find_spec("distributed") is not None


def test_sweep_exit_status_follows_single_runs():
    ok = {"status": "completed", "verified": True}
    assert sweep_exit_status([ok, ok]) == 0
    assert sweep_exit_status([ok, {"status": "cancelled", "verified": None}]) == 2
    assert sweep_exit_status([{"status": "cancelled"}, {"status": "failed"}]) == 1
    assert sweep_exit_status([ok, {"status": "completed", "verified": False}]) == 1


def test_sweep_of_cancelled_cases_exits_2_and_the_table_keeps_every_column(tmp_path, capsys):
    # was: exit 0 for cancelled cases, and a pipe's table cut to 80 columns
    deep = tmp_path / ("a-rather-long-directory-name-" * 3)
    deep.mkdir()
    rc = main(["migrate", "--size", "2M", "--workload", "uniform:rate=8000", "--max-bandwidth", "8MB/s",
               "--downtime-limit", "10", "--sweep", "max-iterations=1,2", "--to", f"file:{deep / 'snap.bin'}",
               "--jobs", "2"])
    captured = capsys.readouterr()
    assert rc == 2
    for case in ("1.max-iterations=1", "2.max-iterations=2"):
        assert str(deep / f"snap.{case}.bin") in captured.out       # in full, not cut with "…"
        # progress on stderr says which case wrote which file
        assert f"({case.split('.', 1)[1]}): cancelled max-iterations; wrote {deep / f'snap.{case}.bin'}" in captured.err
    assert "…" not in captured.out
    assert "[2/2 done, 0 running, 0 failed, 2 cancelled]" in captured.err


def test_sweep_names_each_case_and_its_files_in_json(tmp_path, capsys):
    rc = main(["migrate", "--json", "--quiet", "--size", "2M", "--workload", "idle", "--sweep", "bandwidth=0,40MB/s",
               "--to", f"file:{tmp_path / 's.bin'}", "--events", str(tmp_path / "ev.jsonl"), "--jobs", "2"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [(r["case"], r["name"]) for r in rows] == [(1, "max-bandwidth=0"), (2, "max-bandwidth=40MB/s")]
    assert rows[1]["files"] == [str(tmp_path / "s.2.max-bandwidth=40MB_s.bin"),
                                str(tmp_path / "ev.2.max-bandwidth=40MB_s.jsonl")]
    for row in rows:
        lines = [json.loads(line) for line in open(row["events"])]
        assert lines[-1]["event"] == "result" and lines[-1]["data"]["status"] == "completed"


def test_sweep_refuses_shared_event_output_and_missing_directories(tmp_path):
    base = MigrationConfig(size=MIB)
    with pytest.raises(ValueError, match="cannot write every case's events to standard output"):
        plan_sweep(base, ["size=1M,2M"], events="-")
    with pytest.raises(ValueError, match="directory .* does not exist"):
        plan_sweep(base, ["size=1M,2M"], events=str(tmp_path / "nowhere" / "ev.jsonl"))


def test_case_resources_count_every_copy_of_guest_ram():
    cfg = MigrationConfig(size=8 * MIB)
    assert SweepCase(1, [], cfg).resources == {"cores": 1, "ram": 16 * MIB}       # in-process destination
    cfg.to = "null:"
    assert SweepCase(1, [], cfg).resources["ram"] == 8 * MIB
    cfg.params.xbzrle_cache_size = MIB
    assert SweepCase(1, [], cfg).resources["ram"] == 9 * MIB


def test_cluster_without_dask_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)        # import distributed -> ImportError
    assert main(["migrate", "--quiet", "--size", "1M", "--sweep", "size=1M", "--cluster", "local"]) == 1
    assert "pip install 'npqfile[cluster]'" in capsys.readouterr().err


def test_cluster_needs_a_sweep(capsys):
    assert main(["migrate", "--quiet", "--size", "1M", "--cluster", "local"]) == 1
    assert "--cluster and --scheduler-file run sweeps" in capsys.readouterr().err


@pytest.mark.component
def test_local_cluster_gives_the_pool_s_rows_and_reports_a_failing_case(tmp_path, capsys):
    require(_have_dask(), "dask distributed (pip install 'npqfile[cluster]')")
    argv = ["migrate", "--json", "--size", "2M", "--workload", "idle", "--jobs", "2",
            "--sweep", "workload=idle,no-such-workload", "--sweep", "size=1M,2M"]
    rc_pool = main([*argv, "--to", f"file:{tmp_path / 'pool.bin'}"])
    pool = json.loads(capsys.readouterr().out)
    rc_dask = main([*argv, "--to", f"file:{tmp_path / 'dask.bin'}", "--cluster", "local"])
    out = capsys.readouterr()
    dask = json.loads(out.out)
    assert rc_pool == rc_dask == 1                       # a failed case fails the sweep
    assert [r["status"] for r in dask] == ["completed", "completed", "failed", "failed"]
    assert "unknown workload" in dask[2]["outcome"] and dask[2]["files"] == []
    assert all(r["verified"] is True for r in dask[:2])

    def same(rows, name):
        return [{k: (v.replace(name, "X") if isinstance(v, str) else
                     [f.replace(name, "X") for f in v] if k == "files" else v)
                 for k, v in r.items() if k not in TIMED} for r in rows]
    assert same(pool, "pool") == same(dask, "dask")
    assert "[4/4 done, 0 running, 2 failed, 0 cancelled]" in out.err


@pytest.mark.component
def test_dask_workers_allow_child_processes_and_cases_declare_resources(tmp_path):
    require(_have_dask(), "dask distributed (pip install 'npqfile[cluster]')")
    import distributed

    from npqfile.migration.sweep import _DaskBackend

    base = MigrationConfig(size=MIB, workload="idle")
    cases = plan_sweep(base, ["size=1M,2M"])
    backend = _DaskBackend("local", None, 2, cases)
    try:
        daemonic = backend.client.run(lambda: multiprocessing.current_process().daemon)
        assert len(daemonic) == 2 and not any(daemonic.values())
        info = backend.client.scheduler_info()["workers"].values()
        assert all(w["resources"]["cores"] == 1 and w["resources"]["ram"] >= 4 * MIB for w in info)
        assert backend.use_resources
        # no statistical profiler holding the cases' frames (and guest-RAM views) every 10 ms
        import dask
        profiling = backend.client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
        assert len(profiling) == 2 and not any(profiling.values())
    finally:
        backend.close()

    # a running scheduler (tcp:// and a scheduler file) whose workers are too small
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                                  resources={"cores": 1, "ram": 3 * MIB}) as cluster:
        rows = run_sweep(base, ["size=1M"], cluster=cluster.scheduler_address)
        assert [r["status"] for r in rows] == ["completed"]
        with distributed.Client(cluster) as client:
            client.write_scheduler_file(str(tmp_path / "scheduler.json"))
        with pytest.raises(ValueError, match="no Dask worker declares ram >= 4194304 bytes"):
            run_sweep(base, ["size=2M"], scheduler_file=str(tmp_path / "scheduler.json"))


def test_ctrl_c_keeps_the_finished_cases_and_marks_the_rest_cancelled():
    from npqfile.migration.sweep import SweepInterrupted

    def interrupt(progress):
        if progress.row is not None:
            raise KeyboardInterrupt           # what Ctrl-C raises in the waiting loop

    base = MigrationConfig(size=MIB, workload="idle")
    with pytest.raises(SweepInterrupted) as info:
        run_sweep(base, ["size=1M,2M,3M"], jobs=1, on_update=interrupt)
    rows = info.value.rows
    assert [r["case"] for r in rows] == [1, 2, 3]
    assert rows[0]["status"] == "completed"
    assert [(r["status"], r["outcome"]) for r in rows[1:]] == [("cancelled", "interrupted")] * 2
    assert sweep_exit_status(rows) == 2
