"""``npqfile migrate``: a live pre-copy migration of a changing guest RAM, QEMU's way.

Supports: with no arguments, the embedded default (a 256 MiB guest, a hotset workload,
unlimited bandwidth, the destination in this process over a socketpair, verification
on); every engine option under QEMU's names (``--max-bandwidth 100MB/s``,
``--downtime-limit 300`` in ms, ``--xbzrle-cache 64M``, ``--compress zlib:6``,
``--release-ram``, ``--pause-before-switchover``...); ``--to URI`` for another process
or machine (``tcp:HOST:PORT`` / ``unix:PATH`` with ``npqfile incoming`` there),
``file:PATH`` (a snapshot that ``npqfile analyze`` and QEMU ``-M none`` load),
``exec:CMD``, ``fd:N`` (``--to fd:1 > snap.bin``: the report then goes to stderr); a
live progress line (rich) on a terminal; a summary table, ``--json``, ``--plot
FILE.png`` (its directory is checked before migrating); ``--sweep PARAM=V1,V2`` for a
parameter study in parallel processes (``--plot`` then draws the sweep; with
``file:PATH`` each case writes its own ``PATH.N``, see ``npqfile.migration.sweep``).

Exit status: 0 completed (and verified where the transport allows), 1 error or
verification mismatch, 2 not converged (cancelled at max-iterations / time-limit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from npqfile.migration.engine import MigrationParams
from npqfile.migration.session import INITS, MigrationConfig, run_migration
from npqfile.migration.stats import MigrationStats
from npqfile.migration.sweep import SWEEP_PARAMS, run_sweep, with_rate
from npqfile.units import format_bytes, parse_rate, parse_size

NAME = "migrate"
HELP = "live-migrate a changing guest RAM with QEMU's pre-copy algorithm and wire format"
ORDER = 20
DEFAULT_WORKLOAD = MigrationConfig().workload


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guest")
    g.add_argument("--size", "--ram", default="256M", help="guest RAM size (default 256M)")
    g.add_argument("--block", default="ram", help="RAM block name (QEMU -M none: ram; pc/q35: pc.ram)")
    g.add_argument("--init", default="mixed", choices=INITS, help="initial contents (default mixed)")
    g.add_argument("--workload", default=DEFAULT_WORKLOAD,
                   help="KIND[:rate=R,hot=F,share=S,a=A,seed=N,bytes=B], KIND one of idle, uniform, hotset, "
                        f"sequential, zipf; bytes = bytes changed per page write (default 1) (default {DEFAULT_WORKLOAD})")
    g.add_argument("--dirty-rate", help="override the workload's rate (pages/s, or 50MB/s)")
    g.add_argument("--seed", type=int, default=1, help="seed of contents and workload (>= 0)")
    m = p.add_argument_group("migration (QEMU parameters and capabilities)")
    m.add_argument("--engine", choices=("simulator", "qemu", "both"), default="simulator",
                   help="simulator (default), qemu (real QEMU runs the scenario on a guest that writes like "
                        "the workload) or both (side by side, with relative differences)")
    m.add_argument("--qemu", default=None, metavar="PATH|VERSION",
                   help="QEMU for --engine qemu/both: a binary or 7.2 / 10.0 (default $NPQFILE_QEMU, else PATH)")
    m.add_argument("--to", default=None, metavar="URI",
                   help="destination: tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD, null: "
                        "(default: in this process over a socketpair)")
    m.add_argument("--max-bandwidth", default="0", help="bytes/s, e.g. 100MB/s, 1Gbit/s (0 = unlimited)")
    m.add_argument("--downtime-limit", type=float, default=300.0, help="ms (default 300)")
    m.add_argument("--max-iterations", type=int, default=30, help="dirty syncs before giving up (default 30)")
    m.add_argument("--time-limit", type=float, default=60.0, help="seconds before giving up (default 60)")
    m.add_argument("--on-limit", choices=("cancel", "force"), default="cancel",
                   help="at a limit: cancel (like migrate_cancel) or force stop-and-copy")
    m.add_argument("--no-zero-detection", action="store_true", help="send zero pages as normal pages")
    m.add_argument("--xbzrle-cache", "--xbzrle-cache-size", dest="xbzrle_cache", default=None, metavar="SIZE",
                   help="enable XBZRLE with this cache size (QEMU's xbzrle-cache-size)")
    m.add_argument("--compress", default="none", help="none, zlib[:LEVEL] (QEMU pages), zstd[:LEVEL] or lz4 (channel)")
    m.add_argument("--release-ram", action="store_true", help="release source pages once sent at switchover")
    m.add_argument("--pause-before-switchover", nargs="?", type=float, const=0.0, default=None, metavar="SECONDS",
                   help="pause (pre-switchover) after stopping the guest, for SECONDS")
    m.add_argument("--machine", default="none", help="machine-type name in the stream (default none)")
    m.add_argument("--no-verify", action="store_true", help="skip the destination check")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the statistics as JSON")
    o.add_argument("--plot", metavar="FILE.png",
                   help="draw per-round bytes / dirty pages and source RSS (with --sweep: the sweep)")
    o.add_argument("--quiet", action="store_true", help="no live progress display")
    o.add_argument("--sweep", action="append", metavar="PARAM=V1,V2",
                   help=f"parameter study over {', '.join(SWEEP_PARAMS)} (repeatable: all combinations)")
    o.add_argument("--jobs", type=int, default=None, help="sweep worker processes (default: cores)")


def config_from_args(args: argparse.Namespace) -> MigrationConfig:
    """The MigrationConfig the command line describes.  ValueError for a bad value."""
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    if not args.downtime_limit >= 0:
        raise ValueError(f"--downtime-limit must be a non-negative number of ms, got {args.downtime_limit}")
    if not args.time_limit > 0:
        raise ValueError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    params = MigrationParams(
        max_bandwidth=parse_rate(args.max_bandwidth), downtime_limit=args.downtime_limit / 1000.0,
        max_iterations=args.max_iterations, time_limit=args.time_limit, on_limit=args.on_limit,
        zero_page_detection=not args.no_zero_detection,
        xbzrle_cache_size=parse_size(args.xbzrle_cache) if args.xbzrle_cache else 0,
        release_ram=args.release_ram, pause_before_switchover=args.pause_before_switchover is not None,
        machine=args.machine, sample_rss=bool(args.plot))
    params.check()
    workload = args.workload if args.dirty_rate is None else with_rate(args.workload, args.dirty_rate)
    return MigrationConfig(size=parse_size(args.size), block=args.block, init=args.init, workload=workload,
                           seed=args.seed, to=args.to, compress=args.compress, verify=not args.no_verify,
                           params=params, engine=args.engine, qemu=args.qemu)


def _progress_display(quiet: bool):
    """A rich Live line on a terminal's stderr, or None."""
    if quiet:
        return None, None
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console(stderr=True)
    if not console.is_terminal:
        return None, None
    live = Live(Text("setup"), console=console, refresh_per_second=10, transient=True)

    def update(info: dict) -> None:
        live.update(Text(f"{info['status']:>14}  round {info['round']:>3}  dirty {info['dirty-pages']:>9} pages  "
                         f"sent {format_bytes(info['bytes']):>10}  {info['mbps']:9.1f} Mbit/s  "
                         f"{info['elapsed']:6.2f} s"))
    return live, update


