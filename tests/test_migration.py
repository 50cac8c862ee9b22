"""The pre-copy engine: convergence, rate limiting, limits, capabilities, verification, workloads."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from npqfile.migration.engine import MigrationParams
from npqfile.migration.session import MigrationConfig, fill_guest, run_migration
from npqfile.migration.workloads import (
    HotSet,
    Sequential,
    Uniform,
    Workload,
    Zipf,
    make_workload,
)
from npqfile.ram import GuestRAM

MIB = 1 << 20
PS = 4096


def migrate(size=16 * MIB, workload="idle", to=None, **params):
    cfg = MigrationConfig(size=size, workload=workload, to=to, params=MigrationParams(**params))
    return run_migration(cfg)


def precopy(st):
    return [it for it in st.iterations if not it.final]


def test_idle_guest_converges_in_one_round_plus_stop_and_copy():
    st = migrate()
    assert st.status == "completed" and st.converged and st.outcome == "converged"
    assert len(precopy(st)) == 1
    assert st.iterations[-1].final
    assert st.verification == {"method": "compare", "ok": True, "mismatched": []}
    assert st.ram.normal_pages + st.ram.zero_pages == 16 * MIB // PS
    assert st.destination["status"] == "completed"


def test_hotset_under_limited_bandwidth_needs_several_rounds():
    st = migrate(workload="hotset:rate=3000,hot=0.005,share=0.8,seed=3", max_bandwidth=40e6, downtime_limit=0.005)
    assert st.status == "completed" and st.converged, st.outcome
    assert len(precopy(st)) >= 2
    assert st.dirty_sync_count >= 3
    assert st.ram.pages > 16 * MIB // PS            # re-dirtied pages were sent again
    assert st.verification["ok"] is True
    assert st.dirty_pages_rate > 0


def test_impossible_migration_stops_at_max_iterations():
    st = migrate(size=2 * MIB, workload="uniform:rate=8000", max_bandwidth=8e6, downtime_limit=0.01,
                 max_iterations=4)
    assert st.status == "cancelled"
    assert st.outcome == "max-iterations" and not st.converged
    assert len(st.iterations) == 4 and not any(it.final for it in st.iterations)
    assert st.remaining > 0
    assert st.destination["status"] == "failed"     # the stream was cut, as with migrate_cancel


def test_forced_completion_after_the_limit_still_matches():
    st = migrate(size=2 * MIB, workload="uniform:rate=8000", max_bandwidth=8e6, downtime_limit=0.01,
                 max_iterations=2, on_limit="force")
    assert st.status == "completed" and not st.converged
    assert st.outcome == "forced: max-iterations"
    assert st.verification["ok"] is True


def test_time_limit_outcome():
    st = migrate(size=8 * MIB, workload="uniform:rate=20000", max_bandwidth=4e6, downtime_limit=0.001,
                 time_limit=0.3)
    assert st.status == "cancelled" and st.outcome == "time-limit"


def test_bandwidth_limit_holds_per_window():
    st = migrate(size=4 * MIB, workload="uniform:rate=500", max_bandwidth=10e6, downtime_limit=0.05)
    limit = 10**6
    limited = [w for w in st.windows if w.limit]
    assert len(limited) >= 3 and all(w.limit == limit for w in limited)
    # rate_limit() is checked after each page: a window ends at most one page record
    # (8-byte header + page; the block's idstr on its first record) plus EOS (8) and footer (5) over.
    slack = PS + 8 + 4 + 8 + 5
    assert max(w.bytes for w in limited) > limit          # the budget was really used
    assert st.window_overshoot() <= slack
    assert st.as_dict()["npqfile"]["windows"]["max-overshoot"] == st.window_overshoot()


def test_xbzrle_sends_deltas_after_the_bulk_stage():
    # Dirtying driven by the engine's own syncs, not by the clock: after each sync one byte
    # of every hot page changes, so each round resends the hot set -- the first resend
    # fills the XBZRLE cache (misses), later rounds send deltas.
    ram = GuestRAM()
    ram.add_block("ram", 2 * MIB)
    fill_guest(ram, "random", 1)
    hot = np.arange(0, 512, 8)
    rounds_seen = set()

    def dirty_after_each_sync(progress):
        if progress["status"] == "active" and progress["round"] not in rounds_seen:
            rounds_seen.add(progress["round"])
            ram.block("ram").touch(hot)

    params = MigrationParams(max_bandwidth=8e6, downtime_limit=0.005, xbzrle_cache_size=1 * MIB,
                             max_iterations=6, on_limit="force")
    try:
        st = run_migration(MigrationConfig(size=2 * MIB, workload="idle", params=params), ram=ram,
                           on_progress=dirty_after_each_sync)
    finally:
        ram.close()
    assert st.status == "completed" and st.verification["ok"] is True
    assert st.dirty_sync_count >= 4 and st.ram.xbzrle_pages >= hot.size
    xc = st.as_dict()["xbzrle-cache"]
    assert xc["pages"] == st.ram.xbzrle_pages and xc["encoding-rate"] > 100   # 1-byte deltas
    assert xc["cache-miss"] >= hot.size


@pytest.mark.parametrize("compress", ["zlib:1", "zstd", "lz4"])
def test_compression(compress):
    cfg = MigrationConfig(size=4 * MIB, workload="idle", compress=compress)
    st = run_migration(cfg)
    assert st.status == "completed" and st.verification["ok"] is True
    method = compress.split(":")[0]
    assert st.compression["method"] == method
    if method == "zlib":
        assert st.compression["where"] == "pages" and st.ram.compressed_pages > 0
    else:
        assert st.compression["where"] == "channel"
        assert st.compression["bytes-in"] == st.stream_bytes


@pytest.mark.parametrize("compress", ["zstd", "lz4"])
def test_channel_compression_carries_random_pages(compress):
    """Random pages take QEMUFile's native iovec path; a compressing channel must not
    hand the connection's own writev_iov to it: the pages went past the compressor and
    the destination failed ("Data corruption detected")."""
    st = run_migration(MigrationConfig(size=4 * MIB, workload="idle", compress=compress, init="random"))
    assert st.status == "completed" and st.verification["ok"] is True
    assert st.compression["bytes-in"] == st.stream_bytes


def test_codec_wrappers_forward_only_what_acts_on_the_connection(tmp_path):
    """A compressing channel over a file offers no native I/O and no file offsets (they
    would bypass or address the compressed bytes); fileno and shutdown-like calls are
    the connection's."""
    from npqfile.channels import open_channel
    from npqfile.migration.compression import CompressingWriter, DecompressingReader, parse_compress

    comp = parse_compress("zstd")
    inner = open_channel(f"file:{tmp_path / 's.bin'}", "w")
    w = CompressingWriter(inner, comp)
    try:
        assert inner.positional and hasattr(inner, "writev_iov")
        for name in ("writev_iov", "splice_iov", "is_pipe", "positional"):
            assert not hasattr(w, name), name
        assert w.fileno() == inner.fileno()
    finally:
        w.close()
    r = DecompressingReader(open_channel(f"file:{tmp_path / 's.bin'}", "r"), comp)
    try:
        assert not hasattr(r, "positional") and r.fileno() >= 0
    finally:
        r.close()


