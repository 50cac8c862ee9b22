"""The real-QEMU engine's lifecycle after the source completed: the destination's fate, Ctrl-C.

QEMU's source has no return path in ``--engine qemu``: it is ``completed`` once its last
byte is out, while the destination QEMU may still be loading.  A destination that then
fails, dies or never finishes fails the run (nothing compared: never "mismatch"); a
Ctrl-C cancels nothing (QEMU's ``migration_cancel`` leaves a completed migration alone)
but ends the wait for the destination at once: ``completed`` / ``not-verified``, exit 3,
as after a completed postcopy in the simulator.  A source QEMU that stops answering QMP
mid-migration (SIGSTOP) is asked again (a late answer is no failure), killed and
``cancelled`` on Ctrl-C, ``failed`` at the stall limit.  ``--engine both``: Ctrl-C cancels
the engine running at that moment and the comparison is still printed.  At ``pre-switchover`` a Ctrl-C is
QEMU's ``migrate_cancel`` of the pause (never ``migrate-continue``): ``cancelled``; after
``--on-limit force`` raised the downtime limit a Ctrl-C is still ``migrate_cancel``.

The fakes below stand for a destination QEMU that answers as told; the real-QEMU tests
stop or kill the destination at the moment the source reports ``completed`` (a hook on
the poll, no sleeps) and check that no QEMU is left.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time

import pytest

from conftest import require_qemu
from npqfile.cli import main
from npqfile.cli.migrate import _exit_status, _summary, verification_text
from npqfile.migration import qemu_engine
from npqfile.migration.engine import MigrationParams
from npqfile.migration.qemu_engine import QemuMigration
from npqfile.migration.qemu_vm import QemuError, QemuVM
from npqfile.migration.session import MigrationConfig
from npqfile.qemu import QemuBinary

HANG = 60.0          # a wait still going this long after the cancel ignored it
MIB = 1 << 20


class FakeDestination:
    """A destination QEMU answering query-migrate from ``answers`` (the last one repeats;
    None: no answer within the wait, an exception: raised); ``on_query(n)`` runs before
    answer n.  More than ``limit`` queries fail the test (a wait that never ends)."""

    def __init__(self, answers: list, on_query=None, limit: int = 50):
        self.answers, self.on_query, self.limit, self.queries = answers, on_query, limit, 0

    def query(self, name: str, timeout: float):
        assert name == "query-migrate"
        self.queries += 1
        assert self.queries <= self.limit, "the wait for the destination ignored the cancel"
        if self.on_query is not None:
            self.on_query(self.queries)
        answer = self.answers[min(self.queries, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def cmd(self, name: str, **args):        # the same answers for a plain QMP command
        answer = self.query(name, 0)
        return {"status": "active"} if answer is None else answer

    def stderr_tail(self) -> str:
        return "qemu-system-x86_64: load of migration failed: Invalid argument"


def _completed_run() -> QemuMigration:
    """A QemuMigration whose source QEMU has just reported completed."""
    m = QemuMigration(MigrationConfig(size=16 * MIB), QemuBinary("/nonexistent/qemu", "10.0.2"))
    m._collect({"status": "completed", "total-time": 900, "downtime": 20, "_t": 0.9,
                "ram": {"dirty-sync-count": 3, "transferred": 9000, "total": 4096 * 100}})
    m._source_status = "completed"
    return m


@pytest.mark.parametrize("answer", [{"status": "active"}, None])
def test_a_cancel_ends_the_wait_for_a_destination_still_loading(answer):
    # the destination still loading (or not answering at all: its main loop busy); the
    # cancel comes on the third query: the wait ends there, the run stays completed
    m = _completed_run()
    said = []
    dst = FakeDestination([answer], on_query=lambda n: n == 3 and said.append(m.cancel()))
    m._verify(None, dst)
    assert dst.queries == 3 and said == ["the migration is completed: nothing to cancel"]
    st = m.st
    assert st.status == "completed" and st.completion == "not-verified" and st.outcome == "converged"
    assert st.verification["done"] is False and st.verification["ok"] is None
    assert st.verification["error"].startswith("interrupted before the destination's verdict")
    assert _exit_status(st, interrupted=True) == 3


@pytest.mark.parametrize("answer,error", [
    ({"status": "failed", "error-desc": "load of migration failed: Invalid argument"},
     "load of migration failed: Invalid argument"),
    ({"status": "failed"}, "QEMU reported failed: qemu-system-x86_64: load of migration failed: Invalid argument"),
    (QemuError("destination QEMU exited with status 1 while running query-migrate: boom"),
     "destination QEMU exited with status 1 while running query-migrate: boom"),
])
def test_a_failed_destination_fails_the_run_and_compares_nothing(answer, error, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")          # the summary on one line per row
    m = _completed_run()
    m._verify(None, FakeDestination([{"status": "active"}, answer]))
    st = m.st
    assert st.status == "failed" and not st.converged and st.completion is None
    assert st.outcome == f"error: destination failed: {error}"
    assert st.verification == {"method": "sha256", "ok": False, "done": False, "error": f"destination failed: {error}"}
    d = st.as_dict()
    assert d["status"] == "failed" and d["npqfile"]["completion"] is None
    assert d["npqfile"]["destination"] == {"status": "failed", "error": error, "qemu": "10.0.2"}
    assert d["qemu"]["query-migrate"]["status"] == "completed"       # QEMU's source said so
    out = io.StringIO()
    _summary(st, out)
    text = out.getvalue()
    assert f"migration failed: error: destination failed: {error}" in text
    assert f"not done: destination failed: {error}" in text and "MISMATCH" not in text
    assert verification_text(st.verification).startswith("not done: destination failed")   # --engine both's line
    assert _exit_status(st) == 1


def test_a_destination_that_never_finishes_fails_after_the_finish_timeout(monkeypatch):
    monkeypatch.setattr(qemu_engine, "FINISH_TIMEOUT", 0.0)
    m = _completed_run()
    m._verify(None, FakeDestination([None]))
    assert m.st.status == "failed" and m.st.verification["done"] is False
    assert m.st.outcome == "error: destination failed: still loading after 0 s (status unanswered)"


def test_cancel_says_when_the_source_qemu_has_nothing_left_to_cancel():
    m = QemuMigration(MigrationConfig(size=16 * MIB), QemuBinary("/nonexistent/qemu", "10.0.2"))
    for status, said in (("", None), ("active", None), ("device", None), ("pre-switchover", None),
                         ("completed", "the migration is completed: nothing to cancel"),
                         ("failed", "the migration is failed: nothing to cancel")):
        m._source_status = status
        assert m.cancel() == said


class FakeSource:
    """A source QEMU whose query-migrate answers follow ``statuses`` (the last repeats);
    records the other commands.  More than ``limit`` polls fail the test."""

    def __init__(self, statuses: list[str], limit: int = 40):
        self.statuses, self.limit, self.polls, self.sent = statuses, limit, 0, []

    def check_alive(self, doing: str) -> None:
        pass

    def query(self, name: str, timeout: float, **args):
        return self.cmd(name, **args)

    def cmd(self, name: str, **args):
        if name != "query-migrate":
            self.sent.append(name)
            return {}
        self.polls += 1
        assert self.polls <= self.limit, f"no terminal status after {self.limit} polls: sent {self.sent}"
        status = self.statuses[min(self.polls, len(self.statuses)) - 1]
        if status == "cancelled-once-asked":        # cancelling until migrate_cancel arrives
            status = "cancelled" if "migrate_cancel" in self.sent else "device"
        return {"status": status, "ram": {"dirty-sync-count": self.polls}}


class DyingDestination:
    """The destination QEMU exits once the source's migration is cancelled."""

    def __init__(self, src: FakeSource):
        self.src = src

    def check_alive(self, doing: str) -> None:
        if "migrate_cancel" in self.src.sent:
            raise QemuError(f"destination QEMU exited with status 1 while {doing}")


