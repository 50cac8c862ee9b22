"""A small parameter study: the cartesian product of ``PARAM=V1,V2,...`` lists, run in parallel.

Supports: :data:`SWEEP_PARAMS` (``bandwidth``, ``dirty-rate``, ``downtime``, ``size``,
``workload``, ``xbzrle-cache``, ``compress``, ``max-iterations``, ``release-ram``),
:func:`parse_sweep` (``["bandwidth=50MB/s,200MB/s", "dirty-rate=1000,20000"]`` -> the
list of cases), :func:`apply_param` (one value into a :class:`MigrationConfig`) and
:func:`run_sweep`, which runs every case in its own process (a ``ProcessPoolExecutor``
with ``min(cases, cpu_count)`` workers: each migration has a sender, a workload and a
destination thread, so cases do not share a GIL) and returns one row per case.

Destinations: cases run at the same time, so they cannot share one.  ``file:PATH``
gives each case its own file, ``PATH`` with the case number before the suffix
(``snap.bin`` -> ``snap.1.bin``, ``snap.2.bin``...; :func:`case_destination`, reported
in each row's ``to``); in-process, ``null:`` and ``mem:`` need nothing; ``tcp:``,
``unix:``, ``exec:`` and ``fd:`` are refused (one listener, one command, one fd).

Goals: the table guestperf users draw (total time, downtime, converged or not) in one
command; every bad sweep a ValueError naming what is wrong, before any case runs.
Plan: configs are picklable dataclasses; each worker returns plain dicts.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from npqfile.migration.session import MigrationConfig, run_migration
from npqfile.units import parse_rate, parse_size

SWEEP_PARAMS = ("bandwidth", "dirty-rate", "downtime", "size", "workload", "xbzrle-cache", "compress",
                "max-iterations", "release-ram")
# the option names of ``npqfile migrate`` (and QEMU's parameter names) work too
SWEEP_ALIASES = {"max-bandwidth": "bandwidth", "max_bandwidth": "bandwidth", "downtime-limit": "downtime",
                 "downtime_limit": "downtime", "xbzrle-cache-size": "xbzrle-cache",
                 "xbzrle_cache_size": "xbzrle-cache", "max_iterations": "max-iterations",
                 "release_ram": "release-ram", "dirty_rate": "dirty-rate"}


def with_rate(spec: str, rate: str) -> str:
    """The workload spec with its rate replaced (a later key wins in make_workload)."""
    return f"{spec}{',' if ':' in spec else ':'}rate={rate}"


def apply_param(cfg: MigrationConfig, name: str, value: str) -> None:
    """Set sweep parameter ``name`` to the text ``value`` in ``cfg``.
    Raises ValueError naming the parameter for an unknown name or a bad value."""
    p = cfg.params
    if name == "bandwidth":
        p.max_bandwidth = parse_rate(value)
    elif name == "dirty-rate":
        cfg.workload = with_rate(str(cfg.workload), value)
    elif name == "downtime":
        p.downtime_limit = float(value) / 1000.0
    elif name == "size":
        cfg.size = parse_size(value)
    elif name == "workload":
        cfg.workload = value
    elif name == "xbzrle-cache":
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


def case_destination(to: str | None, case: int) -> str | None:
    """The destination of sweep case number ``case`` (1-based) when the base config goes
    to ``to``: ``file:PATH`` becomes ``file:`` PATH with ``.N`` before its suffix; the
    in-process default, ``null:`` and ``mem:`` stay.  Raises ValueError for a
    destination cases would have to share (tcp:, unix:, exec:, fd:)."""
    if to in (None, "inprocess", "null:", "mem:"):
        return to
    scheme = to.partition(":")[0]
    if scheme == "file":
        root, ext = os.path.splitext(to[len("file:"):])
        return f"file:{root}.{case}{ext}"
    raise ValueError(f"--sweep cannot send its parallel cases to {to!r}: they would share one {scheme}: "
                     "destination (use file:PATH for one file per case, or null:)")


def _run_case(cfg: MigrationConfig) -> dict[str, Any]:
    if cfg.engine == "both":            # the simulator's row, and QEMU's as qemu-* columns
        from npqfile.migration.compare import run_both
        both = run_both(cfg)
        return {**_row(both.simulator), **{f"qemu-{k}": v for k, v in _row(both.qemu).items()}}
    return _row(run_migration(cfg))


def _row(st) -> dict[str, Any]:
    d = st.as_dict()
    return {"status": st.status, "outcome": st.outcome, "converged": st.converged,
            "total-ms": d["total-time"], "downtime-ms": d["downtime"], "iterations": st.dirty_sync_count,
            "transferred": st.transferred, "verified": st.verification.get("ok")}


def run_sweep(base: MigrationConfig, specs: list[str], jobs: int | None = None) -> list[dict[str, Any]]:
    """Run every combination of ``specs`` on top of ``base``; returns one row per case
    (the case's parameters plus status, outcome, converged, total-ms, downtime-ms,
    iterations, transferred bytes, verified, and ``to``, the case's destination).  A
    case that raises gives a row with ``status="error"``.  Raises ValueError for a bad
    sweep or a destination the cases cannot share, before any case runs."""
    cases = parse_sweep(specs)
    configs = []
    for number, case in enumerate(cases, 1):
        cfg = copy.deepcopy(base)
        cfg.to = case_destination(base.to, number)
        for name, value in case:
            apply_param(cfg, name, value)
        configs.append(cfg)
    # real QEMU cases run one at a time unless --jobs says otherwise: parallel QEMUs
    # would share the cores and the measurement
    default_jobs = (os.cpu_count() or 1) if base.engine == "simulator" else 1
    workers = max(1, min(len(configs), jobs or default_jobs))
    # spawn: the parent may hold threads (rich, workloads); forking those is unsafe
    ctx = multiprocessing.get_context("spawn")
    rows = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_run_case, cfg) for cfg in configs]
        for case, cfg, fut in zip(cases, configs, futures):
            try:
                result = fut.result()
            except (OSError, ValueError, RuntimeError) as exc:
                result = {"status": "error", "outcome": str(exc), "converged": False}
            rows.append({**dict(case), **result, "to": cfg.to})
    return rows
