"""A parameter study: the cartesian product of ``PARAM=V1,V2,...`` lists, run in parallel.

Supports: :data:`SWEEP_PARAMS` (QEMU's names: ``max-bandwidth``, ``downtime-limit`` in
ms, ``xbzrle-cache-size``, ``max-iterations``, ``release-ram``; npqfile's ``dirty-rate``,
``size``, ``workload``, ``compress``; the short ``bandwidth``, ``downtime``,
``xbzrle-cache`` as aliases), :func:`parse_sweep`
(``["bandwidth=50MB/s,200MB/s", "dirty-rate=1000,20000"]`` -> the
list of cases), :func:`apply_param` (one value into a :class:`MigrationConfig`),
:func:`plan_sweep` (the :class:`SweepCase` list: config, files, resources) and
:func:`run_sweep`, which runs every case as one task and returns one row per case.

Backends (same rows, same order, whichever ran them):
- the default, a local process pool (``ProcessPoolExecutor``, spawn, ``min(cases,
  cpu_count)`` workers: a migration has a sender, a workload and a destination
  thread, so cases must not share a GIL);
- Dask distributed (``pip install 'npqfile[cluster]'``): ``cluster="local"`` starts a
  ``distributed.LocalCluster`` (one single-threaded worker process per job, workers
  non-daemonic so a case may start processes of its own: ``exec:`` commands, QEMU);
  ``cluster="tcp://HOST:8786"`` or ``scheduler_file=PATH`` use a running scheduler.
  Each case declares the worker resources it needs, ``cores`` (1) and ``ram`` (bytes
  of guest RAM it maps: the source, plus the destination's copy when it loads one in
  process or reads a file back to verify, plus the XBZRLE cache), so a worker started
  with ``--resources "cores=N,ram=BYTES"`` only runs the cases that fit.  Workers of
  users' clusters must allow child processes: start them with
  ``DASK_DISTRIBUTED__WORKER__DAEMON=False`` (README, "Sweeps on a Dask cluster").

Failure: a case that raises, fails or is cancelled is a row (``status`` failed /
cancelled, ``outcome`` says why); the others go on.  :func:`sweep_exit_status` is the
single run's rule over all rows (1 any failure or mismatch, else 2 any cancelled, else 0).

Destinations and files: cases run at the same time, so they cannot share one.  Each
case's files are named after it: ``file:PATH`` becomes ``PATH`` with ``.N.NAME`` before
the suffix (``snap.bin`` -> ``snap.1.size=2M.bin``; :func:`case_file`), and so do
per-case event files; in-process, ``null:`` and ``mem:`` need nothing; ``tcp:``,
``unix:``, ``exec:`` and ``fd:`` are refused (one listener, one command, one fd).
File paths must be on a file system every worker sees.

Goals: the table guestperf users draw (total time, downtime, converged or not) in one
command, on one machine or many; every bad sweep a ValueError naming what is wrong,
before any case runs.  Plan: configs are picklable dataclasses; each task returns a
plain dict (the row); progress (done / running / failed / cancelled) through a callback.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from npqfile.migration.session import MigrationConfig, run_migration
from npqfile.units import parse_rate, parse_size

# QEMU's parameter and capability names where QEMU has one (they are also the row keys,
# so a swept downtime-limit never collides with the measured downtime)
SWEEP_PARAMS = ("max-bandwidth", "dirty-rate", "downtime-limit", "size", "workload", "xbzrle-cache-size",
                "compress", "max-iterations", "release-ram")
# short names, and QEMU's underscored spellings, work too
SWEEP_ALIASES = {"bandwidth": "max-bandwidth", "max_bandwidth": "max-bandwidth", "downtime": "downtime-limit",
                 "downtime_limit": "downtime-limit", "xbzrle-cache": "xbzrle-cache-size",
                 "xbzrle_cache_size": "xbzrle-cache-size", "max_iterations": "max-iterations",
                 "release_ram": "release-ram", "dirty_rate": "dirty-rate"}


def with_rate(spec: str, rate: str) -> str:
    """The workload spec with its rate replaced (a later key wins in make_workload)."""
    return f"{spec}{',' if ':' in spec else ':'}rate={rate}"


def apply_param(cfg: MigrationConfig, name: str, value: str) -> None:
    """Set sweep parameter ``name`` to the text ``value`` in ``cfg``.
    Raises ValueError naming the parameter for an unknown name or a bad value."""
    p = cfg.params
    name = SWEEP_ALIASES.get(name, name)
    if name == "max-bandwidth":
        p.max_bandwidth = parse_rate(value)
    elif name == "dirty-rate":
        cfg.workload = with_rate(str(cfg.workload), value)
    elif name == "downtime-limit":
        p.downtime_limit = float(value) / 1000.0
    elif name == "size":
        cfg.size = parse_size(value)
    elif name == "workload":
        cfg.workload = value
    elif name == "xbzrle-cache-size":
        p.xbzrle_cache_size = parse_size(value)
    elif name == "compress":
        cfg.compress = value
    elif name == "max-iterations":
        p.max_iterations = int(value)
    elif name == "release-ram":
        p.release_ram = value.lower() in ("1", "on", "yes", "true")
    else:
        raise ValueError(f"unknown sweep parameter {name!r} (choose {', '.join(SWEEP_PARAMS)})")


def parse_sweep(specs: list[str]) -> list[list[tuple[str, str]]]:
    """``PARAM=V1,V2`` strings -> every combination as a list of (param, value).
    Raises ValueError for a malformed spec, an unknown parameter or one given twice
    (``--sweep size=16M --sweep size=8M``: write ``size=16M,8M``)."""
    axes = []
    seen: set[str] = set()
    for spec in specs:
        name, eq, values = spec.partition("=")
        name = SWEEP_ALIASES.get(name.strip(), name.strip())
        if not eq or not values.strip():
            raise ValueError(f"--sweep expects PARAM=V1,V2,..., got {spec!r}")
        if name not in SWEEP_PARAMS:
            raise ValueError(f"unknown sweep parameter {name!r} (choose {', '.join(SWEEP_PARAMS)})")
        if name in seen:
            raise ValueError(f"sweep parameter {name!r} given twice: list all its values in one "
                             f"--sweep {name}=V1,V2,...")
        seen.add(name)
        axes.append([(name, v.strip()) for v in values.split(",") if v.strip()])
    return [list(combo) for combo in itertools.product(*axes)]


INSTALL_HINT = ("--cluster needs Dask distributed, an optional extra: pip install 'npqfile[cluster]' "
                "(or pip install 'dask[distributed]')")
POLL = 0.1                  # seconds between looks at the tasks


@dataclass
class SweepCase:
    """One combination: its number (1-based), parameters, config and event file."""
    number: int
    params: list[tuple[str, str]]
    config: MigrationConfig
    events: str | None = None

    @property
    def name(self) -> str:
        """``max-bandwidth=50MB/s,dirty-rate=1000``: the case (parameters by their QEMU names)."""
        return ",".join(f"{n}={v}" for n, v in self.params)

    @property
    def resources(self) -> dict[str, float]:
        """The Dask worker resources the case needs: ``cores`` and ``ram`` (bytes)."""
        return {"cores": 1, "ram": case_ram(self.config)}


def case_ram(cfg: MigrationConfig) -> int:
    """Bytes of guest RAM a case maps at its peak: the source, a second copy when the
    destination loads in process or a ``file:`` is read back to verify, the XBZRLE cache."""
    copies = 2 if cfg.to in (None, "inprocess") or (str(cfg.to).startswith("file:") and cfg.verify) else 1
    return copies * cfg.size + cfg.params.xbzrle_cache_size


def case_slug(name: str) -> str:
    """A case name as part of a file name (``/`` and other unsafe characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def case_file(path: str, case: int, name: str | None = None) -> str:
    """``path`` with ``.N`` (and ``.NAME``, the case's parameters) before its suffix:
    ``snap.bin`` -> ``snap.2.size=4M.bin``."""
    root, ext = os.path.splitext(path)
    return f"{root}.{case}{'.' + case_slug(name) if name else ''}{ext}"


def case_destination(to: str | None, case: int, name: str | None = None) -> str | None:
    """The destination of sweep case number ``case`` (1-based, parameters ``name``)
    when the base config goes to ``to``: ``file:PATH`` becomes ``file:`` + :func:`case_file`;
    the in-process default, ``null:`` and ``mem:`` stay.  Raises ValueError for a
    destination cases would have to share (tcp:, unix:, exec:, fd:)."""
    if to in (None, "inprocess", "null:", "mem:"):
        return to
    scheme = to.partition(":")[0]
    if scheme == "file":
        return "file:" + case_file(to[len("file:"):], case, name)
    raise ValueError(f"--sweep cannot send its parallel cases to {to!r}: they would share one {scheme}: "
                     "destination (use file:PATH for one file per case, or null:)")


def plan_sweep(base: MigrationConfig, specs: list[str], events: str | None = None) -> list[SweepCase]:
    """Every case of ``specs`` on top of ``base`` (``events``: the base name of per-case
    event files, or None).  Raises ValueError for a bad sweep or a shared destination."""
    if events == "-":
        raise ValueError("--sweep cannot write every case's events to standard output: give --events FILE "
                         "(each case writes FILE.N.NAME)")
    cases = []
    for number, params in enumerate(parse_sweep(specs), 1):
        case = SweepCase(number, params, copy.deepcopy(base))
        case.config.to = case_destination(base.to, number, case.name)
        for name, value in params:
            apply_param(case.config, name, value)
        case.events = case_file(events, number, case.name) if events else None
        cases.append(case)
    if events:
        folder = os.path.dirname(os.path.abspath(events))
        if not os.path.isdir(folder):
            raise ValueError(f"--events {events}: directory {folder} does not exist")
    return cases


def run_case(cfg: MigrationConfig, events: str | None = None) -> dict[str, Any]:
    """Run one case (in a worker); returns its result columns.  Exceptions propagate
    (the sweep turns them into a failed row)."""
    from npqfile.migration.events import EventWriter

    if cfg.engine == "both":            # the simulator's columns, and QEMU's as qemu-* columns
        from npqfile.migration.compare import run_both
        both = run_both(cfg)
        return {**_result(both.simulator, []), **{f"qemu-{k}": v for k, v in _result(both.qemu, []).items()
                                                  if k != "files"}}
    files = []
    if events is None:
        st = run_migration(cfg)
    else:
        with EventWriter.open(events) as writer:
            files.append(events)
            st = run_migration(cfg, events=writer)
            writer.result(st.as_dict())
    if str(cfg.to).startswith("file:") and os.path.exists(cfg.to[len("file:"):]):
        files.insert(0, cfg.to[len("file:"):])
    return _result(st, files)


def _result(st: Any, files: list[str]) -> dict[str, Any]:
    d = st.as_dict()
    return {"status": st.status, "outcome": st.outcome, "converged": st.converged,
            "total-time": d["total-time"], "downtime": d["downtime"], "dirty-sync-count": st.dirty_sync_count,
            "transferred": st.transferred, "verified": st.verification.get("ok"), "files": files}


def case_row(case: SweepCase, result: dict[str, Any]) -> dict[str, Any]:
    """A case's row: ``case``, ``name``, its parameters, the result, its files."""
    return {"case": case.number, "name": case.name, **dict(case.params), **result, "to": case.config.to,
            "events": case.events}


def failed_result(status: str, why: str) -> dict[str, Any]:
    """The result columns of a case that did not finish (``status`` failed or cancelled)."""
    return {"status": status, "outcome": why, "converged": False, "verified": None, "files": []}


def sweep_exit_status(rows: list[dict[str, Any]]) -> int:
    """A single run's exit rule over the rows: 1 when any case failed or did not match
    its destination, else 2 when any was cancelled, else 3 when any completed without
    a verdict (not verified), else 0."""
    # --engine both: QEMU's side (qemu-status, qemu-verified) counts as well
    sides = [(r[p + "status"], r.get(p + "verified")) for r in rows for p in ("", "qemu-") if p + "status" in r]
    if any(status not in ("completed", "cancelled") or verified is False for status, verified in sides):
        return 1
    if any(status == "cancelled" for status, _ in sides):
        return 2
    return 3 if any(r["status"] == "completed" and r.get("verified") is None for r in rows) else 0


@dataclass
class SweepProgress:
    """Counts for the progress display; ``row`` is the case that just finished (or None)."""
    total: int
    done: int = 0
    running: int = 0
    failed: int = 0             # failed, or did not match its destination
    cancelled: int = 0
    row: dict[str, Any] | None = None


class _PoolBackend:
    """The local process pool."""

    def __init__(self, workers: int):
        self.workers = workers
        # spawn: the parent may hold threads (rich, workloads); forking those is unsafe
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, case: SweepCase) -> Any:
        return self.pool.submit(run_case, case.config, case.events)

    def running(self, futures: list[Any]) -> int:
        # the pool marks a call running when it queues it for a worker: one more than
        # the workers may be "running"
        return min(self.workers, sum(1 for f in futures if f.running()))

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel)