def test_release_ram_frees_the_source_after_the_destinations_verdict():
    st = migrate(workload="hotset:rate=2000,hot=0.01", release_ram=True)
    assert st.status == "completed" and st.verification["ok"] is True
    assert st.released_bytes == 16 * MIB and st.rss_after == 0 < st.rss_before
    rel = st.as_dict()["npqfile"]["release-ram"]
    assert rel["enabled"] and rel["released-bytes"] == rel["release-advised-bytes"] == 16 * MIB
    assert rel["when"] == "after-verdict"
    assert rel["reason"].startswith("the destination's verdict: RAM equal")


def test_pause_before_switchover_writes_are_migrated():
    ram = GuestRAM()
    ram.add_block("ram", 4 * MIB)
    seen = []

    def hook(engine):
        seen.append(engine.stats.status)
        ram.block("ram").write(12345, b"written while paused")

    try:
        cfg = MigrationConfig(size=4 * MIB, params=MigrationParams(pause_before_switchover=True))
        st = run_migration(cfg, ram=ram, workload=Workload(), pre_switchover=hook)
        assert seen == ["pre-switchover"]
        assert st.status == "completed" and st.verification["ok"] is True
        assert st.iterations[-1].final and st.iterations[-1].dirty_pages >= 1
    finally:
        ram.close()


