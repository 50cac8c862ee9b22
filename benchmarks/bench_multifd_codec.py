"""Benchmark: inflating multifd zstd packets, the receiver's codec against the 1 KiB feed it replaced.

Usage: ``python benchmarks/bench_multifd_codec.py [--size 1G] [--level 1] [--content mix]``.

Packets as QEMU 10.0's source makes them (``multifd-zstd.c``): 128 pages of 4 KiB per
packet, one zstd stream per channel, a block flush per packet; page contents are a
guest-like mix (random doubles as ``npqfile migrate --init random`` writes them, text,
sparse pages of a few words, repeated patterns; zero pages never travel compressed).
Each packet is compressed once and inflated by every decoder in turn, each with its own
per-channel stream:

- ``1 KiB feed``: the previous ``PageCodec`` (``decompressobj().decompress`` fed 1 KiB at
  a time, each result copied into the packet buffer), the baseline;
- ``PageCodec``: this tree's ``PageCodec.decompress`` into the receiver's buffer (pages
  plus a spare byte), one ``stream_reader().readinto1`` call per packet;
- ``unbounded``: ``decompressobj().decompress`` of the whole packet at once, the
  library's speed without any bound (what a hostile packet could inflate to is not
  limited there: a reference, not an option).

Prints seconds, GB/s of page data and the ratio to the baseline measured in this run
(2 shared cores: absolute figures move; ratios are what to read).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from npqfile.stream.multifd import PageCodec, page_count  # noqa: E402
from npqfile.units import parse_size  # noqa: E402

PS = 4096


class FeedDecoder:
    """The receiver's zstd decoder before this change: 1 KiB of input per call."""

    CHUNK = 1024

    def __init__(self) -> None:
        import zstandard
        self._d = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data, out: memoryview) -> None:
        done = 0
        mv = memoryview(data)
        for start in range(0, len(mv), self.CHUNK):
            got = self._d.decompress(mv[start:start + self.CHUNK])
            if done + len(got) > len(out):
                raise ValueError("more than expected")
            out[done:done + len(got)] = got
            done += len(got)
        if done != len(out):
            raise ValueError(f"{done} bytes, expected {len(out)}")


class WholeDecoder:
    """The whole packet in one ``decompressobj`` call: no output bound."""

    def __init__(self) -> None:
        import zstandard
        self._d = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data, out: memoryview) -> None:
        got = self._d.decompress(data)
        if len(got) != len(out):
            raise ValueError(f"{len(got)} bytes, expected {len(out)}")
        out[:] = got


MIXES = {"mix": [0.4, 0.3, 0.2, 0.1], "random": [1, 0, 0, 0], "text": [0, 1, 0, 0], "sparse": [0, 0, 1, 0]}


def page_pool(n: int, mix: str = "mix", seed: int = 7) -> np.ndarray:
    """``n`` guest-like pages; ``mix`` (a key of MIXES) gives the shares of random
    doubles, text, sparse pages of a few words and repeated patterns."""
    rng = np.random.default_rng(seed)
    pool = np.zeros((n, PS), dtype=np.uint8)
    kind = rng.choice(4, size=n, p=MIXES[mix])
    for i in np.flatnonzero(kind == 0):
        pool[i] = rng.random(PS // 8).view(np.uint8)
    words = np.frombuffer(b"the of and to in is that for it with as was on be by migration page guest ram ",
                          dtype=np.uint8)
    for i in np.flatnonzero(kind == 1):
        start = rng.integers(0, words.size, PS // 16)
        pool[i] = words[(start[:, None] + np.arange(16)) % words.size].reshape(-1)
    for i in np.flatnonzero(kind == 2):
        pool[i].view(np.uint64)[rng.integers(0, PS // 8, 24)] = rng.integers(1, 1 << 63, 24, dtype=np.uint64)
    for i in np.flatnonzero(kind == 3):
        pool[i] = np.tile(rng.integers(0, 256, 64, dtype=np.uint8), PS // 64)
    return pool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="page data to inflate (default 1G)")
    ap.add_argument("--level", type=int, default=1, help="multifd-zstd-level (default 1, QEMU's)")
    ap.add_argument("--content", choices=MIXES, default="mix",
                    help="page contents: mix (default: 40%% random doubles, 30%% text, 20%% sparse, "
                         "10%% patterns), or only one kind")
    args = ap.parse_args(argv)
    per = page_count(PS)
    packets = max(1, parse_size(args.size) // (per * PS))
    pool = page_pool(4096, args.content)
    rng = np.random.default_rng(11)
    tx = PageCodec("zstd", args.level)
    decoders = {"1 KiB feed": FeedDecoder(), "PageCodec": PageCodec("zstd"), "unbounded": WholeDecoder()}
    seconds = dict.fromkeys(decoders, 0.0)
    buf = np.empty(per * PS + 1, dtype=np.uint8)
    wire = 0
    for _ in range(packets):
        pages = pool[rng.integers(0, len(pool), per)]
        data = tx.compress(list(pages))
        wire += len(data)
        for name, dec in decoders.items():
            t0 = time.perf_counter()
            if name == "PageCodec":
                dec.decompress(data, memoryview(buf), per * PS)
            else:
                dec.decompress(data, memoryview(buf)[:per * PS])
            seconds[name] += time.perf_counter() - t0
            if not np.array_equal(buf[:per * PS].reshape(per, PS), pages):
                raise SystemExit(f"{name}: wrong pages")
    total = packets * per * PS
    print(f"{packets} packets of {per} pages: {total / 2**30:.2f} GiB of pages, {wire / 2**20:.0f} MiB compressed "
          f"(level {args.level}, {args.content} contents)")
    base = seconds["1 KiB feed"]
    for name, s in seconds.items():
        print(f"  {name:<11} {s:7.2f} s  {total / s / 1e9:5.2f} GB/s  {base / s:5.2f}x the 1 KiB feed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
