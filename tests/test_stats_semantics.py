"""Statistics that mean what QEMU's mean (issue 8 item 5) and the CLI/plot defects of item 6:
XBZRLE and compression switch at the first wrap, dirty-pages-rate counts newly set bits,
released bytes are freed bytes, outputs are checked before the run and never lose results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from npqfile.cli import main
from npqfile.cli import migrate as migrate_cli
from npqfile.migration.engine import MigrationParams
from npqfile.migration.session import MigrationConfig, fill_guest, run_migration
from npqfile.migration.stats import IterationStats, MigrationStats
from npqfile.migration.workloads import make_workload
from npqfile.ram import GuestRAM

MIB = 1 << 20
PS = 4096


# -- item 5: QEMU's statistics --------------------------------------------------------------

def test_idle_guest_with_xbzrle_has_no_cache_misses_and_keeps_compressing_until_the_wrap():
    # 40 MB/s x 500 ms: the first window (4 MB) leaves 12 MB pending, under the threshold,
    # so a dirty sync happens in the middle of the first pass.  QEMU switches to XBZRLE
    # (and stops zlib page compression) only when the page search wraps after the last
    # block: an idle guest never wraps, so no page goes through the cache.
    params = MigrationParams(max_bandwidth=40e6, downtime_limit=0.5, xbzrle_cache_size=8 * MIB)
    st = run_migration(MigrationConfig(size=16 * MIB, init="random", workload="idle", compress="zlib:1",
                                       params=params))
    assert st.status == "completed" and st.verification["ok"] is True
    assert st.dirty_sync_count >= 2
    xc = st.as_dict()["xbzrle-cache"]
    assert xc["cache-miss"] == 0 and xc["pages"] == 0
    assert st.ram.compressed_pages == 16 * MIB // PS        # every page compressed, none sent plain


def test_dirty_pages_rate_counts_only_newly_set_bits():
    # pages written while still waiting to be sent are already set in the migration
    # bitmap: QEMU's sync adds nothing for them to num_dirty_pages_period.  (Written pages
    # that were sent before the next sync are newly set again: QEMU counts and re-sends
    # them.)  So the sync must come while they wait, whatever the machine's load: they are
    # written at the first window's end (<= 4 MB of 16 MiB sent, 40 MB/s) and are the last
    # pages sent, and the sync comes once remaining < window bandwidth x downtime-limit.
    # With QEMU's largest downtime-limit (2000 s) that is the first window that sent at
    # more than 8.4 KB/s, not (as with 0.5 s) one that happened to reach 24 MB/s.
    ram = GuestRAM()
    ram.add_block("ram", 16 * MIB)
    fill_guest(ram, "random", 1)
    pending = np.arange(4096 - 100, 4096)          # the end of RAM: sent last
    done = []

    def write_pending_pages(progress):
        if progress["status"] == "active" and not done:
            done.append(True)
            ram.block("ram").touch(pending)

    params = MigrationParams(max_bandwidth=40e6, downtime_limit=2000.0)
    try:
        st = run_migration(MigrationConfig(size=16 * MIB, workload="idle", params=params), ram=ram,
                           on_progress=write_pending_pages)
    finally:
        ram.close()
    assert done and st.status == "completed" and st.verification["ok"] is True
    assert st.dirty_pages_rate == 0
    assert st.ram.pages == 4096                     # and none of them was sent twice


def test_released_bytes_are_freed_bytes_and_advised_bytes_are_named_so():
    # an untouched (zero) guest holds no memory: releasing it frees nothing
    params = MigrationParams(release_ram=True)
    st = run_migration(MigrationConfig(size=8 * MIB, init="zero", workload="idle", params=params))
    x = st.as_dict()["npqfile"]
    assert st.status == "completed" and st.verification["ok"] is True
    assert x["rss-before"] == 0
    assert x["released-bytes"] == 0
    assert x["release-advised-bytes"] == 8 * MIB
    # a resident guest: what was advised was freed
    st = run_migration(MigrationConfig(size=8 * MIB, init="random", workload="idle", params=params))
    x = st.as_dict()["npqfile"]
    assert x["rss-before"] == 8 * MIB and x["rss-after"] == 0
    assert x["released-bytes"] == 8 * MIB == x["release-advised-bytes"]


# -- item 6: CLI and scripting ----------------------------------------------------------------

@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if a migration starts."""
    def boom(*a, **k):
        raise AssertionError("the migration ran")
    monkeypatch.setattr(migrate_cli, "run_migration", boom)
    monkeypatch.setattr(migrate_cli, "run_sweep", boom)