def test_untracked_writes_are_caught_by_verification():
    def sneaky(ram):   # writes behind the dirty bitmap's back: the destination goes stale
        arr = ram.block("ram").array
        arr[::4096] += 1

    ram = GuestRAM()
    ram.add_block("ram", 4 * MIB)
    try:
        st = run_migration(MigrationConfig(size=4 * MIB, params=MigrationParams(max_bandwidth=20e6)),
                           ram=ram, workload=make_workload(sneaky))
        assert st.status == "completed"
        assert st.verification["ok"] is False and st.verification["mismatched"] == ["ram"]
    finally:
        ram.close()


def test_machine_mismatch_fails_at_the_destination():
    from npqfile.channels import MemoryChannel, MemoryReader
    from npqfile.migration.destination import Destination
    from npqfile.qemufile import QEMUFile
    from npqfile.stream.snapshot import save_snapshot

    with GuestRAM() as ram:
        ram.add_block("ram", 1 * MIB)
        out = MemoryChannel()
        with QEMUFile(out) as f:
            save_snapshot(f, ram, machine="pc-i440fx-7.2")
        dest = Destination(machine="none")
        res = dest.receive(MemoryReader(bytes(out.getvalue())))
        assert res.status == "failed" and "Machine type received is 'pc-i440fx-7.2'" in res.error
        if dest.ram is not None:
            dest.ram.close()


# -- workloads ---------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Uniform, HotSet, Sequential, Zipf])
def test_workload_models_are_reproducible_and_mark_dirty(cls):
    picks = []
    for _ in range(2):
        w = cls(rate=1000, seed=7)
        w.prepare(1000)
        picks.append(w.pick(500, 1000))
    assert np.array_equal(picks[0], picks[1])
    assert picks[0].min() >= 0 and picks[0].max() < 1000
    with GuestRAM() as ram:
        ram.add_block("a", 2 * MIB)
        ram.add_block("b", 2 * MIB)
        w = cls(rate=1000, seed=7)
        w._bounds = np.array([0, 512, 1024])
        w.prepare(1024)
        w.step(ram, 300)
        dirty = ram.sync_dirty()
        assert sum(v.size for v in dirty.values()) > 0


def test_hotset_concentrates_writes():
    w = HotSet(rate=1, seed=1, hot=0.01, share=0.9)
    w.prepare(10000)
    pages = w.pick(10000, 10000)
    in_hot = np.isin(pages, w._hot_pages).mean()
    assert in_hot > 0.85


def test_workload_thread_pauses_for_real():
    with GuestRAM() as ram:
        ram.add_block("ram", 1 * MIB)
        w = Uniform(rate=100000, seed=1)
        w.start(ram)
        try:
            w.pause()
            ram.sync_dirty()
            before = w.writes
            import time
            time.sleep(0.05)
            assert w.writes == before and ram.block("ram").dirty.sum() == 0
            w.resume()
            time.sleep(0.05)
            assert w.writes > before
        finally:
            w.stop()


@pytest.mark.parametrize("spec, message", [
    ("bogus", "unknown workload"), ("hotset:rate", "not key=value"), ("hotset:speed=3", "unknown workload option"),
    ("uniform:rate=fast", "bad value"), ("uniform:hot=0.1", "does not take"), ("hotset:rate=1,hot=2", "hotset needs"),
])
def test_bad_workload_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        make_workload(spec)


def test_workload_rates_in_bytes_per_second():
    assert make_workload("uniform:rate=4MB/s").rate == pytest.approx(4e6 / PS)
    assert make_workload("uniform:rate=250").rate == 250


