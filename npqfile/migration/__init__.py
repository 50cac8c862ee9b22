"""Live migration: QEMU's pre-copy algorithm over a GuestRAM that keeps changing while it is sent.

Supports: the source engine (``MigrationEngine``, ``MigrationParams``: bandwidth windows,
downtime limit, max iterations / time limit, zero pages, XBZRLE, compression,
release-ram, pause-before-switchover), the destination (``Destination``), dirtying
workloads (``make_workload``: idle, uniform, hotset, sequential, zipf, callables),
``query-migrate``-style statistics (``MigrationStats``), whole runs with verification
(``MigrationConfig``, ``run_migration``), parameter sweeps (``run_sweep``) and plots
(``plot_migration``, imported lazily: it needs matplotlib).
Plan: one concept per module -- ``engine`` (the composition, QEMU's migration.c),
``ram`` (``RAMState``: the RAM-saving side and the pre-copy loop, QEMU's ram.c),
``options`` (``MigrationParams``, QEMU's options.c), ``bandwidth``, ``destination``,
``workloads``, ``compression``, ``stats``, ``session``, ``sweep``, ``plot``; the
lifecycle: ``verdict`` (who confirms the guest arrived), ``release_ram`` (when the
source may release its RAM), ``control`` (cancelling a run: ``MigrationControl``).
"""

from __future__ import annotations

from npqfile.migration.control import MigrationControl
from npqfile.migration.destination import Destination, DestinationResult, block_hashes
from npqfile.migration.engine import MigrationEngine, MigrationParams
from npqfile.migration.session import MigrationConfig, run_migration
from npqfile.migration.stats import IterationStats, MigrationStats, WindowStats
from npqfile.migration.sweep import run_sweep
from npqfile.migration.workloads import Workload, make_workload

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
