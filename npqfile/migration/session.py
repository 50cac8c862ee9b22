"""One whole migration, end to end: build the guest, pick a transport, migrate, verify.

Supports: :class:`MigrationConfig` (guest size and block name, initial contents,
workload spec, :class:`~npqfile.migration.engine.MigrationParams`, compression, the
destination URI) and :func:`run_migration`, which returns the statistics with the
verification filled in.  Transports: ``None`` / ``inprocess`` (a socketpair, the
destination loading in a thread of this process), ``tcp:HOST:PORT`` and ``unix:PATH``
(an ``npqfile incoming`` elsewhere; it sends its per-block sha256 back on the return
path, see ``destination``), ``file:PATH`` (a snapshot; verified by loading the file
back), ``exec:CMD`` and ``null:`` (not verifiable: no return path).

Goals: "the destination equals the source at switchover", checked every time it can
be: block by block with ``np.array_equal`` in-process, by sha256 otherwise (always by
hash when release-ram has released the source's pages).  A run is only ``completed``
when the channel also closed cleanly (``qemu_fclose``'s result: an ``exec:`` command
that exits non-zero fails the migration).  When the destination failed, nothing was
compared: the verification says so (``done`` False, ``error`` "destination failed:
..."), never "mismatch".  Plan: the config is a plain picklable dataclass, so a sweep
can ship it to worker processes.
"""

from __future__ import annotations

import os
import select
import socket
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
from npqfile.migration.destination import (
    Destination,
    block_hashes,
    read_verification,
)
from npqfile.migration.engine import MigrationEngine, MigrationParams
from npqfile.migration.events import EventWriter
from npqfile.migration.multifd import multifd_connect, multifd_inprocess
from npqfile.migration.stats import MigrationStats
from npqfile.migration.workloads import Workload, make_workload
from npqfile.qemufile import QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream.loader import load_stream
from npqfile.units import format_bytes

INITS = ("zero", "random", "mixed")
VERIFY_TIMEOUT = 120.0      # seconds to wait for the destination's verdict
FAILED_REPLY_WAIT = 2.0     # after our own failure, for its reason


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


def destination_failed(method: str, reason: str | None) -> dict:
    """The verification of a run whose destination failed: nothing was compared, so
    ``done`` is False and ``error`` says why; ``ok`` is False (the guest did not arrive)."""
    return {"method": method, "ok": False, "done": False, "error": f"destination failed: {reason}"}


def _compare_hashes(mine: dict[str, str], theirs: dict[str, str]) -> dict:
    bad = sorted(n for n in mine if theirs.get(n) != mine[n])
    return {"method": "sha256", "ok": not bad, "mismatched": bad}


def run_migration(cfg: MigrationConfig, *, on_progress: Callable[[dict], None] | None = None,
                  pre_switchover: Callable | None = None, ram: GuestRAM | None = None,
                  workload: Workload | None = None, events: EventWriter | None = None) -> MigrationStats:
    """Run the migration ``cfg`` describes and return its statistics.

    ``ram``/``workload`` override the ones the config would build (tests pass their own).
    ``events``: an EventWriter fed the engine's live ``query-migrate`` (the caller writes
    its ``result`` line).
    ``stats.verification["ok"]`` is True when the destination matched the source at
    switchover, False on a mismatch, None when the transport cannot tell.  Raises
    ValueError for a bad config, OSError when the destination URI cannot be opened.
    With ``cfg.engine == "qemu"`` real QEMU runs the scenario (``qemu_engine``)."""
    if cfg.engine != "simulator":
        if cfg.engine != "qemu" or ram is not None or workload is not None:
            raise ValueError(f"engine {cfg.engine!r}: run_migration takes simulator or qemu (with its own "
                             "guest); both engines: npqfile.migration.compare.run_both")
        from npqfile.migration.qemu_engine import run_qemu_migration
        return run_qemu_migration(cfg, on_progress=on_progress, pre_switchover=pre_switchover, events=events)
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
        return _run(cfg, ram, wl, comp, params, on_progress, pre_switchover, events)
    finally:
        if own_ram:
            ram.close()


