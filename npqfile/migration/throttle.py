"""auto-converge: QEMU's decision to throttle the guest's vCPUs, as a pure state machine.

Supports: :class:`AutoConverge`, fed one call per dirty-bitmap sync
(``on_sync(now, new_dirty_pages, transferred)``) and answering with the throttle
percentage the guest must run at; :func:`throttle_sleep` (how long a throttled vCPU
sleeps per 10 ms of running); :data:`DEFAULTS` and :func:`check_params` for QEMU's
``migrate-set-parameters`` names and ranges.

The algorithm is QEMU's (``migration/ram.c`` of 7.2 and 10.0, ``cpu-throttle.c``):

- ``migration_bitmap_sync`` looks at the throttle only when more than a second passed
  since the period began (``end_time > time_last_bitmap_sync + 1000``); the period's
  counters (dirty pages newly set in the migration bitmap, RAM bytes transferred)
  restart there, whatever was decided.
- ``migration_trigger_throttle``: ``bytes_dirty_period = pages × page size``,
  ``bytes_dirty_threshold = bytes_xfer_period × throttle-trigger-threshold / 100``
  (integer division, as QEMU's uint64 arithmetic).  When the dirty bytes exceed the
  threshold, ``dirty_rate_high_cnt`` is incremented and, when it reaches 2, reset and
  the guest throttled down.  QEMU never resets the counter when the condition is false,
  so "twice" is "the second time the condition holds", not necessarily two periods in a
  row: we do exactly the same.
- ``mig_throttle_guest_down``: not throttled yet -> ``cpu-throttle-initial``; else
  + ``cpu-throttle-increment``, or with ``cpu-throttle-tailslow`` +
  ``min(cpu_now - cpu_ideal, increment)`` where ``cpu_now = 100 - throttle`` and
  ``cpu_ideal = (uint64)(cpu_now × threshold / dirty)``; capped at ``max-cpu-throttle``.
- ``cpu_throttle_set`` clamps to 1..99 (CPU_THROTTLE_PCT_MIN/MAX).
- A throttled vCPU runs 10 ms (CPU_THROTTLE_TIMESLICE) then sleeps
  ``pct / (1 - pct) × 10 ms`` (+1 ns against rounding): it runs (100 - p) % of the time.
  The workload runner applies that duty cycle (``workloads.Workload.set_throttle``).

Goals: the same decisions as QEMU for the same inputs, testable without a clock: every
input (time, counters) is an argument.  Plan: one small class holding RAMState's
throttle fields (``time_last_bitmap_sync``, ``num_dirty_pages_period``,
``bytes_xfer_prev``, ``dirty_rate_high_cnt``) and cpu-throttle.c's percentage.

Differences from QEMU 10.0 (we follow 7.2): 10.0 counts all migration stream bytes in
``bytes_xfer_period`` (``migration_transferred_bytes``) where 7.2 counts RAM bytes
(``ram_counters.transferred``), and 10.0 forces a bitmap sync every 5 s while throttling
(``cpu_throttle_dirty_sync_timer``); the engine syncs only where 7.2 does.
"""

from __future__ import annotations

from dataclasses import dataclass

CPU_THROTTLE_PCT_MIN = 1
CPU_THROTTLE_PCT_MAX = 99
CPU_THROTTLE_TIMESLICE = 0.010        # seconds a throttled vCPU runs between sleeps
PERIOD = 1.0                          # seconds: the throttle is looked at once per period

# migrate-set-parameters defaults (migration/options.c)
DEFAULTS = {"cpu_throttle_initial": 20, "cpu_throttle_increment": 10, "max_cpu_throttle": 99,
            "throttle_trigger_threshold": 50, "cpu_throttle_tailslow": False}


def check_params(cpu_throttle_initial: int, cpu_throttle_increment: int, max_cpu_throttle: int,
                 throttle_trigger_threshold: int) -> None:
    """QEMU's ``migrate_params_check`` for the throttle parameters; returns None,
    raises ValueError naming the parameter (QEMU's hyphenated name) and its range."""
    def whole(name: str, value: int, lo: int, hi: int, what: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"{name} must be an integer in the range of {what}, got {value!r}")

    whole("throttle-trigger-threshold", throttle_trigger_threshold, 1, 100, "1 to 100")
    whole("cpu-throttle-initial", cpu_throttle_initial, 1, 99, "1 to 99")
    whole("cpu-throttle-increment", cpu_throttle_increment, 1, 99, "1 to 99")
    whole("max-cpu-throttle", max_cpu_throttle, cpu_throttle_initial, 99,
          f"cpu-throttle-initial ({cpu_throttle_initial}) to 99")


