"""The dirtyguest's parameter block (host -> guest) and status block (guest -> host).

Supports: :func:`guest_parameters` turns a workload (``make_workload``'s specs:
idle, uniform, hotset, sequential, zipf with rate, bytes, hot, share, a, seed) and a
guest RAM size into :class:`GuestParams`; ``GuestParams.pack()`` gives the bytes of
``struct params`` in ``src/guest.c`` (passed to the guest as its multiboot module);
:func:`read_status` decodes ``struct status`` from the guest's RAM (the
memory-backend-file, at guest-physical ``STATUS_ADDR``).

Goals: the guest writes as the simulator's models do.  Page choices follow the same
distributions, not the same random numbers (the guest has its own xorshift generator):
hotset's hot set and zipf's rank permutation are an affine bijection ``k * mul + add
mod n`` instead of numpy's permutation; zipf draws ranks from a quantile table of 2^16 +
1 points of the exact Zipf CDF (``numpy.random.zipf``'s law, ranks then taken modulo the
page count as the simulator does), linear between points.  The guest writes the
region from ``REGION_START`` (2 MiB, above the kernel and this block) to 1 MiB below the
top of RAM (SeaBIOS keeps its tables there), so its page count is a little smaller than
the simulator's.  Like the simulator's writer the guest is CPU-bound by default: writes
fall due only while its vCPU runs, so QEMU's auto-converge throttle slows it
(``catchup=0``; ``catchup=1`` gives the clock-paced guest that catches up after every
stall).  Errors: ValueError naming the workload or size.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from npqfile.migration.workloads import HotSet, Sequential, Workload, Zipf, make_workload

PAGE = 4096
STATUS_ADDR = 0x8000
STATUS_MAGIC = 0x5351504E          # "NPQS"
PARAMS_MAGIC = 0x4751504E          # "NPQG"
PARAMS_VERSION = 2
REGION_START = 2 << 20
TOP_RESERVE = 1 << 20
MIN_RAM = 8 << 20
TABLE_BITS = 16
KINDS = {"idle": 0, "uniform": 1, "hotset": 2, "sequential": 3, "zipf": 4}
STATES = {0: "booting", 1: "running", 2: "failed"}
ERRORS = {0: "", 1: "bad multiboot magic", 2: "no parameter block module", 3: "bad parameter block",
          4: "write region outside RAM or over the parameter block", 5: "no HPET"}
_HEADER = struct.Struct("<16I")
_STATUS = struct.Struct("<14I")


@dataclass
class GuestParams:
    """``struct params``: see src/guest.c for each field's meaning."""
    kind: int
    rate: int
    write_bytes: int
    n_pages: int
    region_start: int = REGION_START
    hot_pages: int = 0
    share: int = 0
    perm_mul: int = 1
    perm_add: int = 0
    cursor: int = 0
    catchup: int = 0          # 0: CPU-bound writer (the simulator's), 1: clock-paced, catches up
    seed: int = 1
    table: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint32))

    def pack(self) -> bytes:
        """The parameter block's bytes."""
        head = _HEADER.pack(PARAMS_MAGIC, PARAMS_VERSION, self.kind, self.rate, self.write_bytes,
                            self.region_start, self.n_pages, self.hot_pages, self.share, self.perm_mul,
                            self.perm_add, self.cursor, self.catchup, self.seed & 0xFFFFFFFF, self.seed >> 32,
                            len(self.table))
        return head + self.table.astype("<u4").tobytes()


def region_pages(ram_size: int) -> int:
    """How many pages the guest writes in a guest of ``ram_size`` bytes.
    Raises ValueError when the RAM is too small for the guest."""
    if ram_size < MIN_RAM:
        raise ValueError(f"the QEMU guest needs at least {MIN_RAM >> 20} MiB of RAM, got {ram_size} bytes")
    return (ram_size - REGION_START - TOP_RESERVE) // PAGE


def zipf_table(a: float, bits: int = TABLE_BITS) -> np.ndarray:
    """Ranks (1-based, uint32) at the quantiles i / 2^bits, i = 0..2^bits, of Zipf's law
    P(k) = k^-a / zeta(a) (numpy.random.zipf's).  Exact CDF up to 2^22, the integral's
    tail beyond; ranks above 2^31 are clamped (they are taken modulo the page count)."""
    k_max = 1 << 22
    ks = np.arange(1, k_max + 1, dtype=np.float64)
    pmf = ks ** -a
    # zeta(a): the head summed, the tail by Euler-Maclaurin (integral + half the first term)
    tail = k_max ** (1 - a) / (a - 1) - 0.5 * k_max ** -a
    zeta = pmf.sum() + tail
    cdf = np.cumsum(pmf) / zeta
    q = np.arange((1 << bits) + 1, dtype=np.float64) / (1 << bits)
    ranks = np.searchsorted(cdf, q, side="left").astype(np.float64) + 1
    beyond = q > cdf[-1]
    with np.errstate(divide="ignore", over="ignore"):
        # 1 - CDF(k) ~ k^(1-a) / ((a-1) zeta) in the tail
        ranks[beyond] = np.power(np.maximum(1 - q[beyond], 1e-300) * (a - 1) * zeta, -1 / (a - 1))
    return np.minimum(ranks, 2 ** 31 - 1).astype(np.uint32)


