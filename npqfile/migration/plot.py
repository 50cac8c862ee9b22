"""Pictures of one migration: bytes sent and dirty pages per round, source RSS over time.

Supports: :func:`plot_migration(stats, path)` writing a PNG (matplotlib, Agg backend)
with two panels: per-iteration bytes sent (bars) and dirty pages at the start of each
iteration (line, right axis); and the source guest RAM's resident size and the stream
bytes over time (from ``stats.timeline``, sampled every 100 ms window when
``sample_rss`` is on; with release-ram the RSS drops at switchover).
Goals: the figure guestperf users look at, in one call.  Errors: OSError if the file
cannot be written.
"""

from __future__ import annotations

import os

from npqfile.migration.stats import MigrationStats

MIB = float(1 << 20)


def plot_migration(stats: MigrationStats, path: str | os.PathLike) -> None:
    """Draw ``stats`` into the PNG ``path``.  Raises OSError when it cannot be written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3) = plt.subplots(2, 1, figsize=(8, 7))
    try:
        its = stats.iterations
        labels = [("final" if it.final else str(it.index)) for it in its]
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
            ax3.legend(loc="best")
        else:
            ax3.text(0.5, 0.5, "no RSS samples", ha="center", va="center", transform=ax3.transAxes)
        ax3.set_xlabel("time (s)")
        ax3.set_ylabel("MiB")
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=100)
    finally:
        plt.close(fig)