def verification_text(ver: dict) -> str:
    """One line for the summary: equal, MISMATCH (which blocks), not done (why: the
    destination failed, the file did not load) or not verified (why)."""
    if not ver:
        return "n/a"
    if ver.get("done") is False:
        return f"not done: {ver.get('error')}"
    ok = ver.get("ok")
    if ok is None:
        return f"not verified ({ver.get('note', 'unknown reason')})"
    if ok:
        return f"{ver.get('method')}: equal"
    why = ver.get("error") or f"blocks differ: {', '.join(ver.get('mismatched', []))}"
    return f"{ver.get('method')}: MISMATCH ({why})"


def _summary(st: MigrationStats, out) -> None:
    from rich.console import Console
    from rich.table import Table

    d = st.as_dict()
    r, x = d["ram"], d["npqfile"]
    engine = f" (QEMU {d['qemu'].get('version')})" if "qemu" in d else ""
    t = Table(title=f"migration {st.status}: {st.outcome}{engine}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    ver = st.verification
    rows = [
        ("total time", f"{d['total-time']:.1f} ms"), ("setup time", f"{d['setup-time']:.1f} ms"),
        ("downtime", f"{d['downtime']:.1f} ms (expected {d['expected-downtime']:.1f} ms)"),
        ("transferred (RAM)", f"{format_bytes(r['transferred'])} ({r['transferred']} B)"
                              + ("" if x["transferred-queued"] == r["transferred"]
                                 else f"; {x['transferred-queued']} B queued")),
        ("stream bytes", "n/a" if x["stream-bytes"] is None
         else f"{format_bytes(x['stream-bytes'])} ({x['stream-bytes']} B)"),
        ("pages normal / duplicate", f"{r['normal']} / {r['duplicate']}"),
        ("pages xbzrle / compressed", f"{x['pages']['xbzrle']} / {x['pages']['compressed']}"),
        ("dirty sync count", str(r["dirty-sync-count"])), ("dirty pages rate", f"{r['dirty-pages-rate']:.0f} pages/s"),
        ("mbps", f"{r['mbps']:.1f} Mbit/s (last window {x['last-window-mbps']:.1f})"),
        ("pages per second", f"{r['pages-per-second']:.0f}"),
        ("source RSS before / after", "n/a" if x["rss-before"] is None
         else f"{format_bytes(x['rss-before'])} / {format_bytes(x['rss-after'])}"),
        ("verification", verification_text(ver)),
    ]
    if "xbzrle-cache" in d:
        xc = d["xbzrle-cache"]
        rows.append(("xbzrle cache miss / encoding rate", f"{xc['cache-miss']} / {xc['encoding-rate']}"))
    if st.compression:
        rows.append(("compression", ", ".join(f"{k} {v}" for k, v in st.compression.items())))
    for row in rows:
        t.add_row(*row)
    it = Table(title="iterations")
    for col in ("iteration", "sync", "dirty pages", "pages sent", "bytes", "time ms", "Mbit/s"):
        it.add_column(col, justify="right")
    for i in st.iterations:
        it.add_row(f"{i.index} (final)" if i.final else str(i.index), str(i.sync), str(i.dirty_pages),
                   str(i.pages_sent), format_bytes(i.bytes_sent), f"{i.duration * 1000:.1f}",
                   f"{i.bandwidth * 8 / 1e6:.0f}")
    console = Console(file=out)
    console.print(t)
    console.print(it)


def _exit_status(st: MigrationStats) -> int:
    if st.status == "cancelled":
        return 2
    if st.status != "completed" or st.verification.get("ok") is False:
        return 1
    return 0


def _run_sweep(cfg: MigrationConfig, args: argparse.Namespace) -> int:
    rows = run_sweep(cfg, args.sweep, args.jobs)
    names = [s.partition("=")[0].strip() for s in args.sweep]
    if args.plot:
        from npqfile.migration.plot import plot_sweep
        plot_sweep(rows, names, args.plot)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="sweep")
        # --engine both: each cell is "simulator / QEMU"
        sides = [""] if cfg.engine != "both" else ["", "qemu-"]
        cols = ["total ms", "downtime ms", "syncs", "converged", "outcome", "verified"]
        for col in names + [c + (" sim / QEMU" if len(sides) > 1 else "") for c in cols]:
            t.add_column(col, justify="right")
        for row in rows:
            per_side = [[f"{row.get(side + 'total-ms', 0):.0f}", f"{row.get(side + 'downtime-ms', 0):.1f}",
                         str(row.get(side + "iterations", "")), "yes" if row.get(side + "converged") else "no",
                         str(row.get(side + "outcome")), str(row.get(side + "verified"))] for side in sides]
            t.add_row(*[row[n] for n in names], *[" / ".join(cells) for cells in zip(*per_side)])
        Console().print(t)
    return 1 if any(r["status"] in ("error", "failed") for r in rows) else 0


