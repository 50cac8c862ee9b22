"""The memory-reclaim experiment: does streaming guest RAM with release really free it?

Supports: ``ReclaimConfig`` (size, backing, advice, release on/off, sink URI, sampling
interval, seed), ``run_reclaim(config)`` -> ``ReclaimResult``, ``compare_configs`` (the
backing x advice matrix), and three renderings: ``results_table`` (rich),
``results_json`` and ``plot_results`` (matplotlib, RSS against bytes sent: small
multiples, one column per backing, one line per advice).

Goals: measure, per configuration, what the kernel did -- the mapping's RSS before,
at its peak and after the stream (smaps), the process RSS (psutil), the pages still
held by the backing (mincore: shmem / page cache), how many pages QEMUFile released,
and what the released pages read back as (zero, the old data, or something else) --
so that "DONTNEED frees shared memory" style assumptions show up as numbers.

Plan: fill a RAMBlock ``pc.ram`` with random non-zero words (a per-page checksum is
kept, so "old data" is recognised without a second copy), then write it through a real
``QEMUFile`` into the sink as a complete ``-M none`` QEMU stream (``save_snapshot``:
RAMSaver's page records, each page ``put_buffer_async(may_free=release)``, as QEMU's
release-ram does), so the sink is a migration stream that ``npqfile analyze`` and
QEMU load.  The page headers keep pages from merging into one giant iovec, so
QEMUFile flushes (and releases) every 32 pages exactly as QEMU's ram_save_page loop
does.  RSS is sampled every ``sample_every`` bytes of pages; sampling time is excluded
from the reported time.
An advice the kernel refuses for a backing (e.g. ``free`` on shared memory) is found
by a probe on the still-empty block and reported as unsupported, not streamed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from npqfile.channels import open_channel
from npqfile.errors import FileError
from npqfile.qemufile import QEMUFile
from npqfile.ram import ADVICES, DEFAULT_ADVICE, HOST_PAGE_SIZE, GuestRAM, RAMBlock, parse_backing, process_rss
from npqfile.ram.release import check_advice
from npqfile.stream.snapshot import save_snapshot

BACKINGS: tuple[str, ...] = ("private", "shared", "memfd", "file")
_FILL_CHUNK = 16 << 20  # bytes generated / checked per numpy call


@dataclass
class ReclaimConfig:
    """One experiment.  ``backing`` may be ``file`` (a temporary file in ``file_dir``)
    or ``file:PATH``; ``advice`` None is the backing's real freeing primitive;
    ``sample_every`` None is size/32 (at least 1 MiB)."""

    size: int = 512 << 20
    backing: str = "private"
    advice: str | None = None
    release: bool = True
    sink: str = "null:"
    sample_every: int | None = None
    seed: int = 0
    page_size: int = 4096
    hugepages: bool = False
    file_dir: str | None = None


@dataclass
class Sample:
    """Memory seen after ``sent`` payload bytes: the mapping's RSS (smaps Rss), what the
    backing still holds (mincore, bytes) and the process RSS."""

    sent: int
    mapping_rss: int
    backing_kept: int
    process_rss: int


@dataclass
class ReclaimResult:
    """What one configuration did; byte counts unless named ``pages``."""

    backing: str
    advice: str
    release: bool
    size: int
    status: str = "ok"                 # "ok", "unsupported" or "failed"
    error: str | None = None
    reason: str | None = None          # short form of ``error`` for tables (e.g. EINVAL)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    lazyfree_after: int = 0
    process_rss_before: int = 0
    process_rss_peak: int = 0
    process_rss_after: int = 0
    resident_pages_after: int = 0      # pagemap: this mapping still holds them
    cached_pages_after: int = 0        # mincore: the backing still holds them
    pages_released: int = 0
    release_errors: int = 0
    readback_zero: int = 0
    readback_old: int = 0
    readback_other: int = 0
    readback: str = "n/a"
    bytes_sent: int = 0
    seconds: float = 0.0
    throughput: float = 0.0            # stream bytes per second
    samples: list[Sample] = field(default_factory=list)


def _advice_label(config: ReclaimConfig, kind: str) -> str:
    if not config.release:
        return "none"
    return DEFAULT_ADVICE[kind] if config.advice is None else config.advice


def _fill(block: RAMBlock, seed: int) -> np.ndarray:
    """Fill ``block`` with random words (every page non-zero); return per-page checksums."""
    words = block.pages.view(np.uint64)
    sums = np.empty(block.n_pages, dtype=np.uint64)
    bitgen = np.random.PCG64(seed)
    step = max(1, _FILL_CHUNK // block.page_size)
    for a in range(0, block.n_pages, step):
        chunk = words[a:a + step]
        chunk[...] = bitgen.random_raw(chunk.size).reshape(chunk.shape)
        chunk[:, 0] |= np.uint64(1)
        sums[a:a + step] = chunk.sum(axis=1, dtype=np.uint64)
    return sums


def _classify(block: RAMBlock, sums: np.ndarray) -> tuple[int, int, int]:
    """Return (zero, old, other) page counts: reading faults the pages back in."""
    words = block.pages.view(np.uint64)
    zero = old = 0
    step = max(1, _FILL_CHUNK // block.page_size)
    for a in range(0, block.n_pages, step):
        chunk = words[a:a + step]
        is_zero = ~chunk.any(axis=1)
        zero += int(is_zero.sum())
        old += int(((chunk.sum(axis=1, dtype=np.uint64) == sums[a:a + step]) & ~is_zero).sum())
    return zero, old, block.n_pages - zero - old


def _summary(zero: int, old: int, other: int) -> str:
    total = zero + old + other
    if zero == total:
        return "zero"
    if old == total:
        return "old data"
    return f"mixed ({zero} zero, {old} old, {other} other)"


class _Sampler:
    """Samples RSS and keeps the time it spends out of the stream's timing."""

    def __init__(self, block: RAMBlock) -> None:
        self.block = block
        self.samples: list[Sample] = []
        self.spent = 0.0

    def take(self, sent: int) -> Sample:
        t0 = time.perf_counter()
        b = self.block
        s = Sample(sent, b.rss_bytes().get("Rss", 0), int(b.cached_pages().sum()) * b.page_size, process_rss())
        self.samples.append(s)
        self.spent += time.perf_counter() - t0
        return s