def test_fill_guest_mixed_has_zero_and_data_pages():
    with GuestRAM() as ram:
        ram.add_block("ram", 4 * MIB)
        fill_guest(ram, "mixed", 1)
        zero = ~ram.block("ram").pages.any(axis=1)
        assert 0.1 < zero.mean() < 0.4
        with pytest.raises(ValueError, match="initial contents"):
            fill_guest(ram, "ones", 1)


@pytest.mark.parametrize("kw, message", [
    ({"max_bandwidth": -1}, "max_bandwidth"), ({"max_iterations": 0}, "max_iterations"),
    ({"on_limit": "retry"}, "on_limit"), ({"xbzrle_cache_size": 5000}, "xbzrle cache size"),
])
def test_bad_params(kw, message):
    with pytest.raises(ValueError, match=message):
        MigrationParams(**kw).check()


# -- user acceptance fixes ------------------------------------------------------------------

def _decode_channel(method: str, data: bytes) -> tuple[bytes, bool]:
    """Decode a compressed channel with the reference libraries; returns (bytes, the
    last frame ended)."""
    if method == "zstd":
        import zstandard
        d = zstandard.ZstdDecompressor().decompressobj()
        out = d.decompress(data)
        return out, d.eof
    import lz4.frame
    out, ended = [], True
    while data:
        d = lz4.frame.LZ4FrameDecompressor()
        out.append(d.decompress(data))
        ended, data = d.eof, d.unused_data
    return b"".join(out), ended


@pytest.mark.parametrize("method", ["zstd", "lz4"])
@pytest.mark.parametrize("kind", ["file", "exec"])
def test_channel_compression_writes_complete_standard_frames(method, kind, tmp_path):
    # file: reads back at the compressed offset (it used to pread at the decoded one),
    # and the zstd frame is ended on close: the reference decoders and zstd -t accept it
    path = tmp_path / f"snap.{method}"
    to = f"file:{path}" if kind == "file" else f"exec:cat > {path}"
    st = run_migration(MigrationConfig(size=4 * MIB, workload="idle", compress=method, to=to))
    assert st.status == "completed", st.outcome
    if kind == "file":
        assert st.verification == {"method": "sha256", "ok": True, "mismatched": []}
    data = path.read_bytes()
    assert len(data) == st.compression["bytes-out"]
    plain, ended = _decode_channel(method, data)
    assert ended and len(plain) == st.stream_bytes == st.compression["bytes-in"]
    assert plain[:4] == b"QEVM"
    tool = shutil.which(method)
    if tool:
        assert subprocess.run([tool, "-t", "-q", str(path)], capture_output=True, check=False).returncode == 0


def test_a_failing_channel_close_fails_a_completed_migration():
    st = migrate(size=2 * MIB, to="exec:cat > /dev/null; exit 3")
    assert st.status == "failed" and not st.converged
    assert "closing the channel failed" in st.outcome and "exited with status 3" in st.outcome
    assert st.verification == {}


def test_failed_write_counts_only_bytes_the_channel_took():
    from npqfile.channels import MemoryChannel
    from npqfile.migration.engine import MigrationEngine
    from npqfile.qemufile import QEMUFile

    limit = 1 * MIB
    with GuestRAM() as ram:
        ram.add_block("ram", 8 * MIB)
        fill_guest(ram, "random", 2)
        out = MemoryChannel(limit=limit)
        f = QEMUFile(out)
        st = MigrationEngine(ram, f, Workload(), MigrationParams()).run()
        f.close()
    assert st.status == "failed" and "No space left" in st.outcome
    assert st.stream_bytes <= len(out.getvalue()) <= limit
    assert 0 < st.transferred <= st.stream_bytes
    assert st.ram_queued > st.transferred            # QEMU's counter: queued, never written
    d = st.as_dict()
    assert d["ram"]["transferred"] == st.transferred and d["npqfile"]["transferred-queued"] == st.ram_queued


