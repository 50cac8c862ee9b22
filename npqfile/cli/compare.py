"""``npqfile compare``: one scenario on real QEMU and on the simulator, side by side.

Supports: every option of ``npqfile migrate`` (``--engine`` is ``both`` here), printing
one table of the figures (outcome, dirty-sync-count, transferred, total time, downtime,
expected downtime, mbps, pages per iteration) with the relative difference of each, or
``--json`` with both runs in full (``npqfile.migration.compare``).  Same as ``npqfile
migrate --engine both``; exit status as ``migrate``'s over both runs.
"""

from __future__ import annotations

import argparse

from npqfile.cli import migrate

NAME = "compare"
HELP = "run one migration scenario on real QEMU and on the simulator and compare them"
ORDER = 21


def add_arguments(p: argparse.ArgumentParser) -> None:
    migrate.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    args.engine = "both"
    return migrate.run(args)
