"""Cancelling a running migration from outside it: QEMU's ``migrate_cancel`` for a whole run.

Supports: :class:`MigrationControl` -- ``cancel()`` from any thread or a signal handler
(Ctrl-C in ``npqfile migrate``) stops the run wherever it is: while pages are sent the
engine's QEMUFile is shut down (as ``migrate_cancel`` calls ``qemu_file_shutdown``), which
wakes a source blocked in ``sendmsg`` on a stalled peer; while the source waits for the
destination's verdict, the wait ends at once (``wait_fd()`` becomes readable).

Goals: a cancelled run always ends, says it was cancelled and keeps its statistics; the
source's RAM is untouched (nothing is released before a verdict, see ``release_ram``).
Plan: a flag plus a self-pipe; the session attaches its engine while it runs.
"""

from __future__ import annotations

import os
import threading
from typing import Any


class MigrationControl:
    """A cancel switch shared by the caller and one running migration."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()
        self._engine: Any = None
        self._ended: str | None = None      # after the run: why a cancel changes nothing
        self._lock = threading.Lock()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def attach(self, engine: Any) -> None:
        """The session's running engine (None when it has finished); a cancel that came
        earlier is passed on at once.  Returns None."""
        with self._lock:
            if engine is None and self._engine is not None:
                # the run has ended: what a cancel would now say, asked without
                # cancelling (a completed pre-copy's cancel would set its engine's flag)
                self._ended = self._engine.cancel_refused()
            self._engine = engine
        if engine is not None and self.cancelled:
            engine.cancel()

    def cancel(self) -> str | None:
        """migrate_cancel: stop the run at whatever it is doing.  Safe from a signal
        handler (no lock is taken: the engine's cancel only sets a flag and shuts the
        file down).  Returns None, or the engine's reason for not cancelling (postcopy
        in progress, or a run that already ended); a wait for the verdict ends either
        way (``verdict.cancelled_wait`` says what that means)."""
        self._cancelled.set()
        engine = self._engine
        refused = engine.cancel() if engine is not None else self._ended
        try:
            os.write(self._wfd, b"x")        # wake a select() on wait_fd()
        except (BlockingIOError, OSError):
            pass                             # already woken, or closed
        return refused

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for a cancel; returns whether
        the run was cancelled."""
        return self._cancelled.wait(timeout)

    def wait_fd(self) -> int:
        """An fd that becomes readable once ``cancel()`` was called (for select)."""
        return self._rfd

    def close(self) -> None:
        """Close the wake-up pipe.  Returns None."""
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._rfd = self._wfd = -1

    def __enter__(self) -> MigrationControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
