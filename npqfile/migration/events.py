"""Live migration events: ``query-migrate`` answers as JSON lines, for notebooks and dashboards.

Supports: :class:`EventWriter`, which writes one JSON object per line to a text stream
(``--events FILE|-`` of ``npqfile migrate`` and ``npqfile incoming``).  Each line is an
envelope shaped like a QMP event::

    {"event": "MIGRATION", "timestamp": {"seconds": S, "microseconds": U}, "data": {...}}

- ``"MIGRATION"``: the status changed (QEMU's MIGRATION event, emitted at every
  ``migrate_set_state``: setup, active, pre-switchover, device, postcopy-active,
  completed, failed, cancelled); ``data`` is the ``query-migrate`` answer at that moment;
- ``"query-migrate"``: the periodic poll (every ``interval``, 100 ms by default, QEMU's
  BUFFER_DELAY), ``data`` again the ``query-migrate`` answer;
- ``"result"``: the last line; its ``data`` equals the command's ``--json`` output.

Feeding it: :meth:`EventWriter.emit` takes one ``query-migrate`` answer (a dict with
QEMU's field names and at least ``status``) and writes a MIGRATION line when the status
differs from the previous answer's, else a query-migrate line -- so any engine that polls
``query-migrate`` (npqfile's simulator, a real QEMU over QMP) feeds it the same way.
:meth:`EventWriter.follow` starts a thread calling ``poll()`` every interval and emitting
its answer; :meth:`EventWriter.attach` wires a :class:`~npqfile.migration.engine.MigrationEngine`
(its ``query_migrate`` as the poll, plus its statistics' status hook so that no state
change, however short, is missed).  :func:`read_events` reads a file back.

Goals: never slow or break the migration (a write error stops the events, not the run);
timestamps from the wall clock like QMP's; lines are flushed at once (``tail -f``).
Plan: one lock around every write; the poll thread is a daemon stopped by ``result``/``close``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import IO, Any

INTERVAL = 0.1              # seconds between polls (QEMU's BUFFER_DELAY, 100 ms)
STATES = ("setup", "active", "pre-switchover", "device", "postcopy-active", "completed", "failed", "cancelled")


def timestamp(now: float | None = None) -> dict[str, int]:
    """QMP's event stamp for the wall-clock time ``now`` (default: now)."""
    now = time.time() if now is None else now
    seconds = int(now)
    return {"seconds": seconds, "microseconds": int(round((now - seconds) * 1e6)) % 1000000}


