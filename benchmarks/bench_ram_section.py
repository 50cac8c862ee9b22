"""Save and load random guest RAM through the RAM section, beside bare os.writev / readinto.

Usage: ``python benchmarks/bench_ram_section.py [--size 1G] [--repeat 3] [--dir DIR]``

Save: one RAM block of random bytes (no zero pages) goes through ``RAMSaver`` into a
QEMUFile over ``null:``; the baseline hands the same pages to ``os.writev`` on
/dev/null, 64 iovecs per call (QEMUFile's MAX_IOV_SIZE).  Load: that stream, written
to a file in DIR, is read back by ``load_file`` into a fresh GuestRAM; the baseline
``readinto``s the same number of bytes from the same (cached) file into fresh anonymous memory of the
same size (the loader's destination is fresh too) and, for reference, into a warm buffer.  Both run in the same process, best of ``--repeat``; ratios are printed so the
numbers can be compared across machines.
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time

import numpy as np

from npqfile.channels import NullChannel, open_channel
from npqfile.qemufile import QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream import RAMSaver, load_file, save_snapshot
from npqfile.units import parse_size

PAGE = 4096


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    size = parse_size(args.size)
    ram = GuestRAM()
    block = ram.add_block("ram", size)
    rng = np.random.default_rng(1)
    chunk = 64 << 20
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        block.array[off:off + n] = np.frombuffer(rng.bytes(n), dtype=np.uint8)
    pages = np.arange(block.n_pages)

    def save_null():
        with QEMUFile(NullChannel()) as f:
            saver = RAMSaver(f, ram)
            saver.save_setup()
            saver.save_pages(block, pages)
            saver.write_eos()
            f.fflush()

    devnull = os.open(os.devnull, os.O_WRONLY)
    flat = memoryview(block.array)

    def writev_bare():
        for off in range(0, size, 64 * PAGE):
            os.writev(devnull, [flat[o:o + PAGE] for o in range(off, min(off + 64 * PAGE, size), PAGE)])

    t_save = _best(save_null, args.repeat)
    t_writev = _best(writev_bare, args.repeat)
    os.close(devnull)
    flat.release()   # no view may outlive the block

    path = os.path.join(args.dir, f"npqfile-bench-{os.getpid()}.stream")
    try:
        with QEMUFile(open_channel(f"file:{path}", "w")) as f:
            save_snapshot(f, ram)
        stream_size = os.path.getsize(path)
        dst = np.empty(stream_size, dtype=np.uint8)

        def load():
            res = load_file(path)
            res.ram.close()

        def readinto_bare(buf=None):
            # fresh anonymous memory by default, private and THP-advised like the
            # loader's destination RAM blocks, so both pay the same page faults
            if buf is None:
                target = mmap.mmap(-1, stream_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                target.madvise(mmap.MADV_HUGEPAGE)
            else:
                target = buf
            with open(path, "rb", buffering=0) as fh:
                view = memoryview(target)
                got = 0
                while got < stream_size:
                    got += fh.readinto(view[got:got + (8 << 20)])
                del view
            if buf is None:
                target.close()

        readinto_bare(dst)   # warm the page cache and the reused buffer
        t_load = _best(load, args.repeat)
        t_read = _best(readinto_bare, args.repeat)
        t_read_warm = _best(lambda: readinto_bare(dst), args.repeat)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    ram.close()
    mib = size / (1 << 20)
    print(f"RAM {mib:.0f} MiB random, best of {args.repeat}")
    print(f"save  RAMSaver -> null:       {t_save:7.3f} s  {mib / t_save:8.0f} MiB/s")
    print(f"      bare os.writev devnull  {t_writev:7.3f} s  {mib / t_writev:8.0f} MiB/s   ratio {t_save / t_writev:5.2f}x")
    print(f"load  load_file <- file       {t_load:7.3f} s  {mib / t_load:8.0f} MiB/s")
    print(f"      bare readinto (fresh)   {t_read:7.3f} s  {mib / t_read:8.0f} MiB/s   ratio {t_load / t_read:5.2f}x")
    print(f"      bare readinto (warm)    {t_read_warm:7.3f} s  {mib / t_read_warm:8.0f} MiB/s   "
          f"ratio {t_load / t_read_warm:5.2f}x")


if __name__ == "__main__":
    main()
