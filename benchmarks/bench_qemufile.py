"""QEMUFile per-operation cost, each beside a baseline measured in the same run.

Prints ns per op for put_byte, put_be64, get_be64, and per page for
put_buffer_async+fflush (and the batched put_records) of 4 KiB pages into a
NullChannel, with the ratio to its baseline.  Last, the per-page API (``put_be64`` +
``put_buffer_async`` per page) into an AF_UNIX socketpair drained by a fresh interpreter
(``recv_into`` 1 MiB), beside a bare ``sendmsg`` of the same header and page iovecs, 64 a
call, into the same kind of socketpair: its ratio is a throughput ratio (bare time / our
time; the goal is >= 0.6).  The machine is shared and noisy, so each
pair is measured interleaved, several times, and the medians are compared.

    python benchmarks/bench_qemufile.py [--reps 7] [--pages 16384]
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from npqfile.channels import MemoryChannel, NullChannel
from npqfile.channels.sockets import SocketChannel
from npqfile.qemufile import QEMUFile

PAGE = 4096


class BareStore:
    """Baseline for put_byte: a bare Python method storing one byte."""

    def __init__(self) -> None:
        self.buf = bytearray(32768)
        self.i = 0

    def put(self, v: int) -> None:
        self.buf[self.i] = v
        self.i = (self.i + 1) & 32767


def per_op(fn: Callable[[int], None], n: int) -> float:
    """ns per call of ``fn`` over ``n`` calls (the loop overhead is in both sides)."""
    t0 = time.perf_counter_ns()
    fn(n)
    return (time.perf_counter_ns() - t0) / n


def pairs(reps: int, ours: Callable[[], float], base: Callable[[], float]) -> tuple[float, float]:
    a, b = [], []
    for _ in range(reps):
        a.append(ours())
        b.append(base())
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ops", type=int, default=200_000)
    ap.add_argument("--pages", type=int, default=16384)
    args = ap.parse_args()
    n = args.ops

    f = QEMUFile(NullChannel())
    bare = BareStore()

    def put_byte(k: int) -> None:
        put = f.put_byte
        for i in range(k):
            put(i & 255)

    def bare_byte(k: int) -> None:
        put = bare.put
        for i in range(k):
            put(i & 255)

    def put_be64(k: int) -> None:
        put = f.put_be64
        for i in range(k):
            put(i)

    scratch = bytearray(8)

    def pack_be64(k: int) -> None:
        pack = struct.pack_into
        for i in range(k):
            pack(">Q", scratch, 0, i)

    w = MemoryChannel()
    wf = QEMUFile(w)
    for i in range(n):
        wf.put_be64(i)
    wf.fflush()
    stream = w.getvalue()

    def get_be64(k: int) -> None:
        r = QEMUFile(MemoryChannel.reader(stream))
        get = r.get_be64
        for _ in range(k):
            get()

    def unpack_be64(k: int) -> None:
        unpack = struct.unpack_from
        for i in range(k):
            unpack(">Q", stream, (i * 8) % (len(stream) - 8))

    npages = args.pages
    mm = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    np.frombuffer(mm, dtype=np.uint8)[::PAGE] = 1  # populate
    mv = memoryview(mm)
    views = [mv[i * PAGE:(i + 1) * PAGE] for i in range(npages)]
    scattered = views[::2]  # never adjacent: one iovec each, as in a RAM section
    heads = (np.arange(len(scattered), dtype=np.uint64) * PAGE | 0x28).astype(">u8").tobytes()
    devnull = os.open(os.devnull, os.O_WRONLY)

    def async_pages(_k: int) -> None:
        g = QEMUFile(NullChannel())
        put = g.put_buffer_async
        for v in scattered:
            put(v)
        g.fflush()

    def records(_k: int) -> None:
        g = QEMUFile(NullChannel())
        g.put_records(heads, 8, scattered)
        g.fflush()

    def header_and_page(_k: int) -> None:
        g = QEMUFile(NullChannel())
        put_hdr, put = g.put_be64, g.put_buffer_async
        for i, v in enumerate(scattered):
            put_hdr(i)
            put(v)
        g.fflush()

    def bare_writev(_k: int) -> None:
        for i in range(0, len(scattered), 64):
            os.writev(devnull, scattered[i:i + 64])

    def naive_loop(_k: int) -> None:
        # The least a Python stream can do per page (machine-limits.md's "naive loop"):
        # pack the 8-byte header into a staging buffer, queue a view of it and the page,
        # writev every 64 entries.  No errors, no flush rules, no coalescing.
        staging = bytearray(32768)
        sv = memoryview(staging)
        pack = struct.Struct(">Q").pack_into
        iov: list = []
        put = iov.append
        pos = 0
        for i, v in enumerate(scattered):
            pack(staging, pos, i)
            put(sv[pos:pos + 8])
            put(v)
            pos += 8
            if len(iov) == 64:
                os.writev(devnull, iov)
                iov.clear()
                pos = 0
        if iov:
            os.writev(devnull, iov)

    np_ = len(scattered)
    rows = [
        ("put_byte", "bare method storing a byte", *pairs(args.reps, lambda: per_op(put_byte, n), lambda: per_op(bare_byte, n))),
        ("put_be64", "struct.pack_into('>Q')", *pairs(args.reps, lambda: per_op(put_be64, n), lambda: per_op(pack_be64, n))),
        ("get_be64", "struct.unpack_from('>Q')", *pairs(args.reps, lambda: per_op(get_be64, n), lambda: per_op(unpack_be64, n))),
        ("put_buffer_async+fflush /page", "bare os.writev 64 pages /dev/null", *pairs(
            args.reps, lambda: per_op(async_pages, np_), lambda: per_op(bare_writev, np_))),
        ("put_be64+put_buffer_async /page", "bare os.writev 64 pages /dev/null", *pairs(
            args.reps, lambda: per_op(header_and_page, np_), lambda: per_op(bare_writev, np_))),
        ("put_records /page (hdr+page)", "bare os.writev 64 pages /dev/null", *pairs(
            args.reps, lambda: per_op(records, np_), lambda: per_op(bare_writev, np_))),
        ("put_be64+put_buffer_async /page", "naive hdr+page loop, writev /dev/null", *pairs(
            args.reps, lambda: per_op(header_and_page, np_), lambda: per_op(naive_loop, np_))),
        ("put_records /page (hdr+page)", "naive hdr+page loop, writev /dev/null", *pairs(
            args.reps, lambda: per_op(records, np_), lambda: per_op(naive_loop, np_))),
    ]
    os.close(devnull)
    sock_ours, sock_bare = pairs(args.reps, lambda: socket_run(scattered, "api"), lambda: socket_run(scattered, "bare"))
    print(f"{'operation':34} {'ns/op':>8}   {'baseline':36} {'ns/op':>8}  ratio")
    for name, base_name, ours, base in rows:
        print(f"{name:34} {ours:8.0f}   {base_name:36} {base:8.0f}  {ours / base:5.2f}x")
    print(f"{'put_be64+put_buffer_async socket':34} {sock_ours:8.0f}   {'bare sendmsg 64 iovecs, same bytes':36} "
          f"{sock_bare:8.0f}  {sock_bare / sock_ours:5.2f} of bare throughput (goal 0.6)")


DRAIN = ("import socket, sys\n"
         "s = socket.socket(fileno=int(sys.argv[1]))\n"
         "b = bytearray(1 << 20)\n"
         "s.send(b'r')\n"
         "while s.recv_into(b):\n"
         "    pass\n")


def socket_run(pages: list, how: str) -> float:
    """ns per page to send header + page records for ``pages`` into a socketpair whose
    other end a fresh interpreter drains; ``how`` is "api" (QEMUFile per-page calls) or
    "bare" (sendmsg of the same iovecs, 64 a call)."""
    a, b = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", DRAIN, str(b.fileno())], pass_fds=[b.fileno()])
    b.close()
    g = None           # bound before anything can raise: the finally below reads it
    try:
        a.recv(1)      # the drainer is up: its start-up is not timed
        t0 = time.perf_counter_ns()
        if how == "api":
            g = QEMUFile(SocketChannel(a, "w"))
            put_hdr, put = g.put_be64, g.put_buffer_async
            for i, v in enumerate(pages):
                put_hdr(i)
                put(v)
            g.fflush()
        else:
            heads = [struct.pack(">Q", i) for i in range(len(pages))]
            iov = [None] * (2 * len(pages))
            iov[0::2] = heads
            iov[1::2] = pages
            send = a.sendmsg
            for i in range(0, len(iov), 64):
                batch = iov[i:i + 64]
                n = send(batch)
                want = sum(len(x) if isinstance(x, bytes) else x.nbytes for x in batch)
                while n < want:   # a blocking socket may still return short; finish like write_all
                    rest = b"".join(bytes(x) for x in batch)[n:]
                    n += send([rest])
        elapsed = time.perf_counter_ns() - t0
    finally:
        try:
            if g is not None:
                g.close()
        finally:
            a.close()      # (again, if g closed it) the drainer ends at EOF, so the wait below returns
            child.wait()
    return elapsed / len(pages)


if __name__ == "__main__":
    main()
