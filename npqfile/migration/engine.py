"""The source side of a live migration: QEMU's pre-copy loop over a GuestRAM that keeps changing.

Supports: :class:`MigrationParams` (``max_bandwidth``, ``downtime_limit``,
``max_iterations``, ``time_limit`` with ``on_limit`` = cancel or force, zero-page
detection, XBZRLE with a cache size, zlib page compression, ``release_ram``,
``pause_before_switchover``) and :class:`MigrationEngine`, which sends the stream QEMU
sends: header and configuration; a START section for ``ram`` (the MEM_SIZE setup); PART
sections, each filled like ``ram_save_iterate`` (pages until the rate limit is hit or
50 ms passed, then EOS); at completion the END section with the remaining dirty pages;
the ``timer`` and ``globalstate`` FULL sections of a ``-M none`` machine, EOF, vmdesc.

The algorithm is QEMU's (``migration_iteration_run``, ``ram_save_pending``,
``migration_completion``): a migration bitmap starts all set; pages are sent from a
cursor that wraps around RAM; when the dirty bytes still to send drop below
``threshold_size = bandwidth × downtime_limit`` the guest's dirty log is synced into the
bitmap (``dirty-sync-count`` + 1); if the total is still below the threshold, the guest
is stopped (the workload acknowledges), the bitmap synced a last time and everything
left is sent without a rate limit.  XBZRLE is off until the page search first wraps
past the last block (``find_dirty_block``).  With ``auto_converge`` each sync feeds the
throttle decision (``throttle``), which slows the workload as QEMU slows vCPUs.  In
pre-copy the engine releases no guest RAM: the source holds the only running copy
until the destination's verdict (``release_ram`` decides; the session releases after
the verdict); in postcopy pages are released once sent (``postcopy``).  ``cancel()`` shuts the QEMUFile down as ``migrate_cancel`` does, so a
source blocked in ``sendmsg`` on a stalled peer wakes; the time limit cancels the same
way while pages are still being sent.  The statistics count RAM bytes as QEMU 7.2's
``ram_counters.transferred`` does (page records and PART EOS; not the setup records,
not the END EOS), then keep only what the
channel took: a failed run never reports more RAM bytes than stream bytes.

Goals: QEMU's bytes, QEMU's decisions, QEMU's statistics (see ``stats``); a clear outcome
when the migration cannot converge (``max-iterations`` / ``time-limit``: cancelled, or
forced through stop-and-copy with ``on_limit="force"``).  Plan: one method per phase.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from npqfile.migration.bandwidth import RateWindows
from npqfile.migration.destination import block_hashes
from npqfile.migration.multifd import AccountedFile, multifd_stats, save_pages_multifd
from npqfile.migration.postcopy import PostcopySource
from npqfile.migration.release_ram import release_runs
from npqfile.migration.stats import IterationStats, MigrationStats, freed_bytes
from npqfile.migration.throttle import AutoConverge
from npqfile.migration.throttle import check_params as check_throttle_params
from npqfile.migration.workloads import Workload
from npqfile.qemufile import (
    RAM_CONTROL_FINISH,
    RAM_CONTROL_ROUND,
    RAM_CONTROL_SETUP,
    QEMUFile,
)
from npqfile.ram import GuestRAM
from npqfile.stream.constants import (
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
)
from npqfile.stream.devices import machine_devices, ram_entry
from npqfile.stream.ram_saver import RAMSaver
from npqfile.stream.savevm import SaveVMWriter
from npqfile.stream.versions import stream_version

MAX_WAIT = 0.05            # ram_save_iterate: a PART section lasts at most 50 ms
CHUNK = 1024               # pages per save_pages call between time checks (QEMU checks every 64)
SCAN = 1 << 16             # bitmap bits examined per search for dirty pages


@dataclass
class MigrationParams:
    """The knobs of ``migrate-set-parameters`` / ``migrate-set-capabilities`` we model.

    Bandwidth in bytes/s (0 = unlimited), times in seconds.  ``on_limit``: what to do when
    ``max_iterations`` or ``time_limit`` is reached without converging: ``cancel`` (QEMU's
    migrate_cancel) or ``force`` (stop-and-copy anyway, with a longer downtime).
    ``release_ram`` is the capability; the engine itself releases nothing (when the
    source may release is ``release_ram.may_release``'s rule, applied by the session)."""
    max_bandwidth: float = 0.0
    downtime_limit: float = 0.3
    max_iterations: int = 30
    time_limit: float = 60.0
    on_limit: str = "cancel"
    zero_page_detection: bool = True
    xbzrle_cache_size: int = 0
    compress_level: int | None = None
    release_ram: bool = False
    pause_before_switchover: bool = False
    machine: str = "none"
    runstate: str = "running"
    sample_rss: bool = False
    multifd_channels: int = 0           # QEMU's multifd capability + multifd-channels (0: off)
    multifd_compression: str = "none"
    multifd_zero_page: str = "multifd"  # zero-page-detection with multifd: multifd | legacy | none
    qemu_version: str = "7.2"       # the QEMU whose stream is written (npqfile.stream.versions)
    mapped_ram: bool = False        # QEMU 9.0+ mapped-ram file layout (a file: destination)
    # auto-converge capability and its migrate-set-parameters (QEMU's names; see throttle)
    auto_converge: bool = False
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99
    throttle_trigger_threshold: int = 50
    cpu_throttle_tailslow: bool = False
    postcopy_after: int | str | None = None    # postcopy: after N dirty syncs, or "auto" (see postcopy.py)

    def check(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        version = stream_version(self.qemu_version)
        if self.compress_level is not None:
            version.check_compress_pages()
        if self.mapped_ram:
            version.check_mapped_ram()
            if self.xbzrle_cache_size or self.compress_level is not None:
                raise ValueError("mapped-ram cannot be combined with XBZRLE or page compression (QEMU refuses both)")
        if self.max_bandwidth < 0:
            raise ValueError(f"max_bandwidth must not be negative ({self.max_bandwidth})")
        if self.downtime_limit < 0:
            raise ValueError(f"downtime_limit must not be negative ({self.downtime_limit})")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be at least 1 ({self.max_iterations})")
        if self.time_limit <= 0:
            raise ValueError(f"time_limit must be positive ({self.time_limit})")
        if self.on_limit not in ("cancel", "force"):
            raise ValueError(f"on_limit must be cancel or force, not {self.on_limit!r}")
        if self.multifd_channels:
            from npqfile.migration.multifd import check_params
            check_params(self)
        pa = self.postcopy_after
        if pa is not None and pa != "auto" and (not isinstance(pa, int) or pa < 0):
            raise ValueError(f"postcopy_after must be a number of dirty syncs >= 0 or 'auto', not {pa!r}")
        if pa is not None and (self.multifd_channels or self.mapped_ram):
            # QEMU sends postcopy pages on the main channel only; mapped-ram is a file: layout
            raise ValueError("postcopy cannot be combined with multifd channels or mapped-ram here")
        size = self.xbzrle_cache_size
        if size and (size < 4096 or size & (size - 1)):
            raise ValueError(f"xbzrle cache size {size} must be a power of two >= 4096")
        check_throttle_params(self.cpu_throttle_initial, self.cpu_throttle_increment,
                              self.max_cpu_throttle, self.throttle_trigger_threshold)

    def auto_converge_state(self, page_size: int = 4096) -> AutoConverge | None:
        """The auto-converge decision state these parameters describe (None when off)."""
        if not self.auto_converge:
            return None
        return AutoConverge(cpu_throttle_initial=self.cpu_throttle_initial,
                            cpu_throttle_increment=self.cpu_throttle_increment,
                            max_cpu_throttle=self.max_cpu_throttle,
                            throttle_trigger_threshold=self.throttle_trigger_threshold,
                            cpu_throttle_tailslow=self.cpu_throttle_tailslow, page_size=page_size)


def resident_bytes(ram: GuestRAM) -> int:
    """Resident bytes of the guest RAM's blocks (pagemap), 0 where it cannot be read."""
    try:
        return sum(int(np.count_nonzero(b.resident_pages())) * b.page_size for b in ram.blocks)
    except OSError:
        return 0


class MigrationEngine:
    """Migrates ``ram`` (dirtied by ``workload``) over the writable QEMUFile ``f``.

    ``run()`` returns the MigrationStats; I/O errors end the run with ``status="failed"``.
    ``cancel()`` (any thread) stops it like ``migrate_cancel``.  ``pre_switchover``: a
    callable run while paused before switchover (else ``migrate_continue()`` must be
    called, or the pause lasts until the time limit).  ``on_progress(dict)`` is called
    after every window and sync.  ``hash_at_switchover`` records the source's block
    hashes when the guest stops (``self.switchover_hashes``).
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
        if multifd is not None:
            multifd.cancel = self._cancel   # a cancel also ends a wait for a busy channel
        self._continue = threading.Event()
        self._blocks = ram.blocks
        self._bitmap = {b.name: np.zeros(b.n_pages, dtype=bool) for b in self._blocks}
        self._dirty = 0                 # QEMU migration_dirty_pages
        self._cursor = (0, 0)           # (block index, page): where the next search starts
        self._iter: IterationStats | None = None
        self._iter_t0 = 0.0
        self._iter_bytes0 = 0
        self._sync_t = 0.0              # start of the current dirty-rate period
        self.throttle = self.params.auto_converge_state()   # auto-converge (None when off)
        self._rate_pages = 0            # pages dirtied in it
        self._rate_known = False        # QEMU: dirty_pages_rate set (a sync after >= 1 s)
        self._remaining_at_sync = 0     # QEMU: ram_counters.remaining (bytes dirty at the last sync)
        # ram.transferred accounting: RAM-section bytes QEMU does not count (the setup
        # records and the END section's EOS), and per RAM section (stream offset of its
        # payload, counted bytes before it) to tell the bytes written from those queued
        self._uncounted = 0
        self._marks: list[tuple[int, int]] = []
        self.postcopy = PostcopySource(self) if self.params.postcopy_after is not None else None
        self._last_sync_dirty: int | None = None

    # -- control from other threads -----------------------------------------------------
    def cancel(self) -> str | None:
        """migrate_cancel: the run ends as ``cancelled``.  Like QEMU, shut the QEMUFile down
        (qemu_file_shutdown) so a send blocked on a stalled peer wakes at once; any
        thread, or a signal handler.  Returns None, or why nothing was done: a run no
        longer running (migration_cancel leaves completed/failed alone), or postcopy
        once the package was sent (QEMU 10.0's qmp_migrate_cancel refuses it: the guest
        runs on the destination)."""
        status, switched = self.stats.status, self.postcopy is not None and self.postcopy.active
        if status == "completed" and not switched:
            return None     # pre-copy: what remains is the session's wait for the verdict, which ends
        if status in ("completed", "failed", "cancelled", "postcopy-paused"):
            return f"the migration is {status}: nothing to cancel"
        if switched:
            return "Postcopy migration in progress, cannot cancel."
        self._cancel.set()
        self._continue.set()                        # leave a pre-switchover pause
        self.f.shutdown()

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
        self.saver = RAMSaver(self.f, self.ram, zero_page_detection=p.zero_page_detection,
                              xbzrle_cache_size=p.xbzrle_cache_size, compress_level=p.compress_level,
                              mapped_ram=p.mapped_ram)
        self.saver.xbzrle_enabled = False          # QEMU: no XBZRLE during the bulk stage
        self.writer = SaveVMWriter(self.f, machine=p.machine, qemu_version=p.qemu_version,
                                   capabilities=("mapped-ram",) if p.mapped_ram else ())
        self._ram_se = ram_entry(p.qemu_version)
        st.xbzrle_cache_size = p.xbzrle_cache_size
        st.rss_before = resident_bytes(self.ram)
        st.expected_downtime = p.downtime_limit     # migrate_fd_connect
        self._freed0 = freed_bytes(self.ram)
        self.t0 = time.monotonic()
        if p.sample_rss:
            st.timeline.append((0.0, 0, st.rss_before))
        self.windows = RateWindows(AccountedFile(self.f, self.multifd) if self.multifd else self.f, p.max_bandwidth, p.downtime_limit, self.t0, cancel=self._cancel)
        self.windows.on_window = self._window_closed
        self.workload.start(self.ram)
        watchdog = threading.Timer(p.time_limit, self._time_limit_hit)
        watchdog.daemon = True
        watchdog.start()
        try:
            self._setup()
            st.status = "active"
            outcome = self._iterate()
            if outcome == "postcopy":
                self._postcopy_start()
            elif outcome in ("converged", "forced"):
                self._complete()
                st.converged = outcome == "converged"
            else:
                self._cancelled()
            if st.status not in ("cancelled", "completed", "postcopy-paused", "failed"):
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
        st.remaining = self._dirty * st.page_size
        if st.switchover_time == 0.0:
            st.precopy_bytes = self._ram_counted()   # what was sent while the guest ran
        self.f.shutdown()

    def _setup(self) -> None:
        """qemu_savevm_state_setup: header, START(ram) with the block list; all pages dirty."""
        for b in self._blocks:
            b.sync_dirty()                          # start dirty logging from a clean log
            self._bitmap[b.name][:] = True          # ram_list_init_bitmaps: everything to send
        self._dirty = sum(b.n_pages for b in self._blocks)
        self.stats.dirty_sync_count = 1
        self.writer.write_header()
        if self.postcopy is not None:
            self.postcopy.setup()                   # return path and advise, before any RAM
        self.f.ram_control_before_iterate(RAM_CONTROL_SETUP)
        with self._ram_section(QEMU_VM_SECTION_START):
            self.saver.save_setup(self._multifd_sync)
            # ram_save_setup's MEM_SIZE, block list and EOS: not in ram_counters.transferred
            self._uncounted = self.saver.stats.pages_bytes
        self.f.fflush()
        self.stats.setup_time = time.monotonic() - self.t0
        self._sync_t = time.monotonic()
        if self.throttle is not None:
            self.throttle.start(self._sync_t - self.t0, self._ram_counted())
        self._new_iteration(self._dirty)

    @contextlib.contextmanager
    def _ram_section(self, section_type: int) -> Iterator[None]:
        """A ``ram`` section whose payload start is remembered for ``_ram_written``."""
        with self.writer.section(self._ram_se, section_type):
            self._marks.append((self.f.ftell_fast(), self._ram_counted()))
            yield

    def _ram_counted(self) -> int:
        """QEMU's ram_counters.transferred so far: every page record (header, idstr,
        payload) and each PART's EOS as ``ram_transferred_add`` counts them -- bytes
        queued on the QEMUFile, whether or not they were written yet."""
        return self.saver.stats.pages_bytes - self._uncounted

    def _ram_written(self, written: int) -> int:
        """Of the counted RAM bytes, those inside the first ``written`` stream bytes.
        A RAM section's counted bytes are the start of its payload, so each section
        contributes what lies before ``written``; after a failed write nothing more is
        written (puts are no-ops), so later sections contribute nothing."""
        marks = self._marks + [(None, self._ram_counted())]
        total = 0
        for (off, before), (_next, after) in itertools.pairwise(marks):
            total += max(0, min(written - off, after - before))
        return total

    def _new_iteration(self, dirty: int, final: bool = False) -> None:
        """Open the next iteration (numbered 1, 2, 3... in order; ``sync`` records the
        dirty-sync-count it started at, which may skip: the sync that leads to
        completion starts no pre-copy iteration)."""
        self._close_iteration()
        self._iter = IterationStats(len(self.stats.iterations) + 1, dirty, final=final,
                                    sync=self.stats.dirty_sync_count,
                                    cpu_throttle=self.throttle.percentage if self.throttle else 0)
        self._iter_t0 = time.monotonic()
        self._iter_bytes0 = self.windows.f.ftell_fast()     # multifd channels included
        self._iter_pages0 = self.saver.stats.pages + (self.multifd.queued_pages if self.multifd else 0)
        self.stats.iterations.append(self._iter)

    def _close_iteration(self) -> None:
        it = self._iter
        if it is None:
            return
        it.duration = time.monotonic() - self._iter_t0
        it.bytes_sent = self.windows.f.ftell_fast() - self._iter_bytes0
        it.pages_sent = (self.saver.stats.pages + (self.multifd.queued_pages if self.multifd else 0)
                         - self._iter_pages0)
        it.bandwidth = it.bytes_sent / max(it.duration, 1e-9)
        self._iter = None

    def _threshold(self) -> int:
        """threshold_size from the last window's bandwidth (bytes/s × downtime_limit); 0
        before the first window closed, as in QEMU (only an empty bitmap completes then)."""
        bw = self.windows.bandwidth
        self.stats.bandwidth = bw
        self.stats.threshold_size = int(bw * self.params.downtime_limit)
        return self.stats.threshold_size

    def _iterate(self) -> str:
        """The pre-copy loop; returns converged, forced, cancelled, max-iterations or time-limit."""
        p, st = self.params, self.stats
        ps = st.page_size
        while True:
            if self._cancel.is_set():
                return "cancelled"
            threshold = self._threshold()
            synced = self._dirty * ps < threshold
            if synced:                                  # ram_save_pending: sync when little is left
                self._sync()
            pending = self._dirty * ps
            if not pending or pending < threshold:      # migration_iteration_run: complete
                st.outcome = "converged"
                return "converged"
            if self.postcopy is not None and self._postcopy_due(synced):
                return "postcopy"
            if synced:
                if st.dirty_sync_count > p.max_iterations:
                    return self._limit("max-iterations")
                self._new_iteration(self._dirty)
            if time.monotonic() - self.t0 > p.time_limit:
                return self._limit("time-limit")
            self._send_part()
            if self.f.get_error():
                raise self.f.error
            if self.windows.exceeded():
                self.windows.wait()
            else:
                self.windows.tick()

    def _postcopy_due(self, synced: bool) -> bool:
        """migrate-start-postcopy as guestperf issues it: once dirty-sync-count exceeds
        ``postcopy_after``; with ``auto``, at the first sync whose dirty pages did not
        shrink since the previous sync (pre-copy stopped making progress)."""
        pa = self.params.postcopy_after
        if pa != "auto":
            return self.stats.dirty_sync_count > pa
        if not synced:
            return False
        last, self._last_sync_dirty = self._last_sync_dirty, self._dirty
        return last is not None and self._dirty >= last

    def _postcopy_start(self) -> None:
        """Stop the guest (vm_stop) and hand over to the postcopy phase (postcopy.py)."""
        st = self.stats
        self._close_iteration()
        st.precopy_bytes = self._ram_counted()
        stop_t = time.monotonic()
        self.workload.pause()
        self.workload.set_throttle(0)               # cpu_throttle_stop
        st.switchover_time = stop_t - self.t0
        self._sample_rss(st.switchover_time)
        st.status = "device"
        self.postcopy.run(stop_t)               # converged stays False: pre-copy did not

    def _limit(self, why: str) -> str:
        if self.params.postcopy_after == "auto":
            self.stats.outcome = f"postcopy: {why}"
            return "postcopy"               # auto: a run that cannot converge switches
        self.stats.outcome = why if self.params.on_limit == "cancel" else f"forced: {why}"
        return "forced" if self.params.on_limit == "force" else why

    def _sync(self) -> None:
        """migration_bitmap_sync: OR each block's dirty log into the migration bitmap."""
        now = time.monotonic()
        new = 0
        for b in self._blocks:
            idx = b.sync_dirty()
            bm = self._bitmap[b.name]
            fresh = idx[~bm[idx]]
            bm[fresh] = True
            self._dirty += fresh.size
            new += fresh.size       # QEMU counts bits newly set, not pages still waiting
        if self.stats.status == "active":           # the guest ran for the whole period
            self._auto_converge(now, new)
            # QEMU updates dirty-pages-rate over periods of at least a second; a run
            # shorter than that reports the rate since the start
            self._rate_pages += new
            period = now - self._sync_t
            self._rate_known |= period >= 1.0
            if period >= 1.0 or not self.stats.dirty_pages_rate:
                self.stats.dirty_pages_rate = self._rate_pages / max(period, 1e-6)
                self._sync_t, self._rate_pages = now, 0
        self.stats.dirty_sync_count += 1
        self._remaining_at_sync = self._dirty * self.stats.page_size
        self.saver.generation = self.stats.dirty_sync_count
        self._progress()

    def _auto_converge(self, now: float, new: int) -> None:
        """migration_trigger_throttle at this sync; a new percentage throttles the writer."""
        if self.throttle is not None and self.throttle.on_sync(now - self.t0, new, self._ram_counted()):
            self.stats.cpu_throttle_percentage = self.throttle.percentage
            self.stats.throttle_events = self.throttle.events
            self.workload.set_throttle(self.throttle.percentage)

    def _send_part(self) -> None:
        """One PART section: pages until the rate limit is hit or MAX_WAIT passed, then EOS."""
        f = self.f
        limited = self.windows.limit > 0
        deadline = time.monotonic() + MAX_WAIT
        with self._ram_section(QEMU_VM_SECTION_PART):
            f.ram_control_before_iterate(RAM_CONTROL_ROUND)
            while self._dirty:
                self._send_some(CHUNK, limited)
                if (limited and self.windows.exceeded()) or time.monotonic() >= deadline or f.get_error():
                    break
            f.ram_control_after_iterate(RAM_CONTROL_ROUND)
            self.saver.write_eos()
        self.stats.part_sections += 1
        if self._iter is not None:
            self._iter.sections += 1

    def _next_dirty(self, limit: int) -> tuple[Any, np.ndarray]:
        """Up to ``limit`` dirty pages of one block from the cursor on (wrapping around RAM)."""
        bi, page = self._cursor
        for _ in range(2 * len(self._blocks) + 1):
            block = self._blocks[bi]
            bm = self._bitmap[block.name]
            while page < block.n_pages:
                end = min(page + SCAN, block.n_pages)
                idx = np.flatnonzero(bm[page:end])
                if idx.size:
                    return block, idx[:limit] + page
                page = end
            bi, page = (bi + 1) % len(self._blocks), 0
            if bi == 0:
                self._multifd_sync()
                if self.saver.cache is not None:
                    # find_dirty_block: "After the first round, enable XBZRLE" -- when the
                    # search wraps past the last block, not at the first sync
                    self.saver.xbzrle_enabled = True
        return None, np.empty(0, dtype=np.int64)

    def _send_some(self, limit: int, rate_limited: bool) -> int:
        """Send up to ``limit`` dirty pages; returns how many were sent."""
        block, idx = self._next_dirty(limit)
        if block is None:
            self._dirty = 0
            return 0
        if self.multifd is not None:
            n = save_pages_multifd(self.multifd, self.saver, block, idx)
        else:
            n = self.saver.save_pages(block, idx, rate_limited=rate_limited)
        sent = idx[:n]
        if self.saver.release_ram and n:
            # only postcopy turns this on (release_ram.may_release(POSTCOPY)): ZERO records
            # carry no memory for QEMUFile to release once written, so release them here
            self._release_zero(block, sent[self.saver.sent_zero])
        self._bitmap[block.name][sent] = False
        self._dirty -= n
        if n:
            self._cursor = (self._blocks.index(block), int(sent[-1]) + 1)
            if self.multifd is not None and self._cursor == (len(self._blocks) - 1, block.n_pages):
                self._cursor = (0, 0)           # the end of RAM: find_dirty_block wraps
                self._multifd_sync()
        return n

    # -- release-ram in postcopy (release_ram.may_release(POSTCOPY)); pre-copy releases
    # -- nothing here: the session releases after the destination's verdict
    def _release_clean(self) -> None:
        """ram_postcopy_migrated_memory_release: release every page already sent and not
        dirty (the destination has it and runs the guest)."""
        for b in self._blocks:
            self.stats.released_bytes += release_runs(b, ~self._bitmap[b.name])

    def _release_zero(self, block, zero: np.ndarray) -> None:
        """Release the pages ``zero`` just sent as ZERO records (QEMU's save_zero_page
        releases each one under release-ram in postcopy): one call for the batch, one
        release per run of adjacent pages."""
        if zero.size:
            mask = np.zeros(block.n_pages, dtype=bool)
            mask[zero] = True
            self.stats.released_bytes += release_runs(block, mask)

    def _multifd_sync(self) -> None:
        """multifd_ram_flush_and_sync at the end of each pass, in the setup and at
        completion: SYNC on every channel, then RAM_SAVE_FLAG_MULTIFD_FLUSH here."""
        if self.multifd is not None:
            self.multifd.flush_and_sync()
            self.f.put_be64(RAM_SAVE_FLAG_MULTIFD_FLUSH)
            self.saver.stats.pages_bytes += 8
            self.f.fflush()     # the destination's channels wait on it: it must not sit in our buffer

    # -- completion -----------------------------------------------------------------------
    def _complete(self) -> None:
        """migration_completion: stop the guest, sync, send the rest in END, devices, EOF, vmdesc."""
        st, f = self.stats, self.f
        self._close_iteration()
        st.precopy_bytes = self._ram_counted()
        stop_t = time.monotonic()
        self.workload.pause()                       # vm_stop: the writer has acknowledged
        self.workload.set_throttle(0)               # cpu_throttle_stop
        st.switchover_time = stop_t - self.t0
        self._sample_rss(st.switchover_time)        # the RSS line reaches the switchover
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
        self._sync()
        self._new_iteration(self._dirty, final=True)
        excluded = 0.0
        if self.hash_at_switchover:
            h0 = time.monotonic()
            self.switchover_hashes = block_hashes(self.ram)
            excluded = time.monotonic() - h0        # verification, not migration work
        self.saver.last_stage = True
        self.saver.generation = st.dirty_sync_count
        f.set_rate_limit(0)                         # completion runs unthrottled
        self.writer.switchover_start()              # QEMU 10.0: MIG_CMD_SWITCHOVER_START
        with self._ram_section(QEMU_VM_SECTION_END):
            f.ram_control_before_iterate(RAM_CONTROL_FINISH)
            # stop at the first error, as ram_save_complete does: pages "sent" into a
            # failed QEMUFile would only inflate the counters
            while self._dirty and not f.get_error():
                if not self._send_some(CHUNK, False):
                    break
            f.ram_control_after_iterate(RAM_CONTROL_FINISH)
            self._multifd_sync()
            self.saver.write_mapped_ram_bitmaps()   # ram_save_file_bmap
            self.saver.write_eos()
            self._uncounted += 8                    # ram_save_complete's EOS is not counted
        devices = machine_devices(self.params.qemu_version, self.params.runstate)
        for se, payload, _desc in devices:
            self.writer.write_full_section(se, payload)
        self.writer.write_eof()
        self.writer.write_vmdesc([desc for _se, _payload, desc in devices])
        f.fflush()
        self._close_iteration()
        st.downtime = time.monotonic() - stop_t - excluded
        st.downtime_bytes = self._ram_counted() - st.precopy_bytes

    # -- reporting --------------------------------------------------------------------------
    def _sample_rss(self, t: float | None = None) -> None:
        """One (time, stream bytes, source RSS) point for the plot, when sampling is on;
        ``t`` in seconds since the start (default: now)."""
        if self.params.sample_rss:
            when = time.monotonic() - self.t0 if t is None else t
            self.stats.timeline.append((when, self.windows.f.ftell_fast(), resident_bytes(self.ram)))

    def _window_closed(self, windows: RateWindows) -> None:
        # migration_update_counters: expected-downtime starts as downtime-limit and is
        # re-estimated (dirty bytes at the last sync / window bandwidth) only once QEMU has
        # a dirty-pages-rate (a sync period of >= 1 s) and the window sent > 10000 bytes
        sent = windows.windows[-1].bytes if windows.windows else 0
        if self._rate_known and sent > 10000 and windows.bandwidth > 0:
            self.stats.expected_downtime = self._remaining_at_sync / windows.bandwidth
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
                "dirty-pages": self._dirty, "bytes": self.windows.f.ftell_fast(),
                "mbps": self.windows.bandwidth * 8 / 1e6, "elapsed": elapsed,
                "cpu-throttle-percentage": self.throttle.percentage if self.throttle else 0}

    def query_migrate(self) -> dict[str, Any]:
        """The live ``query-migrate`` answer (QEMU's names; callable from any thread,
        e.g. the events writer's 100 ms poll).  Returns just the status before run()."""
        saver, windows = getattr(self, "saver", None), getattr(self, "windows", None)
        if saver is None or windows is None:
            return {"status": self.stats.status}
        out = self.stats.live_dict(elapsed=time.monotonic() - self.t0, ram=saver.stats,
                                   transferred=self._ram_counted(), remaining=self._dirty * self.stats.page_size,
                                   mbps=windows.bandwidth * 8 / 1e6)
        if self.postcopy is not None:
            out["ram"]["postcopy-requests"] = self.postcopy.requests     # as QEMU's, live
        return out

    def _finish_stats(self) -> None:
        st = self.stats
        self._close_iteration()
        st.total_time = time.monotonic() - self.t0
        st.ram = self.saver.stats
        # bytes the channel took: queued bytes a failed write never delivered are not
        # "transferred" (no I/O happens here after an error; a completed run is flushed)
        st.stream_bytes = self.f.ftell()
        st.ram_queued = self._ram_counted()
        st.ram_transferred = self._ram_written(st.stream_bytes)
        if self.multifd is not None:
            multifd_stats(self.multifd, st)     # the channels' bytes and pages join the totals
        st.windows = self.windows.windows
        # postcopy's releases (QEMUFile's may_free, and the engine's above); pre-copy's
        # come after the verdict (session) and are added there
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
