"""Benchmark: 1 GiB over 1, 2 and 4 multifd channels beside one plain channel, npqfile and QEMU 10.0.

Usage: ``python benchmarks/bench_multifd.py [--size 1G] [--repeat 1] [--channels 1,2,4]
[--compression none] [--no-qemu]``.

npqfile -> npqfile: ``npqfile migrate`` (this process, an idle guest of random RAM,
verification on) to ``npqfile incoming unix:`` in another process, without multifd and
with N multifd channels; the time is the source's ``total-time`` (migrate to completed).
QEMU 10.0 -> QEMU 10.0: two paused ``-M none`` guests whose RAM is a
``memory-backend-file`` on /dev/shm (the source's filled with the same kind of random
data), capability ``multifd`` on both sides, ``max-bandwidth`` unlimited, migrated over
``unix:``; the time is the source's ``total-time`` from ``query-migrate``.
Each row prints the time, GB/s and the ratio to the same system's plain channel; the
last column is npqfile's time over QEMU's for the same configuration.  Everything is
measured in this run (the machine has 2 cores shared with others: absolute numbers move).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from npqfile.migration.engine import MigrationParams  # noqa: E402
from npqfile.migration.session import MigrationConfig, fill_guest, run_migration  # noqa: E402
from npqfile.migration.workloads import Workload  # noqa: E402
from npqfile.ram import GuestRAM  # noqa: E402
from npqfile.units import parse_size  # noqa: E402

from bench_support import listening_uri  # noqa: E402


def npqfile_run(ram: GuestRAM, size: int, channels: int, compression: str) -> float:
    """Seconds of the source's total time, npqfile incoming in another process."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "mig.sock")
        cmd = [sys.executable, "-m", "npqfile", "incoming", f"unix:{sock}", "--ram", str(size), "--timeout", "120"]
        if channels:
            cmd += ["--multifd-channels", str(channels), "--multifd-compression", compression]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            listening_uri(proc)                        # "listening on ...", with a deadline
            params = MigrationParams(multifd_channels=channels, multifd_compression=compression)
            st = run_migration(MigrationConfig(size=size, to=f"unix:{sock}", params=params), ram=ram,
                               workload=Workload())
            assert st.status == "completed" and st.verification.get("ok"), (st.outcome, st.verification)
            return st.total_time
        finally:
            proc.kill()
            proc.wait()


def qemu_run(tmp: Path, size: int, channels: int, compression: str, src_file: Path) -> float:
    """Seconds of QEMU 10.0's total-time for one migration of ``src_file`` (0 channels: plain)."""
    from qemu_support import QemuVM
    dst_file = tmp / "dst.ram"
    with open(dst_file, "wb") as fh:
        fh.truncate(size)
    sock = tmp / "q.sock"
    try:
        with QemuVM(tmp, dst_file, version="10.0", size=size, incoming=True) as dst, \
                QemuVM(tmp, src_file, version="10.0", size=size) as src:
            for vm in (dst, src):
                if channels:
                    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
                    vm.cmd("migrate-set-parameters", **{"multifd-channels": channels,
                                                        "multifd-compression": compression})
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            dst.cmd("migrate-incoming", uri=f"unix:{sock}")       # listening once it returns
            src.cmd("migrate", uri=f"unix:{sock}")
            st = src.wait_migration(timeout=300)
            dst.wait_migration(timeout=60)
            assert np.array_equal(np.fromfile(dst_file, dtype=np.uint8), np.fromfile(src_file, dtype=np.uint8))
            return st["total-time"] / 1000
    finally:
        dst_file.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--channels", default="1,2,4")
    ap.add_argument("--compression", default="none", choices=("none", "zlib", "zstd"))
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU 10.0 rows")
    args = ap.parse_args()
    size = parse_size(args.size)
    configs = [0] + [int(c) for c in args.channels.split(",")]
    ours: dict[int, list[float]] = {c: [] for c in configs}
    qemu: dict[int, list[float]] = {c: [] for c in configs}
    ram = GuestRAM()
    ram.add_block("ram", size)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=shm) as tmpdir:
        tmp = Path(tmpdir)
        try:
            fill_guest(ram, "random", 1)
            src_file = tmp / "src.ram"
            ram.block("ram").array.tofile(src_file)
            for _ in range(args.repeat):
                for c in configs:           # interleaved: both systems see the same machine state
                    ours[c].append(npqfile_run(ram, size, c, args.compression))
                    if not args.no_qemu:
                        qemu[c].append(qemu_run(tmp, size, c, args.compression, src_file))
        finally:
            ram.close()
    print(f"guest {args.size} random RAM, multifd-compression {args.compression}, median of {args.repeat}; "
          f"time = source total-time (migrate to completed)")
    print(f"  {'channels':<22}{'npqfile':>10}{'GB/s':>7}{'vs plain':>9}   {'QEMU 10.0':>10}{'GB/s':>7}"
          f"{'vs plain':>9}   {'npqfile/QEMU':>12}")
    o0 = statistics.median(ours[0])
    q0 = statistics.median(qemu[0]) if qemu[0] else None
    for c in configs:
        o = statistics.median(ours[c])
        label = "plain (no multifd)" if c == 0 else f"multifd x{c}"
        row = f"  {label:<22}{o * 1000:>8.0f}ms{size / o / 1e9:>7.2f}{o0 / o:>8.2f}x"
        if qemu[c]:
            q = statistics.median(qemu[c])
            row += f"   {q * 1000:>8.0f}ms{size / q / 1e9:>7.2f}{q0 / q:>8.2f}x   {o / q:>11.2f}x"
        print(row)


if __name__ == "__main__":
    main()
