"""A cancel racing with the end of the simulator's ``device`` phase: QEMU's outcome.

In QEMU ``migration_cancel`` moves the state to ``cancelling`` and
``migration_completion_end`` moves ``device`` to ``completed``, each with a
compare-and-swap: a cancel that came first ends the run ``cancelled`` (even after the
final flush: the stream was whole, the guest stays on the source); one that comes after
the completion changes nothing.  Never ``failed``.  The cancel is injected at the exact
point with hooks and events (no sleeps): the canceller has seen ``device`` and is about
to shut the QEMUFile down while the run reaches its completion point.
"""

from __future__ import annotations

import threading

import pytest

from npqfile.migration import MigrationConfig, MigrationParams, run_migration
from npqfile.migration.control import MigrationControl
from npqfile.migration.engine import MigrationEngine
from npqfile.qemufile import QEMUFile

HANG = 60.0          # a hook still waiting this long: the interleaving did not happen
MIB = 1 << 20


@pytest.mark.parametrize("to", [None, "null:"])
def test_a_cancel_seen_in_device_after_the_final_flush_ends_cancelled(monkeypatch, to):
    in_shutdown, left_device, shut = threading.Event(), threading.Event(), threading.Event()
    canceller: list[threading.Thread] = []
    refusals: list = []
    real_shutdown, real_complete = QEMUFile.shutdown, MigrationEngine._complete

    def shutdown(f):
        # the canceller's qemu_file_shutdown is held until the run has left ``device``:
        # the cancel saw ``device``, the run reaches its completion point meanwhile
        if canceller and threading.current_thread() is canceller[0] and not shut.is_set():
            in_shutdown.set()
            assert left_device.wait(HANG), "the run never left device"
            try:
                return real_shutdown(f)
            finally:
                shut.set()
        return real_shutdown(f)

    def complete(engine):
        real_complete(engine)          # END, devices, EOF and vmdesc written and flushed
        assert engine.stats.status == "device"

        def on_status(old, new):
            if old == "device":
                left_device.set()
                assert shut.wait(HANG), "the cancel's shutdown never came"
        engine.stats.on_status = on_status
        t = threading.Thread(target=lambda: refusals.append(control.cancel()), name="canceller")
        canceller.append(t)
        t.start()
        assert in_shutdown.wait(HANG), "the cancel did not see device"

    monkeypatch.setattr(QEMUFile, "shutdown", shutdown)
    monkeypatch.setattr(MigrationEngine, "_complete", complete)
    with MigrationControl() as control:
        cfg = MigrationConfig(size=8 * MIB, init="random", workload="idle", to=to,
                              params=MigrationParams(time_limit=60.0))
        st = run_migration(cfg, control=control)
    canceller[0].join(HANG)
    assert refusals == [None]                      # "cancelling the migration"
    assert st.status == "cancelled" and st.outcome == "cancelled", (st.status, st.outcome)
    assert st.completion is None and not st.converged
    assert st.release["released-bytes"] == 0


def test_a_cancel_after_the_completion_point_changes_nothing(monkeypatch):
    # the run moved device -> completed first: migrate_cancel finds nothing running
    # (null: has no verdict to wait for), the stream stays whole
    real_complete = MigrationEngine._complete
    seen: list = []

    def complete(engine):
        real_complete(engine)

        def on_status(old, new):
            if (old, new) == ("device", "completed"):
                seen.append(control.cancel())
                seen.append(engine.f.get_error())
        engine.stats.on_status = on_status

    monkeypatch.setattr(MigrationEngine, "_complete", complete)
    with MigrationControl() as control:
        cfg = MigrationConfig(size=8 * MIB, init="random", workload="idle", to="null:")
        st = run_migration(cfg, control=control)
    assert seen == [None, 0]                       # nothing shut down
    assert st.status == "completed" and st.outcome == "converged", st.outcome
    assert st.completion == "not-verified"
