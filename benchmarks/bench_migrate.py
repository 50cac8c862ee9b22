"""Benchmark: live-migrate an idle guest over a socketpair vs. a bare sendmsg of the same bytes.

Usage: ``python benchmarks/bench_migrate.py [--size 1G] [--repeat 3] [--init random]``.
The migration is the full product (engine, QEMU stream, destination loading into its own
GuestRAM; verification off so only migration work is timed), with the destination in a
thread of this process (socketpair: both sides share one GIL) and in another process
(``npqfile incoming unix:``, timed until that process has loaded everything), and to
``null:`` (the source side alone); the baseline
sends the same number of bytes with ``sendmsg`` of 64 x 4 KiB iovecs to a thread that
``recv_into``s a 32 KiB buffer (the best a Python sender/receiver pair does here).
Prints both rates, medians of ``--repeat`` runs, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from npqfile.migration.engine import MigrationParams
from npqfile.migration.session import MigrationConfig, fill_guest, run_migration
from npqfile.migration.workloads import Workload
from npqfile.ram import GuestRAM
from npqfile.units import parse_size

from bench_support import listening_uri


def bare_sendmsg(nbytes: int, src: np.ndarray) -> float:
    """Seconds to push ``nbytes`` (from ``src``, cycled) through a socketpair with sendmsg."""
    a, b = socket.socketpair()
    done = threading.Event()

    def drain() -> None:
        buf = bytearray(32768)
        mv = memoryview(buf)
        got = 0
        while got < nbytes:
            n = b.recv_into(mv)
            if not n:
                break
            got += n
        done.set()

    t = threading.Thread(target=drain, daemon=True)
    mv = memoryview(src)
    pages = [mv[i:i + 4096] for i in range(0, 64 * 4096 * 64, 4096)]
    t0 = time.perf_counter()
    t.start()
    sent = 0
    k = 0
    while sent < nbytes:
        batch = pages[k:k + 64]
        k = (k + 64) % len(pages)
        want = min(nbytes - sent, 64 * 4096)
        if want < 64 * 4096:
            batch = [mv[:want]]
        n = a.sendmsg(batch)
        while n < want:          # finish a partial send
            n += a.send(mv[n % len(mv):][:want - n])
        sent += want
    done.wait()
    elapsed = time.perf_counter() - t0
    a.close()
    b.close()
    return elapsed


def migrate_to_process(ram: GuestRAM, size: int) -> float:
    """Seconds from the start of the migration until ``npqfile incoming`` has loaded it all."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "mig.sock")
        proc = subprocess.Popen([sys.executable, "-m", "npqfile", "incoming", f"unix:{sock}", "--ram", str(size)],
                                stdout=subprocess.PIPE, text=True)
        try:
            listening_uri(proc)                        # "listening on ...", with a deadline
            t0 = time.perf_counter()
            cfg = MigrationConfig(size=size, to=f"unix:{sock}", params=MigrationParams(downtime_limit=0.3))
            st = run_migration(cfg, ram=ram, workload=Workload())   # reads the destination's verdict
            elapsed = time.perf_counter() - t0
            assert st.status == "completed" and st.verification.get("ok"), st.verification
            return elapsed - float(st.destination["hash-time"])   # the verdict waited for hashing
        finally:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--init", default="random", choices=("random", "mixed", "zero"))
    args = ap.parse_args()
    size = parse_size(args.size)
    mig, proc_mig, null_mig, base, nbytes = [], [], [], [], 0
    ram = GuestRAM()
    ram.add_block("ram", size)
    try:
        fill_guest(ram, args.init, 1)
        for _ in range(args.repeat):
            cfg = MigrationConfig(size=size, verify=False, params=MigrationParams(downtime_limit=0.3))
            st = run_migration(cfg, ram=ram, workload=Workload())
            assert st.status == "completed", st.outcome
            nbytes = st.stream_bytes
            mig.append(st.total_time)
            base.append(bare_sendmsg(nbytes, ram.block("ram").array))
            proc_mig.append(migrate_to_process(ram, size))
            null = MigrationConfig(size=size, to="null:", verify=False, params=MigrationParams(downtime_limit=0.3))
            null_mig.append(run_migration(null, ram=ram, workload=Workload()).total_time)
    finally:
        ram.close()
    m, b, p = statistics.median(mig), statistics.median(base), statistics.median(proc_mig)
    print(f"guest {args.size} ({args.init}), stream {nbytes / 1e6:.1f} MB, median of {args.repeat}")
    print(f"  migrate (engine + destination thread): {m * 1000:8.1f} ms  {nbytes / m / 1e9:6.2f} GB/s")
    print(f"  migrate (destination process, unix:)  : {p * 1000:8.1f} ms  {nbytes / p / 1e9:6.2f} GB/s")
    n = statistics.median(null_mig)
    print(f"  migrate to null: (source side only)   : {n * 1000:8.1f} ms  {nbytes / n / 1e9:6.2f} GB/s")
    print(f"  bare sendmsg 64x4KiB -> recv_into     : {b * 1000:8.1f} ms  {nbytes / b / 1e9:6.2f} GB/s")
    print(f"  ratio migrate/bare throughput: thread {b / m:.2f}, process {b / p:.2f}")


if __name__ == "__main__":
    main()