class EventWriter:
    """Writes event lines to ``out`` (a text stream, left open unless ``owns`` is True).

    A failed write (a closed pipe, a full disk) is recorded in ``error`` and ends the
    events; it never raises into the migration."""

    def __init__(self, out: IO[str], *, interval: float = INTERVAL, owns: bool = False):
        self.out = out
        self.interval = interval
        self.owns = owns
        self.error: OSError | None = None
        self.lines = 0
        self._lock = threading.Lock()
        # held from asking for an answer to writing it, so that a poll answered just
        # before a state change is never written after that change's line
        self._feed = threading.RLock()
        self._last_status: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, target: str, **kw: Any) -> EventWriter:
        """A writer to the file ``target`` (created or truncated), or to stdout for ``-``.
        Raises OSError naming the file when it cannot be opened."""
        import sys

        if target == "-":
            return cls(sys.stdout, **kw)
        try:
            return cls(open(target, "w", encoding="utf-8"), owns=True, **kw)
        except OSError as exc:
            raise OSError(exc.errno, f"--events {target}: {exc.strerror or exc}") from None

    # -- writing ------------------------------------------------------------------------
    def _write(self, event: str, data: dict[str, Any]) -> None:
        line = json.dumps({"event": event, "timestamp": timestamp(), "data": data})
        with self._lock:
            if self.error is not None or self.out is None:
                return
            try:
                self.out.write(line + "\n")
                self.out.flush()
                self.lines += 1
            except (OSError, ValueError) as exc:     # ValueError: write to a closed file
                self.error = exc if isinstance(exc, OSError) else OSError(str(exc))
                self._stop.set()

    def emit(self, answer: dict[str, Any]) -> None:
        """Write one ``query-migrate`` answer: a MIGRATION line when its ``status``
        differs from the last one emitted, else a query-migrate line."""
        with self._lock:
            changed = answer.get("status") != self._last_status
            self._last_status = answer.get("status")
        self._write("MIGRATION" if changed else "query-migrate", answer)

    def result(self, doc: dict[str, Any]) -> None:
        """Stop polling and write the final line (``data`` = the ``--json`` result)."""
        self.stop()
        self._write("result", doc)

    # -- feeding ------------------------------------------------------------------------
    def follow(self, poll: Callable[[], dict[str, Any]]) -> None:
        """Emit ``poll()`` now and then every ``interval`` seconds from a daemon thread,
        until :meth:`stop`.  An exception in ``poll`` ends the polling (and is kept in
        ``poll_error``); the run goes on."""
        self.poll_error: BaseException | None = None

        def loop() -> None:
            while True:
                try:
                    with self._feed:
                        self.emit(poll())
                except Exception as exc:          # a poll must never take the run down
                    self.poll_error = exc
                    return
                if self._stop.wait(self.interval):
                    return

        self._thread = threading.Thread(target=loop, name="migration-events", daemon=True)
        self._thread.start()

    def attach(self, engine: Any) -> None:
        """Follow a MigrationEngine: its ``query_migrate`` every interval, and a line at
        every status change (through ``engine.stats.on_status``)."""
        def changed(_old: str, _new: str) -> None:
            with self._feed:
                self.emit(engine.query_migrate())

        engine.stats.on_status = changed
        self.follow(engine.query_migrate)

    def stop(self) -> None:
        """Stop the poll thread (waits for it); idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def close(self) -> None:
        """Stop, and close ``out`` when this writer opened it."""
        self.stop()
        with self._lock:
            if self.owns and self.out is not None:
                try:
                    self.out.close()
                except OSError as exc:
                    self.error = self.error or exc
            self.out = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str) -> list[dict[str, Any]]:
    """The event lines of ``path`` as dicts (a notebook's first step before pandas).
    Raises ValueError naming the line that is not JSON."""
    events = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    events.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{path}:{number}: not an event line: {exc}") from None
    return events


class IncomingEvents:
    """The destination's events (``npqfile incoming --events``), QEMU's incoming states:
    ``setup`` while waiting for the source, ``active`` while loading (polled: the
    ``total-time`` so far and, under ``npqfile``, the ``stream-bytes`` read), then
    ``completed`` or ``failed`` and the result line.  Every method is a no-op when the
    writer is None."""

    def __init__(self, writer: EventWriter | None):
        self.writer = writer
        self.t0 = time.monotonic()
        if writer is not None:
            writer.emit({"status": "setup"})

    def _answer(self, dest: Any) -> dict[str, Any]:
        f = dest.file
        return {"status": dest.result.status, "total-time": round((time.monotonic() - self.t0) * 1000, 3),
                "npqfile": {"stream-bytes": f.tell() if f is not None else 0}}

    def active(self, dest: Any) -> None:
        """The connection is open and ``dest`` (a Destination) starts loading."""
        if self.writer is not None:
            self.t0 = time.monotonic()
            self.writer.follow(lambda: self._answer(dest))

    def result(self, doc: dict[str, Any]) -> None:
        """The load ended: its status line, then the result line (``doc``: the --json result)."""
        if self.writer is not None:
            self.writer.stop()
            self.writer.emit({"status": doc.get("status"), "total-time": round((time.monotonic() - self.t0) * 1000, 3),
                              "npqfile": {"stream-bytes": doc.get("bytes", 0)}})
            self.writer.result(doc)