def _pause_hook(delay: float):
    """pause-before-switchover: the guest is stopped; wait, then let the engine continue."""
    def hook(engine) -> None:
        print(f"pre-switchover: guest stopped, continuing in {delay} s", file=sys.stderr)
        time.sleep(delay)
    return hook


def _stream_fd(to: str | None) -> int | None:
    """The fd number of an ``fd:N`` destination, else None."""
    if to and to.startswith("fd:") and to[3:].isdigit():
        return int(to[3:])
    return None


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.plot:
        from npqfile.migration.plot import check_writable
        check_writable(args.plot)          # before the run, not after it: keep the stats
    if args.sweep:
        return _run_sweep(cfg, args)
    if cfg.engine == "both":
        from npqfile.migration.compare import run_and_report
        return run_and_report(cfg, args, _pause_hook(args.pause_before_switchover)
                              if args.pause_before_switchover is not None else None)
    # --to fd:1 > snap.bin: stdout carries the stream (and the channel closes the fd
    # at the end), so the report goes to stderr; fd:2 likewise sends it to stdout
    stream_fd = _stream_fd(cfg.to)
    out, err = sys.stdout, sys.stderr
    if stream_fd is not None and stream_fd in (_fileno(out), _fileno(err)):
        out = err = sys.stderr if stream_fd == _fileno(out) else sys.stdout
    hook = None if args.pause_before_switchover is None else _pause_hook(args.pause_before_switchover)
    live, update = _progress_display(args.quiet or args.json or stream_fd == _fileno(sys.stderr))
    if live is not None:
        with live:
            st = run_migration(cfg, on_progress=update, pre_switchover=hook)
    else:
        st = run_migration(cfg, pre_switchover=hook)
    if args.plot:
        from npqfile.migration.plot import plot_migration
        plot_migration(st, args.plot)
    if args.json:
        print(json.dumps(st.as_dict(), indent=2), file=out)
    else:
        _summary(st, out)
    ver = st.verification
    if st.status == "failed":
        print(f"error: migration failed: {st.outcome.removeprefix('error: ')}", file=err)
    elif ver.get("done") is False:
        print(f"error: verification not done: {ver.get('error')}", file=err)
    elif ver.get("ok") is False:
        why = ver.get("error") or f"blocks differ: {', '.join(ver.get('mismatched', []))}"
        print(f"error: destination does not match the source at switchover ({why})", file=err)
    return _exit_status(st)


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):   # pytest's capture, a closed stream
        return None
