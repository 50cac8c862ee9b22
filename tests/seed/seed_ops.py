"""The operation model shared by npqfile's differential tests (test_seed_differential.py).

Supports: npqfile channels that mirror the C harness's backends (RecordingChannel: per-call
recording and injected failures; ChunkedReader: short-read cycles), guest RAM shared by both
implementations (RecordingMmap: release_pages records), operation sequences (``resolve``
expands macros, ``run_ops`` applies them to either implementation), and ``drive_npq`` /
``drive_seed``, which run one sequence and return an Outcome (bytes, writev calls, results,
released page ranges).
Goal: one interpreter for both sides, so a difference can only come from the implementations.
Plan: plain functions over tuples ("method", *args); the seed side goes through seed_driver.
"""

from __future__ import annotations

import mmap
import random
from dataclasses import dataclass, field

from npqfile.qemufile import IO_BUF_SIZE, QEMUFile
from seed_driver import SeedLib, SeedWriter

PAGE = mmap.PAGESIZE
RAM_PAGES = 40
RAM_SIZE = RAM_PAGES * PAGE


class RecordingMmap(mmap.mmap):
    """Guest RAM stand-in: ``release_pages`` (npqfile's release protocol) records instead
    of releasing, so both implementations keep reading the same bytes."""

    def release_pages(self, offset: int, length: int) -> None:
        self.released.append((offset, length))


@dataclass
class Ram:
    mm: RecordingMmap
    base: int  # address of byte 0, for the C side

    def view(self, off: int, n: int) -> memoryview:
        return memoryview(self.mm)[off:off + n]


# -- npqfile channels mirroring the C harness's backends ------------------------------


class RecordingChannel:
    """Write channel: records each writev call as (bytes, buffers) and the bytes.  Call
    ``fail_call`` (0-based) raises OSError(-fail_ret) when fail_ret < 0, else returns the
    short count fail_ret (keeping that many bytes) -- as the C sink does."""

    def __init__(self, fail_call: int = -1, fail_ret: int = 0, close_ret: int = 0):
        self.fail_call, self.fail_ret, self.close_ret = fail_call, fail_ret, close_ret
        self.data = bytearray()
        self.calls: list[tuple[int, int]] = []
        self.close_calls = 0

    def writev(self, buffers, pos: int) -> int:
        chunk = b"".join(bytes(b) for b in buffers)
        index = len(self.calls)
        self.calls.append((len(chunk), len(buffers)))
        if index == self.fail_call:
            if self.fail_ret < 0:
                raise OSError(-self.fail_ret, "injected write failure")
            self.data += chunk[:self.fail_ret]
            return self.fail_ret
        self.data += chunk
        return len(chunk)

    def close(self) -> int:
        self.close_calls += 1
        return self.close_ret


class ChunkedReader:
    """Read channel serving ``data`` in a cycle of ``chunks`` sizes, then 0 (EOF) or
    OSError(-end_ret) -- as the C source does."""

    def __init__(self, data: bytes, chunks: list[int], end_ret: int = 0):
        self.data, self.chunks, self.end_ret = data, chunks, end_ret
        self.off = self.next = self.calls = 0

    def readinto(self, buf: memoryview, pos: int) -> int:
        self.calls += 1
        if self.off >= len(self.data):
            if self.end_ret:
                raise OSError(-self.end_ret, "injected read failure")
            return 0
        n = len(buf)
        if self.chunks:
            n = min(n, self.chunks[self.next % len(self.chunks)])
            self.next += 1
        n = min(n, len(self.data) - self.off)
        buf[:n] = self.data[self.off:self.off + n]
        self.off += n
        return n


# -- one operation sequence, two implementations ---------------------------------------

QUERIES = {"ftell", "get_rate_limit"}


def payload(n: int, seed: int, kind: str = "random") -> bytes:
    """n reproducible bytes: random (incompressible), zeros, or text-like (compressible)."""
    if kind == "zeros":
        return bytes(n)
    rnd = random.Random(seed)
    if kind == "text":
        return bytes(rnd.choices(b"abc \n", k=n))
    return rnd.randbytes(n)


def resolve(ops: list[tuple]) -> list[tuple]:
    """Expand macro ops into the primitive ops both implementations run:
    ("put_buffer", n, seed) gets its bytes; ("put_buffer_async", None, n, free) continues
    where the previous async put ended (wrapping to 0), so runs of RAM coalesce;
    ("pages", first, count, free) is QEMU's RAM loop: be64 header + one async page each;
    ("fragment", count, size, free, flush_first) queues `count` async pieces that cannot
    coalesce, after an fflush if flush_first."""
    out, cursor = [], 0
    for op in ops:
        name = op[0]
        if name == "put_buffer":
            out.append(("put_buffer", payload(op[1], op[2])))
        elif name == "put_buffer_async":
            off, n, free = op[1:]
            off = cursor if off is None else off
            if off + n > RAM_SIZE:
                off = 0
            out.append(("put_buffer_async", off, n, free))
            cursor = off + n
        elif name == "fragment":
            count, size, free, flush_first = op[1:]
            if flush_first:  # iovec count known: 62/63 puts the next put at the 64-iovec flush
                out.append(("fflush",))
            for i in range(count):  # separate iovecs: a gap after each piece
                out.append(("put_buffer_async", (i * 2 * size) % (RAM_SIZE - size), size, free))
        elif name == "pages":
            first, count, free = op[1:]
            for i in range(count):
                page = (first + i) % RAM_PAGES
                out.append(("put_be64", page * PAGE | 0x08))
                out.append(("put_buffer_async", page * PAGE, PAGE, free))
        else:
            out.append(op)
    return out


