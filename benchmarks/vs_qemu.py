"""npqfile beside real QEMU on the same RAM and the same sinks: save, load, live migration, RSS.

Usage: ``python benchmarks/vs_qemu.py [--size 1G] [--runs 5] [--qemu 7.2,10.0] [--cases ...]
[--dir DIR] [--json]``

Every case runs real QEMU and npqfile on the same bytes, interleaved (the order alternates run
by run), each run in a fresh process as a user's command is; the figure printed is the median
over runs of the pairwise ratio ``QEMU time / npqfile time`` (above 1: npqfile is faster).  This
2-core machine is shared and noisy, so only ratios measured side by side mean anything.

Cases (``--cases``, comma-separated; default all):

- ``save-random`` / ``save-zero``: QEMU is ``-M none`` paused with its RAM a ``memory-backend-file``
  of the image (``share=on``: the file's page cache is the guest RAM), ``migrate
  exec:cat > /dev/null``; its time is ``query-migrate``'s ``total-time`` (from ``migrate`` to
  ``completed``, QEMU's own clock: process start-up not included).  npqfile runs
  ``npqfile save ram=IMAGE -o 'exec:cat > /dev/null'`` in a fresh process; its time is from the
  command's ``main()`` to its return (mapping the image, opening the channel and closing it
  included; the interpreter's start-up and the loading of npqfile's code -- numpy and the
  command's modules, imported before the clock starts -- not, as QEMU's start-up and code
  loading are not), and the whole-process wall time is printed beside it (``whole cmd``).
  npqfile's default into an ``exec:`` pipe hands RAM pages to the kernel by reference
  (``--zero-copy-send``, vmsplice: the same bytes and writes).
- ``save-random-copy``: ``save-random`` with ``--no-zero-copy-send``: npqfile copies the pages
  into the pipe, as QEMU does.
- ``load``: the stream QEMU saved from the random image, loaded into fresh anonymous RAM from
  ``exec:cat STREAM``: QEMU ``-incoming defer`` with a ``memory-backend-ram``, ``migrate-incoming``,
  timed from that command to ``completed`` as seen over QMP (polled every 5 ms); npqfile runs
  ``npqfile incoming exec:cat STREAM --ram SIZE --no-hash``, timed as ``save`` is: the same work.
  ``load-sha256``: the same without ``--no-hash``, i.e. npqfile's default, which also computes
  (and prints) every block's sha256; QEMU computes none.
- ``live``: a paused guest of random RAM over TCP on 127.0.0.1, QEMU→QEMU (unlimited bandwidth,
  ``total-time``) beside ``npqfile migrate --workload idle --init random`` → ``npqfile incoming``
  (its ``total-time``: from setup to completion, filling the guest and verifying excluded, as
  QEMU's is).  ``live-multifd``: the same with 4 multifd channels on both sides, when this npqfile
  has ``--multifd-channels`` and the QEMU has multifd.
- npqfile's modules are byte-compiled before the runs (``compileall``), as a package install
  does; an environment with ``PYTHONDONTWRITEBYTECODE`` would otherwise make every timed command
  compile every module it imports.
- ``rss``: extra peak RSS of ``npqfile save`` beyond the guest RAM: maxrss(SIZE) − maxrss(4 MiB)
  − (SIZE − 4 MiB), i.e. what saving costs on top of the RAM and of the interpreter's fixed
  footprint.  QEMU's peak RSS of the same save, minus the guest RAM, beside it for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from npqfile.qemu import QemuBinary, QemuNotFound, connect_qmp, find_qemu  # noqa: E402
from npqfile.units import format_bytes, parse_size  # noqa: E402

from bench_support import listening_uri  # noqa: E402

MIB = 1 << 20
CASES = ("save-random", "save-random-copy", "save-zero", "load", "load-sha256", "live", "live-multifd", "rss")
NPQFILE = [sys.executable, "-m", "npqfile"]


@dataclass
class Pair:
    """One case against one QEMU: per-run times (s) of both sides and their ratios."""
    case: str
    qemu: str
    qemu_s: list[float] = field(default_factory=list)
    npq_s: list[float] = field(default_factory=list)
    npq_whole_s: list[float] = field(default_factory=list)
    note: str = ""

    def ratio(self) -> float | None:
        r = [q / n for q, n in zip(self.qemu_s, self.npq_s) if n > 0]
        return statistics.median(r) if r else None

    def as_dict(self) -> dict:
        med = lambda xs: round(statistics.median(xs), 4) if xs else None  # noqa: E731
        return {"case": self.case, "qemu": self.qemu, "qemu-s": med(self.qemu_s), "npqfile-s": med(self.npq_s),
                "npqfile-whole-command-s": med(self.npq_whole_s),
                "ratio": None if self.ratio() is None else round(self.ratio(), 3), "runs": len(self.npq_s),
                "note": self.note}


class Qemu:
    """One paused ``-M none`` QEMU driven over QMP, always killed on exit."""

    def __init__(self, qb: QemuBinary, workdir: str, size: int, *, mem_path: str | None, incoming: bool):
        self.sock = os.path.join(workdir, f"qmp-{os.getpid()}-{time.monotonic_ns()}.sock")
        mib = size // MIB
        backend = (f"memory-backend-file,id=ram,size={mib}M,mem-path={mem_path},share=on" if mem_path
                   else f"memory-backend-ram,id=ram,size={mib}M")
        cmd = qb.command("-M", "none,memory-backend=ram", "-m", f"{mib}M", "-object", backend,
                         "-nodefaults", "-display", "none", "-S", "-monitor", "none", "-serial", "none",
                         "-qmp", f"unix:{self.sock},server=on,wait=off",
                         *(["-incoming", "defer"] if incoming else []))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.qmp = connect_qmp(self.sock, lambda: self.proc.poll() is None, 30)
        if self.qmp is None:
            self.close()
            raise RuntimeError(f"QEMU did not start: {self.proc.stderr.read().decode(errors='replace')}")

    def cmd(self, name: str, **args):
        return self.qmp.cmd(name, **args)

    def wait(self, timeout: float = 300.0, poll: float = 0.005) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                if st["status"] != "completed":
                    raise RuntimeError(f"QEMU migration {st}")
                return st
            time.sleep(poll)
        raise RuntimeError("QEMU migration timed out")

    def maxrss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def close(self) -> None:
        try:
            if self.qmp is not None:
                self.qmp.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _unlimited(q: Qemu, caps: dict | None = None) -> None:
    q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 300})
    if caps:
        q.cmd("migrate-set-capabilities", capabilities=[{"capability": k, "state": v} for k, v in caps.items()])


DRIVER = ("import importlib, sys, time\n"
          "import npqfile.cli as cli\n"        # interpreter and numpy start-up: not timed
          "import numpy\n"                     # (after the CLI set up the process for it)
          "importlib.import_module('npqfile.cli.' + sys.argv[1])\n"    # the command's code, loaded
          "t = time.perf_counter()\n"
          "rc = cli.main(sys.argv[1:])\n"
          "sys.stderr.write(f'\\nNPQ_ELAPSED={time.perf_counter() - t}\\n')\n"
          "sys.exit(rc)\n")


def _timed_npqfile(args: list[str]) -> tuple[float, float, int]:
    """Run ``npqfile ARGS`` in a fresh process: (seconds inside the command -- from ``main()``
    to its return, as QEMU's ``total-time`` starts after QEMU is up --, whole-process wall
    seconds, peak RSS in KiB from wait4).  RuntimeError with its stderr when it fails."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"npqfile {' '.join(args)} failed ({proc.returncode}): {err[-2000:]}")
    inner = float(err.rsplit("NPQ_ELAPSED=", 1)[1].split()[0])
    return inner, wall, usage.ru_maxrss