def guest_parameters(workload: str | Workload, ram_size: int, seed: int | None = None,
                     catchup: bool = False) -> GuestParams:
    """The parameter block for ``workload`` (a spec or a built Workload) in a guest of
    ``ram_size`` bytes; ``catchup`` makes a clock-paced guest that catches up after being
    descheduled instead of the CPU-bound writer the simulator models.  Raises ValueError for a callable workload (the guest runs only
    the built-in models), a rate over 2^32 - 1 pages/s or a guest too small."""
    wl = make_workload(workload, seed=seed) if not isinstance(workload, Workload) else workload
    if wl.kind not in KINDS:
        raise ValueError(f"the QEMU guest runs only the built-in workloads ({', '.join(KINDS)}), "
                         f"not {wl.kind!r}")
    if wl.rate >= 2 ** 32:
        raise ValueError(f"workload rate {wl.rate:g} pages/s is too high for the QEMU guest")
    n = region_pages(ram_size)
    rng = np.random.default_rng(wl.seed)
    p = GuestParams(KINDS[wl.kind], int(round(wl.rate)), wl.write_bytes, n, catchup=int(catchup),
                    seed=int(rng.integers(1, 2 ** 63)))
    p.perm_mul = int(rng.integers(1, max(n, 2)))
    while math.gcd(p.perm_mul, n) != 1:
        p.perm_mul = p.perm_mul % (n - 1) + 1
    p.perm_add = int(rng.integers(0, n))
    if isinstance(wl, HotSet):
        p.hot_pages = max(1, int(n * wl.hot))
        p.share = min(int(wl.share * 2 ** 32), 2 ** 32 - 1)
    elif isinstance(wl, Sequential):
        p.cursor = int(rng.integers(0, n))
    elif isinstance(wl, Zipf):
        p.table = zipf_table(wl.a)
    return p


@dataclass
class GuestStatus:
    """``struct status`` as read: ``state`` ("booting", "running", "failed"), ``error``
    (text, "" when none), ``writes``, guest ``seconds`` since pacing began, the HPET
    frequency, the write region, the PIT interrupts taken, the guest seconds credited
    as running time (``running_seconds``: less than ``seconds`` when the CPU-bound guest
    was descheduled, e.g. by QEMU's auto-converge throttle)."""
    state: str
    error: str
    writes: int
    seconds: float
    hpet_hz: int
    region_start: int
    n_pages: int
    timer_ticks: int
    running_seconds: float = 0.0

    @property
    def running_share(self) -> float:
        """The share of guest time credited as running time (1.0 unthrottled; CPU-bound
        guests only: a clock-paced guest credits all of it)."""
        return self.running_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def rate(self) -> float:
        """Achieved page writes per second of guest time (0 before any time passed)."""
        return self.writes / self.seconds if self.seconds > 0 else 0.0


def read_status(ram: bytes | memoryview | np.ndarray) -> GuestStatus | None:
    """Decode the status block from the guest's RAM (bytes from guest-physical 0); None
    before the guest wrote its magic.  A torn read (the guest mid-update) is retried."""
    for _ in range(1000):
        raw = bytes(ram[STATUS_ADDR:STATUS_ADDR + _STATUS.size])
        magic, seq, state, error, wl, wh, tl, th, hz, start, n, ticks, rl, rh = _STATUS.unpack(raw)
        if magic != STATUS_MAGIC:
            return None
        again = _STATUS.unpack(bytes(ram[STATUS_ADDR:STATUS_ADDR + _STATUS.size]))[1]
        if seq % 2 == 0 and again == seq:
            break
    if error >= 16:
        why = f"CPU exception {error - 16}"
    else:
        why = ERRORS.get(error, f"error {error}")
    return GuestStatus(STATES.get(state, f"state {state}"), why, wh << 32 | wl,
                       (th << 32 | tl) / hz if hz else 0.0, hz, start, n, ticks,
                       (rh << 32 | rl) / hz if hz else 0.0)