def _run(cfg, ram, wl, comp, params, on_progress, pre_switchover, events=None) -> MigrationStats:
    params.check()      # before anything is opened: a bad parameter leaves nothing behind
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
            if params.multifd_channels:
                mf = multifd_connect(to, params)
        if comp.on_channel:
            channel = CompressingWriter(channel, comp)
        remote = to.startswith(("tcp:", "unix:"))
        f = QEMUFile(channel)
        engine = MigrationEngine(ram, f, wl, params, pre_switchover=pre_switchover, on_progress=on_progress,
                                 hash_at_switchover=cfg.verify and params.release_ram, multifd=mf)
        if events is not None:
            events.attach(engine)
        try:
            st = engine.run()
        finally:
            if events is not None:
                events.stop()
        if comp.method == "zlib":
            st.compression = {"method": "zlib", "level": comp.level, "where": "pages",
                              "pages": st.ram.compressed_pages, "bytes-out": st.ram.compressed_bytes}
        src_hashes = engine.switchover_hashes or None
        postcopy = engine.postcopy
        if st.status == "completed" and cfg.verify and src_hashes is None and (to != "inprocess" or postcopy):
            src_hashes = block_hashes(ram)
        if remote and cfg.verify:
            st.verification = _remote_verdict(f, st, src_hashes if cfg.verify else None,
                                              postcopy.return_path if postcopy else None)
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
            res = dest.join(VERIFY_TIMEOUT)
            st.destination = res.as_dict()
            if res.status != "completed" and cfg.verify and st.status != "cancelled":
                st.verification = destination_failed("compare", res.error)
            elif st.status == "completed" and cfg.verify and postcopy is not None and postcopy.active:
                # the destination's guest changed its RAM: compare RAM as it was received
                st.verification = _compare_hashes(src_hashes, res.hashes)
            elif st.status == "completed" and cfg.verify:
                st.verification = _compare(ram, dest_ram, src_hashes)
        elif to.startswith("file:") and st.status == "completed" and cfg.verify:
            st.verification = _verify_file(to[5:], ram, src_hashes, comp, params.mapped_ram)
        elif not remote and st.status == "completed":
            scheme = to.split(":")[0]
            st.verification = {"method": None, "ok": None, "note": f"{scheme}: has no return path"}
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
            dest.join(VERIFY_TIMEOUT)
        if dest_ram is not None:
            dest_ram.close()


def _remote_verdict(f: QEMUFile, st: MigrationStats, src_hashes: dict | None, rp: QEMUFile | None = None) -> dict:
    """Half-close our side, then read the destination's verification message (after a
    failed run too, briefly: it may say why the destination gave up) from ``rp`` (postcopy's
    return path, already read up to SHUT) or a new return path."""
    failed = st.status != "completed"
    if st.status == "cancelled":
        return {}
    try:
        if not failed:
            finish = getattr(f.channel, "finish", None)
            if finish is not None:
                finish()            # the zstd frame ends before our half of the connection
            f.channel.shutdown(False, True)
        rp = rp or f.get_return_path()
        if rp is None:
            return {"method": None, "ok": None, "note": "no return path"}
        try:
            ready = select.select([rp.channel.fileno()], [], [], FAILED_REPLY_WAIT if failed else VERIFY_TIMEOUT)[0]
            msg = read_verification(rp) if ready else None
        finally:
            rp.close()
    except (OSError, StreamError) as exc:
        return {} if failed else {"method": "sha256", "ok": False, "error": f"return path: {exc}"}
    if msg is None:
        return {} if failed else {"method": None, "ok": None,
                                  "note": "the destination sent no verification (not npqfile?)"}
    st.destination = msg
    if msg.get("status") != "completed":
        if failed:
            st.outcome += f" (destination: {msg.get('error')})"
        return destination_failed("sha256", msg.get("error"))
    if src_hashes is None:
        return {"method": None, "ok": None, "note": "verification off"}
    return _compare_hashes(src_hashes, msg.get("hashes", {}))


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