def throttle_sleep(percentage: int) -> float:
    """Seconds a vCPU throttled at ``percentage`` sleeps after each 10 ms of running
    (cpu_throttle_thread: ``pct / (1 - pct) × 10 ms + 1 ns``); 0.0 when not throttled."""
    if percentage <= 0:
        return 0.0
    pct = min(percentage, CPU_THROTTLE_PCT_MAX) / 100
    return int(pct / (1 - pct) * 10_000_000 + 1) / 1e9


@dataclass
class ThrottleEvent:
    """One change of the throttle: when (seconds since the start), to what, and the
    period's figures that decided it."""
    time: float
    percentage: int
    bytes_dirty_period: int
    bytes_dirty_threshold: int

    def as_dict(self) -> dict:
        return {"time-ms": round(self.time * 1000, 3), "cpu-throttle-percentage": self.percentage,
                "bytes-dirty-period": self.bytes_dirty_period,
                "bytes-dirty-threshold": self.bytes_dirty_threshold}


class AutoConverge:
    """The auto-converge state of one migration; see the module docstring.

    ``start(now, transferred)`` opens the first period (the setup sync);
    ``on_sync(...)`` returns True when the percentage changed.  ``percentage`` is the
    current throttle (0 = not throttling); ``events`` every change.
    """

    def __init__(self, *, cpu_throttle_initial: int = 20, cpu_throttle_increment: int = 10,
                 max_cpu_throttle: int = 99, throttle_trigger_threshold: int = 50,
                 cpu_throttle_tailslow: bool = False, page_size: int = 4096):
        check_params(cpu_throttle_initial, cpu_throttle_increment, max_cpu_throttle, throttle_trigger_threshold)
        self.initial = cpu_throttle_initial
        self.increment = cpu_throttle_increment
        self.max = max_cpu_throttle
        self.threshold = throttle_trigger_threshold
        self.tailslow = bool(cpu_throttle_tailslow)
        self.page_size = page_size
        self.percentage = 0
        self.dirty_rate_high_cnt = 0
        self.events: list[ThrottleEvent] = []
        self._t0 = 0.0
        self._last_sync = 0.0             # time_last_bitmap_sync
        self._dirty_pages_period = 0      # num_dirty_pages_period
        self._xfer_prev = 0               # bytes_xfer_prev

    def start(self, now: float, transferred: int = 0) -> None:
        """Begin the first period at ``now`` (seconds, any monotonic clock) with
        ``transferred`` RAM bytes sent so far."""
        self._t0 = self._last_sync = now
        self._dirty_pages_period = 0
        self._xfer_prev = transferred

    def on_sync(self, now: float, new_dirty_pages: int, transferred: int) -> bool:
        """migration_bitmap_sync's throttle part: ``new_dirty_pages`` bits newly set in
        the migration bitmap by this sync, ``transferred`` RAM bytes sent so far (QEMU's
        ``ram_counters.transferred``).  Returns True when the throttle changed."""
        self._dirty_pages_period += new_dirty_pages
        if not now - self._last_sync > PERIOD:
            return False
        before = self.percentage
        self.trigger(self._dirty_pages_period * self.page_size, transferred - self._xfer_prev, now)
        self._last_sync = now
        self._dirty_pages_period = 0
        self._xfer_prev = transferred
        return self.percentage != before

    def trigger(self, bytes_dirty_period: int, bytes_xfer_period: int, now: float | None = None) -> None:
        """migration_trigger_throttle for one period's figures; returns None."""
        bytes_dirty_threshold = max(bytes_xfer_period, 0) * self.threshold // 100
        if bytes_dirty_period > bytes_dirty_threshold:
            self.dirty_rate_high_cnt += 1
            if self.dirty_rate_high_cnt >= 2:
                self.dirty_rate_high_cnt = 0
                self.guest_down(bytes_dirty_period, bytes_dirty_threshold)
                when = (self._last_sync if now is None else now) - self._t0
                self.events.append(ThrottleEvent(when, self.percentage, bytes_dirty_period,
                                                 bytes_dirty_threshold))

    def guest_down(self, bytes_dirty_period: int, bytes_dirty_threshold: int) -> None:
        """mig_throttle_guest_down: start at cpu-throttle-initial or step up; returns None."""
        if not self.percentage:
            self._set(self.initial)
            return
        if not self.tailslow:
            inc = self.increment
        else:
            # the guest CPU share that would bring the dirty rate down to the threshold
            cpu_now = 100 - self.percentage
            cpu_ideal = int(cpu_now * (bytes_dirty_threshold * 1.0 / bytes_dirty_period))
            inc = min(cpu_now - cpu_ideal, self.increment)
        self._set(min(self.percentage + inc, self.max))

    def stop(self) -> None:
        """cpu_throttle_stop (the migration ended): the guest runs freely again."""
        self.percentage = 0

    def _set(self, pct: int) -> None:
        """cpu_throttle_set: clamp to 1..99."""
        self.percentage = max(CPU_THROTTLE_PCT_MIN, min(int(pct), CPU_THROTTLE_PCT_MAX))
