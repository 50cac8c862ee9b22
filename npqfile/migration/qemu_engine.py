"""The real-QEMU engine: the same migration experiment as the simulator, run by QEMU itself.

Supports: :func:`run_qemu_migration(cfg)` takes the simulator's
:class:`~npqfile.migration.session.MigrationConfig` and returns the same
:class:`~npqfile.migration.stats.MigrationStats` (``query-migrate``'s names), measured
on real QEMU: a source ``qemu-system-x86_64 -M pc`` (TCG) running the dirtyguest (its
writes follow ``cfg.workload``, see ``npqfile.guest``), RAM prefilled like the
simulator's (``cfg.init``) in a ``memory-backend-file``; a destination QEMU (``-S
-incoming defer``, then ``migrate-incoming``) on a unix socket (default) or the
``tcp:``/``unix:`` address of ``cfg.to``.  Parameters and capabilities map one to one
(:func:`qemu_settings`): max-bandwidth, downtime-limit, xbzrle (+ xbzrle-cache-size),
compress (+ compress-level; QEMU 7.2 only), zero-page-detection (10.0 only),
release-ram, pause-before-switchover, auto-converge (+ the cpu-throttle parameters, when
MigrationParams carries them under QEMU's names), multifd (+ multifd-channels,
multifd-compression, and zero-page-detection on 9.0+; before 9.0 QEMU detects zero pages
on the main channel only).  ``max_iterations`` / ``time_limit`` are the
simulator's: once ``dirty-sync-count`` passes max_iterations, or the time limit
passes, the run is cancelled (``migrate_cancel``) or forced (``on_limit="force"``: the
downtime limit is raised to QEMU's maximum, so QEMU stops the guest and copies the
rest at its next check).  An option QEMU does not have raises ValueError before any
process starts.

``query-migrate`` is polled every POLL seconds into the live progress callback, the
per-iteration rows (one per ``dirty-sync-count``: a row starts at QEMU's
``MIGRATION_PASS`` event for its sync (the ``events`` capability), its pages and bytes
interpolated linearly between the two polls around that moment -- exact at the polls,
approximate between them -- or, without the event, at the first poll that saw the
count; the last pre-copy row ends at QEMU's own ``precopy-bytes`` and the final row is
QEMU's ``downtime-bytes`` and ``downtime``) and the final statistics.  After completion
the source is paused (``postmigrate``) and the destination paused (``-S``): both RAM
files are final and their sha256 must be equal (``verification``).  The source QEMU has
no return path here, so it is ``completed`` once its last byte is out: a destination
that then fails, dies or does not finish loading within FINISH_TIMEOUT fails the run
(``failed``, its error in ``outcome``, nothing compared: ``verification.done`` False),
as the simulator's session does.  ``cancel()`` (Ctrl-C) follows ``migrate_cancel`` state
by state: before the migrate command nothing starts; in setup, active and device (also
after a forced limit) QEMU decides (``cancelled``, or ``completed`` when it had already
switched over; the destination exiting on the cancelled stream is no failure); at
pre-switchover the pause is not continued (QEMU's cancel ends it: ``cancelled``); once
the source is ``completed`` nothing is cancelled and the wait for the destination (and
the hashing) ends at once: ``completed``, not verified.  Every command to the source
while it migrates waits SOURCE_QUERY_WAIT at most: QEMU answers late while it holds
its big lock (the switchover), so an unanswered poll is asked again; a Ctrl-C while the
source does not answer cannot be sent as ``migrate_cancel`` (nothing reads it), so the
source QEMU is killed and the run ends ``cancelled``, and a source silent for
SOURCE_STALL_LIMIT seconds (its main loop stuck, or the process stopped) is killed and
the run ``failed`` ("source QEMU did not answer query-migrate for 60 s"): what it did
meanwhile is unknown, so such a run is never ``completed``.  The guest's
achieved write rate over the migration (its own counter and clock) is in
``workload``, and over the span QEMU reported throttling it (auto-converge:
``throttled-*``, from the guest status read at each poll that saw
``cpu-throttle-percentage``).  Figures QEMU does not report (stream bytes, PART sections, rate-limit
windows, RSS) are None in the JSON, never invented.

Goals: a run that is comparable figure by figure with the simulator's; both QEMUs
killed on every path (Ctrl-C, failure, timeout); a dying QEMU is a clear ``failed``
outcome with its stderr.  Plan: options -> settings (pure), then launch, migrate,
poll, collect, verify.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npqfile.guest import guest_parameters
from npqfile.guest.params import KINDS
from npqfile.migration.compression import parse_compress
from npqfile.migration.qemu_vm import QemuError, QemuVM
from npqfile.migration.stats import IterationStats, MigrationStats
from npqfile.migration.throttle import ThrottleEvent
from npqfile.migration.verdict import destination_failed
from npqfile.qemu import QemuBinary, QemuNotFound, find_qemu
from npqfile.stream.ram_stats import RAMStats

POLL = 0.05                     # seconds between query-migrate polls (the 50-100 ms)
MAX_DOWNTIME_MS = 2_000_000     # QEMU's MAX_MIGRATE_DOWNTIME (2000 s): "force" completion
FINISH_TIMEOUT = 60.0           # seconds for the destination to finish loading
DEST_QUERY_WAIT = 1.0           # seconds one destination query-migrate may go unanswered
SOURCE_QUERY_WAIT = 1.0         # seconds one source QMP command may go unanswered (Ctrl-C is seen between)
SOURCE_STALL_LIMIT = 60.0       # seconds the source may leave query-migrate unanswered: the run fails
HASH_CHUNK = 64 << 20           # bytes hashed between two looks at the cancel flag
TERMINAL = ("completed", "failed", "cancelled")
THROTTLE_PARAMETERS = ("cpu-throttle-initial", "cpu-throttle-increment", "cpu-throttle-tailslow",
                       "max-cpu-throttle", "throttle-trigger-threshold")
TCG_LOST_WRITES = ("QEMU before 9.0 loses guest writes under TCG: the fast path of "
                   "cpu_physical_memory_sync_dirty_bitmap clears dirty bits without resetting the TCG TLB "
                   "(fixed in 9.0 by 'physmem: Fix migration dirty bitmap coherency with TCG memory access')")


@dataclass
class QemuSettings:
    """What is sent to QEMU: capabilities on both sides, parameters on the source."""
    capabilities: dict[str, bool]
    parameters: dict[str, Any]
    uri: str | None             # None: a unix socket in the run's folder


def qemu_settings(cfg: Any, qemu: QemuBinary) -> QemuSettings:
    """The QMP capabilities and parameters for ``cfg`` on ``qemu``.  Raises ValueError
    naming the option when QEMU (or this version of it) has no equivalent."""
    p = cfg.params
    major = qemu.version_tuple[:2]
    caps: dict[str, bool] = {}
    params: dict[str, Any] = {"max-bandwidth": int(p.max_bandwidth),
                              "downtime-limit": int(round(p.downtime_limit * 1000))}
    if params["downtime-limit"] > MAX_DOWNTIME_MS:
        raise ValueError(f"--downtime-limit {params['downtime-limit']} ms is above QEMU's maximum "
                         f"({MAX_DOWNTIME_MS} ms)")
    if p.xbzrle_cache_size:
        caps["xbzrle"] = True
        params["xbzrle-cache-size"] = int(p.xbzrle_cache_size)
    comp = parse_compress(cfg.compress)
    if comp.on_channel:
        raise ValueError(f"--compress {cfg.compress}: QEMU has no single-channel {comp.method} "
                         "(only multifd compresses with zstd); use zlib, or the simulator")
    if comp.method == "zlib":
        if major >= (9, 1):
            raise ValueError(f"--compress zlib: QEMU {qemu.version} has no compress capability "
                             "(removed in 9.1); use QEMU 7.2 or the simulator")
        caps["compress"] = True
        if comp.page_level is not None and comp.page_level >= 0:
            params["compress-level"] = int(comp.page_level)
    if not p.zero_page_detection:
        if major < (9, 0):
            raise ValueError(f"--no-zero-detection: QEMU {qemu.version} always detects zero pages "
                             "(zero-page-detection=none needs QEMU 9.0); use QEMU 10.0 or the simulator")
        params["zero-page-detection"] = "none"
    if p.release_ram:
        caps["release-ram"] = True
    if p.pause_before_switchover:
        caps["pause-before-switchover"] = True
    if p.machine not in ("none", "pc"):
        raise ValueError(f"--machine {p.machine}: the QEMU engine runs -M pc")
    if getattr(p, "auto_converge", False):
        # auto-converge's throttle parameters, when MigrationParams has them under QEMU's names
        caps["auto-converge"] = True
        for name in THROTTLE_PARAMETERS:
            value = getattr(p, name.replace("-", "_"), None)
            if value is not None:
                params[name] = value
    if getattr(p, "postcopy_after", None) is not None or getattr(p, "mapped_ram", False):
        raise ValueError("--postcopy-after / --mapped-ram: the QEMU engine runs pre-copy only "
                         "(use the simulator)")
    channels = getattr(p, "multifd_channels", 0)
    if channels:
        caps["multifd"] = True
        params["multifd-channels"] = int(channels)
        if getattr(p, "multifd_compression", "none") != "none":
            params["multifd-compression"] = p.multifd_compression
        # (the combination itself was checked by MigrationParams.check: options.py)
        if major >= (9, 0) and p.zero_page_detection:
            params["zero-page-detection"] = getattr(p, "multifd_zero_page", "multifd")
        # before 9.0 QEMU detects zero pages on the main channel (legacy) only: nothing to set
    uri = None
    if cfg.to not in (None, "inprocess"):
        if not cfg.to.startswith(("tcp:", "unix:")):
            raise ValueError(f"--to {cfg.to}: the QEMU engine migrates to its own destination QEMU "
                             "over tcp:HOST:PORT or unix:PATH (default: a unix socket)")
        uri = cfg.to
    return QemuSettings(caps, params, uri)


def _fill_ram_file(path: Path, size: int, init: str, seed: int) -> None:
    """The source RAM file with the simulator's initial contents (fill_guest's)."""
    from npqfile.migration.session import fill_guest

    with open(path, "wb") as f:
        f.truncate(size)
    mem = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))

    class _Block:     # fill_guest reads array, pages and n_pages of each block
        array = mem
        pages = mem.reshape(-1, 4096)
        n_pages = size // 4096

    class _Ram:
        blocks = [_Block]

    try:
        fill_guest(_Ram, init, seed)
        mem.flush()
    finally:
        del mem


def _sha256(path: Path, cancel: threading.Event | None = None) -> str | None:
    """The file's sha256 (hex); None when ``cancel`` was set before the end."""
    h = hashlib.sha256()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        with memoryview(m) as view:
            for start in range(0, len(m), HASH_CHUNK):
                if cancel is not None and cancel.is_set():
                    return None
                h.update(view[start:start + HASH_CHUNK])
    return h.hexdigest()


