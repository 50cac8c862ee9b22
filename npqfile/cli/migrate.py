"""``npqfile migrate``: a live pre-copy migration of a changing guest RAM, QEMU's way.

Supports: with no arguments, the embedded default (a 256 MiB guest, a hotset workload,
unlimited bandwidth, the destination in this process over a socketpair, verification
on); every engine option under QEMU's names (``--max-bandwidth 100MB/s``,
``--downtime-limit 300`` in ms, ``--xbzrle-cache 64M``, ``--compress zlib:6``,
``--release-ram``, ``--pause-before-switchover``, ``--auto-converge`` with
``--cpu-throttle-initial`` and the other throttle parameters...); ``--to URI`` for another process
or machine (``tcp:HOST:PORT`` / ``unix:PATH`` with ``npqfile incoming`` there, or a
real QEMU ``-incoming`` with ``--peer qemu``; ``--stall-timeout`` bounds every wait on
the peer), ``file:PATH`` (a snapshot that ``npqfile analyze`` and QEMU ``-M none`` load),
``exec:CMD``, ``fd:N`` (``--to fd:1 > snap.bin``: the report then goes to stderr); a
live progress line (rich) on a terminal; a summary table, ``--json``, ``--plot
FILE.png`` (its format and directory are checked before migrating, and it is drawn
after the results are printed, so a plot error never loses them); ``--sweep
PARAM=V1,V2`` for a parameter study in parallel processes or on Dask (``--cluster``;
``--plot`` then draws the sweep; each case's files are named after it, see
``npqfile.migration.sweep``); ``--events FILE|-`` for live ``query-migrate`` JSON lines
(``npqfile.migration.events``).  Ctrl-C cancels like ``migrate_cancel``
(``MigrationControl``) and still reports.

Exit status (``EXIT_STATUS``, also in ``--help``): 0 completed and verified, 1 failed
(an error, a destination that failed, died, stalled or sent no verdict) or a
verification mismatch, 2 not converged (cancelled at max-iterations / time-limit), 3
completed but not verified (the peer cannot send a verdict: ``--peer qemu``,
``exec:``, ``null:``, ``fd:``, or ``--no-verify``), 130 cancelled by Ctrl-C (SIGINT
cancels like ``migrate_cancel`` and the cancelled run's summary is printed; a second
Ctrl-C aborts); a sweep: 1 when any case failed or mismatched, else 2 when any was
cancelled, else 3 when any was not verified, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from npqfile.migration.compression import parse_compress
from npqfile.migration.control import MigrationControl
from npqfile.migration.engine import MigrationParams
from npqfile.migration.events import EventWriter
from npqfile.migration.options import (
    MULTIFD_COMPRESSION, ZERO_PAGE_DETECTION, check_migration_params, migration_channels_and_transport_compatible,
)
from npqfile.migration.session import INITS, MigrationConfig, run_migration
from npqfile.migration.stats import MigrationStats
from npqfile.migration.sweep import (
    SWEEP_ALIASES,
    SWEEP_PARAMS,
    SweepInterrupted,
    run_sweep,
    sweep_exit_status,
    with_rate,
)
from npqfile.migration.verdict import PEERS, STALL_TIMEOUT
from npqfile.stream.versions import DEFAULT_STREAM_VERSION, QEMU_STREAM_VERSIONS, stream_version
from npqfile.units import format_bytes, parse_rate, parse_size

NAME = "migrate"
HELP = "live-migrate a changing guest RAM with QEMU's pre-copy algorithm and wire format"
ORDER = 20
DEFAULT_WORKLOAD = MigrationConfig().workload
EXIT_COMPLETED, EXIT_FAILED, EXIT_NOT_CONVERGED, EXIT_NOT_VERIFIED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_STATUS = """exit status:
  0    completed and verified (the destination confirmed RAM equal to the source's)
  1    failed: an error, a destination that failed, died, stalled or sent no verdict,
       or a verification mismatch
  2    not converged: cancelled at --max-iterations / --time-limit
  3    completed, not verified: the peer sends no verdict (--peer qemu, exec:, null:,
       fd:), --no-verify, or Ctrl-C after the migration had completed (postcopy,
       --engine qemu) cut the wait for the verdict short
  130  cancelled by Ctrl-C (like migrate_cancel; the summary is printed)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EXIT_STATUS
    p.formatter_class = argparse.RawDescriptionHelpFormatter
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
    m.add_argument("--zero-page-detection", choices=ZERO_PAGE_DETECTION, default=None,
                   help="QEMU 9.0+'s parameter: none = --no-zero-detection; multifd (default) detects in "
                        "the multifd channels, legacy on the main channel")
    m.add_argument("--multifd-channels", type=int, default=0, metavar="N",
                   help="QEMU 10.0 multifd over N parallel sockets (tcp:/unix:/in-process; default 0: off)")
    m.add_argument("--multifd-compression", choices=MULTIFD_COMPRESSION, default="none",
                   help="per-packet compression in the multifd channels (default none)")
    m.add_argument("--xbzrle-cache", "--xbzrle-cache-size", dest="xbzrle_cache", default=None, metavar="SIZE",
                   help="enable XBZRLE with this cache size (QEMU's xbzrle-cache-size)")
    m.add_argument("--compress", default="none", help="none, zlib[:LEVEL] (QEMU pages), zstd[:LEVEL] or lz4 (channel)")
    m.add_argument("--release-ram", action="store_true",
                   help="release the source's guest RAM once the destination's verdict confirms it holds "
                        "the same RAM (refused where no verdict can come)")
    m.add_argument("--pause-before-switchover", nargs="?", type=float, const=0.0, default=None, metavar="SECONDS",
                   help="pause (pre-switchover) after stopping the guest, for SECONDS")
    m.add_argument("--postcopy-after", default=None, metavar="N|auto",
                   help="postcopy-ram: migrate-start-postcopy once dirty-sync-count exceeds N (0: right after "
                        "setup), or auto: when a sync finds no fewer dirty pages than the previous one, or at "
                        "--max-iterations / --time-limit (needs a return path: in-process, unix:, tcp:)")
    m.add_argument("--machine", default="none", help="machine-type name in the stream (default none)")
    m.add_argument("--qemu-version", choices=list(QEMU_STREAM_VERSIONS), default=None,
                   help=f"write the stream this QEMU writes (default {DEFAULT_STREAM_VERSION.name}, "
                        f"which 7.2 and 10.0 both load; 10.0 with --mapped-ram)")
    m.add_argument("--mapped-ram", action="store_true",
                   help="QEMU 9.0+ mapped-ram file layout (--to file:PATH only): pages at fixed offsets, "
                        "re-dirtied pages rewritten in place, zero pages left as holes")
    a = p.add_argument_group("auto-converge (QEMU's capability and parameters)")
    a.add_argument("--auto-converge", action="store_true",
                   help="throttle the guest when it dirties memory faster than it is sent")
    a.add_argument("--cpu-throttle-initial", type=int, default=20, metavar="PCT",
                   help="first throttle, percent (default 20)")
    a.add_argument("--cpu-throttle-increment", type=int, default=10, metavar="PCT",
                   help="added at each further throttle step, percent (default 10)")
    a.add_argument("--max-cpu-throttle", type=int, default=99, metavar="PCT", help="throttle cap (default 99)")
    a.add_argument("--throttle-trigger-threshold", type=int, default=50, metavar="PCT",
                   help="throttle when dirtied bytes exceed PCT%% of the bytes sent in a period (default 50)")
    a.add_argument("--cpu-throttle-tailslow", action="store_true",
                   help="smaller steps near the needed throttle (QEMU's cpu-throttle-tailslow)")
    m.add_argument("--no-verify", action="store_true", help="skip the destination check")
    m.add_argument("--peer", choices=PEERS, default=None,
                   help="what listens at a tcp:/unix: URI: npqfile (npqfile incoming, sends its verdict; "
                        "default) or qemu (a real QEMU -incoming: no verdict, the run ends not verified)")
    m.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT, metavar="SECONDS",
                   help="tcp:/unix: fail when the destination takes no data, or sends no verdict after the "
                        f"stream, for SECONDS (default {STALL_TIMEOUT:g})")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the statistics as JSON")
    o.add_argument("--plot", metavar="FILE.png",
                   help="draw per-round bytes / dirty pages and source RSS (with --sweep: the sweep)")
    o.add_argument("--quiet", action="store_true", help="no live progress display")
    o.add_argument("--sweep", action="append", metavar="PARAM=V1,V2",
                   help=f"parameter study over {', '.join(SWEEP_PARAMS)} (repeatable: all combinations)")
    o.add_argument("--jobs", type=int, default=None, help="sweep worker processes (default: cores)")
    o.add_argument("--cluster", metavar="local|tcp://HOST:8786",
                   help="run the sweep on Dask: a LocalCluster, or a running scheduler "
                        "(pip install 'npqfile[cluster]')")
    o.add_argument("--scheduler-file", metavar="FILE", help="run the sweep on the Dask scheduler of this file")
    o.add_argument("--events", metavar="FILE|-",
                   help="write live query-migrate events as JSON lines (the last line: the --json result); "
                        "with --sweep each case writes FILE.N.NAME")


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
    pause = args.pause_before_switchover
    if pause is not None and not 0 <= pause < float("inf"):
        raise ValueError(f"--pause-before-switchover must be a non-negative number of seconds, got {pause}")
    params = MigrationParams(
        max_bandwidth=parse_rate(args.max_bandwidth), downtime_limit=args.downtime_limit / 1000.0,
        max_iterations=args.max_iterations, time_limit=args.time_limit, on_limit=args.on_limit,
        zero_page_detection=not args.no_zero_detection and args.zero_page_detection != "none",
        multifd_channels=args.multifd_channels, multifd_compression=args.multifd_compression,
        multifd_zero_page="none" if args.no_zero_detection else (args.zero_page_detection or "multifd"),
        xbzrle_cache_size=parse_size(args.xbzrle_cache) if args.xbzrle_cache else 0,
        release_ram=args.release_ram, pause_before_switchover=args.pause_before_switchover is not None,
        machine=args.machine, sample_rss=bool(args.plot),
        auto_converge=args.auto_converge, cpu_throttle_initial=args.cpu_throttle_initial,
        cpu_throttle_increment=args.cpu_throttle_increment, max_cpu_throttle=args.max_cpu_throttle,
        throttle_trigger_threshold=args.throttle_trigger_threshold,
        cpu_throttle_tailslow=args.cpu_throttle_tailslow, postcopy_after=postcopy_after(args.postcopy_after),
        mapped_ram=args.mapped_ram,
        # multifd is QEMU 10.0's protocol here: it writes QEMU 10.0's stream unless told otherwise
        qemu_version=args.qemu_version or ("10.0" if args.mapped_ram or args.multifd_channels
                                           else DEFAULT_STREAM_VERSION.name))
    migration_channels_and_transport_compatible(args.to, mapped_ram=args.mapped_ram, prefix="--", where="--to")
    params.compress_level = parse_compress(args.compress).page_level   # checked against the version
    # the option combinations, under the options' names (QEMU's migrate_caps_check /
    # migrate_params_check); a declared --qemu-version is the peer multifd must suit
    check_migration_params(params, peer=args.qemu_version and stream_version(args.qemu_version), prefix="--",
                           stream_compression=args.compress != "none", zero_page_detection=args.zero_page_detection)
    params.check()
    workload = args.workload if args.dirty_rate is None else with_rate(args.workload, args.dirty_rate)
    return MigrationConfig(size=parse_size(args.size), block=args.block, init=args.init, workload=workload,
                           seed=args.seed, to=args.to, compress=args.compress, verify=not args.no_verify,
                           params=params, peer=args.peer, stall_timeout=args.stall_timeout,
                           engine=args.engine, qemu=args.qemu)


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
                         f"{info['elapsed']:6.2f} s"
                         + (f"  throttle {info['cpu-throttle-percentage']}%"
                            if info.get("cpu-throttle-percentage") else "")))
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
        disk = ver.get("on-disk-bytes")
        sizes = "" if disk is None else f" (file {format_bytes(ver['file-bytes'])}, {format_bytes(disk)} on disk)"
        return f"{ver.get('method')}: equal{sizes}"
    why = ver.get("error") or f"blocks differ: {', '.join(ver.get('mismatched', []))}"
    return f"{ver.get('method')}: MISMATCH ({why})"


