"""One scenario on both engines: real QEMU and the simulator, figure by figure.

Supports: :func:`run_both(cfg)` runs ``cfg`` on real QEMU (``qemu_engine``) and then on
the simulator (one after the other: they share this machine's cores) and returns a
:class:`Comparison`; ``Comparison.rows()`` gives the side-by-side figures -- outcome,
dirty-sync-count, transferred, total time, downtime, expected downtime, mbps and the
pages of each iteration -- each with its relative difference ``(simulator - qemu) /
qemu`` (QEMU is the reference; None where QEMU's figure is 0 or a figure is not a
number); ``Comparison.as_dict()`` is the ``--json`` form holding both runs' full
statistics; :func:`comparison_table` renders the rows for a terminal (rich).  Ctrl-C
(a MigrationControl) cancels the engine running at that moment as ``migrate_cancel``
does; after a cancel during the QEMU run the simulator is not started (``cancelled``,
outcome NOT_STARTED, no figures compared); the report is printed either way and
:func:`exit_status` follows ``npqfile migrate``'s table (130 for Ctrl-C).

Goals: the question "does the simulator predict what QEMU does?" answered for one
scenario in one command (``npqfile migrate --engine both`` / ``npqfile compare``).
Plan: run, then compare plain ``as_dict`` figures, so a sweep or a benchmark can
compare stored results too (:func:`compare_dicts`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from npqfile.migration.stats import MigrationStats

FIGURES = (  # (label, how to read it from as_dict, unit)
    ("outcome", lambda d: d["npqfile"]["outcome"], ""),
    ("status", lambda d: d["status"], ""),
    ("dirty-sync-count", lambda d: d["ram"]["dirty-sync-count"], ""),
    ("transferred", lambda d: d["ram"]["transferred"], "B"),
    ("total-time", lambda d: d["total-time"], "ms"),
    ("downtime", lambda d: d["downtime"], "ms"),
    ("expected-downtime", lambda d: d["expected-downtime"], "ms"),
    ("mbps", lambda d: d["ram"]["mbps"], "Mbit/s"),
    ("normal", lambda d: d["ram"]["normal"], "pages"),
    ("duplicate", lambda d: d["ram"]["duplicate"], "pages"),
)


def relative(sim: Any, qemu: Any) -> float | None:
    """(sim - qemu) / qemu for two numbers, None for non-numbers or qemu == 0."""
    if isinstance(sim, bool) or isinstance(qemu, bool):
        return None
    if not isinstance(sim, (int, float)) or not isinstance(qemu, (int, float)) or qemu == 0:
        return None
    return (sim - qemu) / qemu


def compare_dicts(sim: dict, qemu: dict) -> list[dict[str, Any]]:
    """Rows ``{"figure", "unit", "simulator", "qemu", "relative-difference"}`` for two
    ``MigrationStats.as_dict()`` results; the per-iteration pages come last, one row per
    iteration (matched by position, "final" for the stop-and-copy pass)."""
    rows = []
    for name, get, unit in FIGURES:
        a, b = get(sim), get(qemu)
        rows.append({"figure": name, "unit": unit, "simulator": a, "qemu": b, "relative-difference": relative(a, b)})
    its = [sim["npqfile"]["iterations"], qemu["npqfile"]["iterations"]]
    pre = [[it for it in x if not it["final"]] for x in its]
    fin = [[it for it in x if it["final"]] for x in its]
    for i in range(max(len(pre[0]), len(pre[1]))):
        a = pre[0][i]["pages"] if i < len(pre[0]) else None
        b = pre[1][i]["pages"] if i < len(pre[1]) else None
        rows.append({"figure": f"pages, iteration {i + 1}", "unit": "pages", "simulator": a, "qemu": b,
                     "relative-difference": relative(a, b)})
    if fin[0] or fin[1]:
        a = fin[0][0]["pages"] if fin[0] else None
        b = fin[1][0]["pages"] if fin[1] else None
        rows.append({"figure": "pages, final", "unit": "pages", "simulator": a, "qemu": b,
                     "relative-difference": relative(a, b)})
    return rows


@dataclass
class Comparison:
    """Both runs of one scenario."""
    simulator: MigrationStats
    qemu: MigrationStats

    def rows(self) -> list[dict[str, Any]]:
        """compare_dicts' rows; a simulator that did not start (NOT_STARTED) has no
        figures to compare: its cells are None (shown "-"), but its outcome and status."""
        rows = compare_dicts(self.simulator.as_dict(), self.qemu.as_dict())
        if self.simulator.outcome == NOT_STARTED:
            for r in rows:
                if r["figure"] not in ("outcome", "status"):
                    r["simulator"] = r["relative-difference"] = None
        return rows

    def as_dict(self) -> dict[str, Any]:
        q = self.qemu.as_dict()
        return {"qemu-version": q.get("qemu", {}).get("version"), "comparison": self.rows(),
                "simulator": self.simulator.as_dict(), "qemu": q}


NOT_STARTED = "cancelled before it started (Ctrl-C during the QEMU run)"


def run_both(cfg: Any, *, on_progress: Callable[[dict], None] | None = None,
             pre_switchover: Callable | None = None, control: Any = None) -> Comparison:
    """Run ``cfg`` on QEMU, then on the simulator; returns the Comparison.  Raises
    ValueError (before anything runs) for an option either engine lacks.  ``control``: a
    MigrationControl whose cancel (Ctrl-C) cancels the engine running at that moment,
    as ``migrate_cancel``; once it was cancelled the simulator does not start (its side
    is ``cancelled``, outcome NOT_STARTED, nothing measured)."""
    from npqfile.migration.qemu_engine import run_qemu_migration
    from npqfile.migration.session import run_migration

    qcfg, scfg = copy.deepcopy(cfg), copy.deepcopy(cfg)
    qcfg.engine, scfg.engine = "qemu", "simulator"
    if scfg.to not in (None, "inprocess"):
        scfg.to = None         # the simulator's side migrates in-process (the QEMU side uses cfg.to)
    scfg.params.check()
    q = run_qemu_migration(qcfg, on_progress=on_progress, pre_switchover=pre_switchover, control=control)
    if control is not None and control.cancelled:
        s = MigrationStats(status="cancelled", outcome=NOT_STARTED, params=asdict(scfg.params))
    else:
        s = run_migration(scfg, on_progress=on_progress, pre_switchover=pre_switchover, control=control)
    return Comparison(s, q)


def _cell(v: Any, unit: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    if unit == "B" and isinstance(v, int):
        from npqfile.units import format_bytes
        return f"{format_bytes(v)}"
    return str(v)


def comparison_table(rows: list[dict[str, Any]], title: str = "simulator vs QEMU"):
    """A rich Table of ``compare_dicts`` rows (relative difference in percent)."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("figure", "simulator", "QEMU", "difference"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for r in rows:
        rel = r["relative-difference"]
        diff = "-" if rel is None else f"{rel * 100:+.1f}%"
        if rel is None and r["simulator"] is not None and r["qemu"] is not None and r["unit"] == "":
            diff = "same" if r["simulator"] == r["qemu"] else "DIFFERENT"
        unit = f" {r['unit']}" if r["unit"] and r["unit"] != "B" else ""
        t.add_row(r["figure"], _cell(r["simulator"], r["unit"]) + unit, _cell(r["qemu"], r["unit"]) + unit, diff)
    return t