def _stream(ram: GuestRAM, block: RAMBlock, config: ReclaimConfig, result: ReclaimResult, sampler: _Sampler,
            progress: Callable[[int], None] | None) -> None:
    """Write ``ram`` (holding ``block``) as a QEMU stream through a QEMUFile into ``config.sink``."""
    every = config.sample_every or max(1 << 20, block.size // 32)

    def sample(sent: int) -> None:
        sampler.take(sent)
        if progress is not None:
            progress(sent)

    sampler.spent = 0.0
    t0 = time.perf_counter()
    f = QEMUFile(open_channel(config.sink, "w"))
    try:
        try:
            save_snapshot(f, ram, release_ram=config.release, progress=sample, progress_every=every)
        except FileError:
            pass  # the sticky error, reported below once the sink is closed
        result.bytes_sent = f.ftell()
        result.pages_released = f.released_bytes // block.page_size
        result.release_errors = f.release_errors
        error = f.error
    finally:
        ret = f.close()
    result.seconds = max(time.perf_counter() - t0 - sampler.spent, 1e-9)
    if error is not None or ret:
        raise OSError(f"streaming to {config.sink} failed: {error or f.error or os.strerror(-ret)}")
    result.throughput = result.bytes_sent / result.seconds


def run_reclaim(config: ReclaimConfig, progress: Callable[[int], None] | None = None) -> ReclaimResult:
    """Run one configuration and return its result.

    ``progress(bytes_sent)`` is called at each sample.  A configuration the kernel
    refuses comes back with ``status="unsupported"`` and the reason in ``error``; a
    failed stream (e.g. a sink that cannot be written) raises OSError naming the sink.
    Raises ValueError for a bad backing or advice name."""
    kind, path = ("file", None) if config.backing == "file" else parse_backing(config.backing)
    advice = _advice_label(config, kind)
    result = ReclaimResult(backing=kind, advice=advice, release=config.release, size=config.size)
    if config.release:
        if advice not in ADVICES:
            raise ValueError(f"unknown release advice {advice!r} (choose from {', '.join(ADVICES)})")
        try:  # a known advice this backing cannot use (punch on anonymous memory)
            check_advice(advice, kind, "pc.ram")
        except ValueError as exc:
            result.status, result.error, result.reason = "unsupported", str(exc), "no fd to punch"
            return result
    tmp = None
    if path is None and kind == "file":
        fd, tmp = tempfile.mkstemp(prefix="npqfile-reclaim-", suffix=".ram", dir=config.file_dir)
        os.close(fd)
        path = tmp
    try:
        ram = GuestRAM()
        try:
            block = ram.add_block("pc.ram", config.size, backing=f"file:{path}" if kind == "file" else kind,
                                  page_size=config.page_size, hugepages=config.hugepages,
                                  advice=advice if config.release else None)
            _measure(ram, block, config, result, progress)
        finally:
            ram.close()
    finally:
        if tmp is not None:
            os.unlink(tmp)
    return result


def _measure(ram: GuestRAM, block: RAMBlock, config: ReclaimConfig, result: ReclaimResult,
             progress: Callable[[int], None] | None) -> None:
    if config.release:
        try:  # ask the kernel on the empty block, before any measurement
            block.mmap.release_pages(0, HOST_PAGE_SIZE)
        except OSError as exc:
            result.status, result.error = "unsupported", exc.strerror
            result.reason = errno.errorcode.get(exc.errno or 0, "error")
            return
    sums = _fill(block, config.seed)
    sampler = _Sampler(block)
    before = sampler.take(0)
    _stream(ram, block, config, result, sampler, progress)
    after_smaps = block.rss_bytes()
    result.rss_after = after_smaps.get("Rss", 0)
    result.lazyfree_after = after_smaps.get("LazyFree", 0)
    result.process_rss_after = process_rss()
    result.resident_pages_after = int(block.resident_pages().sum())
    result.cached_pages_after = int(block.cached_pages().sum())
    result.samples = sampler.samples
    result.rss_before, result.process_rss_before = before.mapping_rss, before.process_rss
    result.rss_peak = max(s.mapping_rss for s in sampler.samples)
    result.process_rss_peak = max(s.process_rss for s in sampler.samples)
    zero, old, other = _classify(block, sums)
    result.readback_zero, result.readback_old, result.readback_other = zero, old, other
    result.readback = _summary(zero, old, other)


def compare_configs(base: ReclaimConfig, backings: Sequence[str] = BACKINGS,
                    advices: Sequence[str | None] = (None, *ADVICES)) -> list[ReclaimConfig]:
    """Return the backing x advice matrix built on ``base``; advice None in ``advices``
    stands for "no release" (the baseline row of each backing)."""
    out = []
    for b in backings:
        for a in advices:
            out.append(dataclasses.replace(base, backing=b, advice=a, release=a is not None))
    return out


# What describes a configuration (kept for every row); every other field is a
# measurement, which a configuration that never ran ("unsupported", "failed") lacks.
_CONFIG_FIELDS = ("backing", "advice", "release", "size", "status", "error", "reason")


def _hyphenated(d: dict) -> dict:
    """``d`` with its keys in the JSON outputs' style (``rss_before`` -> ``rss-before``)."""
    return {k.replace("_", "-"): v for k, v in d.items()}


def _result_dict(r: ReclaimResult) -> dict:
    d = dataclasses.asdict(r)
    if r.status != "ok":
        d = {k: (v if k in _CONFIG_FIELDS else None) for k, v in d.items()}
    if d.get("samples") is not None:
        d["samples"] = [_hyphenated(s) for s in d["samples"]]
    return _hyphenated(d)


def results_json(results: Sequence[ReclaimResult]) -> str:
    """Return the results as a JSON document: ``{"kernel", "host-page-size", "results"}``,
    keys lowercase-hyphenated (``rss-before``, ``pages-released``...; described by
    npqfile/schemas/reclaim.json).  Rows that did not run (``status`` unsupported or
    failed) have null measurements."""
    doc = {"kernel": platform.release(), "host-page-size": HOST_PAGE_SIZE,
           "results": [_result_dict(r) for r in results]}
    return json.dumps(doc, indent=2)


def results_table(results: Sequence[ReclaimResult]) -> Any:
    """Return a rich Table, one row per configuration."""
    from rich.table import Table

    from npqfile.units import format_bytes

    t = Table(title="npqfile reclaim: mapping RSS while streaming guest RAM", show_lines=False)
    for col in ("backing", "advice", "RSS before", "peak", "after", "kept", "released",
                "reads back", "time", "rate", "proc RSS"):
        t.add_column(col, justify="left" if col in ("backing", "advice", "reads back") else "right")
    for r in results:
        if r.status != "ok":
            t.add_row(r.backing, r.advice, *["-"] * 5, f"[yellow]{r.status} ({r.reason})[/]", "-", "-", "-")
            continue
        mark = "*" if r.release and r.advice == DEFAULT_ADVICE[r.backing] else ""
        t.add_row(r.backing, r.advice + mark, format_bytes(r.rss_before), format_bytes(r.rss_peak),
                  format_bytes(r.rss_after), format_bytes(r.cached_pages_after * HOST_PAGE_SIZE),
                  f"{r.pages_released} pg", r.readback, f"{r.seconds:.3f} s",
                  f"{format_bytes(r.throughput)}/s", format_bytes(r.process_rss_after))
    t.caption = ("RSS = the mapping's smaps Rss.  * = the primitive that frees this backing.  kept = mincore: "
                 "still in shmem/page cache (private: still mapped).  proc RSS = process RSS after.  "
                 "Time excludes RSS sampling.")
    return t


def plot_results(results: Sequence[ReclaimResult], path: str) -> None:
    """Write the image ``path`` (see :func:`results_figure`).  Raises OSError if the
    file cannot be written."""
    from npqfile.migration.plot import save_figure
    save_figure(results_figure(results), path)


def results_figure(results: Sequence[ReclaimResult]) -> Any:
    """Small multiples against bytes sent (MiB): one column per backing, the mapping's
    RSS on top and what the backing still holds (mincore) below, one line per advice
    in that backing's panels (a few distinct colours, not two dozen lines in one
    plot).  Configurations that did not run are listed in their panel.  Returns the
    matplotlib Figure; the caller closes it."""
    from npqfile.migration.plot import new_figure, pyplot

    plt = pyplot()
    backings = list(dict.fromkeys(r.backing for r in results))
    colours = dict(zip(("none", *ADVICES), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    with new_figure(2, len(backings), figsize=(3.6 * len(backings) + 1.5, 7), sharex=True, sharey=True,
                    squeeze=False) as (fig, axes):
        for col, backing in enumerate(backings):
            top, bottom = axes[0][col], axes[1][col]
            skipped = []
            for r in (r for r in results if r.backing == backing):
                if r.status != "ok" or not r.samples:
                    skipped.append(f"{r.advice}: {r.reason or r.status}")
                    continue
                xs = [s.sent / (1 << 20) for s in r.samples]
                mark = "*" if r.release and r.advice == DEFAULT_ADVICE[r.backing] else ""
                kw = dict(color=colours.get(r.advice), label=r.advice + mark, linewidth=1.8)
                top.plot(xs, [s.mapping_rss / (1 << 20) for s in r.samples], **kw)
                bottom.plot(xs, [s.backing_kept / (1 << 20) for s in r.samples], **kw)
            top.set_title(backing)
            if skipped:
                bottom.text(0.02, 0.02, "not run: " + "; ".join(skipped), transform=bottom.transAxes,
                            fontsize="x-small", va="bottom")
            if top.lines:
                top.legend(fontsize="x-small", loc="best", title="advice", title_fontsize="x-small")
            bottom.set_xlabel("guest RAM sent (MiB)")
            for ax in (top, bottom):
                ax.grid(True, alpha=0.3)
                ax.set_ylim(bottom=0)
        axes[0][0].set_ylabel("mapping RSS (MiB)")
        axes[1][0].set_ylabel("still held by the backing (MiB)")
        fig.suptitle("npqfile reclaim: streaming a RAM block through QEMUFile with release "
                     "(* = the primitive that frees the backing)")
    return fig