def summary_title(st: MigrationStats) -> str:
    """The summary table's title: the status, for a completed run whether it was
    verified, and the outcome."""
    what = {"verified": "completed, verified", "mismatch": "completed, MISMATCH",
            "not-verified": "completed, NOT VERIFIED"}.get(st.completion or "", st.status)
    return f"migration {what}: {st.outcome}"


def postcopy_after(text: str | None) -> int | str | None:
    """``--postcopy-after``: None, ``auto`` or a count >= 0.  ValueError naming the option."""
    if text is None or text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"--postcopy-after must be a number of dirty syncs >= 0 or auto, got {text!r}")
    return n


def _postcopy_rows(d: dict) -> list[tuple[str, str]]:
    pc = d["npqfile"].get("postcopy")
    if not pc:
        return []
    lat = (d["npqfile"]["destination"].get("postcopy") or {}).get("fault-latency") or {}
    r = d["ram"]
    rows = [("postcopy requests / bytes", f"{r['postcopy-requests']} / {format_bytes(r['postcopy-bytes'])}")]
    if lat.get("count"):
        rows.append(("fault latency p50 / p90 / p99 / max",
                     f"{lat['p50-ms']} / {lat['p90-ms']} / {lat['p99-ms']} / {lat['max-ms']} ms "
                     f"({lat['count']} faults)"))
    if "postcopy-blocktime" in d:
        rows.append(("postcopy blocktime (destination guest)", f"{d['postcopy-blocktime']:.1f} ms"))
    return rows


