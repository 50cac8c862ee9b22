"""Live migration: QEMU's pre-copy algorithm over a GuestRAM that keeps changing while it is sent.

Supports: the source engine (``MigrationEngine``, ``MigrationParams``: bandwidth windows,
downtime limit, max iterations / time limit, zero pages, XBZRLE, compression,
release-ram, pause-before-switchover), the destination (``Destination``), dirtying
workloads (``make_workload``: idle, uniform, hotset, sequential, zipf, callables),
``query-migrate``-style statistics (``MigrationStats``), whole runs with verification
(``MigrationConfig``, ``run_migration``), parameter sweeps (``run_sweep``) and plots
(``plot_migration``, imported lazily: it needs matplotlib).
Plan: one concept per module, re-exported here lazily -- ``engine`` (the composition, QEMU's migration.c),
``ram`` (``RAMState``: the RAM-saving side and the pre-copy loop, QEMU's ram.c),
``options`` (``MigrationParams``, QEMU's options.c), ``bandwidth``, ``destination``,
``workloads``, ``compression``, ``stats``, ``session``, ``sweep``, ``plot``; the
lifecycle: ``verdict`` (who confirms the guest arrived), ``release_ram`` (when the
source may release its RAM), ``control`` (cancelling a run: ``MigrationControl``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from npqfile.lazy import lazy_exports

if TYPE_CHECKING:
    from npqfile.migration.control import MigrationControl
    from npqfile.migration.destination import Destination, DestinationResult, block_hashes
    from npqfile.migration.engine import MigrationEngine, MigrationParams
    from npqfile.migration.session import MigrationConfig, run_migration
    from npqfile.migration.stats import IterationStats, MigrationStats, WindowStats
    from npqfile.migration.sweep import run_sweep
    from npqfile.migration.workloads import Workload, make_workload

# Lazily: `npqfile save` and `incoming` import a module or two of this package (options,
# multifd_recv), not the engine, the sweep and Dask with them.
__getattr__ = lazy_exports(__name__, {
    "MigrationControl": "control", "Destination": "destination", "DestinationResult": "destination",
    "block_hashes": "destination", "MigrationEngine": "engine", "MigrationParams": "engine",
    "MigrationConfig": "session", "run_migration": "session", "IterationStats": "stats",
    "MigrationStats": "stats", "WindowStats": "stats", "run_sweep": "sweep", "Workload": "workloads",
    "make_workload": "workloads",
})

__all__ = [
    "Destination",
    "DestinationResult",
    "IterationStats",
    "MigrationConfig",
    "MigrationControl",
    "MigrationEngine",
    "MigrationParams",
    "MigrationStats",
    "WindowStats",
    "Workload",
    "block_hashes",
    "make_workload",
    "run_migration",
    "run_sweep",
]