def test_release_ram_releases_nothing_before_the_verdict(monkeypatch):
    # the old engine released clean pages at switchover and the final pages as they
    # were written: a destination dying after that took the only copy with it
    ram = GuestRAM()
    ram.add_block("ram", 4 * MIB)
    block = ram.block("ram")
    releases = []
    real = type(block.mmap).release_pages

    def record(self, offset, length, *args):
        releases.append((offset, length))
        return real(self, offset, length, *args)

    seen = []

    def progress(info):
        if info["status"] == "wait-verdict":          # the last byte is written
            seen.append(list(releases))

    monkeypatch.setattr(type(block.mmap), "release_pages", record)
    try:
        fill_guest(ram, "mixed", 3)
        cfg = MigrationConfig(size=4 * MIB, params=MigrationParams(release_ram=True, pause_before_switchover=True))
        st = run_migration(cfg, ram=ram, workload=Workload(), on_progress=progress,
                           pre_switchover=lambda engine: block.fill(np.arange(100, 164), 0))
        assert st.status == "completed" and st.verification["ok"] is True
        assert seen == [[]]                           # nothing released before the verdict
        assert releases == [(0, 4 * MIB)] and st.rss_after == 0   # then all of it, one run
    finally:
        ram.close()


@pytest.mark.parametrize("to", ["null:", "exec:cat > /dev/null", "file:/nonexistent/x.bin"])
def test_release_ram_is_refused_where_no_verdict_can_come(to):
    with pytest.raises(ValueError, match=f"--release-ram needs the destination's verdict.*{to.split(':')[0]}:"):
        migrate(size=1 * MIB, to=to, release_ram=True)
    with pytest.raises(ValueError, match="--peer qemu"):
        run_migration(MigrationConfig(size=MIB, to="tcp:127.0.0.1:9", peer="qemu",
                                      params=MigrationParams(release_ram=True)))
    with pytest.raises(ValueError, match="--no-verify"):
        run_migration(MigrationConfig(size=MIB, verify=False, params=MigrationParams(release_ram=True)))


def test_cancelled_run_keeps_the_source_ram_and_says_why_nothing_was_released():
    from npqfile.migration.control import MigrationControl

    ram = GuestRAM()
    ram.add_block("ram", 8 * MIB)
    try:
        fill_guest(ram, "mixed", 5)
        before = ram.block("ram").sha256()
        with MigrationControl() as control:
            def progress(info):
                if info["status"] == "active" and info["bytes"] > MIB:
                    control.cancel()
            cfg = MigrationConfig(size=8 * MIB, params=MigrationParams(release_ram=True, max_bandwidth=20e6,
                                                                       downtime_limit=0.001))
            st = run_migration(cfg, ram=ram, workload=Workload(), on_progress=progress, control=control)
        assert st.status == "cancelled" and st.outcome == "cancelled"
        assert ram.block("ram").sha256() == before and st.released_bytes == 0
        rel = st.as_dict()["npqfile"]["release-ram"]
        assert rel == {"enabled": True, "released-bytes": 0, "release-advised-bytes": 0, "when": None, "time-ms": None,
                       "reason": "a cancelled migration releases nothing: the source keeps its RAM"}
    finally:
        ram.close()


def test_release_rule_for_each_phase():
    from npqfile.migration.release_ram import AFTER_VERDICT, POSTCOPY, PRECOPY, may_release

    assert may_release(PRECOPY)[0] is False
    assert may_release(POSTCOPY)[0] is True
    assert may_release(AFTER_VERDICT, {"ok": True, "method": "sha256"})[0] is True
    assert may_release(AFTER_VERDICT, {"ok": False, "error": "x"})[0] is False
    assert may_release(AFTER_VERDICT, {"ok": None})[0] is False
    assert may_release(AFTER_VERDICT, None)[0] is False
    with pytest.raises(ValueError):
        may_release("later")


