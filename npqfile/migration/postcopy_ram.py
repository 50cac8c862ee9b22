"""Postcopy's destination (QEMU's ``migration/postcopy-ram.c`` and ``loadvm_postcopy_handle_*``
in ``savevm.c``): the incoming guest runs before all of its RAM has arrived.

Supports :class:`PostcopyIncoming`, the destination's command handler
(``load_stream(..., postcopy=...)``): OPEN_RETURN_PATH opens the return path, PING
answers PONG, POSTCOPY_ADVISE gets a userfaultfd and empties RAM
(``postcopy_ram_incoming_init``), POSTCOPY_RAM_DISCARD drops the pages that changed since
they were sent, LISTEN registers every block for missing-page faults and starts the
fault thread, RUN starts the destination's guest (a workload, wrapped by
:class:`DestinationGuest`).  From LISTEN on the RAM loader places pages through
``place_page`` / ``place_zero`` (UFFDIO_COPY / UFFDIO_ZEROPAGE: atomic, and they wake the
guest if it waits on the page); a guest access to a missing page blocks in the kernel
while the fault thread asks the source for it (REQ_PAGES_ID, then REQ_PAGES while the
block stays the same).  ``finish`` sends SHUT and, to an npqfile source only (it pinged
``PING_NPQFILE_SOURCE``), npqfile's verification message after it: a QEMU source stops
reading at SHUT, so the return path it reads holds QEMU's messages only.

Statistics: requests sent, pages placed and discarded, ``postcopy-blocktime`` (ms the
guest waited on faults, QEMU's name) and the fault latency distribution (fault read to
page placed: p50, p90, p99, max), which QEMU lacks.

Verification: the guest writes pages as soon as they arrive, so the final RAM is not the
source's.  ``received_hashes`` hashes RAM as received (later guest writes left out),
which must equal the source's RAM when it stopped: the guest's first touch of a page
goes through ``npqfile.migration.received_hash``, which hashes in page order as it can
and keeps only the first contents it still needs (about 8 MiB, not a copy of every
touched page).

Goals: QEMU's state machine and messages (``CMD_POSTCOPY_RUN in wrong postcopy state``...),
each a StreamError at the command's offset; no deadlock: every thread that can fault
does so with the GIL released.  Plan: commands in the loader's thread, faults in one
thread, the guest in its own; two locks (return-path writes, the pending/received maps).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
import threading
import time
from typing import Any

import numpy as np

from npqfile.channels.base import wait_readable
from npqfile.migration.received_hash import ReceivedHashes
from npqfile.qemufile import QEMUFile
from npqfile.ram.userfaultfd import Userfaultfd
from npqfile.stream.constants import (
    MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING, MIG_CMD_POSTCOPY_ADVISE, MIG_CMD_POSTCOPY_LISTEN,
    MIG_CMD_POSTCOPY_RAM_DISCARD, MIG_CMD_POSTCOPY_RUN, TARGET_PAGE_SIZE,
)
from npqfile.stream.reader import shown
from npqfile.stream.return_path import (
    DiscardError, PING_NPQFILE_SOURCE, parse_discard, rp_pong, rp_req_pages, rp_shut,
)

VERIFY_MAGIC = b"NPQV"       # npqfile's verification message (see destination.py)
MAX_SAMPLES = 10000          # fault latencies kept in the statistics (evenly subsampled)


def latency_summary(latencies: list[float]) -> dict[str, Any]:
    """p50/p90/p99/max and count of fault latencies (seconds in, milliseconds out)."""
    if not latencies:
        return {"count": 0, "p50-ms": None, "p90-ms": None, "p99-ms": None, "max-ms": None}
    a = np.asarray(latencies) * 1000
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"count": int(a.size), "p50-ms": round(float(p50), 3), "p90-ms": round(float(p90), 3),
            "p99-ms": round(float(p99), 3), "max-ms": round(float(a.max()), 3)}


STATES = ("none", "advise", "discard", "listening", "running", "end")


class PostcopyIncoming:
    """Acts on the commands of an incoming stream (``load_stream(..., postcopy=self)``).

    ``main``: the incoming QEMUFile (its return path is opened on OPEN_RETURN_PATH);
    ``guest``: a Workload started on the destination's RAM at RUN (None: no guest, as a
    ``-M none`` QEMU).  ``state`` follows QEMU's PostcopyState; ``rp`` is the return-path
    QEMUFile once opened.  Errors are StreamError (bad command) or OSError (userfaultfd)."""

    def __init__(self, main: QEMUFile, guest: Any = None):
        self.main = main
        self.guest = guest
        if isinstance(guest, DestinationGuest):
            guest.incoming = self
        self.state = "none"
        self.rp: QEMUFile | None = None
        self.npqfile_source = False
        self._replay = False            # OPEN_RETURN_PATH on a channel that has none
        self._rp_lock = threading.Lock()
        self._lock = threading.Lock()
        self.uffd: Userfaultfd | None = None
        self.ram: Any = None
        self._ranges: list[tuple[int, int, Any]] = []   # (start address, end address, block)
        self._received: dict[str, np.ndarray] = {}
        self._pending: dict[tuple[str, int], float] = {}
        self._last_requested: str | None = None
        self._fault_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._bounce = ctypes.create_string_buffer(TARGET_PAGE_SIZE)
        self._as_received = ReceivedHashes(self._received.get)
        self.latencies: list[float] = []
        self.requests = 0
        self.discarded_pages = 0
        self.placed_pages = 0
        self.fault_error: str | None = None
        self.run_time: float | None = None

    # -- commands -------------------------------------------------------------------------
    def command(self, cmd: int, data: bytes, loader: Any) -> None:
        """Act on one command (called by the loader after parsing it)."""
        r = loader.r
        if cmd == MIG_CMD_OPEN_RETURN_PATH:
            self.rp = self.main.get_return_path()
            if self.rp is None:
                if self.guest is not None:
                    raise r.error("Unable to open return-path for postcopy (the channel has none)")
                # a saved stream replayed from a file or a command: nobody to answer
                loader.res.warnings.append("OPEN_RETURN_PATH on a channel without one: a replayed stream; "
                                           "PINGs are not answered")
                self._replay = True
        elif cmd == MIG_CMD_PING:
            value = struct.unpack(">I", data)[0]
            if self.rp is None and not self._replay:
                raise r.error(f"CMD_PING ({value:#x}) received with no return path")
            self.npqfile_source = self.npqfile_source or value == PING_NPQFILE_SOURCE
            if self.rp is not None:
                self.send(rp_pong(value))
        elif cmd == MIG_CMD_POSTCOPY_ADVISE:
            self._advise(data, loader)
        elif cmd == MIG_CMD_POSTCOPY_RAM_DISCARD:
            self._discard(data, loader)
        elif cmd == MIG_CMD_POSTCOPY_LISTEN:
            self._listen(loader)
        elif cmd == MIG_CMD_POSTCOPY_RUN:
            if self.state != "listening":
                raise r.error(f"CMD_POSTCOPY_RUN in wrong postcopy state ({self.state})")
            self.state = "running"
            self.run_time = time.monotonic()
            if self.guest is not None:
                self.guest.start(self.ram)

    def _advise(self, data: bytes, loader: Any) -> None:
        r = loader.r
        if self.state != "none":
            raise r.error(f"CMD_POSTCOPY_ADVISE in wrong postcopy state ({self.state})")
        if not data:
            return              # postcopy-ram off (e.g. only a return path): nothing to prepare
        summary, tps = struct.unpack(">QQ", data)
        if tps != TARGET_PAGE_SIZE:
            raise r.error(f"Postcopy needs matching target page sizes (s={tps} d={TARGET_PAGE_SIZE})")
        if summary != TARGET_PAGE_SIZE:     # QEMU: remote_pagesize_summary != local (all ours are 4 KiB)
            raise r.error(f"Postcopy needs matching RAM page sizes (s={summary:#x} d={TARGET_PAGE_SIZE:#x})")
        self.uffd = Userfaultfd()       # UserfaultfdUnavailable says what would allow it
        self.state = "advise"
        ram = loader.ram.ram
        if ram is not None:             # postcopy_ram_incoming_init: RAM must be truly empty
            for b in ram.blocks:
                b.release([(0, b.size)])

    def _block(self, name: str, loader: Any) -> Any:
        dest = loader.ram.declared.get(name)
        if dest is None:
            raise loader.r.error(f"ram_discard_range: Failed to find block '{shown(name)}'")
        return dest.block

    def _discard(self, data: bytes, loader: Any) -> None:
        """loadvm_postcopy_ram_handle_discard + ram_discard_range: drop the ranges the
        source re-sends (``data`` was just read: it ends at the reader's offset)."""
        r = loader.r
        if self.state not in ("advise", "discard"):
            raise r.error(f"CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state ({self.state})")
        payload_at = r.offset - len(data)
        try:
            d = parse_discard(data)
            block = self._block(d.block, loader)
            d.check(block.size, block.page_size)
        except DiscardError as exc:
            raise r.error(str(exc), payload_at + exc.offset) from None
        if d.ranges:
            block.release(d.array)
        self.discarded_pages += d.pages(block.page_size)
        self.state = "discard"

    def _listen(self, loader: Any) -> None:
        """loadvm_postcopy_handle_listen: register RAM with the userfaultfd, start the fault thread."""
        r = loader.r
        if self.state not in ("advise", "discard") or self.uffd is None:
            raise r.error(f"CMD_POSTCOPY_LISTEN in wrong postcopy state ({self.state})")
        self.ram = loader.ram.ram
        if self.ram is None:
            raise r.error("CMD_POSTCOPY_LISTEN before any RAM block was declared")
        for b in self.ram.blocks:
            b.mmap.madvise(mmap.MADV_NOHUGEPAGE)    # QEMU too: faults and copies are 4 KiB
            self.uffd.register(b.address, b.size)
            self._ranges.append((b.address, b.address + b.size, b))
            self._received[b.name] = np.zeros(b.n_pages, dtype=bool)
        loader.ram.placer = self
        self.state = "listening"
        self._fault_thread = threading.Thread(target=self._fault_loop, name="postcopy/fault", daemon=True)
        self._fault_thread.start()

    # -- the return path -----------------------------------------------------------------------
    def send(self, message: bytes) -> None:
        """One return-path message (the loader and the fault thread both send)."""
        with self._rp_lock:
            self.rp.put_buffer(message)
            self.rp.fflush()
            if self.rp.get_error():
                raise self.rp.error

    # -- faults -------------------------------------------------------------------------------
    def _fault_loop(self) -> None:
        """postcopy_ram_fault_thread: each missing page a guest touches is requested once."""
        fd = self.uffd.fd
        try:
            while not self._stop.is_set():
                if not wait_readable([fd], 0.05):
                    continue
                for msg in self.uffd.read_faults():
                    self._fault(msg.address, time.monotonic())
        except (OSError, ValueError) as exc:
            self.fault_error = str(exc)

    def _fault(self, address: int, now: float) -> None:
        for start, end, block in self._ranges:
            if start <= address < end:
                break
        else:
            return
        ps = block.page_size
        page = (address - start) // ps
        key = (block.name, page)
        with self._lock:
            if self._received[block.name][page] or key in self._pending:
                return          # placed meanwhile (the copy woke the guest), or already asked for
            self._pending[key] = now
        name = None if self._last_requested == block.name else block.name
        self._last_requested = block.name
        self.requests += 1
        self.send(rp_req_pages(page * ps, ps, name))

    # -- placing pages (called by the RAM loader in postcopy) -----------------------------------
    def place_page(self, block: Any, offset: int, data: bytes) -> None:
        """postcopy_place_page: copy ``data`` into the missing page atomically, wake waiters."""
        ctypes.memmove(self._bounce, data, block.page_size)
        self._place(block, offset, lambda: self.uffd.copy(block.address + offset, ctypes.addressof(self._bounce),
                                                          block.page_size))

    def place_zero(self, block: Any, offset: int, fill: int) -> None:
        """postcopy_place_page_zero (or a filled page for a non-zero fill byte)."""
        if fill:
            self.place_page(block, offset, bytes([fill]) * block.page_size)
            return
        self._place(block, offset, lambda: self.uffd.zeropage(block.address + offset, block.page_size))

    def _place(self, block: Any, offset: int, op: Any) -> None:
        page = offset // block.page_size
        try:
            op()
        except OSError as exc:
            raise OSError(exc.errno, f"postcopy: placing page {offset:#x} of block '{shown(block.name)}' "
                                     f"failed: {exc.strerror}") from None
        now = time.monotonic()
        with self._lock:
            self._received[block.name][page] = True
            t = self._pending.pop((block.name, page), None)
        self.placed_pages += 1
        if t is not None:
            self.latencies.append(now - t)

    # -- the guest's first touch of a page ---------------------------------------------------
    def first_touch(self, block: Any, page: int) -> None:
        """Read the page with the GIL released (a missing page blocks here until placed)
        before the guest first writes it, for verification (see ReceivedHashes)."""
        self._as_received.first_touch(block, page)

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, ok: bool, verdict: dict | None) -> None:
        """Stop the guest and the fault thread, unregister RAM, send SHUT (error flag when
        not ``ok``) and, to an npqfile source, the ``verdict`` after it."""
        self.stop()
        if self.rp is None:
            return
        try:
            self.send(rp_shut(not ok))
            if self.npqfile_source and verdict is not None:
                body = json.dumps(verdict).encode()
                self.send(VERIFY_MAGIC + struct.pack(">I", len(body)) + body)
        except OSError:
            pass                # the source went away: nothing more to tell it
        self.rp.close()
        self.rp = None

    def stop(self) -> None:
        """Stop the guest, the fault thread and the userfaultfd (idempotent).  The order
        matters: a guest blocked on a page that will never come (the source is gone)
        only wakes when RAM is unregistered (its access then reads zeros), so the guest
        is told to stop first, RAM unregistered next, and only then is it joined; it
        never outlives this call, so RAM can be unmapped safely afterwards."""
        running = self.guest is not None and self.state == "running"
        if running:
            self.guest.request_stop()
        self._stop.set()
        if self._fault_thread is not None:
            self._fault_thread.join()
            self._fault_thread = None
        if self.uffd is not None:
            for start, end, _b in self._ranges:
                try:
                    self.uffd.unregister(start, end - start)
                except OSError:
                    pass
            self.uffd.close()
            self.uffd = None
        if running:
            try:
                self.guest.stop()
            except RuntimeError as exc:
                self.fault_error = self.fault_error or str(exc)
        if self.state in ("listening", "running"):
            self.state = "end"

    def received_hashes(self) -> dict[str, str]:
        """sha256 of each block as received: the content every page had when it arrived,
        before the destination's guest changed it."""
        return self._as_received.hashes(self.ram.blocks)

    def summary(self) -> dict[str, Any]:
        """The destination's postcopy statistics (QEMU's postcopy-blocktime in ms)."""
        blocked = sum(self.latencies)
        step = max(1, len(self.latencies) // MAX_SAMPLES)
        return {"state": self.state, "postcopy-requests": self.requests, "placed-pages": self.placed_pages,
                "discarded-pages": self.discarded_pages, "postcopy-blocktime": round(blocked * 1000, 3),
                "fault-latency": latency_summary(self.latencies),
                "fault-latencies-ms": [round(x * 1000, 3) for x in self.latencies[::step]],
                "guest-touched-pages": self._as_received.touched_pages,
                "fault-thread-error": self.fault_error, "npqfile-source": self.npqfile_source}


class DestinationGuest:
    """Wraps a Workload so that it can run on postcopy RAM: before its (GIL-holding, numpy)
    write of a page, the page is first read through ``first_touch`` with the GIL
    released, so a missing page faults there and waits for the source, not inside numpy
    with the GIL held (which would stop the fault thread from asking for the page)."""

    def __init__(self, workload: Any):
        self.workload = workload
        self.incoming: PostcopyIncoming | None = None
        workload.before_write = self._fault_in

    def _fault_in(self, block: Any, pages: np.ndarray) -> None:
        inc = self.incoming
        if inc is not None:
            for p in np.unique(pages).tolist():
                inc.first_touch(block, p)

    def start(self, ram: Any) -> None:
        self.workload.start(ram)

    def request_stop(self) -> None:
        """Ask the workload thread to end without waiting (it may be blocked on a fault)."""
        self.workload.request_stop()

    def stop(self) -> None:
        """End the workload thread and wait for it."""
        self.workload.stop()

    def describe(self) -> dict[str, Any]:
        return self.workload.describe()