@pytest.mark.parametrize("name, message", [("x.txt", "extension .txt"), ("plot", "no extension")])
def test_bad_plot_format_is_refused_before_the_run(no_run, tmp_path, capsys, name, message):
    assert main(["migrate", "--quiet", "--plot", str(tmp_path / name)]) == 1
    err = capsys.readouterr().err
    assert message in err and ".png" in err


def test_missing_plot_and_file_directories_are_refused_before_the_run(no_run, tmp_path, capsys):
    assert main(["migrate", "--quiet", "--plot", str(tmp_path / "nope" / "x.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["migrate", "--quiet", "--to", f"file:{tmp_path}/nope/snap.bin"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["migrate", "--quiet", "--sweep", "downtime=100,200", "--to",
                 f"file:{tmp_path}/nope/snap.bin"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_plot_that_fails_after_the_run_keeps_the_results(monkeypatch, tmp_path, capsys):
    from npqfile.migration import plot

    def fail(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(plot, "plot_migration", fail)
    rc = main(["migrate", "--quiet", "--json", "--size", "4M", "--workload", "idle", "--plot",
               str(tmp_path / "x.png")])
    out = capsys.readouterr()
    assert rc == 1
    assert json.loads(out.out)["status"] == "completed"          # the results were printed
    assert "the plot was not written" in out.err and "No space left" in out.err


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_negative_pause_before_switchover_is_refused(no_run, capsys, value):
    assert main(["migrate", "--quiet", "--pause-before-switchover", value]) == 1
    assert "--pause-before-switchover" in capsys.readouterr().err


def test_save_refuses_a_block_named_twice(tmp_path, capsys):
    img = tmp_path / "a.raw"
    img.write_bytes(b"\1" * 8192)
    assert main(["save", f"ram={img}", f"ram={img}", "-o", str(tmp_path / "out.bin")]) == 1
    assert "'ram' is given twice" in capsys.readouterr().err
    assert not (tmp_path / "out.bin").exists()


def test_idle_takes_no_rate(capsys):
    with pytest.raises(ValueError, match="idle.*no rate"):
        make_workload("idle:rate=5000")
    assert make_workload("idle:rate=0").rate == 0
    assert main(["migrate", "--quiet", "--workload", "idle", "--dirty-rate", "5000"]) == 1
    assert "uniform" in capsys.readouterr().err


def _stats(status="completed", **kw) -> MigrationStats:
    st = MigrationStats(status=status, outcome="converged", total_time=1.0, switchover_time=0.5,
                        downtime=0.142, params={})
    st.iterations = [IterationStats(1, 4096, bytes_sent=16 * MIB), IterationStats(2, 4000, bytes_sent=MIB),
                     IterationStats(3, 4050, bytes_sent=MIB)]
    st.timeline = [(0.0, 0, 16 * MIB), (0.5, 10 * MIB, 16 * MIB), (0.79, 18 * MIB, 0), (1.0, 18 * MIB, 0)]
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def test_plot_shades_the_downtime_not_the_verification_hashing():
    import matplotlib.pyplot as plt

    from npqfile.migration.plot import migration_figure
    fig = migration_figure(_stats())
    try:
        spans = [p for p in fig.axes[1].patches]
        assert len(spans) == 1
        box = spans[0].get_extents().transformed(fig.axes[1].transData.inverted())
        assert box.x0 == pytest.approx(0.5, abs=1e-3) and box.x1 == pytest.approx(0.642, abs=1e-3)
    finally:
        plt.close(fig)


def test_cancelled_run_dirty_axis_starts_at_zero():
    import matplotlib.pyplot as plt

    from npqfile.migration.plot import migration_figure
    fig = migration_figure(_stats(status="cancelled", switchover_time=0.0, downtime=0.0))
    try:
        dirty_axis = fig.axes[-1]                      # the twin axis of the iteration panel
        assert dirty_axis.get_ylim()[0] == 0
    finally:
        plt.close(fig)


def test_sweep_labels_do_not_overlap():
    import matplotlib.pyplot as plt

    from npqfile.migration.plot import sweep_figure
    rows = [{"workload": f"hotset:rate={r},hot=0.1,share=0.9,seed=3", "downtime-limit": d, "total-time": 100.0,
             "downtime": 5.0, "converged": True}
            for r in (10000, 20000, 40000, 80000) for d in ("100", "300")]
    fig = sweep_figure(rows, ["workload", "downtime-limit"])
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = sorted((t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()), key=lambda b: b.x0)
        assert len(boxes) == len(rows)
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
    finally:
        plt.close(fig)


def test_reclaim_compare_plot_is_small_multiples():
    import matplotlib.pyplot as plt

    from npqfile.reclaim import ReclaimConfig, compare_configs, results_figure, run_reclaim
    results = [run_reclaim(c) for c in compare_configs(ReclaimConfig(size=1 * MIB, sample_every=256 * 1024))]
    fig = results_figure(results)
    try:
        panels = [ax for ax in fig.axes if ax.lines]
        assert len({ax.get_title() for ax in fig.axes if ax.get_title()}) == 4     # one column per backing
        assert max(len(ax.lines) for ax in panels) <= 6                          # a few lines per panel
        assert sum(len(ax.lines) for ax in panels) == 2 * sum(r.status == "ok" for r in results)
    finally:
        plt.close(fig)


def test_reclaim_with_an_advice_the_backing_refuses_is_an_error(capsys):
    assert main(["reclaim", "--size", "1M", "--advice", "remove"]) == 1
    err = capsys.readouterr().err
    assert "--advice remove" in err and "nothing was measured" in err
    assert main(["reclaim", "--size", "1M", "--advice", "dontneed", "--json"]) == 0


def _stream(tmp_path, *extra) -> str:
    img = tmp_path / "ram.raw"
    img.write_bytes(np.random.default_rng(1).integers(1, 255, 256 * 1024, dtype=np.uint8).tobytes())
    out = tmp_path / "s.bin"
    assert main(["save", f"ram={img}", "-o", str(out), *extra]) == 0
    return str(out)


def test_incoming_names_a_missing_machine_for_what_it_means(tmp_path, capsys):
    path = _stream(tmp_path, "--no-configuration")
    capsys.readouterr()
    assert main(["incoming", f"file:{path}", "--ram", "256K"]) == 0
    out = capsys.readouterr().out
    assert "machine None" not in out and "no configuration section" in out


def test_failed_incoming_reports_the_bytes_it_received(tmp_path, capsys):
    path = _stream(tmp_path)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:len(data) // 2])
    capsys.readouterr()
    assert main(["incoming", f"file:{cut}", "--ram", "256K", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "failed"
    assert 0 < doc["bytes"] <= len(data) // 2
    assert main(["incoming", f"file:{cut}", "--ram", "256K"]) == 1
    assert f"failed after {doc['bytes']} bytes" in capsys.readouterr().err


def test_a_release_whose_residency_cannot_be_read_is_reported_unmeasured(monkeypatch):
    from npqfile.ram import residency

    def unreadable(*a, **k):
        raise OSError(13, "Permission denied")
    ram = GuestRAM()
    try:
        block = ram.add_block("ram", 1 * MIB)
        block.array[:] = 1
        monkeypatch.setattr(residency, "read_pagemap", unreadable)
        assert block.release([(0, 1 * MIB)]) == 1 * MIB
        assert block.mmap.freed_bytes == 0 and block.mmap.freed_unmeasured == 1 * MIB
    finally:
        ram.close()
    st = MigrationStats(released_bytes=MIB, release_unmeasured_bytes=MIB)
    x = st.as_dict()["npqfile"]
    assert x["release-unmeasured-bytes"] == MIB and x["released-bytes"] == 0


def test_reclaim_checks_its_plot_before_running(monkeypatch, tmp_path, capsys):
    from npqfile.cli import reclaim as reclaim_cli

    def boom(*a, **k):
        raise AssertionError("the experiment ran")
    monkeypatch.setattr(reclaim_cli, "_run_all", boom)
    assert main(["reclaim", "--size", "1M", "--plot", str(tmp_path / "rss.txt")]) == 1
    assert "extension .txt" in capsys.readouterr().err


def test_freed_bytes_of_a_private_image_mapping_are_its_copy_on_write_copies(tmp_path):
    from npqfile.ram import RAMBlock
    img = tmp_path / "img.raw"
    img.write_bytes(b"\1" * MIB)
    block = RAMBlock("ram", MIB, backing=f"image:{img}")
    try:
        assert int(block.array.sum()) == MIB          # read: the file's pages, no copies
        block.touch(np.arange(64))                    # 64 private copies
        assert block.release([(0, MIB)]) == MIB
        assert block.mmap.freed_bytes == 64 * PS      # the page cache keeps the file's pages
    finally:
        block.close()
