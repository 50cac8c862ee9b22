"""One whole migration, end to end: build the guest, pick a transport, migrate, verify.

Supports: :class:`MigrationConfig` (guest size and block name, initial contents,
workload spec, :class:`~npqfile.migration.engine.MigrationParams`, compression, the
destination URI, the peer kind, the stall timeout) and :func:`run_migration`, which
returns the statistics with the verification filled in.  Transports: ``None`` /
``inprocess`` (a socketpair, the destination loading in a thread of this process),
``tcp:HOST:PORT`` and ``unix:PATH`` (an ``npqfile incoming`` elsewhere; it sends its
verdict and per-block sha256 back on the return path, see ``destination`` and
``verdict``; ``peer="qemu"`` for a real QEMU, which sends none), ``file:PATH`` (a
snapshot; verified by loading the file back), ``exec:CMD`` and ``null:`` (not
verifiable: no return path).  A ``MigrationControl`` cancels the run from outside.

Goals: "the destination equals the source at switchover", checked every time it can
be: block by block with ``np.array_equal`` in-process, by sha256 otherwise.  A run is
only ``completed`` when the channel also closed cleanly (``qemu_fclose``'s result: an
``exec:`` command that exits non-zero fails the migration) and, for a destination that
sends a verdict, when that verdict came: a destination that failed, died or stalled
fails the run.  When the destination failed, nothing was compared: the verification
says so (``done`` False, ``error`` "destination failed: ..."), never "mismatch".
release-ram releases the source's RAM only after a verdict of equal RAM
(``release_ram``), and is refused where none can come.  Plan: the config is a plain
picklable dataclass, so a sweep can ship it to worker processes.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from npqfile.channels import SocketChannel, open_channel
from npqfile.errors import StreamError
from npqfile.migration.compression import (
    CompressingWriter,
    DecompressingReader,
    parse_compress,
)
from npqfile.migration.control import MigrationControl
from npqfile.migration.destination import Destination, block_hashes
from npqfile.migration.engine import MigrationEngine, MigrationParams, resident_bytes
from npqfile.migration.events import EventWriter
from npqfile.migration.multifd import multifd_connect, multifd_inprocess
from npqfile.migration.release_ram import (
    POSTCOPY,
    ReleaseRecord,
    check_release_ram,
    may_release,
    release_after_verdict,
)
from npqfile.migration.stats import MigrationStats
from npqfile.migration.verdict import (
    NPQFILE,
    STALL_TIMEOUT,
    await_verdict,
    cancelled_wait,
    compare_hashes,
    destination_failed,
    peer_of,
    verdict_wait,
)
from npqfile.migration.workloads import Workload, make_workload
from npqfile.qemufile import QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream.loader import load_stream
from npqfile.units import format_bytes

INITS = ("zero", "random", "mixed")
VERIFY_TIMEOUT = 120.0      # seconds to wait for the in-process destination's thread


@dataclass
class MigrationConfig:
    """Everything ``npqfile migrate`` needs; see the module docstring."""
    size: int = 256 << 20
    block: str = "ram"                 # QEMU's default RAM id for -M none
    init: str = "mixed"                # zero | random | mixed (3/4 random pages, 1/4 zero)
    workload: Any = "hotset:rate=25000,hot=0.05,share=0.9"   # spec string, Workload or callable
    seed: int = 1
    to: str | None = None              # None/"inprocess" or a migration URI
    compress: str = "none"
    verify: bool = True
    params: MigrationParams = field(default_factory=MigrationParams)
    peer: str | None = None            # tcp:/unix: peer: npqfile (default, sends a verdict) or qemu
    stall_timeout: float = STALL_TIMEOUT   # seconds a tcp:/unix: peer may take no data / send no verdict
    engine: str = "simulator"          # simulator | qemu (real QEMU: npqfile.migration.qemu_engine)
    qemu: str | None = None            # the QEMU binary or version for engine "qemu"


def fill_guest(ram: GuestRAM, init: str, seed: int) -> None:
    """Give the guest its contents before migration (not tracked as dirty: the bulk
    pass sends every page anyway).  ValueError for an unknown ``init``."""
    if init not in INITS:
        raise ValueError(f"unknown initial contents {init!r} (choose {', '.join(INITS)})")
    if init == "zero":
        return
    rng = np.random.default_rng(seed)
    for b in ram.blocks:
        # float64 mantissas: fast random bytes (about 2 GB/s), compressible like real data a little
        words = b.array.view(np.float64)
        step = 1 << 21
        for start in range(0, words.size, step):
            words[start:start + step] = rng.random(min(step, words.size - start))
        if init == "mixed":
            b.pages[rng.random(b.n_pages) < 0.25] = 0


def add_guest_block(ram: GuestRAM, name: str, size: int) -> None:
    """``ram.add_block(name, size)``; returns nothing.  A block the system cannot map
    raises OSError naming the guest RAM size and the block (not a bare ENOMEM)."""
    try:
        ram.add_block(name, size)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot allocate the {format_bytes(size)} guest RAM "
                                 f"(block {name!r}): {exc.strerror or exc}") from None


def _make_ram(cfg: MigrationConfig) -> GuestRAM:
    ram = GuestRAM()
    try:
        add_guest_block(ram, cfg.block, cfg.size)
    except BaseException:
        ram.close()
        raise
    return ram


def _compare(src: GuestRAM, dst: GuestRAM | None, src_hashes: dict[str, str] | None) -> dict:
    """Block-by-block verdict: direct compare, or hashes when the source was released."""
    if dst is None:
        return {"method": "compare", "ok": False, "error": "destination has no RAM"}
    bad = []
    for b in src.blocks:
        if b.name not in dst:
            bad.append(b.name)
            continue
        other = dst.block(b.name)
        if src_hashes is not None:
            if other.sha256() != src_hashes.get(b.name):
                bad.append(b.name)
        elif other.size != b.size or not np.array_equal(b.array, other.array):
            bad.append(b.name)
    return {"method": "sha256" if src_hashes is not None else "compare", "ok": not bad, "mismatched": bad}


def run_migration(cfg: MigrationConfig, *, on_progress: Callable[[dict], None] | None = None,
                  pre_switchover: Callable | None = None, ram: GuestRAM | None = None,
                  workload: Workload | None = None, events: EventWriter | None = None,
                  control: MigrationControl | None = None) -> MigrationStats:
    """Run the migration ``cfg`` describes and return its statistics.

    ``ram``/``workload`` override the ones the config would build (tests pass their own).
    ``events``: an EventWriter fed the engine's live ``query-migrate`` (the caller writes
    its ``result`` line).  ``control``: cancel the run from another thread or a signal
    handler.
    ``stats.verification["ok"]`` is True when the destination matched the source at
    switchover, False on a mismatch, None when the transport cannot tell.  Raises
    ValueError for a bad config (release-ram where no verdict can come included),
    OSError when the destination URI cannot be opened.  With ``cfg.engine == "qemu"``
    real QEMU runs the scenario (``qemu_engine``)."""
    if cfg.engine != "simulator":
        if cfg.engine != "qemu" or ram is not None or workload is not None:
            raise ValueError(f"engine {cfg.engine!r}: run_migration takes simulator or qemu (with its own "
                             "guest); both engines: npqfile.migration.compare.run_both")
        from npqfile.migration.qemu_engine import run_qemu_migration
        return run_qemu_migration(cfg, on_progress=on_progress, pre_switchover=pre_switchover, events=events,
                                  control=control)
    comp = parse_compress(cfg.compress)
    params = cfg.params
    params.compress_level = comp.page_level
    own_ram = ram is None
    if own_ram:
        ram = _make_ram(cfg)
    try:
        if own_ram:
            fill_guest(ram, cfg.init, cfg.seed)
        wl = workload or make_workload(cfg.workload, seed=cfg.seed)
        return _run(cfg, ram, wl, comp, params, on_progress, pre_switchover, events, control)
    finally:
        if own_ram:
            ram.close()


def _check(cfg: MigrationConfig, params: MigrationParams):
    """Validate what can be checked before anything is opened; returns the Peer.
    ValueError naming the bad setting."""
    params.check()
    if not cfg.stall_timeout > 0:
        raise ValueError(f"--stall-timeout must be a positive number of seconds, got {cfg.stall_timeout}")
    peer = peer_of(cfg.to, cfg.peer)
    check_release_ram(params.release_ram, verdict_possible=peer.sends_verdict and cfg.verify,
                      why_not=peer.why_no_verdict() or "verification is off (--no-verify)")
    return peer


def _run(cfg, ram, wl, comp, params, on_progress, pre_switchover, events=None, control=None) -> MigrationStats:
    peer = _check(cfg, params)      # a bad setting leaves nothing behind
    to = cfg.to or "inprocess"
    dest = None
    dest_ram = None
    mf = recv = None            # multifd sender / in-process receiver
    postcopy = None
    channel: Any = None
    f = None
    try:
        if to == "inprocess":
            a, b = socket.socketpair()
            channel = SocketChannel(a, "w")
            reader: Any = SocketChannel(b, "r")
            if comp.on_channel:
                reader = DecompressingReader(reader, comp)
            dest_ram = GuestRAM()
            for blk in ram.blocks:
                add_guest_block(dest_ram, blk.name, blk.size)
            if params.multifd_channels:
                mf, recv = multifd_inprocess(dest_ram, params, reader)
            # postcopy: the guest goes on running its workload (a spec: a Workload object
            # is the source's own) on the destination after RUN
            spec = cfg.workload if isinstance(cfg.workload, str) else None
            guest = make_workload(spec, seed=cfg.seed + 1) if spec and params.postcopy_after is not None else None
            dest = Destination(dest_ram, machine=params.machine, hash_blocks=False, multifd=recv, guest=guest)
            dest.start(reader)
        else:
            channel = open_channel(to, "w")
            if peer.remote and params.postcopy_after is None:
                # not with postcopy: its return-path thread reads the same socket and
                # may rightly hear nothing for longer than the stall timeout
                channel.set_stall_timeout(cfg.stall_timeout, "the destination")
            if params.multifd_channels:
                mf = multifd_connect(to, params)
        if comp.on_channel:
            channel = CompressingWriter(channel, comp)
        f = QEMUFile(channel)
        # postcopy releases pages before the verdict: hash the source at the switch
        postcopy_release = params.release_ram and params.postcopy_after is not None
        engine = MigrationEngine(ram, f, wl, params, pre_switchover=pre_switchover, on_progress=on_progress,
                                 hash_at_switchover=cfg.verify and postcopy_release, multifd=mf)
        if events is not None:
            events.attach(engine)
        if control is not None:
            control.attach(engine)
        try:
            st = engine.run()
        finally:
            if control is not None:
                control.attach(None)
            if events is not None:
                events.stop()
        if comp.method == "zlib":
            st.compression = {"method": "zlib", "level": comp.level, "where": "pages",
                              "pages": st.ram.compressed_pages, "bytes-out": st.ram.compressed_bytes}
        src_hashes = engine.switchover_hashes or None
        postcopy = engine.postcopy
        if st.status == "completed":
            if cfg.verify and src_hashes is None and (to != "inprocess" or postcopy):
                src_hashes = block_hashes(ram)      # the guest is stopped: RAM at switchover
            if on_progress is not None:     # the last byte is written, the verdict awaited
                on_progress(engine.progress_info("wait-verdict"))
        if peer.remote and peer.kind == NPQFILE:
            st.verification = await_verdict(f, st, src_hashes, wait=verdict_wait(cfg.stall_timeout, ram.total_size),
                                            control=control, rp=postcopy.return_path if postcopy else None,
                                            switched=postcopy is not None and postcopy.active)
        elif peer.remote and st.status == "completed":
            st.verification = {"method": None, "ok": None,
                               "note": "the destination is QEMU (--peer qemu): no verdict"}
        if postcopy is not None:
            postcopy.close()
        ret = f.close()
        if ret < 0 and st.status == "completed":
            # qemu_fclose's result: e.g. an exec: command that failed after reading
            # everything; the stream did not reach its destination intact
            st.status, st.converged = "failed", False
            st.outcome = f"error: {f.error or os.strerror(-ret)}"
        f = None
        if comp.on_channel:   # after close: the zstd frame's end is written then
            st.compression = {"method": comp.method, "level": comp.level, "where": "channel",
                              "bytes-in": channel.bytes_in, "bytes-out": channel.bytes_out}
        if dest is not None:
            _inprocess_verdict(st, dest, ram, dest_ram, cfg.verify, src_hashes,
                               postcopy is not None and postcopy.active, control)
        elif to.startswith("file:") and st.status == "completed" and cfg.verify:
            st.verification = _verify_file(to[5:], ram, src_hashes, comp, params.mapped_ram)
        elif not peer.remote and st.status == "completed":
            scheme = to.split(":")[0]
            st.verification = {"method": None, "ok": None, "note": f"{scheme}: has no return path"}
        _release(st, ram, params, engine.t0, postcopy is not None and postcopy.active)
        return st
    finally:
        # On any exit: the stream closed (the destination then sees its end), the
        # destination thread finished, its RAM unmapped.
        if f is not None:
            f.close()
        elif channel is not None and hasattr(channel, "close"):
            channel.close()
        if mf is not None:
            mf.close(abort=True)            # a no-op after the engine closed it
        if recv is not None:
            recv.close()
        if postcopy is not None:
            postcopy.close()            # its return-path thread and socket reference too
        if dest is not None:
            dest.join(VERIFY_TIMEOUT, control.wait_fd() if control is not None else None)
        if dest_ram is not None and not (dest is not None and dest.running):
            # a cancel does not wait for a destination still busy with its last bytes (its
            # input is closed, it ends on its own): its RAM is left to it, never unmapped under it
            dest_ram.close()


def _inprocess_verdict(st: MigrationStats, dest: Destination, ram: GuestRAM, dest_ram: GuestRAM,
                       verify: bool, src_hashes: dict | None, postcopied: bool,
                       control: MigrationControl | None = None) -> None:
    """The in-process destination's verdict: its thread's result, then the comparison
    (after postcopy, of the RAM as it was received: the destination's guest changed it
    since).  A destination that failed fails a completed run; a ``control`` cancel
    (Ctrl-C) ends the wait at once (``cancelled_wait``).  Returns None (fills ``st``)."""
    res = dest.join(VERIFY_TIMEOUT, control.wait_fd() if control is not None else None)
    if res is None:                 # Ctrl-C while the destination was still at work
        if st.status == "completed":
            st.verification = cancelled_wait(st, postcopied)
        return
    st.destination = res.as_dict()
    if st.status == "cancelled":
        return
    if res.status != "completed":
        st.verification = destination_failed("compare", res.error)
        if st.status == "completed":
            st.status, st.converged = "failed", False
            st.outcome = f"error: destination failed: {res.error}"
    elif st.status == "completed" and not verify:
        st.verification = {"method": None, "ok": None, "note": "verification off"}
    elif st.status == "completed" and postcopied:
        st.verification = compare_hashes(src_hashes or {}, res.hashes)
    elif st.status == "completed":
        st.verification = _compare(ram, dest_ram, src_hashes)


def _release(st: MigrationStats, ram: GuestRAM, params: MigrationParams, t0: float, postcopied: bool) -> None:
    """release-ram's rule (``release_ram``): after postcopy the pages were released as
    they were sent (the engine counted them); in pre-copy release the source's RAM after
    a verdict of equal RAM, else nothing.  Records what and why.  Returns None."""
    record = ReleaseRecord(enabled=params.release_ram)
    if params.release_ram and postcopied:
        record.when, record.reason = POSTCOPY, may_release(POSTCOPY)[1]
    elif release_after_verdict(ram, record, st, t0):
        st.rss_after = resident_bytes(ram)
        if params.sample_rss:
            st.timeline.append((time.monotonic() - t0, st.stream_bytes, st.rss_after))
    st.release = record.as_dict(st)


def _verify_file(path: str, ram: GuestRAM, src_hashes: dict | None, comp, sizes: bool = False) -> dict:
    """Load the snapshot file back into a fresh GuestRAM and compare; returns the
    verification dict (a file that does not load gives ``ok`` False, ``done`` False)."""
    check = GuestRAM()
    try:
        for b in ram.blocks:
            add_guest_block(check, b.name, b.size)
        reader: Any = open_channel(f"file:{path}", "r")
        if comp.on_channel:
            reader = DecompressingReader(reader, comp)
        with QEMUFile(reader) as rf:
            load_stream(rf, check)
        res = _compare(ram, check, src_hashes)
        if sizes:   # a mapped-ram file is sparse: its zero pages are holes
            st = os.stat(path)
            res.update({"file-bytes": st.st_size, "on-disk-bytes": st.st_blocks * 512})
        return res
    except (StreamError, OSError) as exc:
        return {"method": "sha256" if src_hashes is not None else "compare", "ok": False, "done": False,
                "error": f"loading {path} back failed: {exc}"}
    finally:
        check.close()
