"""The RAM-saving side of a live migration: QEMU's ``migration/ram.c`` (its ``RAMState``)
and the pre-copy loop that drives it (``migration_iteration_run`` in ``migration.c``).

Supports :class:`RAMState`, the state of one migration's RAM while pages are sent over a
writable QEMUFile from a GuestRAM that keeps changing:

- the migration bitmap (``RAMBlock->bmap``: a page to send), ``dirty``
  (``migration_dirty_pages``) and the search cursor;
- ``init_bitmaps`` / ``save_setup`` (``ram_list_init_bitmaps``, ``ram_save_setup``: all
  pages dirty, the START section with MEM_SIZE and the block list);
- ``sync`` (``migration_bitmap_sync``: OR each block's dirty log into the bitmap,
  ``dirty-sync-count`` + 1, the dirty-pages rate, auto-converge's trigger
  ``migration_trigger_throttle``);
- ``save_iterate`` (``ram_save_iterate``: one PART section, pages until the rate limit
  is hit or 50 ms passed, then EOS), ``find_and_save`` (``ram_find_and_save_block`` with
  ``find_dirty_block``: XBZRLE only after the search first wraps past the last block,
  multifd's flush at each wrap), ``save_pages`` (the pages of one block: main channel or
  multifd, release-ram's ZERO pages in postcopy, bitmap cleared);
- ``last_sync`` and ``save_complete`` (the sync of the stopped guest and
  ``ram_save_complete``'s END section with everything left, multifd's last flush,
  mapped-ram's bitmaps);
- ``iterate`` (``migration_iteration_run``: sync when the dirty bytes drop below
  ``threshold_size``, complete below it, switch to postcopy when due, stop at
  ``max-iterations`` / ``time-limit``);
- the statistics of the RAM: ``transferred`` (QEMU 7.2's ``ram_counters.transferred``:
  page records and PART EOS, not the setup records nor the END EOS), ``written`` (of
  those, the bytes the channel took), per-iteration records, the expected downtime.

It is the documented object the mechanisms use instead of the engine's private state:
postcopy (``postcopy.py``: ``bitmap``, ``dirty``, ``saver``, ``last_sync``,
``save_pages``, ``ram_section``, ``write_eos``, ``release_clean``, ``transferred``,
``close_iteration``, ``cancel``), multifd (``multifd``: ``save_pages`` hands pages to
``save_pages_multifd``, ``multifd_flush`` is ``multifd_ram_flush_and_sync``),
auto-converge (``throttle``: fed at each ``sync``), release-ram (``release_clean`` /
``release_zero`` over ``release_ram.release_runs``) and mapped-ram (the saver's
bitmaps in ``save_complete``).

Goals: QEMU's bytes, decisions and counters, unchanged by where the code lives; a
module a QEMU reader maps function by function (QEMU's names in each docstring).
Plan: the engine (``engine.py``, QEMU's ``migration.c``) builds one RAMState per run
and composes setup, ``iterate``, completion or postcopy and the final statistics; this
module does no device state, no cancel handling beyond honouring ``cancel`` and no
reporting beyond calling ``progress``.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from npqfile.migration.bandwidth import RateWindows
from npqfile.migration.multifd import save_pages_multifd
from npqfile.migration.release_ram import PRECOPY, may_release, release_runs
from npqfile.migration.stats import IterationStats, MigrationStats
from npqfile.migration.throttle import AutoConverge
from npqfile.migration.workloads import Workload
from npqfile.qemufile import RAM_CONTROL_FINISH, RAM_CONTROL_ROUND, RAM_CONTROL_SETUP, QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream.constants import (
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
)
from npqfile.stream.devices import ram_entry
from npqfile.stream.ram_saver import RAMSaver
from npqfile.stream.savevm import SaveVMWriter

MAX_WAIT = 0.05            # ram_save_iterate: a PART section lasts at most 50 ms
CHUNK = 1024               # pages per save_pages call between time checks (QEMU checks every 64)
SCAN = 1 << 16             # bitmap bits examined per search for dirty pages
DIRTY_RATE_PERIOD = 1.0    # migration_bitmap_sync: dirty-pages-rate over periods of >= 1000 ms


class RAMState:
    """The RAM of one migration while it is sent (QEMU's ``RAMState`` and ``ram_counters``).

    Built by the engine at the start of a run over the main QEMUFile ``f``; ``stats``
    is the run's MigrationStats (updated in place), ``windows`` its rate windows,
    ``writer`` its section writer, ``cancel`` the migrate_cancel flag, ``t0`` the start
    (time.monotonic()), ``progress`` called after each sync.  ``saver`` (the RAMSaver,
    XBZRLE off until the first wrap), ``bitmap`` (block name -> bool array: pages still
    to send) and ``dirty`` (how many) are public for the mechanisms; change ``bitmap``
    and ``dirty`` together, as ``save_pages`` does.  I/O errors are left on ``f``
    (``f.get_error()``) or raised as OSError, as the QEMUFile reports them.
    """

    def __init__(self, ram: GuestRAM, f: QEMUFile, params: Any, stats: MigrationStats, *,
                 workload: Workload, windows: RateWindows, writer: SaveVMWriter, cancel: threading.Event,
                 t0: float, throttle: AutoConverge | None = None, multifd: Any = None,
                 progress: Callable[[], None] = lambda: None):
        self.ram, self.f, self.params, self.stats = ram, f, params, stats
        self.workload, self.windows, self.writer, self.cancel = workload, windows, writer, cancel
        self.t0, self.throttle, self.multifd, self.progress = t0, throttle, multifd, progress
        self.saver = RAMSaver(f, ram, zero_page_detection=params.zero_page_detection,
                              xbzrle_cache_size=params.xbzrle_cache_size, compress_level=params.compress_level,
                              mapped_ram=params.mapped_ram,
                              release_ram=params.release_ram and may_release(PRECOPY)[0])
        self.saver.xbzrle_enabled = False          # QEMU: no XBZRLE during the bulk stage
        self.blocks = ram.blocks
        self.bitmap = {b.name: np.zeros(b.n_pages, dtype=bool) for b in self.blocks}
        self.dirty = 0                  # QEMU migration_dirty_pages
        self.cursor = (0, 0)            # (block index, page): where the next search starts
        self.iteration: IterationStats | None = None    # the open iteration's record
        self._iter_t0 = 0.0
        self._iter_bytes0 = 0
        self._iter_pages0 = 0
        self._sync_t = 0.0              # start of the current dirty-rate period
        self._rate_pages = 0            # pages dirtied in it
        self._rate_known = False        # QEMU: dirty_pages_rate set (a sync after >= 1 s)
        self._remaining_at_sync = 0     # QEMU: ram_counters.remaining (bytes dirty at the last sync)
        # ram.transferred accounting: RAM-section bytes QEMU does not count (the setup
        # records and the END section's EOS), and per RAM section (stream offset of its
        # payload, counted bytes before it) to tell the bytes written from those queued
        self._uncounted = 0
        self._marks: list[tuple[int, int]] = []
        self._ram_se = ram_entry(params.qemu_version)

    # -- setup ------------------------------------------------------------------------------
    def init_bitmaps(self) -> None:
        """ram_list_init_bitmaps: start dirty logging from a clean log, every page to send,
        ``dirty-sync-count`` 1.  Returns None."""
        for b in self.blocks:
            b.sync_dirty()
            self.bitmap[b.name][:] = True
        self.dirty = sum(b.n_pages for b in self.blocks)
        self.stats.dirty_sync_count = 1

    def save_setup(self) -> None:
        """ram_save_setup: the START section (MEM_SIZE, block list, EOS; multifd's flush),
        none of it in ram_counters.transferred.  Returns None."""
        self.f.ram_control_before_iterate(RAM_CONTROL_SETUP)
        with self.ram_section(QEMU_VM_SECTION_START):
            self.saver.save_setup(self.multifd_flush)
            self._uncounted = self.saver.stats.pages_bytes

    def start_iterations(self) -> None:
        """After the setup: the first dirty-rate period, auto-converge's start and the
        first iteration.  Returns None."""
        self._sync_t = time.monotonic()
        if self.throttle is not None:
            self.throttle.start(self._sync_t - self.t0, self.transferred())
        self.new_iteration(self.dirty)

    # -- the pre-copy loop ----------------------------------------------------------------------
    def iterate(self, switch_due: Callable[[bool], bool] | None = None) -> str:
        """migration_iteration_run until the end of pre-copy: returns ``converged``,
        ``forced``, ``postcopy`` (``switch_due(synced)`` said so, or auto at a limit),
        ``cancelled``, ``max-iterations`` or ``time-limit``; ``stats.outcome`` says why.
        Raises the QEMUFile's error (OSError) when a write failed."""
        p, st = self.params, self.stats
        ps = st.page_size
        while True:
            if self.cancel.is_set():
                return "cancelled"
            threshold = self.threshold()
            synced = self.dirty * ps < threshold
            if synced:                                  # ram_save_pending: sync when little is left
                self.sync()
            pending = self.dirty * ps
            if not pending or pending < threshold:      # migration_iteration_run: complete
                st.outcome = "converged"
                return "converged"
            if switch_due is not None and switch_due(synced):
                return "postcopy"
            if synced:
                if st.dirty_sync_count > p.max_iterations:
                    return self._limit("max-iterations")
                self.new_iteration(self.dirty)
            if time.monotonic() - self.t0 > p.time_limit:
                return self._limit("time-limit")
            self.save_iterate()
            if self.f.get_error():
                raise self.f.error
            if self.windows.exceeded():
                self.windows.wait()
            else:
                self.windows.tick()

    def _limit(self, why: str) -> str:
        """A limit was reached without converging: postcopy with ``auto``, else cancel or
        force as ``on_limit`` says.  Returns the outcome for ``iterate``."""
        if self.params.postcopy_after == "auto":
            self.stats.outcome = f"postcopy: {why}"
            return "postcopy"               # auto: a run that cannot converge switches
        self.stats.outcome = why if self.params.on_limit == "cancel" else f"forced: {why}"
        return "forced" if self.params.on_limit == "force" else why

    def threshold(self) -> int:
        """threshold_size from the last window's bandwidth (bytes/s × downtime_limit); 0
        before the first window closed, as in QEMU (only an empty bitmap completes then).
        Also records ``bandwidth`` and ``threshold_size`` in the statistics."""
        bw = self.windows.bandwidth
        self.stats.bandwidth = bw
        self.stats.threshold_size = int(bw * self.params.downtime_limit)
        return self.stats.threshold_size

    # -- migration_bitmap_sync ---------------------------------------------------------------
    def sync(self) -> None:
        """migration_bitmap_sync: OR each block's dirty log into the migration bitmap;
        while the guest runs, update the dirty-pages rate and auto-converge.  Returns None."""
        now = time.monotonic()
        new = 0
        for b in self.blocks:
            idx = b.sync_dirty()
            bm = self.bitmap[b.name]
            fresh = idx[~bm[idx]]
            bm[fresh] = True
            self.dirty += fresh.size
            new += fresh.size       # QEMU counts bits newly set, not pages still waiting
        if self.stats.status == "active":           # the guest ran for the whole period
            self._auto_converge(now, new)
            # QEMU updates dirty-pages-rate over periods of at least a second; a run
            # shorter than that reports the rate since the start
            self._rate_pages += new
            period = now - self._sync_t
            self._rate_known |= period >= DIRTY_RATE_PERIOD
            if period >= DIRTY_RATE_PERIOD or not self.stats.dirty_pages_rate:
                self.stats.dirty_pages_rate = self._rate_pages / max(period, 1e-6)
                self._sync_t, self._rate_pages = now, 0
        self.stats.dirty_sync_count += 1
        self._remaining_at_sync = self.dirty * self.stats.page_size
        self.saver.generation = self.stats.dirty_sync_count
        self.progress()

    def last_sync(self) -> None:
        """The sync of the stopped guest (ram_save_complete's, or postcopy's in
        ram_postcopy_send_discard_bitmap), opening the final iteration.  Returns None."""
        self.sync()
        self.new_iteration(self.dirty, final=True)

    def _auto_converge(self, now: float, new: int) -> None:
        """migration_trigger_throttle at this sync; a new percentage throttles the writer."""
        if self.throttle is not None and self.throttle.on_sync(now - self.t0, new, self.transferred()):
            self.stats.cpu_throttle_percentage = self.throttle.percentage
            self.stats.throttle_events = self.throttle.events
            self.workload.set_throttle(self.throttle.percentage)

    # -- sending pages -------------------------------------------------------------------------
    def save_iterate(self) -> None:
        """ram_save_iterate: one PART section, pages until the rate limit is hit or
        MAX_WAIT passed, then EOS.  Returns None; a write error stays on ``f``."""
        f = self.f
        limited = self.windows.limit > 0
        deadline = time.monotonic() + MAX_WAIT
        with self.ram_section(QEMU_VM_SECTION_PART):
            f.ram_control_before_iterate(RAM_CONTROL_ROUND)
            while self.dirty:
                self.find_and_save(CHUNK, limited)
                if (limited and self.windows.exceeded()) or time.monotonic() >= deadline or f.get_error():
                    break
            f.ram_control_after_iterate(RAM_CONTROL_ROUND)
            self.saver.write_eos()
        self.stats.part_sections += 1
        if self.iteration is not None:
            self.iteration.sections += 1

    def find_dirty(self, limit: int) -> tuple[Any, np.ndarray]:
        """find_dirty_block: up to ``limit`` dirty pages of one block from the cursor on
        (wrapping around RAM).  Returns (block, page numbers), or (None, empty) when the
        bitmap is empty."""
        bi, page = self.cursor
        for _ in range(2 * len(self.blocks) + 1):
            block = self.blocks[bi]
            bm = self.bitmap[block.name]
            while page < block.n_pages:
                end = min(page + SCAN, block.n_pages)
                idx = np.flatnonzero(bm[page:end])
                if idx.size:
                    return block, idx[:limit] + page
                page = end
            bi, page = (bi + 1) % len(self.blocks), 0
            if bi == 0:
                self.multifd_flush()
                if self.saver.cache is not None:
                    # find_dirty_block: "After the first round, enable XBZRLE" -- when the
                    # search wraps past the last block, not at the first sync
                    self.saver.xbzrle_enabled = True
        return None, np.empty(0, dtype=np.int64)

    def find_and_save(self, limit: int, rate_limited: bool) -> int:
        """ram_find_and_save_block: send up to ``limit`` dirty pages from the cursor on;
        returns how many were sent (0 also when nothing is dirty: ``dirty`` becomes 0)."""
        block, idx = self.find_dirty(limit)
        if block is None:
            self.dirty = 0
            return 0
        n = self.save_pages(block, idx, rate_limited=rate_limited)
        if n:
            self.cursor = (self.blocks.index(block), int(idx[n - 1]) + 1)
            if self.multifd is not None and self.cursor == (len(self.blocks) - 1, block.n_pages):
                self.cursor = (0, 0)           # the end of RAM: find_dirty_block wraps
                self.multifd_flush()
        return n

    def save_pages(self, block: Any, idx: np.ndarray, *, rate_limited: bool = False) -> int:
        """ram_save_target_page for the dirty pages ``idx`` of ``block`` (multifd's
        channels when on, else the main channel); the pages sent leave the bitmap.
        Returns how many were sent (fewer than asked only when ``rate_limited``)."""
        if self.multifd is not None:
            n = save_pages_multifd(self.multifd, self.saver, block, idx)
        else:
            n = self.saver.save_pages(block, idx, rate_limited=rate_limited)
        sent = idx[:n]
        if self.saver.release_ram and n:
            # only postcopy turns this on (release_ram.may_release(POSTCOPY)): ZERO records
            # carry no memory for QEMUFile to release once written, so release them here
            self.release_zero(block, sent[self.saver.sent_zero])
        self.bitmap[block.name][sent] = False
        self.dirty -= n
        return n

    def multifd_flush(self) -> None:
        """multifd_ram_flush_and_sync at the end of each pass, in the setup and at
        completion: SYNC on every channel, then RAM_SAVE_FLAG_MULTIFD_FLUSH here.
        Returns None (nothing without multifd)."""
        if self.multifd is not None:
            self.multifd.flush_and_sync()
            self.f.put_be64(RAM_SAVE_FLAG_MULTIFD_FLUSH)
            self.saver.stats.pages_bytes += 8
            self.f.fflush()     # the destination's channels wait on it: it must not sit in our buffer

    def save_complete(self) -> None:
        """ram_save_complete after its sync (``last_sync``): every page left in the END
        section, unthrottled, stopping at the first write error; multifd's last flush,
        mapped-ram's bitmaps (ram_save_file_bmap), the (uncounted) EOS.  Returns None."""
        f = self.f
        self.saver.last_stage = True
        self.saver.generation = self.stats.dirty_sync_count
        with self.ram_section(QEMU_VM_SECTION_END):
            f.ram_control_before_iterate(RAM_CONTROL_FINISH)
            # stop at the first error, as ram_save_complete does: pages "sent" into a
            # failed QEMUFile would only inflate the counters
            while self.dirty and not f.get_error():
                if not self.find_and_save(CHUNK, False):
                    break
            f.ram_control_after_iterate(RAM_CONTROL_FINISH)
            self.multifd_flush()
            self.saver.write_mapped_ram_bitmaps()
            self.write_eos(counted=False)           # ram_save_complete's EOS is not counted

    # -- release-ram in postcopy (release_ram.may_release(POSTCOPY)); pre-copy releases
    # -- nothing here: the session releases after the destination's verdict
    def release_clean(self) -> None:
        """ram_postcopy_migrated_memory_release: release every page already sent and not
        dirty (the destination has it and runs the guest).  Returns None."""
        for b in self.blocks:
            self.stats.released_bytes += release_runs(b, ~self.bitmap[b.name])

    def release_zero(self, block: Any, zero: np.ndarray) -> None:
        """Release the pages ``zero`` just sent as ZERO records (QEMU's save_zero_page
        releases each one under release-ram in postcopy): one call for the batch, one
        release per run of adjacent pages.  Returns None."""
        if zero.size:
            # a mask of the batch's span, not of the block: per batch, work of its size
            lo = int(zero.min())
            mask = np.zeros(int(zero.max()) - lo + 1, dtype=bool)
            mask[zero - lo] = True
            self.stats.released_bytes += release_runs(block, mask, lo)

    # -- sections and ram_counters.transferred ---------------------------------------------------
    @contextlib.contextmanager
    def ram_section(self, section_type: int) -> Iterator[None]:
        """A ``ram`` section (START, PART or END) whose payload start is remembered for
        ``written``."""
        with self.writer.section(self._ram_se, section_type):
            self._marks.append((self.f.ftell_fast(), self.transferred()))
            yield

    def write_eos(self, *, counted: bool = True) -> None:
        """The section's RAM_SAVE_FLAG_EOS; ``counted=False`` for the END section's, which
        QEMU leaves out of ram_counters.transferred.  Returns None."""
        self.saver.write_eos()
        if not counted:
            self._uncounted += 8

    def transferred(self) -> int:
        """QEMU's ram_counters.transferred so far: every page record (header, idstr,
        payload) and each PART's EOS as ``ram_transferred_add`` counts them -- bytes
        queued on the QEMUFile, whether or not they were written yet."""
        return self.saver.stats.pages_bytes - self._uncounted

    def written(self, stream_bytes: int) -> int:
        """Of the counted RAM bytes, those inside the first ``stream_bytes`` stream bytes.
        A RAM section's counted bytes are the start of its payload, so each section
        contributes what lies before ``stream_bytes``; after a failed write nothing more is
        written (puts are no-ops), so later sections contribute nothing."""
        marks = self._marks + [(None, self.transferred())]
        total = 0
        for (off, before), (_next, after) in itertools.pairwise(marks):
            total += max(0, min(stream_bytes - off, after - before))
        return total

    def update_expected_downtime(self, windows: RateWindows) -> None:
        """migration_update_counters: expected-downtime starts as downtime-limit and is
        re-estimated (dirty bytes at the last sync / window bandwidth) only once QEMU has
        a dirty-pages-rate (a sync period of >= 1 s) and the window sent > 10000 bytes."""
        sent = windows.windows[-1].bytes if windows.windows else 0
        if self._rate_known and sent > 10000 and windows.bandwidth > 0:
            self.stats.expected_downtime = self._remaining_at_sync / windows.bandwidth

    # -- iterations ------------------------------------------------------------------------------
    def new_iteration(self, dirty: int, final: bool = False) -> None:
        """Open the next iteration (numbered 1, 2, 3... in order; ``sync`` records the
        dirty-sync-count it started at, which may skip: the sync that leads to
        completion starts no pre-copy iteration).  Returns None."""
        self.close_iteration()
        self.iteration = IterationStats(len(self.stats.iterations) + 1, dirty, final=final,
                                        sync=self.stats.dirty_sync_count,
                                        cpu_throttle=self.throttle.percentage if self.throttle else 0)
        self._iter_t0 = time.monotonic()
        self._iter_bytes0 = self.windows.f.ftell_fast()     # multifd channels included
        self._iter_pages0 = self.saver.stats.pages + (self.multifd.queued_pages if self.multifd else 0)
        self.stats.iterations.append(self.iteration)

    def close_iteration(self) -> None:
        """Close the open iteration (duration, bytes, pages, bandwidth); a no-op when none
        is open.  Returns None."""
        it = self.iteration
        if it is None:
            return
        it.duration = time.monotonic() - self._iter_t0
        it.bytes_sent = self.windows.f.ftell_fast() - self._iter_bytes0
        it.pages_sent = (self.saver.stats.pages + (self.multifd.queued_pages if self.multifd else 0)
                         - self._iter_pages0)
        it.bandwidth = it.bytes_sent / max(it.duration, 1e-9)
        self.iteration = None
