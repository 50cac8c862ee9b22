"""The source side of a live migration: QEMU's ``migration.c``, composing the mechanisms.

Supports :class:`MigrationEngine`, which sends the stream QEMU sends (header and
configuration; the RAM's START, PART and END sections; the ``timer`` and
``globalstate`` FULL sections of a ``-M none`` machine, EOF, vmdesc) from a GuestRAM a
workload keeps dirtying, with the :class:`MigrationParams` of ``options.py``
(re-exported here).  ``cancel()`` is ``migrate_cancel``: it shuts the QEMUFile down so a
send blocked on a stalled peer wakes; the time limit cancels the same way while pages
are still being sent.  Progress: ``on_progress`` after every window and sync,
``query_migrate()`` from any thread.

Goals: QEMU's bytes, decisions and statistics (``stats``); a clear outcome when the
migration cannot converge (``max-iterations`` / ``time-limit``: cancelled, or forced
through stop-and-copy with ``on_limit="force"``); a failed run never reports more RAM
bytes than stream bytes; in pre-copy no guest RAM is released here (the session
releases after the destination's verdict, ``release_ram``).

Plan: one short method per phase of ``migration_thread``: setup
(``qemu_savevm_state_setup``) -> ``RAMState.iterate`` (``ram.py``: QEMU's ``ram.c`` and
``migration_iteration_run``) -> completion (``migration_completion``: stop the guest,
pre-switchover pause, ``ram_save_complete``, devices) or ``postcopy.py``'s switch ->
statistics.  Each mechanism is its own module and reaches the run only through public
objects: ``RAMState`` (bitmap, saver, sections, counters), ``multifd.py``,
``throttle.py`` (fed at each sync), ``release_ram.py``, mapped-ram (the saver), and
``postcopy.py``, which also uses this engine's ``f``, ``writer``, ``params``, ``stats``,
``ram``, ``rs``, ``hash_at_switchover`` / ``switchover_hashes`` and ``report_progress()``.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from npqfile.migration.bandwidth import RateWindows
from npqfile.migration.destination import block_hashes
from npqfile.migration.multifd import AccountedFile, multifd_stats
from npqfile.migration.options import MigrationParams
from npqfile.migration.postcopy import PostcopySource
from npqfile.migration.ram import CHUNK, MAX_WAIT, SCAN, RAMState  # noqa: F401  (the constants' old home)
from npqfile.migration.stats import MigrationStats, freed_bytes
from npqfile.migration.workloads import Workload
from npqfile.qemufile import QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream.devices import machine_devices
from npqfile.stream.savevm import SaveVMWriter


def resident_bytes(ram: GuestRAM) -> int:
    """Resident bytes of the guest RAM's blocks (pagemap), 0 where it cannot be read."""
    try:
        return sum(int(np.count_nonzero(b.resident_pages())) * b.page_size for b in ram.blocks)
    except OSError:
        return 0