def _listen_port(q: "Qemu") -> int:
    """The port a QEMU ``migrate-incoming tcp:127.0.0.1:0`` listens on (query-migrate's
    socket-address): the listener binds first, so no other process can take the port
    between choosing it and listening on it."""
    return int(q.cmd("query-migrate")["socket-address"][0]["port"])


class Bench:
    def __init__(self, args: argparse.Namespace, qemus: list[QemuBinary]):
        self.size = parse_size(args.size)
        self.runs = args.runs
        self.qemus = qemus
        self.dir = tempfile.mkdtemp(prefix="vs_qemu-", dir=args.dir)
        self.random_img = os.path.join(self.dir, "random.img")
        self.zero_img = os.path.join(self.dir, "zero.img")
        self.small_img = os.path.join(self.dir, "small.img")
        self.streams: dict[str, str] = {}
        self._make_images()

    def _make_images(self) -> None:
        with open(self.random_img, "wb") as fh:
            left = self.size
            while left:
                n = min(left, 64 * MIB)
                fh.write(os.urandom(n))
                left -= n
        with open(self.zero_img, "wb") as fh:   # written zeros, not a hole: both sides read real pages
            block = bytes(64 * MIB)
            left = self.size
            while left:
                n = min(left, 64 * MIB)
                fh.write(block[:n])
                left -= n
        with open(self.small_img, "wb") as fh:
            fh.write(os.urandom(4 * MIB))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the cases ------------------------------------------------------------------------
    def qemu_save(self, qb: QemuBinary, image: str, uri: str = "exec:cat > /dev/null") -> tuple[float, int]:
        q = Qemu(qb, self.dir, self.size, mem_path=image, incoming=False)
        try:
            _unlimited(q)
            q.cmd("migrate", uri=uri)
            st = q.wait()
            return st["total-time"] / 1000.0, q.maxrss_kb()
        finally:
            q.close()

    def npq_save(self, image: str, *extra: str) -> tuple[float, float, int]:
        return _timed_npqfile(["save", f"ram={image}", "-o", "exec:cat > /dev/null", *extra])

    def stream_of(self, qb: QemuBinary) -> str:
        """The stream this QEMU saves from the random image (made once, reused by ``load``)."""
        if qb.version not in self.streams:
            path = os.path.join(self.dir, f"stream-{qb.version}.bin")
            self.qemu_save(qb, self.random_img, uri=f"exec:cat > {path}")
            self.streams[qb.version] = path
        return self.streams[qb.version]

    def qemu_load(self, qb: QemuBinary, stream: str) -> float:
        q = Qemu(qb, self.dir, self.size, mem_path=None, incoming=True)
        try:
            t = time.perf_counter()
            q.cmd("migrate-incoming", uri=f"exec:cat {stream}")
            q.wait()
            return time.perf_counter() - t
        finally:
            q.close()

    def npq_load(self, stream: str, hashed: bool = False) -> tuple[float, float, int]:
        return _timed_npqfile(["incoming", f"exec:cat {stream}", "--ram", str(self.size),
                               *([] if hashed else ["--no-hash"])])

    def qemu_live(self, qb: QemuBinary, channels: int = 0) -> float:
        dst = Qemu(qb, self.dir, self.size, mem_path=None, incoming=True)
        src = None
        try:
            src = Qemu(qb, self.dir, self.size, mem_path=self.random_img, incoming=False)
            caps = {"multifd": True} if channels else None
            _unlimited(src, caps)
            _unlimited(dst, caps)
            if channels:
                for q in (src, dst):
                    q.cmd("migrate-set-parameters", **{"multifd-channels": channels})
            dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{_listen_port(dst)}")
            st = src.wait()
            dst.wait()
            return st["total-time"] / 1000.0
        finally:
            for q in (src, dst):
                if q is not None:
                    q.close()

    def npq_live(self, channels: int = 0) -> float:
        extra = ["--multifd-channels", str(channels)] if channels else []
        dst = subprocess.Popen(NPQFILE + ["incoming", "tcp:127.0.0.1:0", "--ram", str(self.size), "--timeout", "120",
                                          *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            uri = listening_uri(dst)      # not a probe connection: incoming accepts only one
            res = subprocess.run(NPQFILE + ["migrate", "--to", uri, "--size", str(self.size), "--init", "random",
                                            "--workload", "idle", "--quiet", "--json", *extra],
                                 cwd=ROOT, capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                raise RuntimeError(f"npqfile migrate failed ({res.returncode}): {res.stderr[-2000:]}")
            return json.loads(res.stdout)["total-time"] / 1000.0
        finally:
            try:
                dst.wait(timeout=120)
            except subprocess.TimeoutExpired:
                dst.kill()
                dst.wait()

    def supports_multifd(self) -> bool:
        res = subprocess.run(NPQFILE + ["migrate", "--help"], cwd=ROOT, capture_output=True, text=True)
        return "--multifd-channels" in res.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--qemu", default="7.2,10.0", help="QEMU versions or paths, comma-separated")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r} (cases: {', '.join(CASES)})")
    qemus = []
    for spec in args.qemu.split(","):
        try:
            qemus.append(find_qemu(spec))
        except QemuNotFound as exc:
            print(f"skipping QEMU {spec}: {exc}", file=sys.stderr)
    if not qemus:
        ap.error("no QEMU to compare with")
    # Byte-compile npqfile first, as installing a package does: an environment with
    # PYTHONDONTWRITEBYTECODE (this one has it) would otherwise compile every module from
    # source inside every timed command (about 0.25 s here).
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "npqfile")], check=True)
    bench = Bench(args, qemus)
    pairs: list[Pair] = []
    try:
        multifd = bench.supports_multifd()
        for qb in qemus:
            for case in cases:
                pair = Pair(case, qb.version)
                if case == "live-multifd" and (not multifd or qb.version_tuple < (8, 0)):
                    pair.note = ("npqfile has no --multifd-channels" if not multifd
                                 else "multifd needs QEMU 8.0+ here")
                    pairs.append(pair)
                    continue
                for run in range(args.runs):
                    order = (0, 1) if run % 2 == 0 else (1, 0)
                    q = n = 0.0
                    for side in order:
                        if side == 0:
                            q = _qemu_side(bench, qb, case, pair)
                        else:
                            n = _npq_side(bench, case, pair)
                    pair.qemu_s.append(q)
                    pair.npq_s.append(n)
                pairs.append(pair)
                _print_row(pair, sys.stderr)
    finally:
        bench.close()
    if args.json:
        print(json.dumps({"size": bench.size, "runs": args.runs, "cpus": os.cpu_count(),
                          "cases": [p.as_dict() for p in pairs]}, indent=2))
    else:
        print(f"\nnpqfile vs QEMU, {format_bytes(bench.size)}, {args.runs} runs each, pairwise median of "
              f"QEMU time / npqfile time (> 1: npqfile faster); {os.cpu_count()} CPUs")
        print(f"{'case':14} {'QEMU':8} {'QEMU s':>9} {'npqfile s':>10} {'ratio':>7} {'whole cmd':>10}  note")
        for p in pairs:
            _print_row(p, sys.stdout)
    return 0


