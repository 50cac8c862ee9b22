"""Pictures of one migration: bytes sent and dirty pages per round, source RSS over time.

Supports: :func:`plot_migration(stats, path)` writing an image (matplotlib, Agg backend;
the format follows the extension, PNG, PDF, SVG...) with two panels, three with
auto-converge: per-iteration bytes sent (bars) and dirty pages at the start of each
iteration (line, right axis, from 0 so a small change never looks like a large one);
the source guest RAM's resident size and the stream bytes over time (from
``stats.timeline``, sampled every 100 ms window when ``sample_rss`` is on, and at
switchover, after release-ram's release and at completion), with the downtime shaded
(from vm_stop for the reported downtime: the source's verification hashing is not
drawn as downtime); and the cpu-throttle-percentage over time (auto-converge).
:func:`plot_postcopy(stats, path)`: the source's RSS as postcopy proceeds and the
destination's page-fault latency CDF.
:func:`plot_sweep(rows, names, path)` for a ``--sweep``: total time (bars) and downtime
(line) per case, the case labels wrapped and spaced so they never overlap;
:func:`check_plot_path(path)` to fail before a long run rather than after it.
Goals: the figure guestperf users look at, in one call.  Plan: ``*_figure`` functions
build the figure (tests inspect it) inside :func:`new_figure` (closed if drawing
fails), ``plot_*`` save and close it (:func:`save_figure`; ``reclaim`` uses both too).
Errors: OSError if the file cannot be written, ValueError for a format matplotlib
cannot write.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
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


def check_plot_path(path: str | os.PathLike) -> None:
    """Raise ValueError unless ``path``'s extension names a format matplotlib writes
    (``.png``, ``.pdf``, ``.svg``...), OSError when the file cannot be created there;
    returns nothing.  Cheap enough to call before a run."""
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    formats = _formats()
    if ext not in formats:
        what = f"extension .{ext}" if ext else "no extension"
        raise ValueError(f"cannot write the plot {os.fspath(path)}: {what} is not an image format "
                         f"(use one of {', '.join('.' + f for f in sorted(formats))})")
    check_writable(path)


def _formats() -> set[str]:
    """The file formats matplotlib can save."""
    plt = pyplot()
    return set(plt.gcf().canvas.get_supported_filetypes()) | {"png"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` to the image ``path`` and close it, written or not.  Raises OSError
    when it cannot be written."""
    plt = pyplot()
    try:
        fig.savefig(os.fspath(path), dpi=100)
    finally:
        plt.close(fig)