class MigrationEngine:
    """Migrates ``ram`` (dirtied by ``workload``) over the writable QEMUFile ``f`` (the
    part of QEMU's ``MigrationState`` the simulator needs; its RAM side is ``rs``).

    ``run()`` returns the MigrationStats; I/O errors end the run with ``status="failed"``.
    ``cancel()`` (any thread) stops it like ``migrate_cancel``.  ``pre_switchover``: a
    callable run while paused before switchover (else ``migrate_continue()`` must be
    called, or the pause lasts until the time limit).  ``on_progress(dict)`` is called
    after every window and sync.  ``hash_at_switchover`` records the source's block
    hashes when the guest stops (``self.switchover_hashes``).  ``rs`` is the run's
    RAMState (None before ``run()``).
    """

    def __init__(self, ram: GuestRAM, f: QEMUFile, workload: Workload | None = None,
                 params: MigrationParams | None = None, *, pre_switchover: Callable | None = None,
                 on_progress: Callable[[dict], None] | None = None, hash_at_switchover: bool = False,
                 multifd: Any = None):
        self.ram = ram
        self.multifd = multifd          # a MultiFDSend: pages go to its channels (npqfile.migration.multifd)
        self.f = f
        self.workload = workload or Workload()
        self.params = params or MigrationParams()
        self.params.check()
        self.pre_switchover = pre_switchover
        self.on_progress = on_progress
        self.hash_at_switchover = hash_at_switchover
        self.switchover_hashes: dict[str, str] = {}
        self.stats = MigrationStats(page_size=4096, ram_total=ram.total_size, params=asdict(self.params))
        self._cancel = threading.Event()
        self._cancel_reason: str | None = None   # the limit that cancelled (None: migrate_cancel)
        self._completing = False        # run() reached migration_completion_end (see cancel())
        if multifd is not None:
            multifd.cancel = self._cancel   # a cancel also ends a wait for a busy channel
        self._continue = threading.Event()
        self.throttle = self.params.auto_converge_state()   # auto-converge (None when off)
        self.rs: RAMState | None = None
        self.postcopy = PostcopySource(self) if self.params.postcopy_after is not None else None

    # -- control from other threads -----------------------------------------------------
    def cancel(self) -> str | None:
        """migrate_cancel: the run ends as ``cancelled``.  Like QEMU, shut the QEMUFile down
        (qemu_file_shutdown) so a send blocked on a stalled peer wakes at once; any
        thread, or a signal handler.  Returns None, or why nothing was done: a run no
        longer running (migration_cancel leaves completed/failed alone), or postcopy
        once the package was sent (QEMU 10.0's qmp_migrate_cancel refuses it: the guest
        runs on the destination).  A cancel racing with the end of ``device`` is
        QEMU's: ``cancelled`` unless the run had already completed, never ``failed``."""
        refused = self.cancel_refused()
        if refused is not None:
            return refused
        status = self.stats.status
        # QEMU's migration_cancel moves the state to CANCELLING with a compare-and-swap,
        # as migration_completion_end moves DEVICE to COMPLETED: exactly one wins.  Here:
        # the flag first, then the run's completion mark (run() does the reverse).
        self._cancel.set()
        if self._completing or status == "completed":
            # the run is at its completion point: it sees this flag and ends cancelled,
            # or it completed first and the flag only ends the wait that follows
            # (postcopy's for SHUT, the session's for the verdict); the file is the run's
            return None
        self._continue.set()                        # leave a pre-switchover pause
        self.f.shutdown()

    def cancel_refused(self) -> str | None:
        """Why ``cancel()`` would do nothing now (None: it would cancel, or end the wait
        that follows a completed pre-copy); changes nothing.  Returns the reason."""
        status, switched = self.stats.status, self.postcopy is not None and self.postcopy.active
        if status in ("failed", "cancelled", "postcopy-paused") or (status == "completed" and switched):
            return f"the migration is {status}: nothing to cancel"
        if switched:
            return "Postcopy migration in progress, cannot cancel."
        return None

    def _time_limit_hit(self) -> None:
        """The time limit's watchdog: while pages are still being sent (setup or
        pre-copy) and ``on_limit`` is cancel, cancel -- even a send blocked on a peer
        that reads nothing.  Forced completion is left to the loop's own check."""
        if self.params.on_limit == "cancel" and self.stats.status in ("setup", "active"):
            self._cancel_reason = "time-limit"
            self.cancel()

    def migrate_continue(self) -> None:
        """Leave the pre-switchover pause."""
        self._continue.set()

    # -- the run ------------------------------------------------------------------------
    def run(self) -> MigrationStats:
        """Migrate; returns the statistics (``status`` completed, cancelled or failed)."""
        p, st = self.params, self.stats
        self.writer = SaveVMWriter(self.f, machine=p.machine, qemu_version=p.qemu_version,
                                   capabilities=("mapped-ram",) if p.mapped_ram else ())
        st.xbzrle_cache_size = p.xbzrle_cache_size
        st.rss_before = resident_bytes(self.ram)
        st.expected_downtime = p.downtime_limit     # migrate_fd_connect
        self._freed0 = freed_bytes(self.ram)
        self.t0 = time.monotonic()
        if p.sample_rss:
            st.timeline.append((0.0, 0, st.rss_before))
        self.windows = RateWindows(AccountedFile(self.f, self.multifd) if self.multifd else self.f, p.max_bandwidth, p.downtime_limit, self.t0, cancel=self._cancel)
        self.windows.on_window = self._window_closed
        rs = self.rs = RAMState(self.ram, self.f, p, st, workload=self.workload, windows=self.windows,
                                writer=self.writer, cancel=self._cancel, t0=self.t0, throttle=self.throttle,
                                multifd=self.multifd, progress=self._progress)
        self.workload.start(self.ram)
        watchdog = threading.Timer(p.time_limit, self._time_limit_hit)
        watchdog.daemon = True
        watchdog.start()
        try:
            self._setup()
            st.status = "active"
            outcome = rs.iterate(self.postcopy.due if self.postcopy is not None else None)
            if outcome == "postcopy":
                self._postcopy_start()
            elif outcome in ("converged", "forced"):
                self._complete()
                st.converged = outcome == "converged"
            else:
                self._cancelled()
            if st.status not in ("cancelled", "completed", "postcopy-paused", "failed"):
                # migration_completion_end: DEVICE -> COMPLETED unless a migrate_cancel
                # moved the state to CANCELLING first (cancel() checks this mark after
                # setting its flag; here the mark comes before the flag is read)
                self._completing = True
                if self._cancel.is_set():
                    raise OSError(errno.ECANCELED, "cancelled in device")
                self.f.fflush()
                if self.f.get_error():
                    raise self.f.error
                st.status = "completed"
                if self.postcopy is not None:
                    self.postcopy.await_close()     # converged in pre-copy: the return path ends with SHUT
        except (OSError, RuntimeError) as exc:   # I/O failure, or the workload thread failed
            if self._cancel.is_set():            # cancel() shut the file down under a send
                self._cancelled()
            else:
                st.status, st.outcome = "failed", f"error: {exc}"
        finally:
            watchdog.cancel()
            if self.multifd is not None:    # the destination sees the channels end
                self.multifd.close(abort=st.status != "completed")
            try:
                self.workload.stop()
            except RuntimeError as exc:
                st.status, st.outcome = "failed", f"error: {exc}"
            self._finish_stats()
        return st

    def _cancelled(self) -> None:
        """End the run as ``cancelled`` (migrate_cancel, or a limit): what was left to
        send, and the file shut down."""
        st = self.stats
        if self._cancel.is_set():
            st.outcome = self._cancel_reason or "cancelled"
        st.status, st.converged = "cancelled", False
        st.remaining = self.rs.dirty * st.page_size
        if st.switchover_time == 0.0:
            st.precopy_bytes = self.rs.transferred()   # what was sent while the guest ran
        self.f.shutdown()

    def _setup(self) -> None:
        """qemu_savevm_state_setup: header, START(ram) with the block list; all pages dirty."""
        rs = self.rs
        rs.init_bitmaps()
        self.writer.write_header()
        if self.postcopy is not None:
            self.postcopy.setup()                   # return path and advise, before any RAM
        rs.save_setup()
        self.f.fflush()
        self.stats.setup_time = time.monotonic() - self.t0
        rs.start_iterations()

    def _stop_guest(self) -> float:
        """vm_stop at the end of pre-copy: the writer has acknowledged, its throttle is
        off (cpu_throttle_stop).  Returns the stop time (time.monotonic())."""
        st = self.stats
        self.rs.close_iteration()
        st.precopy_bytes = self.rs.transferred()
        stop_t = time.monotonic()
        self.workload.pause()
        self.workload.set_throttle(0)
        st.switchover_time = stop_t - self.t0
        self._sample_rss(st.switchover_time)        # the RSS line reaches the switchover
        return stop_t

    def _postcopy_start(self) -> None:
        """Stop the guest (vm_stop) and hand over to the postcopy phase (postcopy.py)."""
        stop_t = self._stop_guest()
        self.stats.status = "device"
        self.postcopy.run(stop_t)               # converged stays False: pre-copy did not

    def switchover_sync(self) -> float:
        """The guest is stopped: the last dirty sync (``rs.last_sync``), then, with
        ``hash_at_switchover``, the source's block hashes.  Returns the seconds spent
        hashing (verification, not migration work: left out of the downtime).  Shared by
        pre-copy completion and the switch to postcopy."""
        self.rs.last_sync()
        if not self.hash_at_switchover:
            return 0.0
        h0 = time.monotonic()
        self.switchover_hashes = block_hashes(self.ram)
        return time.monotonic() - h0

    # -- completion -----------------------------------------------------------------------
    def _complete(self) -> None:
        """migration_completion: stop the guest, sync, send the rest in END, devices, EOF, vmdesc."""
        st, f, rs = self.stats, self.f, self.rs
        stop_t = self._stop_guest()
        if self.params.pause_before_switchover:
            st.status = "pre-switchover"
            self._progress()
            if self.pre_switchover is not None:
                self.pre_switchover(self)
            else:
                self._continue.wait(max(0.0, self.params.time_limit - (time.monotonic() - self.t0)))
            if self._cancel.is_set():
                raise OSError(errno.ECANCELED, "cancelled at pre-switchover")
        st.status = "device"
        excluded = self.switchover_sync()
        f.set_rate_limit(0)                         # completion runs unthrottled
        self.writer.switchover_start()              # QEMU 10.0: MIG_CMD_SWITCHOVER_START
        rs.save_complete()
        devices = machine_devices(self.params.qemu_version, self.params.runstate)
        for se, payload, _desc in devices:
            self.writer.write_full_section(se, payload)
        self.writer.write_eof()
        self.writer.write_vmdesc([desc for _se, _payload, desc in devices])
        f.fflush()
        rs.close_iteration()
        st.downtime = time.monotonic() - stop_t - excluded
        st.downtime_bytes = rs.transferred() - st.precopy_bytes

    # -- reporting --------------------------------------------------------------------------
    def _sample_rss(self, t: float | None = None) -> None:
        """One (time, stream bytes, source RSS) point for the plot, when sampling is on;
        ``t`` in seconds since the start (default: now)."""
        if self.params.sample_rss:
            when = time.monotonic() - self.t0 if t is None else t
            self.stats.timeline.append((when, self.windows.f.ftell_fast(), resident_bytes(self.ram)))

    def _window_closed(self, windows: RateWindows) -> None:
        self.rs.update_expected_downtime(windows)   # migration_update_counters
        self.report_progress()

    def report_progress(self) -> None:
        """A point for the RSS plot (when sampling) and an ``on_progress`` call: after each
        window, and each postcopy section.  Returns None."""
        self._sample_rss()
        self._progress()

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress_info())

    def progress_info(self, status: str | None = None) -> dict:
        """The ``on_progress`` dict now (``status`` overrides the run's: the session
        reports ``wait-verdict`` with it)."""
        elapsed = time.monotonic() - self.t0
        return {"status": status or self.stats.status, "round": self.stats.dirty_sync_count,
                "dirty-pages": self.rs.dirty, "bytes": self.windows.f.ftell_fast(),
                "mbps": self.windows.bandwidth * 8 / 1e6, "elapsed": elapsed,
                "cpu-throttle-percentage": self.throttle.percentage if self.throttle else 0}

    def query_migrate(self) -> dict[str, Any]:
        """The live ``query-migrate`` answer (QEMU's names; callable from any thread,
        e.g. the events writer's 100 ms poll).  Returns just the status before run()."""
        rs = self.rs
        if rs is None:
            return {"status": self.stats.status}
        out = self.stats.live_dict(elapsed=time.monotonic() - self.t0, ram=rs.saver.stats,
                                   transferred=rs.transferred(), remaining=rs.dirty * self.stats.page_size,
                                   mbps=self.windows.bandwidth * 8 / 1e6)
        if self.postcopy is not None:
            out["ram"]["postcopy-requests"] = self.postcopy.requests     # as QEMU's, live
        return out

    def _finish_stats(self) -> None:
        st, rs = self.stats, self.rs
        rs.close_iteration()
        st.total_time = time.monotonic() - self.t0
        st.ram = rs.saver.stats
        # bytes the channel took: queued bytes a failed write never delivered are not
        # "transferred" (no I/O happens here after an error; a completed run is flushed)
        st.stream_bytes = self.f.ftell()
        st.ram_queued = rs.transferred()
        st.ram_transferred = rs.written(st.stream_bytes)
        if self.multifd is not None:
            multifd_stats(self.multifd, st)     # the channels' bytes and pages join the totals
        st.windows = self.windows.windows
        # postcopy's releases (QEMUFile's may_free, and RAMState's); pre-copy's come
        # after the verdict (session) and are added there
        st.released_bytes += self.f.released_bytes
        st.release_freed_bytes, st.release_unmeasured_bytes = (
            now - then for now, then in zip(freed_bytes(self.ram), self._freed0))
        st.rss_after = resident_bytes(self.ram)
        st.workload = self.workload.describe()
        if self.postcopy is not None:
            st.postcopy = {**st.postcopy, **self.postcopy.summary()}
        st.window_bandwidth = st.bandwidth
        if st.status == "completed":
            # migration_calculate_complete: s->mbps becomes the average over the
            # migration after setup (every stream byte / (total time - setup time))
            st.average_bandwidth = st.stream_bytes / max(st.total_time - st.setup_time, 1e-9)
            if st.bandwidth == 0:
                st.bandwidth = st.average_bandwidth      # no window closed: the average
        if self.params.sample_rss:
            st.timeline.append((st.total_time, st.stream_bytes, st.rss_after))