class _DaskBackend:
    """A Dask distributed client: a LocalCluster of ``workers`` processes, or a running
    scheduler.  Raises ValueError with the install hint when Dask is missing."""

    def __init__(self, cluster: str | None, scheduler_file: str | None, workers: int, cases: list[SweepCase]):
        try:
            import dask
            import distributed
        except ImportError:
            raise ValueError(INSTALL_HINT) from None
        self.cluster = None
        need = max(c.resources["ram"] for c in cases)
        if cluster == "local":
            import logging

            import psutil

            total = psutil.virtual_memory().total
            workers = max(1, min(workers, total // max(need, 1)))
            # A case may start processes (exec: commands, QEMU): workers must not be
            # daemonic.  No statistical profiler: every 10 ms it holds the case's frames
            # -- and the guest-RAM views in them -- while it walks them, so a RAM block's
            # close could find its views alive (RAMBlock.close waits briefly for that on
            # clusters we do not start).  The nanny hands this config to its workers.
            with dask.config.set({"distributed.worker.daemon": False,
                                  "distributed.worker.profile.enabled": False}):
                self.cluster = distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                    memory_limit=0, silence_logs=logging.CRITICAL,    # failed cases are rows, not log lines
                    resources={"cores": 1, "ram": max(total // workers, need)})
            self.client = distributed.Client(self.cluster)
        elif scheduler_file:
            self.client = distributed.Client(scheduler_file=scheduler_file, timeout=30)
        else:
            self.client = distributed.Client(cluster, timeout=30)
        self.use_resources = self._check_workers(need)

    def _check_workers(self, need: int) -> bool:
        """Whether to declare resources: only when workers declare them (a task needing
        a resource no worker has would wait forever).  ValueError when no worker has
        the RAM the largest case needs."""
        workers = self.client.scheduler_info().get("workers", {}).values()
        declared = [w.get("resources", {}) for w in workers if "ram" in w.get("resources", {})]
        if not declared:
            return False
        if max(r["ram"] for r in declared) < need:
            self.close()
            raise ValueError(f"no Dask worker declares ram >= {need} bytes, which the largest sweep case needs "
                             "(start workers with --resources \"cores=N,ram=BYTES\")")
        return True

    def submit(self, case: SweepCase) -> Any:
        return self.client.submit(run_case, case.config, case.events, pure=False,
                                  key=f"npqfile-case-{case.number}-{os.getpid()}-{time.time_ns()}",
                                  resources=case.resources if self.use_resources else None)

    def running(self, futures: list[Any]) -> int:
        """Cases on workers, at most as many as the workers' slots (the scheduler also
        lists the tasks a worker holds until a slot is free)."""
        keys = {f.key for f in futures}
        try:
            processing = self.client.processing()
            workers = self.client.scheduler_info().get("workers", {})
        except Exception:                 # a scheduler hiccup only costs the count
            return 0
        total = 0
        for address, tasks in processing.items():
            info = workers.get(address, {})
            slots = info.get("nthreads", 1)
            if self.use_resources and "cores" in info.get("resources", {}):
                slots = min(slots, int(info["resources"]["cores"]))
            total += min(slots, sum(1 for k in tasks if k in keys))
        return total

    def close(self, cancel: bool = False) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _outcome(fut: Any) -> dict[str, Any]:
    """The result of a finished task, or a failed result naming its exception."""
    try:
        return fut.result()
    except Exception as exc:              # any exception of a case is that case's failure
        return failed_result("failed", f"error: {type(exc).__name__}: {exc}" if not str(exc) else f"error: {exc}")


def run_sweep(base: MigrationConfig, specs: list[str], jobs: int | None = None, *, cluster: str | None = None,
              scheduler_file: str | None = None, events: str | None = None,
              on_update: Callable[[SweepProgress], None] | None = None) -> list[dict[str, Any]]:
    """Run every combination of ``specs`` on top of ``base``; returns one row per case
    in case order (see :func:`case_row`: ``case``, ``name``, the parameters, ``status``,
    ``outcome``, ``converged``, ``total-time`` and ``downtime`` in ms, ``dirty-sync-count``,
    ``transferred``, ``verified``, ``files`` (those the case wrote), ``to``, ``events``).
    ``cluster`` / ``scheduler_file`` choose Dask (module docstring), else the local
    pool of ``jobs`` processes.  ``on_update`` is called whenever a case ends or the
    number running changes.  A case that raises gives a failed row; Ctrl-C cancels the
    cases not finished and raises :class:`SweepInterrupted` holding every row (those
    cases ``cancelled``, outcome ``interrupted``).
    Raises ValueError for a bad sweep, a shared destination or a missing Dask, before
    any case runs."""
    cases = plan_sweep(base, specs, events)
    # real QEMU cases run one at a time unless --jobs says otherwise: parallel QEMUs
    # would share the cores and the measurement
    default_jobs = (os.cpu_count() or 1) if base.engine == "simulator" else 1
    workers = max(1, min(len(cases), jobs or default_jobs))
    backend: Any = (_DaskBackend(cluster, scheduler_file, workers, cases) if cluster or scheduler_file
                    else _PoolBackend(workers))
    results: dict[int, dict[str, Any]] = {}
    progress = SweepProgress(total=len(cases))
    interrupted = False
    try:
        pending = {backend.submit(c): c for c in cases}
        while pending:
            for fut in [f for f in pending if f.done()]:
                case = pending.pop(fut)
                results[case.number] = _outcome(fut)
                progress.done += 1
                res = results[case.number]
                progress.cancelled += res["status"] == "cancelled"
                progress.failed += res["status"] not in ("completed", "cancelled") or res.get("verified") is False
                progress.running = backend.running(list(pending))
                progress.row = case_row(case, results[case.number])
                if on_update:
                    on_update(progress)
            running = backend.running(list(pending))
            if running != progress.running:
                progress.running, progress.row = running, None
                if on_update:
                    on_update(progress)
            if pending:
                time.sleep(POLL)
    except KeyboardInterrupt:
        interrupted = True
        for fut in pending:
            fut.cancel()
    finally:
        backend.close(cancel=interrupted)
    rows = [case_row(c, results.get(c.number) or failed_result("cancelled", "interrupted")) for c in cases]
    if interrupted:
        raise SweepInterrupted(rows)
    return rows


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; ``rows`` holds every case (unfinished ones ``cancelled``)."""

    def __init__(self, rows: list[dict[str, Any]]):
        super().__init__("interrupted")
        self.rows = rows