def test_cancel_wakes_a_source_blocked_on_a_peer_that_reads_nothing():
    # migrate_cancel shuts the QEMUFile down: a sendmsg blocked on a full socket wakes
    import socket
    import threading

    from npqfile.channels import SocketChannel
    from npqfile.migration.engine import MigrationEngine
    from npqfile.qemufile import QEMUFile

    a, b = socket.socketpair()                        # b is never read: a stalled peer
    ram = GuestRAM()
    ram.add_block("ram", 32 * MIB)
    try:
        fill_guest(ram, "random", 1)
        engine = MigrationEngine(ram, QEMUFile(SocketChannel(a, "w")), Workload())
        out = []
        t = threading.Thread(target=lambda: out.append(engine.run()), daemon=True)
        t.start()
        threading.Timer(0.3, engine.cancel).start()
        t.join(60)
        assert not t.is_alive(), "cancel() did not wake the blocked send"
        assert out[0].status == "cancelled" and out[0].outcome == "cancelled"
    finally:
        b.close()
        if not t.is_alive():
            ram.close()


def test_release_ram_counts_each_page_once_with_zero_and_data_pages_in_the_final_pass():
    # mixed contents and a bandwidth limit leave data and zero pages for stop-and-copy
    cfg = MigrationConfig(size=16 * MIB, init="mixed", workload="idle",
                          params=MigrationParams(release_ram=True, max_bandwidth=100e6, downtime_limit=0.05))
    st = run_migration(cfg)
    assert st.status == "completed" and st.verification["ok"] is True
    assert st.rss_after == 0 and st.released_bytes == 16 * MIB



@pytest.mark.parametrize("detect", [True, False])
def test_final_pass_zero_pages_are_released_once(detect):
    # zero pages written while the guest is stopped go in the final pass (as ZERO
    # records, or without detection as normal pages); the release after the verdict
    # counts every page once
    ram = GuestRAM()
    ram.add_block("ram", 4 * MIB)
    try:
        fill_guest(ram, "random", 3)
        params = MigrationParams(release_ram=True, pause_before_switchover=True, zero_page_detection=detect)
        st = run_migration(MigrationConfig(size=4 * MIB, params=params), ram=ram, workload=Workload(),
                           pre_switchover=lambda engine: ram.block("ram").fill(np.arange(100, 164), 0))
        assert st.status == "completed" and st.verification["ok"] is True
        assert st.released_bytes == 4 * MIB and st.rss_after == 0
        assert (st.ram.zero_pages > 0) == detect
    finally:
        ram.close()


def test_iterations_are_numbered_in_order_with_their_sync_count():
    st = migrate(workload="hotset:rate=3000,hot=0.005,share=0.8,seed=3", max_bandwidth=40e6, downtime_limit=0.005)
    assert st.status == "completed"
    assert [it.index for it in st.iterations] == list(range(1, len(st.iterations) + 1))
    syncs = [it.sync for it in st.iterations]
    assert syncs[0] == 1 and syncs == sorted(syncs) and syncs[-1] == st.dirty_sync_count
    d = st.as_dict()["npqfile"]["iterations"]
    assert [it["iteration"] for it in d] == [it.index for it in st.iterations]
    assert [it["dirty-sync-count"] for it in d] == syncs


def test_mbps_at_completion_is_qemus_average():
    # migration_calculate_complete: every stream byte over (total time - setup time)
    st = migrate(size=4 * MIB, max_bandwidth=20e6)
    assert st.status == "completed"
    avg = st.stream_bytes * 8 / 1e6 / (st.total_time - st.setup_time)
    assert st.mbps == pytest.approx(avg)
    d = st.as_dict()
    assert d["ram"]["mbps"] == round(avg, 3)
    assert d["npqfile"]["last-window-mbps"] == round(st.window_bandwidth * 8 / 1e6, 3)


def test_rss_is_sampled_at_switchover_and_after_the_release():
    st = migrate(size=4 * MIB, workload="hotset:rate=2000,hot=0.01", release_ram=True, sample_rss=True,
                 max_bandwidth=40e6)
    assert st.status == "completed" and st.switchover_time > 0
    at_switch = [s for s in st.timeline if s[0] == st.switchover_time]
    assert len(at_switch) == 1 and at_switch[0][2] > 0           # before anything was released
    later = [s for s in st.timeline if s[0] > st.switchover_time]
    assert len(later) >= 2 and later[-1][2] < at_switch[0][2]    # after release, at completion