def _throttled_span(samples: list[tuple[int, Any]]) -> dict[str, Any]:
    """The guest's counters between the first and the last poll at which QEMU reported a
    cpu-throttle-percentage (the throttle was on all along: it only rises until the
    migration ends): guest and credited running seconds, writes, achieved rate, and the
    lowest percentage QEMU reported there.  Returns {} with fewer than two such polls or
    no guest time between them."""
    done = [(pct, g) for pct, g in samples if g is not None]
    if len(done) < 2 or done[-1][1].seconds <= done[0][1].seconds:
        return {}
    (_, a), (_, b) = done[0], done[-1]
    seconds = b.seconds - a.seconds
    return {"throttled-min-percentage": min(p for p, _ in done), "throttled-guest-seconds": round(seconds, 3),
            "throttled-running-seconds": round(b.running_seconds - a.running_seconds, 3),
            "throttled-writes": b.writes - a.writes,
            "throttled-achieved-rate-pages": round((b.writes - a.writes) / seconds, 1)}


class QemuMigrationStats(MigrationStats):
    """MigrationStats measured on QEMU: the figures QEMU does not report are None in
    ``as_dict``, and a ``qemu`` key holds the binary, its version and QEMU's own last
    ``query-migrate`` answer."""
    qemu: dict | None = None

    def as_dict(self) -> dict[str, Any]:
        d = super().as_dict()
        x = d["npqfile"]
        for key in ("stream-bytes", "part-sections", "threshold-size", "throughput-mbps", "rss-before",
                    "rss-after", "released-bytes", "release-advised-bytes", "release-unmeasured-bytes"):
            x[key] = None
        x["windows"] = {"count": None, "max-bytes": None, "limit": None, "max-overshoot": None}
        x["engine"] = "qemu"
        d["qemu"] = self.qemu or {}
        return d


