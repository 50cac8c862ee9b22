"""auto-converge: QEMU's throttle decisions (hand-computed from ram.c / cpu-throttle.c), the
workload's duty cycle, the CLI options and a guest that only converges when throttled."""

from __future__ import annotations

import pytest

from npqfile.cli import build_parser, main
from npqfile.cli.migrate import config_from_args
from npqfile.migration import workloads
from npqfile.migration.engine import MigrationParams
from npqfile.migration.session import MigrationConfig, run_migration
from npqfile.migration.throttle import AutoConverge, check_params, throttle_sleep
from npqfile.migration.workloads import Uniform

MIB = 1 << 20
PS = 4096


def test_trigger_needs_a_period_over_a_second_and_the_second_high_period():
    ac = AutoConverge()
    ac.start(0.0, 0)
    # 0.5 s: no look at the throttle yet (QEMU: end_time > time_last_bitmap_sync + 1000)
    assert not ac.on_sync(0.5, 1000, 4_000_000)
    assert ac.dirty_rate_high_cnt == 0
    # 1.2 s: the period holds 2000 pages = 8_192_000 bytes dirtied against
    # 8_000_000 transferred -> threshold 4_000_000: high, first time
    assert not ac.on_sync(1.2, 1000, 8_000_000)
    assert ac.dirty_rate_high_cnt == 1 and ac.percentage == 0
    # 0.9 s later: the same period goes on, its counters accumulate
    assert not ac.on_sync(2.1, 10, 16_000_000)
    # 2.5 s: 110 pages (450_560 bytes) against 8 MB: low; QEMU does not reset the count
    assert not ac.on_sync(2.5, 100, 16_000_000)
    assert ac.dirty_rate_high_cnt == 1
    # 3.6 s: high again -> the second time: throttle at cpu-throttle-initial, count reset
    assert ac.on_sync(3.6, 3000, 24_000_000)
    assert ac.percentage == 20 and ac.dirty_rate_high_cnt == 0
    assert ac.events[-1].percentage == 20 and ac.events[-1].time == pytest.approx(3.6)
    assert ac.events[-1].bytes_dirty_period == 3000 * PS and ac.events[-1].bytes_dirty_threshold == 4_000_000


def high(ac: AutoConverge, times: int = 2, dirty: int = 10_000_000, xfer: int = 10_000_000) -> None:
    for _ in range(times):
        ac.trigger(dirty, xfer)


def test_steps_initial_then_increment_capped_at_max_and_99():
    ac = AutoConverge()
    seen = []
    for _ in range(11):
        high(ac)
        seen.append(ac.percentage)
    assert seen == [20, 30, 40, 50, 60, 70, 80, 90, 99, 99, 99]
    ac = AutoConverge(cpu_throttle_initial=30, cpu_throttle_increment=15, max_cpu_throttle=50)
    seen = []
    for _ in range(4):
        high(ac)
        seen.append(ac.percentage)
    assert seen == [30, 45, 50, 50]


def test_threshold_is_integer_arithmetic_and_strictly_greater():
    ac = AutoConverge(throttle_trigger_threshold=50)
    ac.trigger(99, 199)            # 199 * 50 // 100 = 99: 99 is not above it
    assert ac.dirty_rate_high_cnt == 0
    ac.trigger(100, 199)
    assert ac.dirty_rate_high_cnt == 1
    ac = AutoConverge(throttle_trigger_threshold=100)
    high(ac, dirty=1000, xfer=1000)      # equal: never
    assert ac.percentage == 0 and ac.dirty_rate_high_cnt == 0


def test_tailslow_steps_as_qemu_computes_them():
    ac = AutoConverge(cpu_throttle_tailslow=True)
    high(ac)
    assert ac.percentage == 20                     # the first step is always the initial value
    # dirty 8_000_000 vs threshold 6_000_000 (12_000_000 sent): cpu_now 80,
    # cpu_ideal = (uint64)(80 * 0.75) = 60 -> min(80 - 60, 10) = 10
    high(ac, dirty=8_000_000, xfer=12_000_000)
    assert ac.percentage == 30
    # dirty 10_000_000 vs 9_500_000 (19_000_000 sent): cpu_now 70, cpu_ideal =
    # (uint64)(70 * 0.95) = (uint64)66.5 = 66 -> min(4, 10) = 4
    high(ac, dirty=10_000_000, xfer=19_000_000)
    assert ac.percentage == 34
    # without tailslow the same figures step by the increment
    plain = AutoConverge()
    high(plain)
    high(plain, dirty=10_000_000, xfer=19_000_000)
    assert plain.percentage == 30


def test_cpu_throttle_sleep_matches_cpu_throttle_thread():
    assert throttle_sleep(0) == 0.0
    assert throttle_sleep(20) == pytest.approx(0.002500001, abs=1e-12)   # 0.25 x 10 ms + 1 ns
    assert throttle_sleep(50) == pytest.approx(0.010000001, abs=1e-12)
    # 0.99 / 0.01 is 98.99999999999991 in doubles: QEMU's + 1 ns makes it 990 ms
    assert throttle_sleep(99) == pytest.approx(0.99, abs=1e-12)


