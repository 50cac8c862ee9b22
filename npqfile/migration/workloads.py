"""Dirtying models: a thread that writes into the source GuestRAM while it migrates.

Supports: ``idle`` (no writes), ``uniform`` (random pages at a rate), ``hotset`` (a
fraction ``hot`` of the pages takes a share ``share`` of the writes), ``sequential``
(a sweep through RAM, wrapping), ``zipf`` (page popularity ~ rank^-a over a random
permutation) and any Python callable (``fn(ram)`` or ``fn(ram, rng)``, called once per
time slice).  Rates are pages/s or a byte rate (``50MB/s``).  Text specs such as
``hotset:rate=20000,hot=0.1,share=0.9,seed=1`` build them (:func:`make_workload`).

Goals: the writes go through ``RAMBlock.touch`` (one byte per page write) or, with
``bytes=N``, ``RAMBlock.scribble`` (N random bytes at a random offset: XBZRLE then has
real deltas to encode), so the dirty bitmap is exact; each
model is reproducible from its seed (a numpy Generator); ``pause()`` returns only once
the thread has acknowledged it is stopped (QEMU stops the vCPUs before the final
bitmap sync; a write after it would be lost to the destination).  The thread must not
starve the migration thread of the GIL: every slice is one vectorised ``touch`` per
block and then a sleep.

Plan: the thread wakes every ``slice`` seconds (5 ms), computes how many writes are due
since it started (rate × running time, minus writes done), draws that many page numbers
in the guest's global page space and touches them block by block.  Pausing is two
Events: ``_run`` (cleared to pause) and ``_parked`` (set by the thread when parked).

auto-converge (``set_throttle(p)``) throttles the writer as QEMU throttles a vCPU
(``cpu-throttle.c``): after each 10 ms of running it sleeps ``p / (1 - p) × 10 ms``,
so it runs (100 - p) % of the time; the sleep is not running time, so no writes fall
due during it, and it is cut short by ``pause()`` (QEMU's ``cpu->stop``).

``idle`` means no writes: ``idle`` with a rate is refused (use ``uniform``).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from npqfile.migration.throttle import CPU_THROTTLE_TIMESLICE, throttle_sleep
from npqfile.ram import GuestRAM
from npqfile.units import parse_rate

SLICE = 0.005                # seconds between write batches
DEFAULT_RATE = 25000.0       # page writes/s of a workload given without rate=
MAX_BATCH = 1 << 16          # writes per slice at most (a catch-up after a stall stays bounded)
KINDS = ("idle", "uniform", "hotset", "sequential", "zipf")


class Workload:
    """Base: ``start(ram)``, ``pause()``, ``resume()``, ``stop()``; subclasses pick pages.

    ``rate`` is page writes per second.  ``writes`` counts the writes done so far.
    """

    kind = "idle"
    write_bytes = 1      # bytes changed per page write: 1 = RAMBlock.touch, more = scribble

    def __init__(self, rate: float = 0.0, seed: int = 0):
        if rate < 0:
            raise ValueError(f"workload rate must not be negative, got {rate}")
        self.rate = float(rate)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.writes = 0
        self.ram: GuestRAM | None = None
        self._bounds = np.zeros(1, dtype=np.int64)
        self._run = threading.Event()
        self._parked = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running_time = 0.0     # seconds spent unpaused (writes are due only then)
        self.throttle = 0            # auto-converge: cpu-throttle-percentage applied to this writer
        self._ran = 0.0              # running time since the last throttle sleep
        self._asleep_until = 0.0     # end of the current throttle sleep (monotonic)
        self.error: BaseException | None = None
        # called as before_write(block, pages) ahead of every write (postcopy's destination
        # faults the pages in there, with the GIL released; see migration.postcopy_ram)
        self.before_write: Callable[[Any, np.ndarray], None] | None = None

    # -- models ------------------------------------------------------------------------
    def prepare(self, n_pages: int) -> None:
        """Per-model setup once the guest size is known (hot set, permutation...)."""

    def pick(self, count: int, n_pages: int) -> np.ndarray:
        """``count`` global page numbers to write next (int64)."""
        return self.rng.integers(0, n_pages, count, dtype=np.int64)

    def step(self, ram: GuestRAM, count: int) -> None:
        """Write ``count`` pages: pick them and touch each block's share in one call."""
        n_pages = int(self._bounds[-1])
        pages = self.pick(count, n_pages)
        blocks = ram.blocks
        if len(blocks) == 1:
            self._write(blocks[0], pages)
            return
        which = np.searchsorted(self._bounds, pages, side="right") - 1
        for i, block in enumerate(blocks):
            mine = pages[which == i]
            if mine.size:
                self._write(block, mine - self._bounds[i])

    def _write(self, block: Any, pages: np.ndarray) -> None:
        if self.before_write is not None:
            self.before_write(block, pages)
        if self.write_bytes == 1:
            block.touch(pages)
        else:
            block.scribble(pages, self.write_bytes, self.rng)

    def describe(self) -> dict[str, Any]:
        """The model and its parameters (for statistics)."""
        return {"kind": self.kind, "rate-pages": self.rate, "seed": self.seed, "writes": self.writes,
                "write-bytes": self.write_bytes}

    # -- thread control ----------------------------------------------------------------
    def set_throttle(self, percentage: int) -> None:
        """Run only (100 - ``percentage``) % of the time from now on (0 = unthrottled),
        the way QEMU's cpu_throttle_set throttles a vCPU.  Any thread may call it."""
        self.throttle = max(0, min(int(percentage), 99))
        if not self.throttle:
            self._asleep_until = 0.0

    def start(self, ram: GuestRAM) -> None:
        """Start writing into ``ram`` in a daemon thread (no thread for a zero rate)."""
        self.ram = ram
        self._bounds = np.cumsum([0] + [b.n_pages for b in ram.blocks]).astype(np.int64)
        self.prepare(int(self._bounds[-1]))
        self._run.set()
        if self.rate <= 0 and type(self).step is Workload.step:
            self._parked.set()
            return
        self._thread = threading.Thread(target=self._loop, name=f"workload-{self.kind}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                if not self._run.is_set():
                    self._parked.set()
                    self._run.wait(0.05)
                    last = time.monotonic()
                    continue
                self._parked.clear()
                if not self._run.is_set():   # paused between the check and the clear
                    continue
                now = time.monotonic()
                if now < self._asleep_until:        # throttled: sleeping, not running
                    time.sleep(min(SLICE, self._asleep_until - now))
                    last = time.monotonic()
                    continue
                self._running_time += now - last
                self._ran += now - last
                last = now
                due = min(int(self.rate * self._running_time) - self.writes, MAX_BATCH)
                if due > 0 or self.rate <= 0:
                    self.step(self.ram, max(due, 0))
                    self.writes += max(due, 0)
                if self._throttle_check(now):       # a throttle sleep begins now
                    continue
                time.sleep(SLICE)
        except BaseException as exc:  # reported by the engine, never lost in a thread
            self.error = exc
        finally:
            self._parked.set()

    def _throttle_check(self, now: float) -> bool:
        """After each CPU_THROTTLE_TIMESLICE of running, start a throttle sleep; returns
        True when one starts (the loop then sleeps it out instead of running a slice)."""
        if not self.throttle:
            self._ran = 0.0
            return False
        if self._ran < CPU_THROTTLE_TIMESLICE - 1e-6:
            return False
        # the sleep for the time actually run (slices are 5 ms, a slice may overrun):
        # running stays (100 - p) % of the wall time, as in QEMU
        self._asleep_until = now + throttle_sleep(self.throttle) * self._ran / CPU_THROTTLE_TIMESLICE
        self._ran = 0.0
        return True

    def pause(self, timeout: float = 10.0) -> None:
        """Stop writing and wait until the thread acknowledges (QEMU's vm_stop).
        Raises RuntimeError if the thread does not park within ``timeout`` seconds."""
        self._run.clear()
        if self._thread is not None and not self._parked.wait(timeout):
            raise RuntimeError(f"workload {self.kind!r} did not stop within {timeout} s")
        self._raise_error()

    def resume(self) -> None:
        """Let the writer run again."""
        self._run.set()

    def request_stop(self) -> None:
        """Ask the thread to end without waiting for it (it may be blocked, e.g. on a
        postcopy page fault); ``stop()`` then waits."""
        self._stop.set()
        self._run.set()

    def stop(self) -> None:
        """End the thread (idempotent)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        self._raise_error()

    def _raise_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"workload {self.kind!r} failed: {err}") from err


class Uniform(Workload):
    """Random pages, each equally likely."""
    kind = "uniform"


class HotSet(Workload):
    """A random ``hot`` fraction of pages receives ``share`` of the writes."""
    kind = "hotset"

    def __init__(self, rate: float = 0.0, seed: int = 0, hot: float = 0.05, share: float = 0.9):
        super().__init__(rate, seed)
        if not 0 < hot <= 1 or not 0 <= share <= 1:
            raise ValueError(f"hotset needs 0 < hot <= 1 and 0 <= share <= 1, got hot={hot}, share={share}")
        self.hot, self.share = hot, share
        self._hot_pages = np.zeros(1, dtype=np.int64)

    def prepare(self, n_pages: int) -> None:
        count = max(1, int(n_pages * self.hot))
        self._hot_pages = np.sort(self.rng.choice(n_pages, count, replace=False)).astype(np.int64)

    def pick(self, count: int, n_pages: int) -> np.ndarray:
        to_hot = self.rng.random(count) < self.share
        out = self.rng.integers(0, n_pages, count, dtype=np.int64)
        n_hot = int(np.count_nonzero(to_hot))
        out[to_hot] = self._hot_pages[self.rng.integers(0, self._hot_pages.size, n_hot)]
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "hot": self.hot, "share": self.share, "hot-pages": int(self._hot_pages.size)}


class Sequential(Workload):
    """A sweep: consecutive pages from a cursor, wrapping at the end of RAM (mig_mon's sequential)."""
    kind = "sequential"

    def __init__(self, rate: float = 0.0, seed: int = 0):
        super().__init__(rate, seed)
        self._cursor = 0

    def prepare(self, n_pages: int) -> None:
        self._cursor = int(self.rng.integers(0, n_pages))

    def pick(self, count: int, n_pages: int) -> np.ndarray:
        out = (self._cursor + np.arange(count, dtype=np.int64)) % n_pages
        self._cursor = (self._cursor + count) % n_pages
        return out


class Zipf(Workload):
    """Page popularity follows Zipf's law with exponent ``a`` (> 1) over a random permutation."""
    kind = "zipf"

    def __init__(self, rate: float = 0.0, seed: int = 0, a: float = 1.2):
        super().__init__(rate, seed)
        if a <= 1:
            raise ValueError(f"zipf exponent must be > 1, got {a}")
        self.a = a
        self._perm = np.zeros(1, dtype=np.int64)

    def prepare(self, n_pages: int) -> None:
        self._perm = self.rng.permutation(n_pages).astype(np.int64)

    def pick(self, count: int, n_pages: int) -> np.ndarray:
        ranks = self.rng.zipf(self.a, count)
        return self._perm[(ranks - 1) % n_pages]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "a": self.a}


class CallableWorkload(Workload):
    """Calls ``fn(ram)`` (or ``fn(ram, rng)`` when it takes two arguments) once per slice.
    The callable must write through the RAMBlock API (write/touch/fill) to be tracked."""
    kind = "callable"

    def __init__(self, fn: Callable, seed: int = 0):
        super().__init__(0.0, seed)
        self.fn = fn
        try:
            self._wants_rng = len(inspect.signature(fn).parameters) >= 2
        except (TypeError, ValueError):
            self._wants_rng = False

    def step(self, ram: GuestRAM, count: int) -> None:
        self.fn(ram, self.rng) if self._wants_rng else self.fn(ram)

    def describe(self) -> dict[str, Any]:
        return {"kind": "callable", "name": getattr(self.fn, "__name__", repr(self.fn)), "seed": self.seed}


_CLASSES: dict[str, type[Workload]] = {"idle": Workload, "uniform": Uniform, "hotset": HotSet,
                                       "sequential": Sequential, "zipf": Zipf}


def parse_workload_rate(text: str | float, page_size: int = 4096) -> float:
    """Pages per second from ``20000`` (pages/s) or a byte rate ``80MB/s`` / ``1Gbit/s``.
    Raises ValueError naming the text."""
    if isinstance(text, (int, float)):
        return float(text)
    t = text.strip()
    try:
        return float(t)
    except ValueError:
        return parse_rate(t) / page_size


def make_workload(spec: str | Workload | Callable, *, seed: int | None = None, page_size: int = 4096) -> Workload:
    """Build a workload from ``KIND[:key=value,...]`` (keys: rate, seed, hot, share, a, and
    bytes: how many bytes each page write changes, 1 by default), a
    Workload (returned as is) or a callable.  Returns the Workload; ValueError for an
    unknown kind or key, or a bad value."""
    if isinstance(spec, Workload):
        return spec
    if callable(spec):
        return CallableWorkload(spec, seed or 0)
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in _CLASSES:
        raise ValueError(f"unknown workload {kind!r} (choose {', '.join(KINDS)}, or pass a callable)")
    kw: dict[str, Any] = {}
    write_bytes = 1
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"workload option {item!r} in {spec!r} is not key=value")
        key = key.strip()
        try:
            if key == "rate":
                kw["rate"] = parse_workload_rate(value, page_size)
            elif key == "seed":
                kw["seed"] = int(value)
            elif key in ("hot", "share", "a"):
                kw[key] = float(value)
            elif key == "bytes":
                write_bytes = int(value)
                if not 1 <= write_bytes <= page_size:
                    raise ValueError(f"workload option bytes={value} in {spec!r} must be 1..{page_size} "
                                     f"(bytes changed per page write)")
            else:
                raise ValueError(f"unknown workload option {key!r} in {spec!r} (rate, seed, hot, share, a, bytes)")
        except ValueError as exc:
            if "workload option" in str(exc):
                raise
            raise ValueError(f"bad value {value!r} for {key} in workload {spec!r}") from None
    if seed is not None:
        kw.setdefault("seed", seed)
    if kind == "idle" and kw.get("rate", 0.0) > 0:
        # idle means "no writes": a rate would make it write, silently contradicting its name
        raise ValueError(f"workload 'idle' writes nothing and takes no rate ({spec!r}); "
                         f"for random writes at a rate use 'uniform:rate=...'")
    if kind != "idle":
        kw.setdefault("rate", DEFAULT_RATE)   # a bare "hotset" writes, as the default does
    try:
        wl = _CLASSES[kind](**kw)
    except TypeError:
        raise ValueError(f"workload {kind!r} does not take the options {sorted(kw)} ({spec!r})") from None
    wl.write_bytes = write_bytes
    return wl