def _summary(st: MigrationStats, out) -> None:
    from rich.console import Console
    from rich.table import Table

    d = st.as_dict()
    r, x = d["ram"], d["npqfile"]
    engine = f" (QEMU {d['qemu'].get('version')})" if "qemu" in d else ""
    t = Table(title=f"{summary_title(st)}{engine}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    ver = st.verification
    rows = [
        ("total time", f"{d['total-time']:.1f} ms"), ("setup time", f"{d['setup-time']:.1f} ms"),
        ("downtime", f"{d['downtime']:.1f} ms (expected {d['expected-downtime']:.1f} ms)"),
        ("transferred (RAM)", f"{format_bytes(r['transferred'])} ({r['transferred']} B)"
                              + ("" if x["transferred-queued"] == r["transferred"]
                                 else f"; {x['transferred-queued']} B queued")),
        ("stream bytes", "n/a" if x["stream-bytes"] is None       # the QEMU engine: not reported
         else f"{format_bytes(x['stream-bytes'])} ({x['stream-bytes']} B)"),
        ("pages normal / duplicate", f"{r['normal']} / {r['duplicate']}"),
        ("pages xbzrle / compressed", f"{x['pages']['xbzrle']} / {x['pages']['compressed']}"),
        ("dirty sync count", str(r["dirty-sync-count"])), ("dirty pages rate", f"{r['dirty-pages-rate']:.0f} pages/s"),
        ("mbps", f"{r['mbps']:.1f} Mbit/s (last window {x['last-window-mbps']:.1f})"),
        ("pages per second", f"{r['pages-per-second']:.0f}"),
        ("source RSS before / after", "n/a" if x["rss-before"] is None
         else f"{format_bytes(x['rss-before'])} / {format_bytes(x['rss-after'])}"),
        ("verification", verification_text(ver)),
        *_postcopy_rows(d),
    ]
    if x["released-bytes"] is not None:          # the QEMU engine does not measure it
        rows.insert(-1, ("released (freed / advised)",
                         f"{format_bytes(x['released-bytes'])} / {format_bytes(x['release-advised-bytes'])}"))
    if st.release:
        rel = st.release
        when = {"after-verdict": "after the verdict", "postcopy": "once sent (postcopy)"}.get(rel["when"])
        rows.append(("release-ram", f"{format_bytes(rel['released-bytes'])} {when}" if when
                     else f"nothing released: {rel['reason']}"))
    if "cpu-throttle-percentage" in d:
        steps = " -> ".join(str(e["cpu-throttle-percentage"]) for e in x["throttle-events"]) or "never throttled"
        rows.append(("cpu throttle (auto-converge)", f"{d['cpu-throttle-percentage']} % ({steps})"))
    if "xbzrle-cache" in d:
        xc = d["xbzrle-cache"]
        rows.append(("xbzrle cache miss / encoding rate", f"{xc['cache-miss']} / {xc['encoding-rate']}"))
    if st.compression:
        rows.append(("compression", ", ".join(f"{k} {v}" for k, v in st.compression.items())))
    if st.multifd:
        m = st.multifd
        rows.append((f"multifd ({m['channels']} channels, {m['compression']})",
                     f"{format_bytes(m['multifd-bytes'])}: " + " / ".join(format_bytes(c["bytes"])
                                                                       for c in m["per-channel"])))
    for row in rows:
        t.add_row(*row)
    it = Table(title="iterations")
    throttled = "cpu-throttle-percentage" in d
    for col in ("iteration", "sync", "dirty pages", "pages sent", "bytes", "time ms", "Mbit/s") + (
            ("throttle %",) if throttled else ()):
        it.add_column(col, justify="right")
    for i in st.iterations:
        it.add_row(f"{i.index} (final)" if i.final else str(i.index), str(i.sync), str(i.dirty_pages),
                   str(i.pages_sent), format_bytes(i.bytes_sent), f"{i.duration * 1000:.1f}",
                   f"{i.bandwidth * 8 / 1e6:.0f}", *((str(i.cpu_throttle),) if throttled else ()))
    console = Console(file=out)
    console.print(t)
    console.print(it)


def _exit_status(st: MigrationStats, interrupted: bool = False) -> int:
    """EXIT_STATUS for the run's statistics (``interrupted``: Ctrl-C cancelled it)."""
    if st.status == "cancelled":
        return EXIT_INTERRUPTED if interrupted else EXIT_NOT_CONVERGED
    if st.status != "completed":
        return EXIT_FAILED
    return {"verified": EXIT_COMPLETED, "not-verified": EXIT_NOT_VERIFIED}.get(st.completion, EXIT_FAILED)


def _sweep_line(p) -> str:
    """One progress line: the case that finished (and its files), then the counts."""
    counts = f"[{p.done}/{p.total} done, {p.running} running, {p.failed} failed, {p.cancelled} cancelled]"
    if p.row is None:
        return counts
    files = p.row.get("files") or []
    wrote = f"; wrote {', '.join(files)}" if files else ""
    return f"case {p.row['case']} ({p.row['name']}): {p.row['status']} {p.row['outcome']}{wrote}  {counts}"


def _run_sweep(cfg: MigrationConfig, args: argparse.Namespace) -> int:
    names = [SWEEP_ALIASES.get(s.partition("=")[0].strip(), s.partition("=")[0].strip()) for s in args.sweep]
    show = None if args.quiet else (lambda p: print(_sweep_line(p), file=sys.stderr, flush=True))
    try:
        rows = run_sweep(cfg, args.sweep, args.jobs, cluster=args.cluster, scheduler_file=args.scheduler_file,
                         events=args.events, on_update=show)
        status = sweep_exit_status(rows)
    except SweepInterrupted as exc:
        rows, status = exc.rows, 130
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="sweep")
        # --engine both: each result cell is "simulator / QEMU"
        sides = [""] if cfg.engine != "both" else ["", "qemu-"]
        both = " sim / QEMU" if len(sides) > 1 else ""
        for col in ["case", *names, *[c + both for c in ("status", "total ms", "downtime ms", "syncs", "converged",
                                                         "outcome", "verified")], "files"]:
            t.add_column(col, justify="right")
        for row in rows:
            per_side = [[str(row.get(side + "status")), f"{row.get(side + 'total-time', 0):.0f}",
                         f"{row.get(side + 'downtime', 0):.1f}", str(row.get(side + "dirty-sync-count", "")),
                         "yes" if row.get(side + "converged") else "no", str(row.get(side + "outcome")),
                         str(row.get(side + "verified"))] for side in sides]
            t.add_row(str(row["case"]), *[row[n] for n in names],
                      *[" / ".join(cells) for cells in zip(*per_side)], " ".join(row.get("files") or []))
        console = Console()
        if not console.is_terminal:
            console = Console(width=100000)     # a pipe or file: every column in full
        console.print(t)
    if args.plot:                      # after the results are printed: a plot error loses nothing
        from npqfile.migration.plot import plot_sweep
        status = status or _draw(plot_sweep, rows, names, args.plot)
    return status


