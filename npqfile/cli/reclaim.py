"""``npqfile reclaim``: the memory-reclaim experiment (see npqfile.reclaim).

Fills a RAM block, streams it as a QEMU migration stream through a QEMUFile into a sink
with release-ram on or off,
and reports what happened to the memory: one table (rich), JSON, or a PNG plot of RSS
against bytes sent.  ``--compare`` runs the backing x advice matrix.  Exit status 1 when
the one configuration asked for could not run (e.g. ``--advice remove`` on private
memory: the kernel refuses it), after printing what was found.
"""

from __future__ import annotations

import argparse
import sys

from npqfile.ram import ADVICES
from npqfile.reclaim import BACKINGS, ReclaimConfig, compare_configs, plot_results, results_json, results_table, run_reclaim
from npqfile.units import format_bytes, parse_size

NAME = "reclaim"
HELP = "measure how much guest RAM streaming with release-ram really frees"
DESCRIPTION = (
    "Fill a RAM block with random data, stream it through a QEMUFile into a sink with release on or off, "
    "and measure the mapping's RSS (smaps), the process RSS, what the backing still holds (mincore) and "
    "what released pages read back as.")
ORDER = 60
_PROGRESS_MIN = 64 << 20  # show a progress bar from this much RAM per configuration


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="512M", help="RAM block size (default 512M)")
    p.add_argument("--backing", default="private",
                   help="private (default), shared, memfd, file (temporary file) or file:PATH")
    p.add_argument("--advice", default=None, choices=ADVICES,
                   help="release primitive (default: the one that frees the backing)")
    p.add_argument("--release", action=argparse.BooleanOptionalAction, default=True,
                   help="release pages after they are sent (default on)")
    p.add_argument("--compare", action="store_true",
                   help=f"run every backing ({', '.join(BACKINGS)}) x advice (none, {', '.join(ADVICES)})")
    p.add_argument("--sink", default="null:",
                   help="migration URI the stream is written to (default null:): a complete -M none QEMU "
                        "stream of the block pc.ram, which npqfile analyze and QEMU load")
    p.add_argument("--sample-every", default=None, help="sample RSS every this many bytes sent (default size/32)")
    p.add_argument("--page-size", default="4096", help="target page size (default 4096)")
    p.add_argument("--hugepages", action="store_true", help="madvise(MADV_HUGEPAGE) the block")
    p.add_argument("--file-dir", default=None, help="directory for the temporary file of 'file' backings")
    p.add_argument("--seed", type=int, default=0, help="random data seed")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="plot RSS against bytes sent")


def run(args: argparse.Namespace) -> int:
    base = ReclaimConfig(size=parse_size(args.size), backing=args.backing, advice=args.advice,
                         release=args.release, sink=args.sink,
                         sample_every=parse_size(args.sample_every) if args.sample_every else None,
                         seed=args.seed, page_size=parse_size(args.page_size), hugepages=args.hugepages,
                         file_dir=args.file_dir)
    if base.sample_every is not None and base.sample_every <= 0:
        raise ValueError(f"--sample-every must be positive, not {args.sample_every!r}")
    if args.plot:
        from npqfile.migration.plot import check_plot_path
        check_plot_path(args.plot)         # before the run: never lose results to the plot
    configs = compare_configs(base) if args.compare else [base]
    results = _run_all(configs)
    if args.json:
        print(results_json(results))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:
            console = Console(width=160)  # a pipe or file: do not squeeze the table into 80 columns
        console.print(results_table(results))
    status = 0
    if not args.compare and results[0].status != "ok":
        # one configuration asked for and nothing measured: that is an error, not a result
        r = results[0]
        print(f"error: {r.backing} memory cannot be released with --advice {r.advice}: {r.error} "
              f"(nothing was measured)", file=sys.stderr)
        status = 1
    if args.plot:
        try:
            plot_results(results, args.plot)
        except OSError as exc:
            print(f"error: the plot was not written: {exc}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"plot written to {args.plot}")
    return status


def _run_all(configs: list[ReclaimConfig]) -> list:
    """Run ``configs`` in order, with a rich progress bar on stderr for long runs."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    total = sum(c.size for c in configs)
    show = console.is_terminal and max(c.size for c in configs) >= _PROGRESS_MIN
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[done]}"),
                  TimeRemainingColumn(), console=console, transient=True, disable=not show) as bar:
        task = bar.add_task("reclaim", total=total, done="")
        finished = 0
        for c in configs:
            label = f"{c.backing}/{c.advice or 'auto'}" if c.release else f"{c.backing}/no release"
            bar.update(task, description=label)

            def progress(sent: int, _base: int = finished) -> None:
                bar.update(task, completed=_base + sent, done=format_bytes(_base + sent))

            results.append(run_reclaim(c, progress))
            finished += c.size
            bar.update(task, completed=finished)
    return results