def _qemu_side(bench: Bench, qb: QemuBinary, case: str, pair: Pair) -> float:
    if case in ("save-random", "save-random-copy"):
        return bench.qemu_save(qb, bench.random_img)[0]
    if case == "save-zero":
        return bench.qemu_save(qb, bench.zero_img)[0]
    if case in ("load", "load-sha256"):
        return bench.qemu_load(qb, bench.stream_of(qb))
    if case == "live":
        return bench.qemu_live(qb)
    if case == "live-multifd":
        return bench.qemu_live(qb, channels=4)
    if case == "rss":
        _, rss = bench.qemu_save(qb, bench.random_img)
        extra = rss * 1024 - bench.size
        if "QEMU" not in pair.note:
            pair.note = f"QEMU peak RSS beyond guest RAM {format_bytes(max(extra, 0))}" + pair.note
        return 1.0
    raise ValueError(case)


def _npq_side(bench: Bench, case: str, pair: Pair) -> float:
    """npqfile's time for one run of ``case`` (whole-command times go to ``pair.npq_whole_s``)."""
    timed = None
    if case == "save-random":
        timed = bench.npq_save(bench.random_img)
    elif case == "save-random-copy":
        timed = bench.npq_save(bench.random_img, "--no-zero-copy-send")
    elif case == "save-zero":
        timed = bench.npq_save(bench.zero_img)
    elif case in ("load", "load-sha256"):
        timed = bench.npq_load(bench.streams.get(pair.qemu) or bench.stream_of(find_qemu(pair.qemu)),
                               hashed=case == "load-sha256")
    if timed is not None:
        pair.npq_whole_s.append(timed[1])
        return timed[0]
    if case == "live":
        return bench.npq_live()
    if case == "live-multifd":
        return bench.npq_live(channels=4)
    if case == "rss":
        big = bench.npq_save(bench.random_img)[2]
        small = bench.npq_save(bench.small_img)[2]
        extra = (big - small) * 1024 - (bench.size - 4 * MIB)
        if "npqfile" not in pair.note:
            pair.note += f"; npqfile extra peak RSS {format_bytes(max(extra, 0))}"
        return 1.0
    raise ValueError(case)


def _print_row(p: Pair, out) -> None:
    d = p.as_dict()
    if p.case == "rss":
        print(f"{p.case:14} {p.qemu:8} {'':>9} {'':>10} {'':>7} {'':>10}  {p.note}", file=out)
        return
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    ratio = "-" if d["ratio"] is None else f"{d['ratio']:.2f}x"
    print(f"{p.case:14} {p.qemu:8} {fmt(d['qemu-s']):>9} {fmt(d['npqfile-s']):>10} {ratio:>7} "
          f"{fmt(d['npqfile-whole-command-s']):>10}  {p.note}", file=out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
