"""Live events (``--events``): QMP-shaped JSON lines of query-migrate answers, the last one the --json result."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

from npqfile.cli import main
from npqfile.migration.events import STATES, EventWriter, read_events
from proc_support import read_line

ROOT = Path(__file__).resolve().parents[1]


def _states(events: list[dict]) -> list[str]:
    return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]


def _check_envelopes(events: list[dict]) -> None:
    stamps = [e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6 for e in events]
    assert stamps == sorted(stamps)
    assert {e["event"] for e in events} <= {"MIGRATION", "query-migrate", "result"}
    assert events[-1]["event"] == "result" and all(e["event"] != "result" for e in events[:-1])
    assert all(e["data"]["status"] in STATES for e in events[:-1])


def test_migrate_events_follow_every_state_and_end_with_the_json_result(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    rc = main(["migrate", "--json", "--quiet", "--size", "4M", "--workload", "uniform:rate=2000",
               "--max-bandwidth", "20MB/s", "--pause-before-switchover", "0", "--events", str(path)])
    result = json.loads(capsys.readouterr().out)
    events = read_events(str(path))
    assert rc == 0
    _check_envelopes(events)
    assert _states(events) == ["setup", "active", "pre-switchover", "device", "completed"]
    assert events[-1]["data"] == result
    live = [e["data"] for e in events if e["event"] != "result" and e["data"]["status"] != "setup"]
    # QEMU's query-migrate names while the run goes on; transferred only grows
    assert all({"total-time", "setup-time", "expected-downtime", "ram"} <= set(d) for d in live)
    sent = [d["ram"]["transferred"] for d in live]
    assert sent == sorted(sent) and all(d["ram"]["total"] == 4 << 20 for d in live)


def test_a_cancelled_run_ends_its_events_cancelled(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    rc = main(["migrate", "--json", "--quiet", "--size", "2M", "--workload", "uniform:rate=8000",
               "--max-bandwidth", "8MB/s", "--downtime-limit", "10", "--max-iterations", "2",
               "--xbzrle-cache", "1M", "--events", str(path)])
    result = json.loads(capsys.readouterr().out)
    events = read_events(str(path))
    assert rc == 2 and _states(events) == ["setup", "active", "cancelled"]
    assert events[-1]["data"] == result
    assert "xbzrle-cache" in events[-2]["data"]


def test_events_on_stdout_move_the_report_to_stderr():
    proc = subprocess.run([sys.executable, "-m", "npqfile", "migrate", "--json", "--size", "2M", "--workload", "idle",
                           "--events", "-"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]     # stdout: event lines only
    assert events[-1]["data"] == json.loads(proc.stderr)


def test_incoming_events_end_with_its_json_result(tmp_path, capsys):
    snap = tmp_path / "snap.bin"
    assert main(["migrate", "--quiet", "--size", "2M", "--workload", "idle", "--to", f"file:{snap}"]) == 0
    capsys.readouterr()
    path = tmp_path / "in.jsonl"
    assert main(["incoming", f"file:{snap}", "--ram", "2M", "--json", "--events", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    events = read_events(str(path))
    _check_envelopes(events)
    assert _states(events) == ["setup", "active", "completed"]
    assert events[-1]["data"] == result
    assert events[-2]["data"]["npqfile"]["stream-bytes"] == snap.stat().st_size

    # a stream for another RAM size: failed, and the events say so
    assert main(["incoming", f"file:{snap}", "--ram", "4M", "--json", "--events", str(path)]) == 1
    events = read_events(str(path))
    assert _states(events)[-1] == "failed" and events[-1]["data"]["status"] == "failed"


def test_writer_marks_state_changes_and_never_raises_into_the_run():
    out = io.StringIO()
    w = EventWriter(out)
    for status in ("setup", "active", "active", "device", "completed"):
        w.emit({"status": status})
    w.result({"status": "completed"})
    kinds = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert kinds == ["MIGRATION", "MIGRATION", "query-migrate", "MIGRATION", "MIGRATION", "result"]

    broken = io.StringIO()
    w = EventWriter(broken)
    broken.close()
    w.emit({"status": "active"})                 # a closed output ends the events, not the migration
    assert w.error is not None and w.lines == 0


def test_polling_runs_every_interval_until_stopped():
    out = io.StringIO()
    w = EventWriter(out, interval=0.01)
    answers = iter(range(1000000))
    w.follow(lambda: {"status": "active", "n": next(answers)})
    deadline = time.monotonic() + 60     # only against a hang: no timing is asserted
    while w.lines < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert w.lines >= 3
    w.stop()
    seen = w.lines
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["data"]["n"] for e in lines] == list(range(seen))
    assert w.lines == seen            # stopped means stopped


def test_an_events_file_that_cannot_be_written_fails_before_the_run(tmp_path, capsys):
    assert main(["migrate", "--quiet", "--size", "1M", "--events", str(tmp_path / "no" / "ev.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--events" in err and "No such file or directory" in err


def test_status_hook_fires_on_changes_only_and_stays_out_of_copies():
    import copy
    import pickle

    from npqfile.migration.stats import MigrationStats

    st, seen = MigrationStats(), []
    st.on_status = lambda old, new: seen.append((old, new))
    st.status = "active"
    st.status = "active"
    st.status = "completed"
    assert seen == [("setup", "active"), ("active", "completed")]
    clone = copy.deepcopy(pickle.loads(pickle.dumps(st)))
    clone.status = "failed"
    assert clone.on_status is None and len(seen) == 2


def test_incoming_over_tcp_with_events_on_stdout_keeps_stdout_json_lines(tmp_path):
    dest = subprocess.Popen([sys.executable, "-m", "npqfile", "incoming", "tcp:127.0.0.1:0", "--ram", "2M", "--json",
                             "--timeout", "60", "--events", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        line = read_line(dest, dest.stderr)             # "listening on" moves to stderr with the report
        assert line.startswith("listening on tcp:127.0.0.1:"), line
        src = subprocess.run([sys.executable, "-m", "npqfile", "migrate", "--quiet", "--size", "2M", "--workload",
                              "idle", "--to", line.split()[-1]], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert src.returncode == 0, src.stderr
        out, err = dest.communicate(timeout=60)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    events = [json.loads(x) for x in out.splitlines()]
    assert _states(events) == ["setup", "active", "completed"]
    assert events[-1]["data"] == json.loads(err)
