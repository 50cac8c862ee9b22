"""QEMU's bandwidth control for the migration thread: 100 ms windows and a byte budget.

Supports: :class:`RateWindows` -- at the start of each window ``f.reset_rate_limit()``
and ``f.set_rate_limit(max_bandwidth / 10)`` (QEMU: ``XFER_LIMIT_RATIO = 1000 /
BUFFER_DELAY``); ``exceeded()`` (``qemu_file_rate_limit``); ``wait()`` which flushes and
sleeps until the window ends (QEMU's ``migration_rate_limit`` waits on a semaphore with
a timeout: it sleeps, never spins); the bandwidth measured per window (bytes over
elapsed time, sleep included, as ``migration_update_counters`` does) and the resulting
``threshold_size = bandwidth × downtime_limit``; a record of every window's byte count,
so a test can check that no window exceeded its budget by more than one page.

Goals: the limit QEMU users set is the limit that holds, within one page record.
Plan: windows are driven by the engine: ``tick()`` between batches of pages closes the
window once 100 ms have passed; ``wait()`` closes it early when the budget is used up.
"""

from __future__ import annotations

import threading
import time

from npqfile.migration.stats import WindowStats

BUFFER_DELAY = 0.1           # seconds per window (QEMU BUFFER_DELAY = 100 ms)
XFER_LIMIT_RATIO = 10        # windows per second


class RateWindows:
    """Rate-limit windows over the writable QEMUFile ``f``.

    ``max_bandwidth`` in bytes/s (0 = unlimited), ``downtime_limit`` in seconds, ``t0``
    the migration's start (``time.monotonic()``), ``cancel`` an Event that cuts a sleep
    short.  ``windows`` lists closed windows (only when ``record``).
    """

    def __init__(self, f, max_bandwidth: float, downtime_limit: float, t0: float, *,
                 cancel: threading.Event | None = None, record: bool = True):
        self.f = f
        self.max_bandwidth = max(0.0, float(max_bandwidth))
        self.limit = int(self.max_bandwidth / XFER_LIMIT_RATIO)
        self.downtime_limit = downtime_limit
        self.t0 = t0
        self.cancel = cancel or threading.Event()
        self.record = record
        self.windows: list[WindowStats] = []
        self.bandwidth = 0.0          # bytes/s of the last closed window
        self.threshold_size = 0       # bytes that fit in downtime_limit at that rate
        self.on_window = None         # callback(RateWindows) after each closed window
        self._start = t0
        self._start_bytes = 0
        self.open(t0)

    def open(self, now: float | None = None) -> None:
        """Start a window: reset the QEMUFile's counter and set its budget."""
        self._start = time.monotonic() if now is None else now
        self._start_bytes = self.f.ftell_fast()
        self.f.reset_rate_limit()
        self.f.set_rate_limit(self.limit)

    def exceeded(self) -> bool:
        """True when the window's budget is spent (or the file has an error)."""
        return self.f.rate_limit()

    def _close(self, now: float) -> None:
        sent = self.f.ftell_fast() - self._start_bytes
        elapsed = max(now - self._start, 1e-6)
        self.bandwidth = sent / elapsed
        self.threshold_size = int(self.bandwidth * self.downtime_limit)
        if self.record:
            self.windows.append(WindowStats(self._start - self.t0, elapsed, sent, self.limit))
        if self.on_window is not None:
            self.on_window(self)

    def tick(self) -> bool:
        """Close the window if it has lasted BUFFER_DELAY and open the next.  Returns True
        when a window was closed (the bandwidth estimate was updated)."""
        now = time.monotonic()
        if now - self._start < BUFFER_DELAY:
            return False
        self._close(now)
        self.open(now)
        return True

    def wait(self) -> None:
        """The budget is spent: flush, sleep until the window ends, open the next one."""
        self.f.fflush()
        remaining = self._start + BUFFER_DELAY - time.monotonic()
        if remaining > 0:
            self.cancel.wait(remaining)
        now = time.monotonic()
        self._close(now)
        self.open(now)
