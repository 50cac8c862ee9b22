"""Statistics of one live migration, shaped like QEMU's ``query-migrate`` answer.

Supports: :class:`IterationStats` (one dirty-sync period: pages and bytes sent, dirty
pages found at its sync, duration, bandwidth), :class:`WindowStats` (one 100 ms
rate-limit window: bytes queued and the limit), :class:`MigrationStats` (the whole run,
plus npqfile extras: iterations, windows, source RSS before and after, converged /
outcome, verification), and :meth:`MigrationStats.as_dict` which renders
``query-migrate``'s names (``total-time``, ``setup-time``, ``downtime``, ``ram`` with
``transferred`` / ``normal`` / ``duplicate`` / ``dirty-pages-rate`` / ``mbps``...,
``xbzrle-cache`` with ``cache-miss`` / ``encoding-rate``..., ``cpu-throttle-percentage``
with auto-converge), :meth:`MigrationStats.live_dict` (the answer while the run goes
on, for live events) and ``MigrationStats.on_status`` (called at every status change,
as QEMU emits its MIGRATION event).  Every key follows the naming scheme of
npqfile/schemas (QEMU's names, else lowercase-hyphenated).  Released memory is reported
twice, named for what each is: ``release-advised-bytes`` (bytes handed to madvise /
fallocate) and ``released-bytes`` (bytes that held memory before and no longer do:
what the release freed).

Goals: a user who reads QEMU's statistics reads ours the same way: times in
milliseconds, byte counts in bytes, ``mbps`` in megabits per second, zero pages named
``duplicate``.  Plan: plain dataclasses filled by the engine; one rendering function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from npqfile.stream.ram_stats import RAMStats


@dataclass
class IterationStats:
    """One pass of pre-copy between two dirty-bitmap syncs (QEMU: one ``dirty-sync-count`` step)."""
    index: int                  # 1 = the bulk pass over all RAM, then 2, 3... in order
    dirty_pages: int            # pages pending when the pass began (all pages for pass 1)
    pages_sent: int = 0         # page records sent during the pass (any kind)
    bytes_sent: int = 0         # stream bytes queued during the pass (QEMUFile ftell_fast delta)
    duration: float = 0.0       # seconds
    bandwidth: float = 0.0      # bytes/s measured over the pass
    sections: int = 0           # PART sections written in the pass
    final: bool = False         # the stop-and-copy pass (END section)
    sync: int = 0               # dirty-sync-count when the pass began (skips one before the
                                # final pass: the sync that decides completion starts no pass)
    cpu_throttle: int = 0       # auto-converge: cpu-throttle-percentage during the pass

    def as_dict(self) -> dict:
        return {"iteration": self.index, "dirty-sync-count": self.sync, "dirty-pages": self.dirty_pages,
                "pages": self.pages_sent,
                "bytes": self.bytes_sent, "time-ms": round(self.duration * 1000, 3),
                "mbps": round(self.bandwidth * 8 / 1e6, 3), "sections": self.sections, "final": self.final,
                "cpu-throttle-percentage": self.cpu_throttle}


@dataclass
class WindowStats:
    """One rate-limit window (QEMU's BUFFER_DELAY of 100 ms)."""
    start: float                # seconds since the migration started
    duration: float             # seconds the window lasted (sleep included)
    bytes: int                  # bytes queued on the QEMUFile during the window
    limit: int                  # the window's byte limit (0 = unlimited)


@dataclass
class MigrationStats:
    """Everything one migration measured; see the module docstring."""
    status: str = "setup"       # setup, active, pre-switchover, device, completed, cancelled, failed
    outcome: str = ""           # converged, forced, max-iterations, time-limit, error: ...
    converged: bool = False
    total_time: float = 0.0
    setup_time: float = 0.0
    downtime: float = 0.0
    expected_downtime: float = 0.0
    stream_bytes: int = 0       # every stream byte the channel took (QEMUFile ftell at the end)
    page_size: int = 4096
    ram_total: int = 0
    remaining: int = 0          # dirty bytes not sent (non-zero only for a cancelled run)
    dirty_sync_count: int = 0
    dirty_pages_rate: float = 0.0   # pages/s, measured over the last completed pass
    bandwidth: float = 0.0          # bytes/s, last measurement (drives threshold_size)
    window_bandwidth: float = 0.0   # bytes/s of the last rate-limit window
    average_bandwidth: float = 0.0  # completed runs: stream bytes / (total - setup time)
    threshold_size: int = 0         # bytes that fit in downtime_limit at that bandwidth
    part_sections: int = 0
    precopy_bytes: int = 0          # RAM bytes (QEMU's counting) queued while the guest ran
    downtime_bytes: int = 0         # ... while it was stopped
    ram_queued: int = 0             # QEMU's ram_counters.transferred: RAM bytes queued
    ram_transferred: int = 0        # the part of ram_queued the channel actually took
    switchover_time: float = 0.0    # seconds from the start to vm_stop (0: never stopped)
    ram: RAMStats = field(default_factory=RAMStats)
    xbzrle_cache_size: int = 0
    compression: dict = field(default_factory=dict)
    iterations: list[IterationStats] = field(default_factory=list)
    windows: list[WindowStats] = field(default_factory=list)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)   # (t, bytes sent, source RSS)
    rss_before: int = 0             # resident bytes of the source's guest RAM
    rss_after: int = 0
    released_bytes: int = 0         # bytes advised (madvise / fallocate), reported as release-advised-bytes
    release_freed_bytes: int = 0    # of those, bytes that held memory and were freed: released-bytes
    release_unmeasured_bytes: int = 0   # advised where residency could not be read (not in freed)
    release: dict | None = None     # the release-ram record (migration.release_ram; None: not applied)
    cpu_throttle_percentage: int = 0    # auto-converge: the throttle when pre-copy ended
    throttle_events: list = field(default_factory=list)   # throttle.ThrottleEvent, every change
    verification: dict = field(default_factory=dict)
    destination: dict = field(default_factory=dict)
    workload: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    multifd: dict = field(default_factory=dict)     # multifd-bytes and per-channel counts (multifd runs)
    postcopy: dict = field(default_factory=dict)    # source's postcopy statistics (postcopy.py)

    @property
    def transferred(self) -> int:
        """QEMU's ``ram.transferred``: page records (headers, idstrs, data) and the EOS of
        each PART section -- not ``ram_save_setup``'s records nor the END section's EOS,
        which QEMU 7.2 does not count either -- limited to bytes the channel took (QEMU
        counts at queue time; the two differ only for a failed run)."""
        return self.ram_transferred

    @property
    def mbps(self) -> float:
        """``ram.mbps``: for a completed run QEMU's migration_calculate_complete average
        (all stream bytes over total time minus setup time), otherwise the last window's
        rate, as query-migrate reports while active; megabits per second."""
        rate = self.average_bandwidth if self.status == "completed" and self.average_bandwidth else self.bandwidth
        return rate * 8 / 1e6

    @property
    def completion(self) -> str | None:
        """For a completed run: ``verified`` (the destination confirmed equal RAM),
        ``mismatch`` (it holds different RAM) or ``not-verified`` (no verdict could
        come: a QEMU peer, exec:, null:, fd:, or verification off); None otherwise."""
        if self.status != "completed":
            return None
        ok = self.verification.get("ok")
        return "verified" if ok is True else "mismatch" if ok is False else "not-verified"

    # Called as ``on_status(old, new)`` whenever ``status`` changes (the events writer's
    # hook: QEMU emits a MIGRATION event at every migrate_set_state).  Not a field.
    on_status = None

    def __setattr__(self, name: str, value: Any) -> None:
        old = self.__dict__.get(name) if name == "status" else None
        object.__setattr__(self, name, value)
        if name == "status" and old is not None and value != old and self.on_status is not None:
            self.on_status(old, value)

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles (a sweep's worker, deepcopy) leave the hook behind
        state = self.__dict__.copy()
        state.pop("on_status", None)
        return state

    def live_dict(self, *, elapsed: float, ram: RAMStats, transferred: int, remaining: int,
                  mbps: float) -> dict[str, Any]:
        """A ``query-migrate`` answer while the run goes on (the engine's ``query_migrate``):
        the status, times in ms (``total-time`` so far), and ``ram`` / ``xbzrle-cache``
        counters with ``transferred`` as QEMU counts it (bytes queued).  Only the fields
        QEMU reports while active; the final answer is :meth:`as_dict`."""
        secs = max(elapsed, 1e-9)
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": round(elapsed * 1000, 3),
            "setup-time": round(self.setup_time * 1000, 3),
            "expected-downtime": round(self.expected_downtime * 1000, 3),
            "ram": {
                "transferred": transferred,
                "total": self.ram_total,
                "remaining": remaining,
                "duplicate": ram.zero_pages,
                "normal": ram.normal_pages,
                "normal-bytes": ram.normal_pages * self.page_size,
                "skipped": 0,
                "dirty-pages-rate": round(self.dirty_pages_rate, 1),
                "dirty-sync-count": self.dirty_sync_count,
                "mbps": round(mbps, 3),
                "page-size": self.page_size,
                "pages-per-second": round(ram.pages / secs, 1),
            },
        }
        if self.status == "completed":          # as QEMU: downtime once known, before that expected-downtime
            out["downtime"] = round(self.downtime * 1000, 3)
        if self.params.get("auto_converge"):
            out["cpu-throttle-percentage"] = self.cpu_throttle_percentage
        if self.xbzrle_cache_size:
            out["xbzrle-cache"] = self._xbzrle_dict(ram)
        return out

    def _xbzrle_dict(self, r: RAMStats) -> dict[str, Any]:
        """QEMU's ``xbzrle-cache`` object."""
        sent_pages = r.normal_pages + r.xbzrle_pages + r.compressed_pages
        return {
            "cache-size": self.xbzrle_cache_size,
            "bytes": r.xbzrle_bytes,
            "pages": r.xbzrle_pages,
            "cache-miss": r.xbzrle_cache_miss,
            "cache-miss-rate": round(r.xbzrle_cache_miss / sent_pages, 4) if sent_pages else 0.0,
            "encoding-rate": round(r.xbzrle_pages * self.page_size / r.xbzrle_bytes, 3) if r.xbzrle_bytes else 0.0,
            "overflow": r.xbzrle_overflow,
        }

    def window_overshoot(self) -> int:
        """Most bytes any limited window went over its limit (0 when none did or unlimited)."""
        return max((w.bytes - w.limit for w in self.windows if w.limit), default=0)

    def as_dict(self) -> dict[str, Any]:
        """``query-migrate``-style JSON-ready dict (times in ms) plus npqfile extras."""
        r = self.ram
        secs = max(self.total_time, 1e-9)
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": round(self.total_time * 1000, 3),
            "setup-time": round(self.setup_time * 1000, 3),
            "downtime": round(self.downtime * 1000, 3),
            "expected-downtime": round(self.expected_downtime * 1000, 3),
            "ram": {
                "transferred": self.transferred,
                "total": self.ram_total,
                "remaining": self.remaining,
                "duplicate": r.zero_pages,
                "normal": r.normal_pages,
                "normal-bytes": r.normal_pages * self.page_size,
                "skipped": 0,
                "dirty-pages-rate": round(self.dirty_pages_rate, 1),
                "dirty-sync-count": self.dirty_sync_count,
                "mbps": round(self.mbps, 3),
                "page-size": self.page_size,
                "pages-per-second": round(r.pages / secs, 1),
                "precopy-bytes": self.precopy_bytes,
                "downtime-bytes": self.downtime_bytes,
                **({"multifd-bytes": self.multifd["multifd-bytes"]} if self.multifd else {}),
            },
            "npqfile": {
                "outcome": self.outcome,
                "completion": self.completion,
                "converged": self.converged,
                "stream-bytes": self.stream_bytes,
                "part-sections": self.part_sections,
                "threshold-size": self.threshold_size,
                "throughput-mbps": round(self.stream_bytes * 8 / 1e6 / secs, 3),
                "last-window-mbps": round(self.window_bandwidth * 8 / 1e6, 3),
                "transferred-queued": self.ram_queued,
                "switchover-ms": round(self.switchover_time * 1000, 3),
                "pages": {"normal": r.normal_pages, "duplicate": r.zero_pages, "xbzrle": r.xbzrle_pages,
                          "compressed": r.compressed_pages, "xbzrle-unchanged": r.xbzrle_unchanged},
                "iterations": [it.as_dict() for it in self.iterations],
                "windows": {"count": len(self.windows),
                            "max-bytes": max((w.bytes for w in self.windows), default=0),
                            "limit": self.windows[0].limit if self.windows else 0,
                            "max-overshoot": self.window_overshoot()},
                "rss-before": self.rss_before,
                "rss-after": self.rss_after,
                "released-bytes": self.release_freed_bytes,
                "release-advised-bytes": self.released_bytes,
                **({"release-unmeasured-bytes": self.release_unmeasured_bytes}
                   if self.release_unmeasured_bytes else {}),
                "release-ram": self.release,
                "throttle-events": [e.as_dict() for e in self.throttle_events],
                "compression": self.compression,
                "verification": self.verification,
                **({"multifd": self.multifd} if self.multifd else {}),
                "destination": self.destination,
                "workload": self.workload,
                "params": params_dict(self.params),
            },
        }
        if self.params.get("auto_converge"):
            # query-migrate shows it while throttling; after the run: the last value
            out["cpu-throttle-percentage"] = self.cpu_throttle_percentage
        if self.postcopy:
            out["ram"]["postcopy-requests"] = self.postcopy.get("postcopy-requests", 0)
            out["ram"]["postcopy-bytes"] = self.postcopy.get("postcopy-bytes", 0)
            dst = self.destination.get("postcopy") or {}
            if "postcopy-blocktime" in dst:        # QEMU reports it on the destination
                out["postcopy-blocktime"] = dst["postcopy-blocktime"]
            out["npqfile"]["postcopy"] = self.postcopy     # the destination's: npqfile.destination.postcopy
        if self.xbzrle_cache_size:
            out["xbzrle-cache"] = self._xbzrle_dict(r)
        return out


def params_dict(params: dict[str, Any]) -> dict[str, Any]:
    """``MigrationParams`` fields (``dataclasses.asdict``) under QEMU's parameter and
    capability names (``max-bandwidth`` in bytes/s, ``downtime-limit`` in ms as QEMU
    takes it, ``xbzrle-cache-size``, ``release-ram``...), npqfile's own hyphenated
    (``time-limit`` in seconds, ``on-limit``...)."""
    out = {k.replace("_", "-"): v for k, v in params.items()}
    if isinstance(out.get("downtime-limit"), (int, float)):
        out["downtime-limit"] = round(out["downtime-limit"] * 1000, 3)
    return out


def freed_bytes(ram: Any) -> tuple[int, int]:
    """(bytes the releases of ``ram``'s blocks freed so far, bytes released where that
    could not be measured): ``RAMBlockMmap.freed_bytes`` and ``freed_unmeasured`` summed
    over the blocks (a block without the counters counts 0)."""
    return (sum(getattr(b.mmap, "freed_bytes", 0) for b in ram.blocks),
            sum(getattr(b.mmap, "freed_unmeasured", 0) for b in ram.blocks))