def test_ctrl_c_after_a_forced_limit_is_still_migrate_cancel_and_ends_cancelled():
    # --on-limit force raised the downtime limit (QEMU then stops the guest: device); a
    # Ctrl-C there is still sent as migrate_cancel (QEMU: cancelling -> cancelled), and the
    # destination QEMU exiting on the cancelled stream is not a failure
    params = MigrationParams(max_iterations=1, on_limit="force")
    m = QemuMigration(MigrationConfig(size=16 * MIB, params=params), QemuBinary("/nonexistent/qemu", "10.0.2"))
    src = FakeSource(["active", "active", "device", "device", "cancelled-once-asked"])
    m.t0 = time.monotonic()
    m.on_progress = lambda info: info["status"] == "device" and m.cancel()
    final = m._poll(src, DyingDestination(src))
    assert src.sent == ["migrate-set-parameters", "migrate_cancel"] and final["status"] == "cancelled"
    m._collect(final)
    assert m.st.status == "cancelled" and m.st.outcome == "cancelled"
    # no limit reached yet (still --on-limit force): Ctrl-C while active, QEMU cancelling
    m = QemuMigration(MigrationConfig(size=16 * MIB, params=MigrationParams(on_limit="force")),
                      QemuBinary("/nonexistent/qemu", "10.0.2"))
    src = FakeSource(["active", "active", "cancelling", "cancelling", "cancelled"])
    m.t0 = time.monotonic()
    m.on_progress = lambda info: info["round"] == 2 and m.cancel()
    final = m._poll(src, DyingDestination(src))
    assert src.sent == ["migrate_cancel"] and final["status"] == "cancelled"
    # QEMU completed anyway: the outcome says it was forced, and the cancel came too late
    m = QemuMigration(MigrationConfig(size=16 * MIB, params=params), QemuBinary("/nonexistent/qemu", "10.0.2"))
    m._forced, m.st.outcome = "max-iterations", "cancelled"
    m._collect({"status": "completed", "total-time": 900, "downtime": 20, "_t": 0.9, "ram": {}})
    assert m.st.outcome == "forced: max-iterations (migrate_cancel for cancelled came too late)"
    assert not m.st.converged