def run_ops(f, ops: list[tuple], put_async) -> list[tuple]:
    """Apply resolved ops to a file (npqfile or seed).  Returns the results of the queries
    and, after every op, (ftell_fast, rate_limit, get_error)."""
    results = []
    for name, *args in ops:
        if name == "put_buffer_async":
            put_async(*args)
        elif name in QUERIES:
            results.append((name, getattr(f, name)()))
        elif name == "put_compression_data":
            level, kind, n, seed = args
            results.append((name, f.put_compression_data(payload(n, seed, kind), level)))
        else:
            getattr(f, name)(*args)
        results.append((f.ftell_fast(), f.rate_limit(), f.get_error()))
    return results


def result_of(results: list[tuple], name: str):
    """The value of the last query named ``name`` in a run's results."""
    return next(r[1] for r in reversed(results) if r[0] == name)


def page_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges of RAM -> the (first, end) whole pages inside each, dropping empty ones."""
    out = []
    for start, length in ranges:
        first, end = -(-start // PAGE), (start + length) // PAGE
        if end > first:
            out.append((first, end))
    return out


def page_set(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for first, end in ranges for p in range(first, end)}


@dataclass
class Outcome:
    written: bytes
    calls: list[tuple[int, int]]
    results: list[tuple]
    released: list[tuple[int, int]] = field(default_factory=list)  # page ranges


def drive_npq(ram: Ram, ops: list[tuple], fail_call: int = -1, fail_ret: int = 0,
              close_ret: int = 0) -> Outcome:
    """Run ops through npqfile over a RecordingChannel, then close."""
    ram.mm.released.clear()
    ch = RecordingChannel(fail_call, fail_ret, close_ret)
    f = QEMUFile(ch)
    results = run_ops(f, ops, lambda off, n, free: f.put_buffer_async(ram.view(off, n), free))
    results.append(("close", f.close()))
    return Outcome(bytes(ch.data), ch.calls, results, page_ranges(ram.mm.released))


def drive_seed(lib: SeedLib, ram: Ram, ops: list[tuple], fail_call: int = -1, fail_ret: int = 0,
               close_ret: int = 0) -> Outcome:
    """Run ops through the seed.  Released pages exclude the madvise calls that followed a
    failed writev (npqfile releases only after a successful write: §2.8)."""
    with SeedWriter(lib, fail_call=fail_call, fail_ret=fail_ret, close_ret=close_ret) as w:
        results = run_ops(w, ops, lambda off, n, free: w.put_buffer_at(ram.base + off, n, free))
        results.append(("close", w.fclose()))
        calls = w.calls
        failed = {i for i, (want, _) in enumerate(calls) if i == fail_call and fail_ret != want}
        madv = [(addr - ram.base, n) for addr, n, after in lib.madvise_log() if after - 1 not in failed]
        return Outcome(w.written, calls, results, page_ranges(madv))


CONSUMED = {"get_byte": 1, "get_be16": 2, "get_be32": 4, "get_be64": 8}


class PeekRule:
    """QEMU's rule for peeks: "you can only peek continuous bytes from where the current
    pointer is".  The seed never reads for a peek that starts past the buffered bytes (it
    returns nothing, see test_difference_peek_past_buffered_data); the random sequences
    follow the rule, tracking a lower bound of the bytes known to be buffered."""

    def __init__(self) -> None:
        self.ahead = 0

    def legal(self, name: str, args: list) -> list:
        """The op's arguments with the peek offset brought inside the rule."""
        if name == "peek_byte":
            return [args[0] % (self.ahead + 1)]
        if name == "peek_buffer":
            off = args[1] % (self.ahead + 1)
            return [min(args[0], IO_BUF_SIZE - off), off]
        return args

    def update(self, name: str, args: list, result) -> None:
        if name == "peek_buffer":
            self.ahead = max(self.ahead, args[1] + len(result))
        elif name == "peek_byte":
            self.ahead = max(self.ahead, args[0] + 1) if self.ahead >= args[0] else self.ahead
        elif name == "skip":
            self.ahead = max(0, self.ahead - args[0])
        else:
            self.ahead = max(0, self.ahead - CONSUMED.get(name, 1 << 30))


def read_npq(f: QEMUFile, name: str, args: list):
    """Apply one read op to npqfile; buffers come back as bytes, like SeedReader's."""
    if name in ("get_buffer", "get_buffer_in_place"):
        buf = bytearray(args[0])
        got = getattr(f, name)(buf)
        return bytes(buf[:got]) if name == "get_buffer" else bytes(got)
    if name == "peek_buffer":
        return bytes(f.peek_buffer(*args))
    return getattr(f, name)(*args)