def _draw(plot, *what) -> int:
    """Run ``plot(*what)``; returns 0, or 1 after printing why the plot was not written."""
    try:
        plot(*what)
    except (OSError, ValueError) as exc:
        print(f"error: the plot was not written: {exc}", file=sys.stderr)
        return 1
    return 0


def _pause_hook(delay: float, control: MigrationControl):
    """pause-before-switchover: the guest is stopped; wait (a cancel ends the wait),
    then let the engine continue."""
    def hook(engine) -> None:
        print(f"pre-switchover: guest stopped, continuing in {delay} s", file=sys.stderr, flush=True)
        control.wait(delay)
    return hook


def _run_cancellable(cfg: MigrationConfig, control: MigrationControl, *, run=None,
                     **kw) -> tuple[Any, bool]:
    """``run(cfg, control=control, **kw)`` (default run_migration; compare.run_both) with Ctrl-C
    mapped to migrate_cancel: the first SIGINT cancels the run (which then ends with its
    statistics), a second one raises KeyboardInterrupt.  Returns (what ``run`` returned,
    whether SIGINT cancelled the run).

    The handler only writes a byte to a pipe (async-signal-safe); a watcher thread does
    the cancel and the message.  Cancelling sets threading Events that the main thread
    may be waiting on, and prints: done in the handler, which runs in the main thread
    between two bytecodes, that could take a lock the main thread already holds."""
    run = run or run_migration
    if threading.current_thread() is not threading.main_thread():
        return run(cfg, control=control, **kw), False
    hit = []
    rfd, wfd = os.pipe()

    def on_sigint(signum, frame) -> None:
        hit.append(signum)
        signal.signal(signal.SIGINT, previous)     # a second Ctrl-C aborts
        os.write(wfd, b"x")

    def watcher() -> None:
        while os.read(rfd, 1):                      # b"": the run is over
            refused = control.cancel()
            print(f"interrupted: {refused or 'cancelling the migration'} (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)

    thread = threading.Thread(target=watcher, name="sigint-cancel", daemon=True)
    thread.start()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        st = run(cfg, control=control, **kw)
    finally:
        signal.signal(signal.SIGINT, previous)
        os.close(wfd)                               # the watcher handles a pending byte, then ends
        thread.join()
        os.close(rfd)
    return st, bool(hit)


def _stream_fd(to: str | None) -> int | None:
    """The fd number of an ``fd:N`` destination, else None."""
    if to and to.startswith("fd:") and to[3:].isdigit():
        return int(to[3:])
    return None


def check_outputs(args: argparse.Namespace, cfg: MigrationConfig) -> None:
    """Every output the command will write, checked before the run (a run's results must
    not be lost to a bad output path): the plot's format and directory, a ``file:``
    destination's directory.  Returns None; raises ValueError or OSError naming it."""
    if args.plot:
        from npqfile.migration.plot import check_plot_path
        check_plot_path(args.plot)
    to = cfg.to or ""
    if to.startswith("file:"):
        if not to[5:]:
            raise ValueError("--to file: needs a path (file:PATH)")
        folder = os.path.dirname(os.path.abspath(to[5:]))
        if not os.path.isdir(folder):
            raise ValueError(f"--to {to}: directory {folder} does not exist")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_outputs(args, cfg)               # before the run, not after it: keep the stats
    if args.sweep:
        return _run_sweep(cfg, args)
    if args.cluster or args.scheduler_file:
        raise ValueError("--cluster and --scheduler-file run sweeps: add --sweep PARAM=V1,V2,...")
    if cfg.engine == "both":
        from npqfile.migration.compare import run_and_report
        with MigrationControl() as control:
            return run_and_report(cfg, args, _pause_hook(args.pause_before_switchover, control)
                                  if args.pause_before_switchover is not None else None, control)
    # --to fd:1 > snap.bin: stdout carries the stream (and the channel closes the fd
    # at the end), so the report goes to stderr; fd:2 likewise sends it to stdout
    stream_fd = _stream_fd(cfg.to)
    out, err = sys.stdout, sys.stderr
    if stream_fd is not None and stream_fd in (_fileno(out), _fileno(err)):
        out = err = sys.stderr if stream_fd == _fileno(out) else sys.stdout
    if args.events == "-" and stream_fd is not None:
        raise ValueError("--events - and --to fd:N cannot share standard output: give --events FILE")
    events = EventWriter.open(args.events) if args.events else None
    if args.events == "-":
        out = sys.stderr                    # stdout carries the event lines
    live, update = _progress_display(args.quiet or args.json or stream_fd == _fileno(sys.stderr))
    try:
        with MigrationControl() as control:
            hook = None if args.pause_before_switchover is None else _pause_hook(args.pause_before_switchover,
                                                                                  control)
            if live is not None:
                with live:
                    st, interrupted = _run_cancellable(cfg, control, on_progress=update, pre_switchover=hook,
                                                       events=events)
            else:
                st, interrupted = _run_cancellable(cfg, control, pre_switchover=hook, events=events)
        if events is not None:
            events.result(st.as_dict())
    finally:
        if events is not None:
            events.close()
    if args.json:
        print(json.dumps(st.as_dict(), indent=2), file=out)
    else:
        _summary(st, out)
    plot_status = 0
    if args.plot:                          # after the results are out: a plot error loses nothing
        from npqfile.migration.plot import plot_migration
        plot_status = _draw(plot_migration, st, args.plot)
        if st.postcopy.get("postcopy-bytes"):
            from npqfile.migration.plot import plot_postcopy, postcopy_plot_path
            plot_status = plot_status or _draw(plot_postcopy, st, postcopy_plot_path(args.plot))
    ver = st.verification
    if interrupted and st.status == "cancelled":
        print("error: migration cancelled (interrupted)", file=err)
    elif st.status == "postcopy-paused":
        print(f"error: migration postcopy-paused: {st.outcome.removeprefix('error: ')}", file=err)
    elif st.status == "failed":
        print(f"error: migration failed: {st.outcome.removeprefix('error: ')}", file=err)
    elif ver.get("done") is False:
        print(f"error: verification not done: {ver.get('error')}", file=err)
    elif ver.get("ok") is False:
        why = ver.get("error") or f"blocks differ: {', '.join(ver.get('mismatched', []))}"
        print(f"error: destination does not match the source at switchover ({why})", file=err)
    return _exit_status(st, interrupted) or plot_status


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):   # pytest's capture, a closed stream
        return None