def test_sweep_destinations_and_repeated_parameters():
    from npqfile.migration.sweep import case_destination, parse_sweep

    assert case_destination("file:/tmp/x/snap.bin", 2) == "file:/tmp/x/snap.2.bin"
    assert case_destination("file:/tmp/x/snap.bin", 2, "bandwidth=40MB/s,size=4M") == \
        "file:/tmp/x/snap.2.bandwidth=40MB_s,size=4M.bin"
    assert case_destination(None, 1) is None and case_destination("null:", 3) == "null:"
    for uri in ("tcp:127.0.0.1:4444", "unix:/tmp/s", "exec:cat > f", "fd:5"):
        with pytest.raises(ValueError, match="cannot send its parallel cases"):
            case_destination(uri, 1)
    with pytest.raises(ValueError, match="'size' given twice"):
        parse_sweep(["size=16M,32M", "size=8M"])


def test_workload_write_size_gives_xbzrle_real_deltas():
    wl = make_workload("uniform:rate=1000,bytes=256,seed=2")
    assert wl.write_bytes == 256 and wl.describe()["write-bytes"] == 256
    ram = GuestRAM()
    ram.add_block("ram", 1 * MIB)
    try:
        wl.prepare(256)
        wl._bounds = np.array([0, 256])
        before = ram.block("ram").array.copy()
        wl.step(ram, 50)
        changed = (ram.block("ram").pages != before.reshape(256, PS)).sum(axis=1)
        assert changed.max() > 1 and changed.sum() <= 50 * 256        # up to 256 bytes per write
        assert set(np.flatnonzero(changed)) <= set(ram.block("ram").sync_dirty().tolist())
    finally:
        ram.close()
    with pytest.raises(ValueError, match="bytes"):
        make_workload("uniform:bytes=0")


def test_bare_workload_kinds_write_and_sweep_takes_option_names():
    from npqfile.migration.sweep import parse_sweep

    assert make_workload("hotset").rate > 0 and make_workload("uniform").rate > 0
    assert make_workload("idle").rate == 0
    cases = parse_sweep(["max-bandwidth=0,100MB/s", "downtime-limit=50"])
    assert [[name for name, _ in case] for case in cases] == [["max-bandwidth", "downtime-limit"]] * 2
    with pytest.raises(ValueError, match=r"bytes=5000 .* must be 1\.\.4096"):
        make_workload("hotset:bytes=5000")


def test_which_peers_send_a_verdict():
    from npqfile.migration.verdict import peer_of, verdict_wait

    assert peer_of(None).sends_verdict and peer_of("inprocess").sends_verdict
    assert peer_of("tcp:127.0.0.1:4444").sends_verdict and peer_of("unix:/tmp/s").kind == "npqfile"
    qemu = peer_of("tcp:127.0.0.1:4444", "qemu")
    assert not qemu.sends_verdict and qemu.why_no_verdict() == "a QEMU destination (--peer qemu) sends none"
    for uri in ("file:/tmp/x", "exec:cat", "null:", "fd:3"):
        assert not peer_of(uri).sends_verdict and peer_of(uri).why_no_verdict().endswith("cannot send one")
    with pytest.raises(ValueError, match="--peer applies to tcp: and unix:"):
        peer_of("exec:cat", "npqfile")
    with pytest.raises(ValueError, match="--peer must be one of"):
        peer_of("tcp:h:1", "libvirt")
    assert verdict_wait(30.0, 64 << 20) == 31.0      # the stall timeout plus hashing at 64 MiB/s


def test_no_source_hashes_is_never_equal_ram():
    """compare_hashes with nothing on the source side compared nothing: not "equal" (it
    would let a run be reported verified, and release-ram release, on no evidence)."""
    from npqfile.migration.verdict import compare_hashes
    v = compare_hashes({}, {"ram": "ab"})
    assert v["ok"] is False and v["done"] is False
    assert compare_hashes({"ram": "ab"}, {"ram": "ab"})["ok"] is True