@pytest.mark.parametrize("kw, message", [
    (dict(cpu_throttle_initial=0), "cpu-throttle-initial"),
    (dict(cpu_throttle_increment=100), "cpu-throttle-increment"),
    (dict(throttle_trigger_threshold=0), "throttle-trigger-threshold"),
    (dict(throttle_trigger_threshold=101), "throttle-trigger-threshold"),
    (dict(cpu_throttle_initial=40, max_cpu_throttle=30), "max-cpu-throttle"),
])
def test_parameter_ranges_are_qemus(kw, message):
    args = dict(cpu_throttle_initial=20, cpu_throttle_increment=10, max_cpu_throttle=99,
                throttle_trigger_threshold=50) | kw
    with pytest.raises(ValueError, match=message):
        check_params(**args)
    with pytest.raises(ValueError, match=message):
        MigrationParams(**kw).check()


@pytest.mark.parametrize("pct", [20, 75])
def test_workload_duty_cycle_runs_100_minus_p_percent(monkeypatch, pct):
    """The writer under a fake clock: throttled at 75 %, it runs 10 ms then sleeps 30 ms,
    so a second of wall time holds a quarter second of writes; at 20 % the 2.5 ms sleep
    is shorter than the writer's 5 ms slice and must still not count as running."""
    clock = [100.0]
    wl = Uniform(rate=10000, seed=1)

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        if clock[0] >= 101.0:
            wl._stop.set()

    monkeypatch.setattr(workloads.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(workloads.time, "sleep", sleep)
    from npqfile.ram import GuestRAM
    ram = GuestRAM()
    try:
        ram.add_block("ram", 4 * MIB)
        wl.ram = ram
        wl._bounds = workloads.np.array([0, ram.blocks[0].n_pages], dtype=workloads.np.int64)
        wl.set_throttle(pct)
        wl._run.set()
        wl._loop()
        assert wl.error is None
        share = (100 - pct) / 100
        assert wl._running_time == pytest.approx(share, abs=0.011)      # one 10 ms slice of slack
        assert wl.writes == pytest.approx(10000 * share, abs=110)
        # unthrottled, the next second is all running time
        wl.set_throttle(0)
        wl._stop.clear()
        ran = wl._running_time
        clock[0] = 101.0

        def sleep2(seconds: float) -> None:
            clock[0] += seconds
            if clock[0] >= 102.0:
                wl._stop.set()
        monkeypatch.setattr(workloads.time, "sleep", sleep2)
        wl._loop()
        assert wl._running_time - ran == pytest.approx(1.0, abs=0.011)
    finally:
        ram.close()


def test_cli_options_carry_qemus_parameter_names():
    args = build_parser().parse_args(["migrate", "--auto-converge", "--cpu-throttle-initial", "30",
                                      "--cpu-throttle-increment", "5", "--max-cpu-throttle", "80",
                                      "--throttle-trigger-threshold", "70", "--cpu-throttle-tailslow"])
    p = config_from_args(args).params
    assert (p.auto_converge, p.cpu_throttle_initial, p.cpu_throttle_increment, p.max_cpu_throttle,
            p.throttle_trigger_threshold, p.cpu_throttle_tailslow) == (True, 30, 5, 80, 70, True)
    args = build_parser().parse_args(["migrate", "--max-cpu-throttle", "10"])
    with pytest.raises(ValueError, match="max-cpu-throttle"):
        config_from_args(args)


def test_cli_rejects_bad_throttle_before_running(capsys):
    assert main(["migrate", "--quiet", "--throttle-trigger-threshold", "0"]) == 1
    assert "throttle-trigger-threshold" in capsys.readouterr().err


UNCONVERGENT = dict(size=16 * MIB, workload="uniform:rate=20000,seed=2")   # ~80 MB/s of writes


def test_guest_that_cannot_converge_completes_with_auto_converge():
    # without auto-converge: every pass re-dirties nearly all of RAM at 20 MB/s
    params = MigrationParams(max_bandwidth=20e6, downtime_limit=0.02, time_limit=2.5)
    st = run_migration(MigrationConfig(**UNCONVERGENT, params=params))
    assert st.status == "cancelled" and not st.converged
    assert "cpu-throttle-percentage" not in st.as_dict()
    # with it (straight to 99 % at the first step, to keep the test short)
    params = MigrationParams(max_bandwidth=20e6, downtime_limit=0.02, time_limit=60, auto_converge=True,
                             cpu_throttle_initial=99)
    shown = set()
    st = run_migration(MigrationConfig(**UNCONVERGENT, params=params),
                       on_progress=lambda info: shown.add(info["cpu-throttle-percentage"]))
    assert shown == {0, 99}                           # the live progress line shows it too
    assert st.status == "completed" and st.converged, st.outcome
    assert st.verification["ok"] is True
    d = st.as_dict()
    assert d["cpu-throttle-percentage"] == 99 == st.cpu_throttle_percentage
    events = d["npqfile"]["throttle-events"]
    assert [e["cpu-throttle-percentage"] for e in events] == [99]
    assert events[0]["bytes-dirty-period"] > events[0]["bytes-dirty-threshold"]
    per_iter = [it["cpu-throttle-percentage"] for it in d["npqfile"]["iterations"]]
    assert per_iter[0] == 0 and per_iter[-1] == 99        # the bulk pass ran free, the end throttled
    assert per_iter == sorted(per_iter)
    assert d["npqfile"]["params"]["auto-converge"] is True

    from npqfile.migration.plot import migration_figure
    import matplotlib.pyplot as plt
    fig = migration_figure(st)
    try:
        throttle_ax = fig.axes[2]
        ys = throttle_ax.lines[0].get_ydata()
        assert max(ys) == 99 and ys[0] == 0
    finally:
        plt.close(fig)