# -- real QEMU --------------------------------------------------------------------------

def _on_progress(monkeypatch, progress) -> None:
    """Every QemuMigration built from now on calls ``progress(run, info)`` at each poll
    (its ``on_progress``)."""
    real_init = QemuMigration.__init__

    def init(run, *args, **kw):
        real_init(run, *args, **kw)
        run.on_progress = lambda info: progress(run, info)
    monkeypatch.setattr(QemuMigration, "__init__", init)


def _watch_destination(monkeypatch, on_completed) -> None:
    """Run ``on_completed(run, dst)`` when the source QEMU reports completed (at the end of
    the poll)."""
    real_poll = QemuMigration._poll

    def poll(run, src, dst):
        final = real_poll(run, src, dst)
        if final.get("status") == "completed":
            on_completed(run, dst)
        return final
    monkeypatch.setattr(QemuMigration, "_poll", poll)


def _gone(vm: QemuVM) -> bool:
    return vm.proc is not None and vm.proc.poll() is not None


class Stopper:
    """SIGSTOPs QEMUs for a test (``stop(pid)``) with a safety net: HANG seconds after the
    first stop a timer resumes them (SIGCONT) and records it in ``fired``, so an engine that
    ignores the silence ends the test in a failure, not a hang.  ``stopped``: the pids."""

    def __init__(self) -> None:
        self.stopped: list[int] = []
        self.fired: list[bool] = []
        self.timer = threading.Timer(HANG, self._give_up)
        self.timer.daemon = True

    def _give_up(self) -> None:
        self.fired.append(True)
        for pid in self.stopped:
            os.kill(pid, signal.SIGCONT)

    def stop(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.stopped.append(pid)
        if len(self.stopped) == 1:
            self.timer.start()

    def end(self) -> None:
        """Cancel the timer and resume what it stopped (the ``started`` fixture kills
        whatever the engine left running)."""
        self.timer.cancel()
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_ctrl_c_while_the_destination_qemu_is_still_loading_ends_at_once(monkeypatch, capsys, started):
    # the destination QEMU is stopped (SIGSTOP: it can neither finish nor answer QMP)
    # when the source reports completed, then Ctrl-C: the wait must end on the Ctrl-C
    require_qemu("10.0")
    stopper = Stopper()                      # a wait that ignores Ctrl-C ends in a failure, not a hang

    def stop_then_interrupt(run, dst):
        stopper.stop(dst.proc.pid)
        os.kill(os.getpid(), signal.SIGINT)  # migrate's handler: its watcher thread cancels
        assert run._cancel.wait(HANG), "Ctrl-C did not reach the engine"

    _watch_destination(monkeypatch, stop_then_interrupt)
    try:
        rc = main(["migrate", "--engine", "qemu", "--qemu", "10.0", "--size", "16M", "--workload", "idle",
                   "--json", "--quiet"])
    finally:
        stopper.end()
    out, err = capsys.readouterr()
    assert stopper.stopped and not stopper.fired, "the wait for the destination ignored Ctrl-C"
    d = json.loads(out)
    assert rc == 3 and d["status"] == "completed" and d["npqfile"]["completion"] == "not-verified", err
    ver = d["npqfile"]["verification"]
    assert ver["done"] is False and ver["ok"] is None
    assert "interrupted: the migration is completed: nothing to cancel" in err
    assert "error: verification not done: interrupted before the destination's verdict" in err
    assert "Traceback" not in err
    assert all(_gone(vm) for vm in started)          # the stopped QEMU too (QMP quit bounded, then SIGKILL)


def test_a_destination_qemu_dying_after_the_source_completed_fails_the_run(monkeypatch, started):
    qemu = require_qemu("10.0")
    killed: list[int] = []

    def kill(run, dst):
        os.kill(dst.proc.pid, signal.SIGKILL)
        dst.proc.wait()
        killed.append(dst.proc.pid)
    _watch_destination(monkeypatch, kill)
    st = QemuMigration(MigrationConfig(size=16 * MIB, workload="idle"), qemu).run()
    assert killed
    assert st.status == "failed" and st.completion is None, (st.status, st.verification)
    assert st.outcome.startswith("error: destination failed: destination QEMU exited with status -9"), st.outcome
    assert st.verification["done"] is False and st.verification["ok"] is False
    assert st.qemu["query-migrate"]["status"] == "completed" and _exit_status(st) == 1
    assert all(_gone(vm) for vm in started)


def test_a_cancel_at_qemus_pre_switchover_cancels_the_pause():
    # QEMU parks in pre-switchover until migrate-continue; a cancel there is migrate_cancel
    # (which wakes the pause into cancelling), never a continue: QEMU ends cancelled
    qemu = require_qemu("10.0")
    seen: list[str] = []

    def hook(run):
        seen.append(run.samples[-1]["status"])
        run.cancel()
    cfg = MigrationConfig(size=16 * MIB, workload="idle", params=MigrationParams(pause_before_switchover=True))
    st = QemuMigration(cfg, qemu, pre_switchover=hook).run()
    assert seen == ["pre-switchover"]
    assert st.status == "cancelled" and st.outcome == "cancelled", st.outcome
    assert st.qemu["query-migrate"]["status"] == "cancelled" and st.completion is None


def test_a_cancel_before_the_migrate_command_starts_no_migration(started):
    # Ctrl-C while the QEMUs start (a pending cancel is passed on when the run attaches):
    # QEMU has no migration to cancel; none is started, both QEMUs are ended
    qemu = require_qemu("10.0")
    m = QemuMigration(MigrationConfig(size=16 * MIB, workload="idle"), qemu)
    assert m.cancel() is None
    st = m.run()
    assert st.status == "cancelled" and st.outcome == "cancelled" and st.qemu["polls"] == 0
    assert st.transferred == 0 and st.verification == {} and len(started) == 2
    assert all(_gone(vm) for vm in started)


def test_a_destination_qemu_that_stops_answering_fails_the_run_instead_of_hanging(monkeypatch, started):
    # stopped (SIGSTOP) once the source completed: its QMP never answers; the wait gives up
    # at FINISH_TIMEOUT (0 here: after one unanswered query) and the stopped QEMU is killed
    qemu = require_qemu("10.0")
    monkeypatch.setattr(qemu_engine, "FINISH_TIMEOUT", 0.0)
    stopper = Stopper()
    _watch_destination(monkeypatch, lambda run, dst: stopper.stop(dst.proc.pid))
    try:
        st = QemuMigration(MigrationConfig(size=16 * MIB, workload="idle"), qemu).run()
    finally:
        stopper.end()
    assert stopper.stopped and not stopper.fired, "a destination that does not answer QMP hung the run"
    assert st.status == "failed" and st.completion is None
    assert st.outcome == "error: destination failed: still loading after 0 s (status unanswered)", st.outcome
    assert all(_gone(vm) for vm in started)


# -- a source QEMU that stops answering QMP ----------------------------------------------

class SilentSource(FakeSource):
    """A source QEMU whose query-migrate goes unanswered where ``statuses`` says None
    (QEMU holding its big lock, or stopped); ``kill()`` is recorded."""

    killed = False

    def query(self, name: str, timeout: float, **args):
        answer = self.cmd(name, **args)
        if answer.get("status") == "completed":
            answer["total-time"] = 900             # QEMU's figures are in (no settling poll)
        return None if name == "query-migrate" and answer["status"] is None else answer

    def kill(self) -> None:
        self.killed = True


class LiveDestination:
    def check_alive(self, doing: str) -> None:
        pass


def _polling_run() -> QemuMigration:
    m = QemuMigration(MigrationConfig(size=16 * MIB), QemuBinary("/nonexistent/qemu", "10.0.2"))
    m.t0 = time.monotonic()
    return m


def test_a_late_query_migrate_answer_is_asked_again_not_a_failure():
    # QEMU answers late while it holds its big lock (the switchover under TCG): polling goes on
    m = _polling_run()
    src = SilentSource(["active", None, None, "active", None, "completed"])
    final = m._poll(src, LiveDestination())
    assert final["status"] == "completed" and src.polls == 6 and not src.killed
    assert [s["status"] for s in m.samples] == ["active", "active", "completed"]


def test_a_source_silent_past_the_stall_limit_fails_the_run_and_is_killed(monkeypatch):
    monkeypatch.setattr(qemu_engine, "SOURCE_STALL_LIMIT", 0.0)
    m = _polling_run()
    src = SilentSource(["active", None])
    final = m._poll(src, LiveDestination())
    assert src.killed and final["status"] == "failed" and final["ram"] == {"dirty-sync-count": 1}
    m._collect(final)
    assert m.st.status == "failed" and not m.st.converged and m.st.completion is None
    assert m.st.outcome == "error: source QEMU did not answer query-migrate for 0 s"
    assert _exit_status(m.st) == 1


def test_ctrl_c_while_the_source_does_not_answer_kills_it_and_ends_cancelled():
    # migrate_cancel cannot reach a QEMU that reads nothing: the cancel kills it, never "completed"
    m = _polling_run()
    src = SilentSource(["active", None, None, "completed"])
    m.on_progress = lambda info: m.cancel()
    final = m._poll(src, LiveDestination())
    assert src.killed and src.sent == ["migrate_cancel"] and final["status"] == "cancelled"
    m._collect(final)
    assert m.st.status == "cancelled" and m.st.outcome.startswith("cancelled (the source QEMU did not answer")
    assert _exit_status(m.st, interrupted=True) == 130


def _stop_source_when_active(monkeypatch, started, then) -> Stopper:
    """SIGSTOP the source QEMU (of ``started``, the fixture) at the first poll that saw it
    ``active`` (the engine's progress callback), then call ``then(run)``; a timer resumes it
    (SIGCONT) after HANG, so an engine that ignores the silence ends instead of hanging.
    Returns the Stopper."""
    stopper = Stopper()

    def progress(run, info):
        if info["status"] == "active" and not stopper.stopped:
            stopper.stop(next(vm for vm in started if vm.role == "source").proc.pid)
            then(run)
    _on_progress(monkeypatch, progress)
    return stopper


def test_a_stopped_source_qemu_fails_the_run_at_the_stall_limit(monkeypatch, started):
    # the source stopped (SIGSTOP) mid-migration answers nothing: the run fails at the stall
    # limit (0 here: the first unanswered poll) and the stopped QEMU is killed
    qemu = require_qemu("10.0")
    monkeypatch.setattr(qemu_engine, "SOURCE_STALL_LIMIT", 0.0, raising=False)   # (the old code had none)
    monkeypatch.setattr(qemu_engine, "SOURCE_QUERY_WAIT", 0.2, raising=False)
    stopper = _stop_source_when_active(monkeypatch, started, lambda run: None)
    cfg = MigrationConfig(size=16 * MIB, workload="idle", params=MigrationParams(max_bandwidth=4e6))
    try:
        st = QemuMigration(cfg, qemu).run()
    finally:
        stopper.end()
    assert stopper.stopped and not stopper.fired, "a source QEMU that does not answer QMP hung the run"
    assert st.status == "failed" and st.completion is None and not st.converged
    assert st.outcome == "error: source QEMU did not answer query-migrate for 0 s", st.outcome
    assert st.verification == {} and len(started) == 2 and all(_gone(vm) for vm in started)


def test_a_source_qemu_that_answers_again_completes_the_run(monkeypatch, started):
    # the source stopped (SIGSTOP) mid-migration and resumed (SIGCONT) after two unanswered
    # polls: its late answers are dropped, polling goes on, the run completes and verifies
    qemu = require_qemu("10.0")
    monkeypatch.setattr(qemu_engine, "SOURCE_QUERY_WAIT", 0.2, raising=False)
    stopper = _stop_source_when_active(monkeypatch, started, lambda run: None)
    unanswered: list[str] = []
    real_query = QemuVM.query

    def query(vm, name, timeout, **args):
        answer = real_query(vm, name, timeout, **args)
        if vm.role == "source" and stopper.stopped and answer is None and len(unanswered) < 2:
            unanswered.append(name)
            if len(unanswered) == 2:
                os.kill(vm.proc.pid, signal.SIGCONT)
        return answer
    monkeypatch.setattr(QemuVM, "query", query)
    cfg = MigrationConfig(size=16 * MIB, workload="idle", params=MigrationParams(max_bandwidth=8e6))
    try:
        st = QemuMigration(cfg, qemu).run()
    finally:
        stopper.end()
    assert stopper.stopped and not stopper.fired and unanswered == ["query-migrate", "query-migrate"]
    assert st.status == "completed" and st.completion == "verified", st.outcome
    assert all(_gone(vm) for vm in started)


def test_ctrl_c_ends_a_run_whose_source_qemu_stopped_answering(monkeypatch, capsys, started):
    # SIGSTOP the source mid-migration, then Ctrl-C: migrate_cancel cannot be sent, the
    # source QEMU is killed, the run ends cancelled (exit 130) with its summary, no QEMU left
    require_qemu("10.0")
    stopper = _stop_source_when_active(
        monkeypatch, started, lambda run: os.kill(os.getpid(), signal.SIGINT))   # migrate's handler cancels
    try:
        rc = main(["migrate", "--engine", "qemu", "--qemu", "10.0", "--size", "16M", "--workload", "idle",
                   "--max-bandwidth", "4MB/s", "--json", "--quiet"])
    finally:
        stopper.end()
    out, err = capsys.readouterr()
    assert stopper.stopped and not stopper.fired, "Ctrl-C did not end a run whose source QEMU does not answer"
    d = json.loads(out)
    assert rc == 130 and d["status"] == "cancelled", err
    assert d["npqfile"]["outcome"].startswith("cancelled (the source QEMU did not answer query-migrate"), d
    assert "error: migration cancelled (interrupted)" in err and "Traceback" not in err
    assert len(started) == 2 and all(_gone(vm) for vm in started)


# -- --engine both: Ctrl-C ----------------------------------------------------------------

def test_engine_both_exit_status_follows_the_single_engines_table():
    from npqfile.migration.compare import exit_status
    from npqfile.migration.stats import MigrationStats

    def st(status, ok=True):
        return MigrationStats(status=status, verification={} if ok == "none" else {"ok": ok})
    assert exit_status(st("completed"), st("completed")) == 0
    assert exit_status(st("completed"), st("cancelled")) == 2
    assert exit_status(st("completed"), st("cancelled", "none"), interrupted=True) == 130
    assert exit_status(st("completed", None), st("completed")) == 3       # Ctrl-C after QEMU completed
    assert exit_status(st("failed"), st("cancelled"), interrupted=True) == 1
    assert exit_status(st("completed", False), st("completed")) == 1


def _main_interrupted(argv: list[str]) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C raised KeyboardInterrupt out of the command")


BOTH = ["migrate", "--engine", "both", "--qemu", "10.0", "--size", "16M", "--workload", "idle", "--json", "--quiet"]


def test_ctrl_c_during_the_qemu_side_of_engine_both_cancels_it_and_starts_no_simulator(monkeypatch, capsys,
                                                                                       started):
    require_qemu("10.0")
    hit: list[bool] = []

    def progress(run, info):          # the first poll that sees QEMU migrating: Ctrl-C
        if info["status"] == "active" and not hit:
            hit.append(True)
            os.kill(os.getpid(), signal.SIGINT)
    _on_progress(monkeypatch, progress)
    rc = _main_interrupted([*BOTH, "--max-bandwidth", "4MB/s"])
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert hit and rc == 130, err
    assert d["qemu"]["status"] == "cancelled" and d["qemu"]["npqfile"]["outcome"] == "cancelled", d["qemu"]["status"]
    assert d["simulator"]["status"] == "cancelled"
    assert d["simulator"]["npqfile"]["outcome"] == "cancelled before it started (Ctrl-C during the QEMU run)"
    rows = {r["figure"]: r for r in d["comparison"]}        # nothing measured: nothing compared
    assert rows["transferred"]["simulator"] is None and rows["transferred"]["relative-difference"] is None
    assert rows["transferred"]["qemu"] is not None and rows["status"]["simulator"] == "cancelled"
    assert "interrupted: cancelling the migration" in err and "error: migration cancelled (interrupted)" in err
    assert "Traceback" not in err
    assert len(started) == 2 and all(_gone(vm) for vm in started)


def test_ctrl_c_during_the_simulator_side_of_engine_both_keeps_qemus_result(monkeypatch, capsys):
    require_qemu("10.0")
    import npqfile.migration.session as session
    real_run = session.run_migration

    def interrupted_run(cfg, **kw):
        # Ctrl-C as the simulator starts; its handler's watcher cancels before the run goes on
        os.kill(os.getpid(), signal.SIGINT)
        assert kw["control"].wait(HANG), "Ctrl-C did not reach the control"
        return real_run(cfg, **kw)
    monkeypatch.setattr(session, "run_migration", interrupted_run)
    rc = _main_interrupted(BOTH)
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert rc == 130, err
    assert d["qemu"]["status"] == "completed" and d["qemu"]["npqfile"]["verification"]["ok"] is True
    assert d["simulator"]["status"] == "cancelled" and d["simulator"]["npqfile"]["outcome"] == "cancelled"
    assert "error: migration cancelled (interrupted)" in err and "Traceback" not in err