class QemuMigration:
    """One run; see the module docstring.  ``run()`` returns the statistics."""

    def __init__(self, cfg: Any, qemu: QemuBinary | None = None, *,
                 on_progress: Callable[[dict], None] | None = None, pre_switchover: Callable | None = None,
                 events: Any = None):
        self.cfg = cfg
        self.events = events            # an EventWriter: fed every query-migrate answer
        self.qemu = qemu or find_qemu(getattr(cfg, "qemu", None))
        self.settings = qemu_settings(cfg, self.qemu)       # before anything starts
        self.guest = guest_parameters(cfg.workload, cfg.size, seed=cfg.seed)
        self.on_progress = on_progress
        self.pre_switchover = pre_switchover
        self.samples: list[dict] = []
        self.throttled: list[Any] = []          # guest status at each poll that saw QEMU throttle
        self.passes: dict[int, float] = {}      # dirty-sync-count -> seconds after migrate
        self.st = QemuMigrationStats(page_size=4096, params=asdict(cfg.params))
        self.st.qemu = {"path": self.qemu.path, "version": self.qemu.version}
        self._cancel = threading.Event()
        self._source_status = ""        # the source's status at the last poll
        self._forced: str | None = None  # the limit that forced completion (on_limit "force")

    def cancel(self) -> str | None:
        """migrate_cancel from another thread or a signal handler (Ctrl-C): only sets a
        flag; the poll loop sends ``migrate_cancel`` to the source at its next poll, and
        the wait for the destination ends.  Returns None, or why nothing is cancelled: a
        source QEMU that already ended (its migration_cancel leaves it alone)."""
        self._cancel.set()
        return self.cancel_refused()

    def cancel_refused(self) -> str | None:
        """Why a cancel would change nothing in the source QEMU (its migration already
        ended), else None; changes nothing."""
        status = self._source_status
        return f"the migration is {status}: nothing to cancel" if status in TERMINAL else None

    def run(self) -> MigrationStats:
        """Launch both QEMUs, migrate, collect, verify, clean up.  Returns the stats:
        ``failed`` (with QEMU's words in ``outcome``) when a QEMU dies or refuses, or the
        source leaves query-migrate unanswered for SOURCE_STALL_LIMIT seconds;
        QemuError only when the QEMUs cannot be started at all."""
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        # the process id in the name: whoever started this npqfile can find its QEMUs
        workdir = Path(tempfile.mkdtemp(prefix=f"npqfile-qemu-{os.getpid()}-", dir=shm))
        src = dst = None
        try:
            params_file = workdir / "params.bin"
            params_file.write_bytes(self.guest.pack())
            _fill_ram_file(workdir / "source.ram", self.cfg.size, self.cfg.init, self.cfg.seed)
            src = QemuVM(self.qemu, workdir, "source", self.cfg.size, params_file)
            dst = QemuVM(self.qemu, workdir, "destination", self.cfg.size, params_file, incoming=True)
            src.start()
            dst.start()
            src.wait_guest_running(self._cancel)     # a Ctrl-C while it boots starts nothing
            self._configure(src, dst)
            uri = self.settings.uri or f"unix:{workdir / 'migration.sock'}"
            dst.cmd("migrate-incoming", uri=uri)
            before = src.guest_status()
            self.t0, self.real0 = time.monotonic(), time.time()
            if self._cancel.is_set():
                # Ctrl-C while the QEMUs started: no migration to cancel, none started
                final = {"status": "cancelled", "_t": 0.0}
            else:
                src.cmd("migrate", uri=uri)
                try:
                    final = self._poll(src, dst)
                except QemuError as exc:
                    final = {"status": "failed"}
                    self.st.outcome = f"error: {exc}"
            after = src.guest_status()
            self._collect(final)
            self._guest_rate(before, after)
            if self.st.status == "completed":
                self._verify(src, dst)
            return self.st
        finally:
            for vm in (src, dst):
                if vm is not None:
                    vm.close()
            shutil.rmtree(workdir, ignore_errors=True)

    def _configure(self, src: QemuVM, dst: QemuVM) -> None:
        caps = [{"capability": k, "state": v} for k, v in self.settings.capabilities.items()]
        # MIGRATION_PASS events time-stamp each dirty-bitmap sync (the rows' boundaries)
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        if caps:
            src.cmd("migrate-set-capabilities", capabilities=caps)
            # the destination needs the capabilities that change the stream (compress)
            dst.cmd("migrate-set-capabilities",
                    capabilities=[c for c in caps if c["capability"] in ("compress", "xbzrle", "multifd")])
        src.cmd("migrate-set-parameters", **self.settings.parameters)
        # the destination's side of the stream's settings (decompression, channels)
        mine = {k: v for k, v in self.settings.parameters.items()
                if k in ("compress-level", "multifd-channels", "multifd-compression")}
        if mine:
            dst.cmd("migrate-set-parameters", **mine)

    # -- polling --------------------------------------------------------------------------
    def _poll(self, src: QemuVM, dst: QemuVM) -> dict:
        """Poll query-migrate until a terminal status; apply the limits; returns the last
        answer -- or, for a source that stopped answering (``_source_silent``), its end
        (``cancelled`` / ``failed`` with the last answered ``ram`` figures).  QemuError
        when a QEMU dies or refuses a command."""
        p = self.cfg.params
        limited = cancel_sent = False      # a limit applied; migrate_cancel sent
        paused_at = silent_since = None    # pre-switchover seen; first unanswered poll
        while True:
            src.check_alive("migrating")
            asked = time.monotonic()
            info = src.query("query-migrate", SOURCE_QUERY_WAIT)
            if info is None:
                # QEMU answers late while it holds its big lock (the switchover under TCG):
                # ask again, until Ctrl-C or SOURCE_STALL_LIMIT
                silent_since = asked if silent_since is None else silent_since
                ended = self._source_silent(src, time.monotonic() - silent_since)
                if ended is not None:
                    return ended
                continue
            silent_since = None
            now = time.monotonic() - self.t0
            self._take_events(src)
            if self.events is not None:
                self.events.emit(dict(info))
            info["_t"] = now
            self.samples.append(info)
            status = self._source_status = info.get("status", "")
            if status == "active" and info.get("cpu-throttle-percentage", 0) > 0:
                self.throttled.append((info["cpu-throttle-percentage"], src.guest_status()))
            ram = info.get("ram", {})
            if self.on_progress is not None:
                self.on_progress({"status": status, "round": ram.get("dirty-sync-count", 0),
                                  "dirty-pages": ram.get("remaining", 0) // 4096,
                                  "bytes": ram.get("transferred", 0), "mbps": ram.get("mbps", 0.0),
                                  "elapsed": now})
            if status == "completed" and not info.get("total-time") and time.monotonic() < self._settle_deadline():
                # QEMU 7.2 reports "completed" a moment before migration_calculate_complete
                # fills total-time, downtime and mbps (all 0 until then): ask again
                time.sleep(0.01)
                continue
            if status in TERMINAL:
                return info
            if self._cancel.is_set() and not cancel_sent:
                # Ctrl-C: also after a forced limit (QEMU in device: cancelling)
                cancel_sent = True
                self.st.outcome = "cancelled"
                src.query("migrate_cancel", SOURCE_QUERY_WAIT)
            if not cancel_sent:                    # a cancelled stream ends the destination
                dst.check_alive("receiving the migration")
            if status == "pre-switchover":
                if paused_at is None:
                    paused_at = now
                    if self.pre_switchover is not None:
                        self.pre_switchover(self)
                    if not self._cancel.is_set():
                        src.query("migrate-continue", SOURCE_QUERY_WAIT, state="pre-switchover")
                    # else: the next poll sends migrate_cancel, which ends QEMU's pause
                    # (migration_cancel wakes it into CANCELLING): never continued
            elif status == "active" and not limited and not cancel_sent:
                why = None
                if ram.get("dirty-sync-count", 0) > p.max_iterations:
                    why = "max-iterations"
                elif now > p.time_limit:
                    why = "time-limit"
                if why is not None:
                    limited = True
                    if p.on_limit == "force":
                        self._forced = why
                        self.st.outcome = f"forced: {why}"
                        src.query("migrate-set-parameters", SOURCE_QUERY_WAIT,
                                  **{"downtime-limit": MAX_DOWNTIME_MS})
                    else:
                        self.st.outcome = why
                        cancel_sent = True
                        src.query("migrate_cancel", SOURCE_QUERY_WAIT)
            time.sleep(POLL)

    def _source_silent(self, src: QemuVM, silent: float) -> dict | None:
        """The source QEMU left query-migrate unanswered for ``silent`` seconds: returns
        None to poll again, or the run's end once Ctrl-C came (``cancelled``: migrate_cancel
        cannot reach a QEMU whose main loop does not run, so it is killed) or the silence
        passed SOURCE_STALL_LIMIT (``failed``).  Either way the source QEMU is killed
        first: what it did meanwhile is unknown, so the run is never ``completed``."""
        why = None
        if self._cancel.is_set():
            self.st.outcome = (f"cancelled (the source QEMU did not answer query-migrate for {silent:.0f} s: "
                               "killed, migrate_cancel could not reach it)")
            why = "cancelled"
        elif silent >= SOURCE_STALL_LIMIT:
            self.st.outcome = f"error: source QEMU did not answer query-migrate for {SOURCE_STALL_LIMIT:g} s"
            why = "failed"
        if why is None:
            return None
        src.kill()
        self._source_status = why
        last = next((s for s in reversed(self.samples) if s.get("ram")), {})
        return {"status": why, "ram": dict(last.get("ram", {})), "_t": time.monotonic() - self.t0}

    def _settle_deadline(self) -> float:
        """Until when a "completed" answer without its figures is asked again (2 s)."""
        if getattr(self, "_settle", None) is None:
            self._settle = time.monotonic() + 2.0
        return self._settle

    def _take_events(self, src: QemuVM) -> None:
        """Record each MIGRATION_PASS (dirty-sync-count N reached) at its QEMU timestamp,
        in seconds since the migrate command."""
        try:
            events = src.qmp.get_events(wait=False)
            src.qmp.clear_events()
        except Exception:      # events are a refinement: without them rows use the polls
            return
        for ev in events:
            if ev.get("event") == "MIGRATION_PASS":
                ts = ev.get("timestamp", {})
                when = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6 - self.real0
                self.passes[ev.get("data", {}).get("pass", 0)] = when

    # -- results --------------------------------------------------------------------------
    def _collect(self, final: dict) -> None:
        st, ps = self.st, 4096
        status = final.get("status", "failed")
        ram = final.get("ram", {})
        st.status = status
        if status == "completed":
            if st.outcome in ("cancelled", "max-iterations", "time-limit"):
                # migrate_cancel reached a QEMU that had already switched over (its
                # migration_cancel leaves that run alone): QEMU's completion is the outcome
                late = f"migrate_cancel for {st.outcome} came too late"
                st.outcome = f"forced: {self._forced} ({late})" if self._forced else f"converged ({late})"
            st.converged = not st.outcome.startswith("forced")
            st.outcome = st.outcome or "converged"
        elif status == "failed" and not st.outcome:
            st.outcome = f"error: {final.get('error-desc', 'QEMU reported failed')}"
        elif status == "cancelled" and not st.outcome:
            st.outcome = "cancelled"
        # a cancelled or failed migration has no total-time in query-migrate: our clock
        # from the migrate command to the last poll
        st.total_time = final.get("total-time", final.get("_t", 0.0) * 1000) / 1000
        st.setup_time = final.get("setup-time", 0) / 1000
        st.downtime = final.get("downtime", 0) / 1000
        active = [s for s in self.samples if s.get("status") == "active"]
        last = active[-1] if active else final
        # no poll while active (pre-copy under 50 ms): QEMU's value was still its initial
        # one, the downtime limit (it changes only after a dirty-rate period of 1 s)
        st.expected_downtime = last.get("expected-downtime", self.settings.parameters["downtime-limit"]) / 1000
        lram = last.get("ram", {})
        ram = ram or lram
        st.page_size = ram.get("page-size", ps) or ps
        st.ram_total = ram.get("total", 0)
        st.remaining = ram.get("remaining", 0) if status != "completed" else 0
        st.dirty_sync_count = ram.get("dirty-sync-count", 0)
        st.dirty_pages_rate = float(ram.get("dirty-pages-rate", lram.get("dirty-pages-rate", 0)))
        st.bandwidth = lram.get("mbps", 0.0) * 1e6 / 8
        st.window_bandwidth = st.bandwidth
        if status == "completed":
            st.average_bandwidth = ram.get("mbps", 0.0) * 1e6 / 8
        st.precopy_bytes = ram.get("precopy-bytes", 0)
        st.downtime_bytes = ram.get("downtime-bytes", 0)
        st.ram_queued = st.ram_transferred = ram.get("transferred", 0)
        st.switchover_time = max(0.0, st.total_time - st.downtime) if status == "completed" else 0.0
        xb = final.get("xbzrle-cache", {})
        comp = final.get("compression", {})
        st.ram = RAMStats(normal_pages=ram.get("normal", 0), zero_pages=ram.get("duplicate", 0),
                          xbzrle_pages=xb.get("pages", 0), xbzrle_bytes=xb.get("bytes", 0),
                          xbzrle_cache_miss=xb.get("cache-miss", 0), xbzrle_overflow=xb.get("overflow", 0),
                          compressed_pages=comp.get("pages", 0), compressed_bytes=comp.get("compressed-size", 0))
        st.xbzrle_cache_size = self.settings.parameters.get("xbzrle-cache-size", 0)
        if comp:
            st.compression = {"method": "zlib", "where": "pages", **comp}
        st.iterations = self._iterations(final)
        # auto-converge: QEMU shows cpu-throttle-percentage while it throttles; each change
        # seen by a poll is an event (QEMU does not report the period's dirty bytes)
        for sample in self.samples:
            pct = sample.get("cpu-throttle-percentage", 0)
            if pct != st.cpu_throttle_percentage and sample.get("status") == "active":
                st.throttle_events.append(ThrottleEvent(sample["_t"], pct, None, None))
                st.cpu_throttle_percentage = pct
        st.qemu = {**(st.qemu or {}), "query-migrate": {k: v for k, v in final.items() if k != "_t"},
                   "polls": len(self.samples)}
        st.params = {**st.params, "qemu-capabilities": self.settings.capabilities,
                     "qemu-parameters": self.settings.parameters}

    @staticmethod
    def _pages(info: dict) -> int:
        if "_pages" in info:            # interpolated by _at
            return info["_pages"]
        ram = info.get("ram", {})
        return (ram.get("normal", 0) + ram.get("duplicate", 0) + info.get("xbzrle-cache", {}).get("pages", 0)
                + info.get("compression", {}).get("pages", 0))

    def _iterations(self, final: dict) -> list[IterationStats]:
        """One row per dirty-sync-count reached while the guest ran, and the final
        stop-and-copy row from QEMU's own downtime figures.

        A row starts when its count was reached: QEMU's MIGRATION_PASS timestamp, or else
        the first poll that saw the count.  The counters at that moment are interpolated
        linearly between the polls around it (exact at a poll).  Counts reached between two
        polls still get their row (from their events).  For a completed run the count of
        the final sync belongs to the final row (QEMU 7.2 stays "active" during the
        stop-and-copy, so a poll may see it), the sync just before it (the one that
        decided to complete) starts no row, and pre-copy ends at ``total - downtime``
        with QEMU's ``precopy-bytes`` (pages after the last poll split by bytes).  With
        multifd QEMU's precopy/downtime-bytes count only the main channel: pre-copy then
        ends at the last poll, or, when no poll fell inside it, is estimated by time."""
        ps = 4096
        fram = final.get("ram", {})
        completed = final.get("status") == "completed"
        last_count = fram.get("dirty-sync-count", 0) if completed else None
        end_t = (final.get("total-time", 0) - final.get("downtime", 0)) / 1000 if completed else None
        pre = [s for s in self.samples if s.get("status") in ("setup", "active") and s.get("ram")
               and (not completed or (s["ram"].get("dirty-sync-count", 0) < last_count and s["_t"] <= end_t))]
        # the curve of (time, bytes, pages) from the start to the end of pre-copy
        curve = [(0.0, 0, 0)] + [(s["_t"], s["ram"].get("transferred", 0), self._pages(s)) for s in pre]
        if completed:
            # pages sent between the last poll and the guest's stop: QEMU reports only the
            # bytes (precopy-bytes), so the pages are interpolated by bytes up to the end
            _t, b0, p0 = curve[-1]
            # with multifd, QEMU's precopy-bytes / downtime-bytes count only the main
            # channel: pre-copy then ends at the last poll, the rest is the final row's
            multifd = fram.get("multifd-bytes", 0) > 0
            pre_bytes = b0 if multifd else fram.get("precopy-bytes", b0)
            if multifd and not b0 and final.get("total-time"):
                # no poll fell inside a multifd pre-copy: split by time (an estimate,
                # assuming one throughput for both phases)
                share = max(0.0, 1 - final.get("downtime", 0) / final["total-time"])
                pre_bytes = round(fram.get("transferred", 0) * share)
            rest = fram.get("transferred", 0) - b0
            pages = p0 + round((self._pages(final) - p0) * (pre_bytes - b0) / rest) if rest > 0 else p0
            curve.append((max(end_t, curve[-1][0]), pre_bytes, pages))
        counts = {s["ram"].get("dirty-sync-count", 0) for s in pre}
        counts |= {c for c in self.passes
                   if 1 <= c and (c < last_count if completed else c <= max(counts, default=0))}
        if completed:
            # the sync that decided completion (ram_save_pending's, one before the final
            # sync) starts no pass: its moment folds into the previous row, as in the simulator
            if len(counts) > 1:
                counts.discard(last_count - 1)
        starts = []
        for c in sorted(counts):
            first = next((s for s in pre if s["ram"].get("dirty-sync-count", 0) >= c), None)
            when = 0.0 if c <= 1 else self.passes.get(c, first["_t"] if first else curve[-1][0])
            dirty = fram.get("total", 0) // ps if c <= 1 else (first or {"ram": {}})["ram"].get("remaining", 0) // ps
            starts.append((c, min(when, curve[-1][0]), dirty))
        rows = []
        for i, (c, when, dirty) in enumerate(starts):
            end = starts[i + 1][1] if i + 1 < len(starts) else curve[-1][0]
            t0, b0, p0 = self._interpolate(curve, when)
            t1, b1, p1 = self._interpolate(curve, end)
            row = IterationStats(i + 1, dirty, sync=c)
            first = next((s for s in pre if s["ram"].get("dirty-sync-count", 0) >= c), None)
            row.cpu_throttle = (first or {}).get("cpu-throttle-percentage", 0)
            row.duration, row.bytes_sent, row.pages_sent = max(0.0, t1 - t0), max(0, b1 - b0), max(0, p1 - p0)
            row.bandwidth = row.bytes_sent / max(row.duration, 1e-9)
            rows.append(row)
        if completed:
            fin = IterationStats(len(rows) + 1, pre[-1]["ram"].get("remaining", 0) // ps if pre else 0,
                                 final=True, sync=last_count)
            fin.pages_sent = self._pages(final) - curve[-1][2]
            fin.bytes_sent = (fram.get("transferred", 0) - curve[-1][1] if fram.get("multifd-bytes", 0) > 0
                              else fram.get("downtime-bytes", 0))
            fin.duration = final.get("downtime", 0) / 1000
            fin.bandwidth = fin.bytes_sent / max(fin.duration, 1e-9)
            rows.append(fin)
        return rows

    @staticmethod
    def _interpolate(curve: list[tuple[float, int, int]], t: float) -> tuple[float, int, int]:
        """(t, bytes, pages) at time ``t`` on the piecewise-linear ``curve``."""
        if t <= curve[0][0]:
            return curve[0]
        for (ta, ba, pa), (tb, bb, pb) in zip(curve, curve[1:]):
            if ta <= t <= tb:
                f = (t - ta) / (tb - ta) if tb > ta else 1.0
                return t, round(ba + f * (bb - ba)), round(pa + f * (pb - pa))
        return curve[-1]

    def _guest_rate(self, before, after) -> None:
        d = self.guest
        spec = self.cfg.workload if isinstance(self.cfg.workload, str) else repr(self.cfg.workload)
        kind = next(k for k, v in KINDS.items() if v == d.kind)
        info: dict[str, Any] = {"spec": spec, "kind": kind, "rate-pages": d.rate, "write-bytes": d.write_bytes,
                                "guest-pages": d.n_pages}
        if before is not None and after is not None and after.seconds > before.seconds:
            info["writes"] = after.writes - before.writes
            info["guest-seconds"] = round(after.seconds - before.seconds, 3)
            info["achieved-rate-pages"] = round(info["writes"] / (after.seconds - before.seconds), 1)
            # the guest seconds it credited as running (CPU-bound guest: less when throttled)
            info["running-seconds"] = round(after.running_seconds - before.running_seconds, 3)
        info.update(_throttled_span(self.throttled))
        self.st.workload = info

    def _verify(self, src: QemuVM, dst: QemuVM) -> None:
        """After the source completed: wait for the destination to finish loading, then
        compare both RAM files by sha256.  Fills ``verification`` and ``destination``;
        a destination that failed, died or did not finish fails the run (nothing was
        compared, never "mismatch"); a cancel ends the wait or the hashing at once and
        leaves the run ``completed``, not verified.  Returns None."""
        info = self._await_destination(dst)
        if info is None:
            self._interrupted()
            return
        if info.get("status") != "completed":
            self._destination_failed(info.get("error-desc") or f"status {info.get('status')}")
            return
        self.st.destination = {"status": "completed", "qemu": self.qemu.version}
        mine = _sha256(src.ram_file, self._cancel)
        theirs = _sha256(dst.ram_file, self._cancel) if mine is not None else None
        if theirs is None:
            self._interrupted()
            return
        self.st.verification = {"method": "sha256", "ok": mine == theirs,
                                "mismatched": [] if mine == theirs else ["pc.ram"], "block": "pc.ram"}
        if mine != theirs and self.qemu.version_tuple[:2] < (9, 0):
            self.st.verification["note"] = TCG_LOST_WRITES

    def _await_destination(self, dst: QemuVM) -> dict | None:
        """Poll the destination's query-migrate until a terminal status; returns the last
        answer (status ``failed`` with an ``error-desc`` when it died, refused, or was
        still loading after FINISH_TIMEOUT), or None once ``cancel()`` was called.  A
        query it leaves unanswered (busy, stopped) blocks for DEST_QUERY_WAIT at most."""
        deadline = time.monotonic() + FINISH_TIMEOUT
        info: dict = {}
        while not self._cancel.is_set():
            try:
                answer = dst.query("query-migrate", DEST_QUERY_WAIT)
            except QemuError as exc:
                return {"status": "failed", "error-desc": str(exc)}
            if answer is not None:
                info = answer
            status = info.get("status")
            if status == "failed" and not info.get("error-desc"):
                tail = dst.stderr_tail()
                info["error-desc"] = "QEMU reported failed" + (f": {tail}" if tail else "")
            if status in TERMINAL:
                return info
            if time.monotonic() > deadline:
                return {"status": "failed", "error-desc": f"still loading after {FINISH_TIMEOUT:g} s "
                                                          f"(status {status or 'unanswered'})"}
            self._cancel.wait(0.02)
        return None

    def _destination_failed(self, error: str) -> None:
        """The source completed but the destination QEMU did not: the run failed (the
        guest did not arrive), as the simulator's session says of a failed destination."""
        st = self.st
        st.status, st.converged = "failed", False
        st.outcome = f"error: destination failed: {error}"
        st.verification = destination_failed("sha256", error)
        st.destination = {"status": "failed", "error": error, "qemu": self.qemu.version}

    def _interrupted(self) -> None:
        """A cancel (Ctrl-C) after the source QEMU completed: migrate_cancel does nothing
        to a completed migration, so the status stays QEMU's; the verification says it
        was not obtained (completion ``not-verified``, as after a completed postcopy)."""
        self.st.verification = {"method": "sha256", "ok": None, "done": False,
                                "error": "interrupted before the destination's verdict; the source QEMU had "
                                         "already completed the migration (migrate_cancel does nothing to a "
                                         "completed migration)"}


def run_qemu_migration(cfg: Any, *, on_progress: Callable[[dict], None] | None = None,
                       pre_switchover: Callable | None = None, events: Any = None,
                       control: Any = None) -> MigrationStats:
    """Run ``cfg`` (a MigrationConfig) on real QEMU (``cfg.qemu``: a path or version, else
    ``$NPQFILE_QEMU`` / PATH); returns the statistics.  Raises ValueError for an option
    QEMU does not have, QemuNotFound for a missing QEMU, QemuError when QEMU cannot start
    -- all before or without a migration; a QEMU that dies mid-run gives status failed.
    ``events``: an EventWriter fed QEMU's own query-migrate answers (the caller writes
    its ``result`` line).  ``control``: a MigrationControl whose cancel (Ctrl-C) sends
    ``migrate_cancel``."""
    try:
        qemu = find_qemu(getattr(cfg, "qemu", None))
    except QemuNotFound as exc:
        raise ValueError(f"--engine qemu: {exc}") from None
    run = QemuMigration(cfg, qemu, on_progress=on_progress, pre_switchover=pre_switchover, events=events)
    if control is None:
        return run.run()
    control.attach(run)
    try:
        return run.run()
    finally:
        control.attach(None)