@contextmanager
def new_figure(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(*args, **kwargs)`` for a ``*_figure`` function: yields (figure,
    axes) to draw on, lays the figure out when drawing ends, and closes it if drawing
    raised (the caller of a ``*_figure`` owns only a figure it received)."""
    plt = pyplot()
    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise


def plot_migration(stats: MigrationStats, path: str | os.PathLike) -> None:
    """Draw ``stats`` into the image ``path``.  Raises OSError when it cannot be written."""
    save_figure(migration_figure(stats), path)


def migration_figure(stats: MigrationStats):
    """The matplotlib Figure of ``stats`` (see the module docstring); the caller closes it."""
    throttle = bool(stats.params.get("auto_converge"))
    with new_figure(3 if throttle else 2, 1, figsize=(8, 9.5 if throttle else 7)) as (fig, axes):
        _iterations_panel(stats, axes[0])
        _timeline_panel(stats, axes[1])
        if throttle:
            _throttle_panel(stats, axes[2])
    return fig


def _iterations_panel(stats: MigrationStats, ax1) -> None:
    its = stats.iterations
    labels = [(f"{it.index}\nfinal" if it.final else str(it.index)) for it in its]
    xs = range(len(its))
    ax1.bar(xs, [it.bytes_sent / MIB for it in its], color="tab:blue", label="bytes sent")
    ax1.set_xticks(list(xs), labels)
    ax1.set_xlabel("iteration (dirty sync)")
    ax1.set_ylabel("sent (MiB)", color="tab:blue")
    ax2 = ax1.twinx()
    dirty = [it.dirty_pages for it in its]
    ax2.plot(list(xs), dirty, "o-", color="tab:red", label="dirty pages")
    # from 0: autoscaling a nearly flat line (a cancelled run that never converged)
    # would magnify a 1 % change into the full height
    ax2.set_ylim(0, max(dirty, default=0) * 1.1 or 1)
    ax2.set_ylabel("dirty pages at start", color="tab:red")
    ax1.set_title(f"{stats.status} ({stats.outcome}): total {stats.total_time * 1000:.0f} ms, "
                  f"downtime {stats.downtime * 1000:.1f} ms")


def _timeline_panel(stats: MigrationStats, ax3, postcopy: bool = False) -> None:
    """Source RSS and stream bytes over time; the downtime shaded (pre-copy) or the
    switch to postcopy marked (``postcopy``)."""
    tl = stats.timeline
    if tl:
        ts = [t for t, _b, _r in tl]
        ax3.plot(ts, [r / MIB for _t, _b, r in tl], color="tab:green", label="source RSS")
        ax3.plot(ts, [b / MIB for _t, b, _r in tl], color="tab:gray", linestyle="--", label="stream bytes")
        if postcopy and stats.switchover_time:
            ax3.axvline(stats.switchover_time, color="tab:orange", label="switch to postcopy")
        elif not postcopy and stats.switchover_time and stats.downtime:
            # the reported downtime from vm_stop; hashing for verification is left out
            ax3.axvspan(stats.switchover_time, stats.switchover_time + stats.downtime, color="tab:orange",
                        alpha=0.2, label=f"downtime ({stats.downtime * 1000:.0f} ms)")
        ax3.legend(loc="best")
        ax3.set_ylim(bottom=0)
    else:
        ax3.text(0.5, 0.5, "no RSS samples", ha="center", va="center", transform=ax3.transAxes)
    ax3.set_xlabel("time (s)")
    ax3.set_ylabel("MiB")


def _throttle_panel(stats: MigrationStats, ax) -> None:
    """cpu-throttle-percentage as a step line over the run (0 until the first change)."""
    end = stats.switchover_time or stats.total_time
    ts = [0.0] + [e.time for e in stats.throttle_events] + [end]
    pct = [0] + [e.percentage for e in stats.throttle_events]
    ax.step(ts, pct + pct[-1:], where="post", color="tab:purple", label="cpu-throttle-percentage")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("throttle (%)")
    ax.set_title("auto-converge: the guest runs (100 - throttle) % of the time")


def plot_sweep(rows: list[dict[str, Any]], names: list[str], path: str | os.PathLike) -> None:
    """Draw a sweep's rows (``run_sweep``) into the image ``path``; see
    :func:`sweep_figure`.  Raises OSError when it cannot be written."""
    save_figure(sweep_figure(rows, names), path)


def _wrap(text: str, width: int = 18) -> str:
    """``text`` cut into lines of at most ``width`` characters, at commas when it can."""
    lines, line = [], ""
    for part in text.replace(",", ",\x00").split("\x00"):
        while len(part) > width:
            if line:
                lines.append(line)
                line = ""
            lines.append(part[:width])
            part = part[width:]
        if len(line) + len(part) > width and line:
            lines.append(line)
            line = ""
        line += part
    if line:
        lines.append(line)
    return "\n".join(lines)


def sweep_figure(rows: list[dict[str, Any]], names: list[str]):
    """The Figure of a sweep: one bar per case (its ``names`` values as the label,
    wrapped, each case as wide as its label, so neighbours never overlap) for the total time, the downtime
    as a line on the right axis; cases that did not converge are hatched.  The caller
    closes it."""
    labels = ["\n".join(_wrap(f"{n}={row[n]}") for n in names) for row in rows]
    # each case gets the width of its widest label line (about 0.08 in per character at
    # 8 pt) plus a gap, so the labels sit side by side without touching
    widest = max((len(line) for label in labels for line in label.split("\n")), default=1)
    with new_figure(figsize=(max(6.0, len(rows) * (0.08 * widest + 0.3) + 2.5), 6)) as (fig, ax1):
        xs = list(range(len(rows)))
        bars = ax1.bar(xs, [row.get("total-time", 0) for row in rows], color="tab:blue", label="total time")
        for bar, row in zip(bars, rows):
            if not row.get("converged"):
                bar.set_hatch("//")
        ax1.set_xticks(xs, labels, fontsize=8)
        ax1.set_xlim(-0.5, len(rows) - 0.5)
        ax1.set_ylabel("total time (ms)", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.plot(xs, [row.get("downtime", 0) for row in rows], "o-", color="tab:red", label="downtime")
        ax2.set_ylim(bottom=0)
        ax2.set_ylabel("downtime (ms)", color="tab:red")
        ax1.set_title(f"sweep over {', '.join(names)} (hatched: not converged)")
    return fig


def postcopy_plot_path(path: str | os.PathLike) -> str:
    """``run.png`` -> ``run.postcopy.png``: where ``migrate --plot`` draws the postcopy figure."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.postcopy{ext or '.png'}"


def plot_postcopy(stats: MigrationStats, path: str | os.PathLike) -> None:
    """Draw :func:`postcopy_figure` into the image ``path``.  Raises OSError when it
    cannot be written."""
    save_figure(postcopy_figure(stats), path)


def postcopy_figure(stats: MigrationStats):
    """Postcopy: the source's RSS over time (release-ram frees each page once sent, so it
    falls after the switch) and the destination's page-fault latency distribution (CDF,
    p50/p90/p99 marked; from ``stats.destination["postcopy"]``).  The caller closes it."""
    with new_figure(2, 1, figsize=(8, 7)) as (fig, (ax1, ax2)):
        _timeline_panel(stats, ax1, postcopy=True)
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
    return fig
