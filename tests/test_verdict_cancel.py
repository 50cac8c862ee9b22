"""Ctrl-C (``migrate_cancel``) while the source waits for the destination's verdict.

Pre-copy: the source still holds the guest, so the run is ``cancelled`` (exit 130) and
nothing is released.  After postcopy switched the guest runs on the destination: QEMU 10.0
refuses ``migrate_cancel`` in postcopy and a completed migration is no longer running, so
the status stays ``completed`` and the completion says the verdict was not obtained
(exit 3).  The in-process destination here is made to stay busy after the last byte
(until the test lets it go): only the cancel can end the wait, never a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
from proc_support import wait_for_eof
from test_postcopy import require_uffd

import npqfile.migration.destination as destination_mod
import npqfile.migration.session as session_mod
from npqfile.cli import main
from npqfile.migration import MigrationConfig, MigrationParams, postcopy_ram, run_migration
from npqfile.migration.control import MigrationControl

HANG = 60.0          # a run still waiting this long after the cancel ignored it (the wait is 3600 s)
MIB = 1 << 20


class BusyDestination:
    """Makes the in-process destination stay busy at ``where`` (after loading the stream
    and seeing the source close its side, or after postcopy's SHUT) until ``release()``;
    ``stalled`` is set once it is there."""

    def __init__(self, monkeypatch, where: str):
        self.stalled = threading.Event()
        self.gate = threading.Event()
        monkeypatch.setattr(session_mod, "VERIFY_TIMEOUT", 3600.0)    # only a cancel can end the wait
        if where == "after-load":
            real = destination_mod.load_stream

            def load_then_stall(f, *a, **kw):
                out = real(f, *a, **kw)
                # the source closes its side after its engine finished, right before it waits for the verdict
                wait_for_eof(f.channel.fileno())
                self._stall()
                return out
            monkeypatch.setattr(destination_mod, "load_stream", load_then_stall)
        else:
            real_finish = postcopy_ram.PostcopyIncoming.finish

            def finish_then_stall(pc, *a, **kw):
                real_finish(pc, *a, **kw)          # SHUT is out: the source's run is completed
                self._stall()
            monkeypatch.setattr(postcopy_ram.PostcopyIncoming, "finish", finish_then_stall)

    def _stall(self) -> None:
        self.stalled.set()
        self.gate.wait()

    def release(self) -> None:
        """Let the destination thread end, and wait for it."""
        self.gate.set()
        for t in threading.enumerate():
            if t.name == "migration-destination":
                t.join(HANG)


def _interrupt_when(event: threading.Event) -> threading.Thread:
    """Send this process SIGINT (Ctrl-C) once ``event`` is set and migrate's handler is in."""
    def run() -> None:
        if event.wait(HANG) and signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            os.kill(os.getpid(), signal.SIGINT)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _main_interrupted_when_busy(argv: list[str], busy: BusyDestination) -> int:
    """main(argv) in this (the main) thread, with Ctrl-C once ``busy`` stalled; a watchdog
    releases the destination after HANG so a wait that ignores Ctrl-C ends in a failure,
    not a hung suite.  The destination and the interrupting thread are ended on return."""
    fired: list[bool] = []

    def give_up() -> None:
        fired.append(True)
        busy.gate.set()
    t = _interrupt_when(busy.stalled)
    watchdog = threading.Timer(HANG, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        rc = main(argv)
    finally:
        watchdog.cancel()
        busy.release()
        t.join(HANG)
    assert not fired, f"the verdict wait ignored Ctrl-C for {HANG:g} s"
    return rc


def test_ctrl_c_during_an_inprocess_verdict_wait_cancels_at_once_and_releases_nothing(monkeypatch, capsys):
    busy = BusyDestination(monkeypatch, "after-load")
    rc = _main_interrupted_when_busy(["migrate", "--size", "8M", "--workload", "idle", "--init", "random",
                                      "--release-ram", "--json", "--quiet"], busy)
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert rc == 130 and d["status"] == "cancelled", err
    assert d["npqfile"]["outcome"] == "cancelled while waiting for the destination's verdict"
    assert d["npqfile"]["completion"] is None and "migration cancelled (interrupted)" in err
    rel = d["npqfile"]["release-ram"]
    assert rel["released-bytes"] == 0 and d["npqfile"]["released-bytes"] == 0
    assert "releases nothing: the source keeps its RAM" in rel["reason"]


def test_ctrl_c_after_an_inprocess_postcopy_completed_stays_completed_not_verified(monkeypatch, capsys):
    require_uffd()
    busy = BusyDestination(monkeypatch, "after-shut")
    rc = _main_interrupted_when_busy(["migrate", "--size", "8M", "--workload", "uniform:rate=2000", "--init",
                                      "random", "--postcopy-after", "0", "--json", "--quiet"], busy)
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert rc == 3 and d["status"] == "completed" and d["npqfile"]["outcome"] == "postcopy", err
    assert d["npqfile"]["completion"] == "not-verified"
    ver = d["npqfile"]["verification"]
    assert ver["ok"] is None and ver["done"] is False and "migrate_cancel cannot undo it" in ver["error"]
    assert "error: verification not done: interrupted before the destination's verdict" in err
    # migrate_cancel refused (postcopy in progress) or a no-op (completed): never "cancelled"
    assert ("interrupted: Postcopy migration in progress, cannot cancel." in err
            or "interrupted: the migration is completed: nothing to cancel" in err), err
    assert "migration cancelled" not in err and "Traceback" not in err


def test_cancel_during_a_remote_postcopy_verdict_wait_keeps_completed(tmp_path, monkeypatch):
    # --to unix: to an npqfile destination (here a thread of this process): the verdict
    # follows SHUT on the return path; this destination holds it back until released
    require_uffd()
    from npqfile.channels.uri import listen
    from npqfile.migration.destination import VERIFY_MAGIC, Destination
    shut_sent, gate = threading.Event(), threading.Event()
    real_send = postcopy_ram.PostcopyIncoming.send

    def send_verdict_late(pc, message):
        if message.startswith(VERIFY_MAGIC):
            shut_sent.set()
            gate.wait(HANG)
        real_send(pc, message)
    monkeypatch.setattr(postcopy_ram.PostcopyIncoming, "send", send_verdict_late)
    uri = f"unix:{tmp_path / 'm.sock'}"
    listener = listen(uri)
    results: list = []

    def incoming() -> None:
        channel = listener.accept(HANG)
        results.append(Destination(None).receive(channel))
    t = threading.Thread(target=incoming, daemon=True)
    t.start()
    try:
        with MigrationControl() as control:
            def cancel_at_wait(info: dict) -> None:
                if info["status"] == "wait-verdict":
                    assert shut_sent.wait(HANG)       # SHUT is in, the verdict held back
                    control.cancel()
            cfg = MigrationConfig(size=16 * MIB, init="random", workload="idle", to=uri,
                                  params=MigrationParams(postcopy_after=0, time_limit=30.0))
            st = run_migration(cfg, on_progress=cancel_at_wait, control=control)
        assert control.cancelled and not gate.is_set()
        assert st.status == "completed" and st.outcome == "postcopy", st.outcome
        assert st.completion == "not-verified" and st.verification["done"] is False
        assert "migrate_cancel cannot undo it" in st.verification["error"]
    finally:
        gate.set()
        t.join(HANG)
        listener.close()
    assert results and results[0].status == "completed"


def test_cancel_in_postcopy_active_is_refused_as_qemu_10_does():
    # QEMU 10.0: "Postcopy migration in progress, cannot cancel." -- the run goes on and
    # ends completed (the Ctrl-C then only cuts the verdict wait short if it is not in yet)
    require_uffd()
    refusals: list = []
    with MigrationControl() as control:
        def cancel_in_postcopy(info: dict) -> None:
            if info["status"] == "postcopy-active" and not refusals:
                refusals.append(control.cancel())
        cfg = MigrationConfig(size=16 * MIB, init="random", workload="uniform:rate=2000",
                              params=MigrationParams(postcopy_after=0, time_limit=30.0))
        st = run_migration(cfg, on_progress=cancel_in_postcopy, control=control)
    assert refusals == ["Postcopy migration in progress, cannot cancel."]
    assert st.status == "completed" and st.outcome == "postcopy", st.outcome
    assert st.completion in ("verified", "not-verified") and st.verification.get("ok") is not False


@pytest.mark.parametrize("switched", [False, True])
def test_cancelled_wait_follows_qemus_states(switched):
    from npqfile.migration.stats import MigrationStats
    from npqfile.migration.verdict import cancelled_wait
    st = MigrationStats()
    st.status, st.outcome = "completed", "postcopy" if switched else "converged"
    ver = cancelled_wait(st, switched)
    if switched:
        assert st.status == "completed" and st.completion == "not-verified" and ver["done"] is False
    else:
        assert st.status == "cancelled" and st.completion is None and ver == {}


def test_destination_join_given_up_leaves_no_descriptor(monkeypatch):
    """A join that a cancel (or its timeout) ends while the in-process destination still
    loads leaves nothing open once that thread ends, even if nobody joins it again (the
    session's cancel path): each cancelled in-process run used to leak a pipe."""
    from npqfile.migration.destination import Destination

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gate = threading.Event()
    dest = Destination()
    monkeypatch.setattr(dest, "receive", lambda channel, reply=True: gate.wait(30))
    r, w = os.pipe()
    before = open_fds()
    os.write(w, b"x")                       # the cancel fd is readable: Ctrl-C came
    dest.start(None)
    try:
        assert dest.join(30, r) is None     # the cancel ends the wait; the thread still runs
        assert dest.running
        assert dest.join(0).status == "failed"      # a timeout gives a failed result
    finally:
        gate.set()
        dest._thread.join(30)
    assert not dest.running
    assert open_fds() == before
    os.close(r)
    os.close(w)


def test_control_detach_asks_without_cancelling(tmp_path):
    """attach(None) at a run's end asks what a cancel would now say without cancelling:
    a completed pre-copy engine's cancel flag stays clear (it used to call cancel(),
    which sets it), and a later Ctrl-C still says what it does."""
    from npqfile.channels import open_channel
    from npqfile.migration.engine import MigrationEngine
    from npqfile.qemufile import QEMUFile
    from npqfile.ram import GuestRAM

    ram = GuestRAM()
    ram.add_block("ram", 1 << 20)
    try:
        with QEMUFile(open_channel(f"file:{tmp_path / 'out.bin'}", "w")) as f:
            engine = MigrationEngine(ram, f, None, MigrationParams(downtime_limit=10.0))
            control = MigrationControl()
            control.attach(engine)
            assert engine.run().status == "completed"
            control.attach(None)
            assert not engine._cancel.is_set()
            assert control.cancel() is None     # ends the verdict wait: cancelled there
            control.close()
    finally:
        ram.close()