def exit_status(*runs: MigrationStats, interrupted: bool = False) -> int:
    """``npqfile migrate``'s exit status (EXIT_STATUS) over several runs (``interrupted``:
    Ctrl-C cancelled the command): 1 if any failed or did not verify, else 130 if
    interrupted and any was cancelled, else 2 if any was cancelled (did not converge),
    else 3 if any completed without a verdict, else 0."""
    if any(st.status not in ("completed", "cancelled") or st.verification.get("ok") is False for st in runs):
        return 1
    if any(st.status == "cancelled" for st in runs):
        return 130 if interrupted else 2
    return 3 if any(st.verification and st.verification.get("ok") is None for st in runs) else 0


def run_and_report(cfg: Any, args: Any, pre_switchover: Callable | None = None, control: Any = None) -> int:
    """``--engine both`` for the command line: run (with ``control``: Ctrl-C cancels the
    engine running at that moment and the report is still printed, see
    ``cli.migrate._run_cancellable``), print the table (or ``--json``), draw ``--plot``
    (the simulator's to FILE, QEMU's to FILE with ``.qemu`` before the suffix; a side
    that did not run draws nothing); returns the exit status (``exit_status``)."""
    import json
    import os
    import sys

    if control is not None:
        from npqfile.cli.migrate import _run_cancellable
        both, interrupted = _run_cancellable(cfg, control, run=run_both, pre_switchover=pre_switchover)
    else:
        both, interrupted = run_both(cfg, pre_switchover=pre_switchover), False
    if getattr(args, "plot", None):
        from npqfile.migration.plot import plot_migration
        root, ext = os.path.splitext(args.plot)
        if both.simulator.outcome != NOT_STARTED:
            plot_migration(both.simulator, args.plot)
        plot_migration(both.qemu, f"{root}.qemu{ext}")
    if getattr(args, "json", False):
        print(json.dumps(both.as_dict(), indent=2))
    else:
        from rich.console import Console

        from npqfile.cli.migrate import verification_text
        version = both.qemu.as_dict().get("qemu", {}).get("version")
        Console().print(comparison_table(both.rows(), f"simulator vs QEMU {version}"))
        for name, st in (("simulator", both.simulator), (f"QEMU {version}", both.qemu)):
            ver = st.verification
            # "not done: destination failed: ..." when nothing was compared, never a mismatch
            verdict = "n/a" if not ver else "equal" if ver.get("ok") else verification_text(ver)
            print(f"{name}: {st.status} ({st.outcome}); destination RAM {verdict}")
    if interrupted and "cancelled" in (both.simulator.status, both.qemu.status):
        print("error: migration cancelled (interrupted)", file=sys.stderr)
    return exit_status(both.simulator, both.qemu, interrupted=interrupted)
