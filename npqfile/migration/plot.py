"""Pictures of one migration: bytes sent and dirty pages per round, source RSS over time.

Supports: :func:`plot_migration(stats, path)` writing a PNG (matplotlib, Agg backend)
with two panels: per-iteration bytes sent (bars) and dirty pages at the start of each
iteration (line, right axis); and the source guest RAM's resident size and the stream
bytes over time (from ``stats.timeline``, sampled every 100 ms window when
``sample_rss`` is on, and at switchover, after release-ram's release and at completion,
so the RSS drop shows while the guest is stopped, which is shaded); :func:`plot_sweep(rows,
names, path)` for a ``--sweep``: total time (bars) and downtime (line) per case;
:func:`check_writable(path)` to fail before a long run rather than after it.
Goals: the figure guestperf users look at, in one call.  Errors: OSError if the file
cannot be written.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from npqfile.migration.stats import MigrationStats

MIB = float(1 << 20)


def check_writable(path: str | os.PathLike) -> None:
    """Raise OSError naming ``path`` when a file cannot be created there (missing or
    unwritable directory, or a directory in the file's place); returns nothing."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(errno.ENOENT, f"cannot write the plot {path}: directory {folder} does not exist")
    if os.path.isdir(path):
        raise OSError(errno.EISDIR, f"cannot write the plot {path}: it is a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"cannot write the plot {path}: directory {folder} is not writable")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_migration(stats: MigrationStats, path: str | os.PathLike) -> None:
    """Draw ``stats`` into the PNG ``path``.  Raises OSError when it cannot be written."""
    plt = _pyplot()
    fig, (ax1, ax3) = plt.subplots(2, 1, figsize=(8, 7))
    try:
        its = stats.iterations
        labels = [(f"{it.index}\nfinal" if it.final else str(it.index)) for it in its]
        xs = range(len(its))
        ax1.bar(xs, [it.bytes_sent / MIB for it in its], color="tab:blue", label="bytes sent")
        ax1.set_xticks(list(xs), labels)
        ax1.set_xlabel("iteration (dirty sync)")
        ax1.set_ylabel("sent (MiB)", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.plot(list(xs), [it.dirty_pages for it in its], "o-", color="tab:red", label="dirty pages")
        ax2.set_ylabel("dirty pages at start", color="tab:red")
        ax1.set_title(f"{stats.status} ({stats.outcome}): total {stats.total_time * 1000:.0f} ms, "
                      f"downtime {stats.downtime * 1000:.1f} ms")
        tl = stats.timeline
        if tl:
            ts = [t for t, _b, _r in tl]
            ax3.plot(ts, [r / MIB for _t, _b, r in tl], color="tab:green", label="source RSS")
            ax3.plot(ts, [b / MIB for _t, b, _r in tl], color="tab:gray", linestyle="--", label="stream bytes")
            if stats.switchover_time and not stats.postcopy.get("postcopy-bytes"):
                # from vm_stop to the end (the reported downtime leaves out verification hashing)
                ax3.axvspan(stats.switchover_time, ts[-1], color="tab:orange", alpha=0.2, label="guest stopped")
            ax3.legend(loc="best")
        else:
            ax3.text(0.5, 0.5, "no RSS samples", ha="center", va="center", transform=ax3.transAxes)
        ax3.set_xlabel("time (s)")
        ax3.set_ylabel("MiB")
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=100)
    finally:
        plt.close(fig)


def plot_sweep(rows: list[dict[str, Any]], names: list[str], path: str | os.PathLike) -> None:
    """Draw a sweep's rows (``run_sweep``) into the PNG ``path``: one bar per case (its
    ``names`` values as the label) for the total time, the downtime as a line on the
    right axis; cases that did not converge are hatched.  Raises OSError when it cannot
    be written."""
    plt = _pyplot()
    fig, ax1 = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 5))
    try:
        labels = ["\n".join(f"{n}={row[n]}" for n in names) for row in rows]
        xs = list(range(len(rows)))
        bars = ax1.bar(xs, [row.get("total-ms", 0) for row in rows], color="tab:blue", label="total time")
        for bar, row in zip(bars, rows):
            if not row.get("converged"):
                bar.set_hatch("//")
        ax1.set_xticks(xs, labels)
        ax1.set_ylabel("total time (ms)", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.plot(xs, [row.get("downtime-ms", 0) for row in rows], "o-", color="tab:red", label="downtime")
        ax2.set_ylabel("downtime (ms)", color="tab:red")
        ax1.set_title(f"sweep over {', '.join(names)} (hatched: not converged)")
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=100)
    finally:
        plt.close(fig)


def postcopy_plot_path(path: str | os.PathLike) -> str:
    """``run.png`` -> ``run.postcopy.png``: where ``migrate --plot`` draws the postcopy figure."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.postcopy{ext or '.png'}"


def plot_postcopy(stats: MigrationStats, path: str | os.PathLike) -> None:
    """Postcopy: source RSS over time (release-ram frees pages as they are sent) and the
    destination's page-fault latency distribution (CDF, p50/p90/p99 marked).  Raises
    OSError when the PNG cannot be written."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7))
    try:
        tl = stats.timeline
        if tl:
            ts = [t for t, _b, _r in tl]
            ax1.plot(ts, [r / MIB for _t, _b, r in tl], color="tab:green", label="source RSS")
            ax1.plot(ts, [b / MIB for _t, b, _r in tl], color="tab:gray", linestyle="--", label="stream bytes")
            if stats.switchover_time:
                ax1.axvline(stats.switchover_time, color="tab:orange", label="switch to postcopy")
            ax1.legend(loc="best")
        else:
            ax1.text(0.5, 0.5, "no RSS samples", ha="center", va="center", transform=ax1.transAxes)
        ax1.set_xlabel("time (s)")
        ax1.set_ylabel("MiB")
        ax1.set_title(f"postcopy {stats.status}: {stats.postcopy.get('postcopy-requests', 0)} page requests, "
                      f"downtime {stats.downtime * 1000:.1f} ms")
        dst = stats.destination.get("postcopy") or {}
        lat = sorted(dst.get("fault-latencies-ms") or [])
        if lat:
            n = len(lat)
            ax2.plot(lat, [(i + 1) / n for i in range(n)], color="tab:purple")
            summary = dst.get("fault-latency") or {}
            for q in ("p50", "p90", "p99"):
                v = summary.get(f"{q}-ms")
                if v is not None:
                    ax2.axvline(v, color="tab:gray", linestyle=":")
                    ax2.text(v, 0.02, q, rotation=90, va="bottom")
            ax2.set_title(f"destination page faults: {n}, guest blocked "
                          f"{dst.get('postcopy-blocktime', 0):.1f} ms in all")
        else:
            ax2.text(0.5, 0.5, "no page faults recorded (no guest on the destination, or a remote one)",
                     ha="center", va="center", transform=ax2.transAxes)
        ax2.set_xlabel("fault latency (ms): fault to page placed")
        ax2.set_ylabel("fraction of faults")
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=100)
    finally:
        plt.close(fig)
