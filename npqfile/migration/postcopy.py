"""Postcopy: the guest moves to the destination before all of its RAM has, and pages it
touches there are fetched on demand (QEMU's ``migration/postcopy-ram.c`` and the
postcopy parts of ``savevm.c``, ``ram.c`` and ``migration.c``).

Supports both sides over any channel with a return path (a socketpair, ``tcp:``, ``unix:``):

- :class:`PostcopySource`, the source's postcopy phase of a
  :class:`~npqfile.migration.engine.MigrationEngine`.  At setup (``setup()``) it sends
  OPEN_RETURN_PATH, a PING and POSTCOPY_ADVISE before any RAM, and starts the
  return-path thread (``source_return_path_thread``).  When the engine decides to switch
  (``--postcopy-after N`` dirty syncs, or ``auto``), ``run()`` does ``postcopy_start``:
  stop the guest, sync the dirty bitmap, send POSTCOPY_RAM_DISCARD for every page still
  dirty (``ram_postcopy_send_discard_bitmap``), release the pages already sent with
  release-ram (``ram_postcopy_migrated_memory_release``), PING 2, then PACKAGED holding
  LISTEN, the device state, PING 3 and RUN.  Then pages go in the background, pages the
  destination asks for (REQ_PAGES / REQ_PAGES_ID) first, each page once; with
  release-ram every page is released once written (``put_buffer_async(may_free)``).  At
  the end: the RAM END section and EOF (``qemu_savevm_state_complete_postcopy``), and the
  outcome waits for the destination's SHUT.
- :class:`PostcopyIncoming`, the destination's command handler (``load_stream(...,
  postcopy=...)``): OPEN_RETURN_PATH opens the return path, PING answers PONG,
  POSTCOPY_ADVISE gets a userfaultfd and empties RAM (QEMU's ``postcopy_ram_incoming_init``),
  POSTCOPY_RAM_DISCARD drops pages that changed since they were sent, LISTEN registers
  every block for missing-page faults and starts the fault thread, RUN starts the
  destination's guest (a workload).  From LISTEN on, pages are placed atomically with
  UFFDIO_COPY / UFFDIO_ZEROPAGE; a guest access to a missing page blocks in the kernel
  while the fault thread asks the source for it on the return path.  At the end it sends
  SHUT; to an npqfile source (which announced itself with a PING of
  ``PING_NPQFILE_SOURCE``) and only then, npqfile's verification message follows SHUT
  (a QEMU source stops reading at SHUT, so the return path it reads holds QEMU's
  messages only).

Statistics: QEMU's ``postcopy-requests`` (source: page requests received), ``downtime``
(stop to package sent, as QEMU measures it in postcopy), ``postcopy-bytes``, and the
destination's ``postcopy-blocktime`` (ms its guest spent waiting on faults), plus what
QEMU lacks: the fault latency distribution (p50, p90, p99, max), RSS of the source as
postcopy proceeds (release-ram).

Failures: an I/O error on either channel once the destination may run the guest leaves
the guest split between the two sides: both report ``postcopy-paused`` (QEMU's status;
npqfile has no recovery, so the pause is final), a destination that reports an error
(SHUT 1, or a failed verdict) makes the source report ``failed``; never ``completed``.

Verification: the destination's guest writes pages as soon as they arrive, so its RAM
at the end is not the source's.  The destination keeps the content each page had when
its guest first touched it and hashes "RAM as received" (the pages as they arrived,
the guest's later writes left out): that must equal the source's RAM when it stopped.

Plan: protocol bytes live in ``npqfile.stream.return_path`` (pure), the userfaultfd in
``npqfile.ram.userfaultfd``; this module is the two state machines and their threads.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import mmap
import select
import struct
import threading
import time
from typing import Any

import numpy as np

from npqfile.channels import MemoryChannel
from npqfile.errors import StreamError
from npqfile.qemufile import QEMUFile
from npqfile.ram.userfaultfd import Userfaultfd
from npqfile.stream.constants import (
    MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PACKAGED, MIG_CMD_PING, MIG_CMD_POSTCOPY_ADVISE,
    MIG_CMD_POSTCOPY_LISTEN, MIG_CMD_POSTCOPY_RAM_DISCARD, MIG_CMD_POSTCOPY_RUN,
    QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART, TARGET_PAGE_SIZE,
)
from npqfile.stream.devices import none_machine_devices
from npqfile.stream.reader import shown
from npqfile.stream.return_path import (
    MIG_RP_MSG_PONG, MIG_RP_MSG_REQ_PAGES, MIG_RP_MSG_REQ_PAGES_ID, MIG_RP_MSG_SHUT,
    PING_BEFORE_PACKAGE, PING_IN_PACKAGE, PING_NPQFILE_SOURCE, ReturnPathParser, advise_payload,
    discard_payloads, parse_discard, rp_pong, rp_req_pages, rp_shut,
)
from npqfile.stream.savevm import SaveVMWriter

BACKGROUND_CHUNK = 64        # background pages between looks at the request queue
SHUT_TIMEOUT = 120.0         # seconds the source waits for the destination's SHUT
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


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) of every run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return [(int(s), int(e - s)) for s, e in zip(edges[0::2], edges[1::2])]


# =========================================================================================
# source
# =========================================================================================
class PostcopySource:
    """The postcopy phase of ``engine`` (a MigrationEngine whose params ask for postcopy).

    ``setup()`` after the stream header; ``run()`` instead of pre-copy completion.  The
    outcome goes into ``engine.stats`` (status ``completed``, ``postcopy-paused`` or
    ``failed``).  ``return_path`` is the return-path QEMUFile, positioned after SHUT (the
    session reads npqfile's verdict from it)."""

    def __init__(self, engine: Any):
        self.e = engine
        self.return_path: QEMUFile | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()      # (block, first page, count)
        self._queued = {b.name: np.zeros(b.n_pages, dtype=bool) for b in engine.ram.blocks}
        self._blocks = {b.name: b for b in engine.ram.blocks}
        self._last_block: Any = None
        self.requests = 0             # QEMU's postcopy-requests
        self.pages_requested = 0      # pages sent because the destination asked
        self.pongs = 0
        self.shut: int | None = None  # SHUT's value once received
        self.rp_error: str | None = None
        self._rp_done = threading.Event()
        self.active = False           # the package (with RUN) has been sent
        self._bytes0 = 0              # RAM bytes counted when postcopy began

    # -- setup: return path and advise ------------------------------------------------------
    def setup(self) -> None:
        """OPEN_RETURN_PATH, PING (npqfile's value), POSTCOPY_ADVISE; start the return-path
        thread.  OSError when the channel has no return path (postcopy needs one)."""
        e = self.e
        rp = e.f.get_return_path()
        if rp is None:
            raise OSError("postcopy needs a return path: use a socket transport (tcp:, unix:, in-process)")
        self.return_path = rp
        w = e.writer
        w.write_command(MIG_CMD_OPEN_RETURN_PATH)
        w.write_command(MIG_CMD_PING, struct.pack(">I", PING_NPQFILE_SOURCE))
        summary = 0
        for b in e.ram.blocks:
            summary |= b.page_size
        w.write_command(MIG_CMD_POSTCOPY_ADVISE, advise_payload(summary, TARGET_PAGE_SIZE))
        self._thread = threading.Thread(target=self._rp_thread, name="return-path", daemon=True)
        self._thread.start()

    # -- the return-path thread -------------------------------------------------------------
    def _rp_thread(self) -> None:
        """source_return_path_thread: read messages until SHUT, an error or the end."""
        parser = ReturnPathParser()
        rp = self.return_path
        head = bytearray(4)
        try:
            while True:
                if rp.get_buffer(head) != 4 or rp.get_error():
                    raise StreamError("return path closed before the destination sent SHUT", parser.offset, None)
                parser.feed(bytes(head))           # checks type and length before the payload
                n = struct.unpack_from(">H", head, 2)[0]
                body = bytearray(n)
                if n and (rp.get_buffer(body) != n or rp.get_error()):
                    raise StreamError("return path closed inside a message", parser.offset, None)
                for msg in parser.feed(bytes(body)):
                    if msg.type == MIG_RP_MSG_SHUT:
                        self.shut = msg.value
                        return
                    if msg.type == MIG_RP_MSG_PONG:
                        self.pongs += 1
                    elif msg.type in (MIG_RP_MSG_REQ_PAGES, MIG_RP_MSG_REQ_PAGES_ID):
                        self._request(msg)
        except (StreamError, OSError) as exc:
            self.rp_error = str(exc)
        finally:
            self._rp_done.set()

    def _request(self, msg: Any) -> None:
        """ram_save_queue_pages: check the request (QEMU's messages) and queue its pages,
        each page at most once (a flood of repeated requests costs no memory)."""
        if msg.type == MIG_RP_MSG_REQ_PAGES_ID:
            block = self._blocks.get(msg.block)
            if block is None:
                raise StreamError(f"return path: ram_save_queue_pages no block '{shown(msg.block)}'", msg.offset, None)
            self._last_block = block
        else:
            block = self._last_block
            if block is None:
                raise StreamError("return path: ram_save_queue_pages no previous block", msg.offset, None)
        ps = block.page_size
        if msg.start % ps or msg.length % ps or not msg.length:
            raise StreamError(f"return path: Misaligned page request, start: {msg.start:#x} len: {msg.length:#x}",
                              msg.offset, None)
        if msg.start + msg.length > block.size:
            raise StreamError(f"return path: ram_save_queue_pages request overrun, start={msg.start:#x} "
                              f"len={msg.length:#x} blocklen={block.size:#x} (block '{shown(block.name)}')",
                              msg.offset, None)
        self.requests += 1
        first, count = msg.start // ps, msg.length // ps
        with self._lock:
            q = self._queued[block.name]
            fresh = ~q[first:first + count]
            if fresh.any():
                q[first:first + count] = True
                self._queue.append((block, first, count))

    # -- postcopy_start and the background phase ---------------------------------------------
    def run(self, stop_t: float) -> None:
        """Switch to postcopy (the guest was stopped at ``stop_t``) and send the rest.
        Sets engine.stats.status; raises OSError for an I/O failure before the package
        was sent (the engine then reports ``failed``: the destination never ran)."""
        e, st, f = self.e, self.e.stats, self.e.f
        e._sync()                                   # ram_postcopy_send_discard_bitmap syncs first
        e._new_iteration(e._dirty, final=True)
        excluded = 0.0
        if e.hash_at_switchover:
            h0 = time.monotonic()
            e.switchover_hashes = {b.name: b.sha256() for b in e.ram.blocks}
            excluded = time.monotonic() - h0
        self._check_rp()
        w = e.writer
        discards = 0
        for b in e.ram.blocks:                      # pages dirtied since they were sent
            ranges = [(s * b.page_size, n * b.page_size) for s, n in _runs(e._bitmap[b.name])]
            for payload in discard_payloads(b.name, ranges):
                w.write_command(MIG_CMD_POSTCOPY_RAM_DISCARD, payload)
                discards += 1
        if e.params.release_ram:
            # ram_postcopy_migrated_memory_release: the destination has every clean page
            f.fflush()
            e._release_clean()
            e.saver.release_ram = True              # from now on each page is released once sent
        e.saver.xbzrle_enabled = False              # QEMU sends whole pages in postcopy
        e.saver.compress_level = None
        w.write_command(MIG_CMD_PING, struct.pack(">I", PING_BEFORE_PACKAGE))
        self._send_package()
        f.fflush()
        if f.get_error():
            raise f.error
        self.active = True
        self._bytes0 = e._ram_counted()
        st.status = "postcopy-active"
        st.downtime = time.monotonic() - stop_t - excluded     # QEMU: stop to package sent
        st.postcopy = {"discard-messages": discards, "switch-sync": st.dirty_sync_count}
        e._sample_rss()
        e._progress()
        f.set_rate_limit(0)                         # max-postcopy-bandwidth 0: unlimited
        try:
            self._background()
        except OSError as exc:
            self._pause(f"error: {exc}")
            return
        if self.rp_error is not None:
            self._pause(f"error: {self.rp_error}")
            return
        self._finish()

    def _send_package(self) -> None:
        """PACKAGED: LISTEN, the device state, PING 3, RUN, as one blob with its length."""
        e = self.e
        buf = MemoryChannel()
        pf = QEMUFile(buf)
        pw = SaveVMWriter(pf, machine=e.params.machine)
        pw.write_command(MIG_CMD_POSTCOPY_LISTEN)
        for se, payload, _desc in none_machine_devices(e.params.runstate):
            pw.write_full_section(se, payload)
        pw.write_command(MIG_CMD_PING, struct.pack(">I", PING_IN_PACKAGE))
        pw.write_command(MIG_CMD_POSTCOPY_RUN)
        pf.fflush()
        blob = buf.getvalue()
        pf.close()
        e.writer.write_command(MIG_CMD_PACKAGED, struct.pack(">I", len(blob)))
        e.f.put_buffer(blob)

    def _check_rp(self) -> None:
        if self.rp_error is not None:
            raise OSError(f"return path: {self.rp_error}")
        if self.shut is not None:
            raise OSError(f"the destination sent SHUT ({self.shut}) before the migration ended")

    def _background(self) -> None:
        """Requested pages first, then background pages, in PART sections of <= 50 ms."""
        from npqfile.migration.engine import MAX_WAIT
        e, f = self.e, self.e.f
        while e._dirty and self.rp_error is None and not e._cancel.is_set():
            deadline = time.monotonic() + MAX_WAIT
            with e._ram_section(QEMU_VM_SECTION_PART):
                while e._dirty and self.rp_error is None and time.monotonic() < deadline:
                    if self._serve_requests():
                        f.fflush()                  # a faulting guest waits for these
                    e._send_some(BACKGROUND_CHUNK, False)
                    if f.get_error():
                        raise f.error
                e.saver.write_eos()
            st = e.stats
            st.part_sections += 1
            e._sample_rss()
            e._progress()
        if e._cancel.is_set():
            raise OSError("migrate_cancel during postcopy")

    def _serve_requests(self) -> int:
        """Send the still-dirty pages of every queued request; returns pages sent."""
        e = self.e
        sent = 0
        while True:
            with self._lock:
                if not self._queue:
                    return sent
                block, first, count = self._queue.popleft()
                self._queued[block.name][first:first + count] = False
            bm = e._bitmap[block.name]
            idx = np.flatnonzero(bm[first:first + count]) + first
            if not idx.size:
                continue                            # already sent in the background
            n = e.saver.save_pages(block, idx)
            if e.saver.release_ram:
                e._release_zero(block, idx[:n][e.saver.sent_zero])
            bm[idx[:n]] = False
            e._dirty -= n
            sent += n
            self.pages_requested += n

    def _finish(self) -> None:
        """qemu_savevm_state_complete_postcopy, then wait for SHUT."""
        e, st, f = self.e, self.e.stats, self.e.f
        with e._ram_section(QEMU_VM_SECTION_END):
            e.saver.write_eos()
            e._uncounted += 8
        e.writer.write_eof()
        f.fflush()
        if f.get_error():
            self._pause(f"error: {f.error}")
            return
        e._close_iteration()
        if not self._rp_done.wait(SHUT_TIMEOUT):
            self._pause(f"error: no SHUT from the destination within {SHUT_TIMEOUT:g} s")
            return
        if self.rp_error is not None:
            self._pause(f"error: {self.rp_error}")
        elif self.shut:
            st.status, st.outcome = "failed", f"error: the destination reported an error (SHUT {self.shut})"
        else:
            st.status, st.outcome = "completed", "postcopy"

    def await_close(self) -> None:
        """await_return_path_close_on_source after a pre-copy completion: wait for SHUT;
        a destination error (SHUT 1) or a broken return path fails the migration."""
        st = self.e.stats
        self.e.f.fflush()
        if not self._rp_done.wait(SHUT_TIMEOUT):
            st.status, st.outcome = "failed", f"error: no SHUT from the destination within {SHUT_TIMEOUT:g} s"
        elif self.rp_error is not None:
            st.status, st.outcome = "failed", f"error: return path: {self.rp_error}"
        elif self.shut:
            st.status, st.outcome = "failed", f"error: the destination reported an error (SHUT {self.shut})"

    def _pause(self, why: str) -> None:
        st = self.e.stats
        st.status = "postcopy-paused"
        st.outcome = (f"{why}; the guest is split between source and destination (QEMU: postcopy-paused; "
                      f"npqfile cannot recover it)")
        self.e.f.shutdown()

    def summary(self) -> dict[str, Any]:
        """The source's postcopy statistics."""
        return {"postcopy-requests": self.requests,
                "postcopy-bytes": self.e._ram_counted() - self._bytes0 if self.active else 0,
                "pages-requested-sent": self.pages_requested,
                "pongs": self.pongs, "shut": self.shut, "return-path-error": self.rp_error}

    def close(self) -> None:
        """Stop the return-path thread (shutting the connection down if it still runs)
        and close the return path."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self.e.f.channel.shutdown(True, True)
            except (OSError, AttributeError, TypeError):
                pass
            self._thread.join(5.0)
        rp, self.return_path = self.return_path, None
        if rp is not None:
            try:
                rp.close()
            except ValueError:
                pass            # already closed by whoever read the verdict


# =========================================================================================
# destination
# =========================================================================================
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
        self._first_seen: dict[tuple[str, int], bytes] = {}
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
        if summary & ~TARGET_PAGE_SIZE:
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
        r = loader.r
        if self.state not in ("advise", "discard"):
            raise r.error(f"CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state ({self.state})")
        try:
            name, ranges = parse_discard(data)
        except ValueError as exc:
            raise r.error(str(exc)) from None
        block = self._block(name, loader)
        for start, length in ranges:
            if start % block.page_size or length % block.page_size or start + length > block.size:
                raise r.error(f"ram_discard_range: range {start:#x}+{length:#x} is not whole pages inside "
                              f"block '{shown(name)}' ({block.size:#x} bytes)")
        if ranges:
            block.release(ranges)
        self.discarded_pages += sum(n for _s, n in ranges) // block.page_size
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
                if not select.select([fd], [], [], 0.05)[0]:
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
        """Read the page with the GIL released (a missing page blocks here until placed) and
        keep its content as received, for verification."""
        key = (block.name, page)
        if key in self._first_seen:
            return
        buf = ctypes.create_string_buffer(block.page_size)
        ctypes.memmove(buf, block.address + page * block.page_size, block.page_size)
        self._first_seen[key] = buf.raw

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
        if self.guest is not None and self.state == "running":
            try:
                self.guest.stop()
            except RuntimeError as exc:
                self.fault_error = self.fault_error or str(exc)
        self._stop.set()
        if self._fault_thread is not None:
            self._fault_thread.join(5.0)
            self._fault_thread = None
        if self.uffd is not None:
            for start, end, _b in self._ranges:
                try:
                    self.uffd.unregister(start, end - start)
                except OSError:
                    pass
            self.uffd.close()
            self.uffd = None
        if self.state in ("listening", "running"):
            self.state = "end"

    def received_hashes(self) -> dict[str, str]:
        """sha256 of each block as received: the content every page had when it arrived,
        before the destination's guest changed it."""
        out = {}
        ram = self.ram
        for b in ram.blocks:
            h = hashlib.sha256()
            ps = b.page_size
            mine = sorted(p for (name, p) in self._first_seen if name == b.name)
            pos = 0
            mv = memoryview(b.array)
            for p in mine:
                h.update(mv[pos * ps:p * ps])
                h.update(self._first_seen[(b.name, p)])
                pos = p + 1
            h.update(mv[pos * ps:])
            out[b.name] = h.hexdigest()
        return out

    def summary(self) -> dict[str, Any]:
        """The destination's postcopy statistics (QEMU's postcopy-blocktime in ms)."""
        blocked = sum(self.latencies)
        step = max(1, len(self.latencies) // MAX_SAMPLES)
        return {"state": self.state, "postcopy-requests": self.requests, "placed-pages": self.placed_pages,
                "discarded-pages": self.discarded_pages, "postcopy-blocktime": round(blocked * 1000, 3),
                "fault-latency": latency_summary(self.latencies),
                "fault-latencies-ms": [round(x * 1000, 3) for x in self.latencies[::step]],
                "guest-touched-pages": len(self._first_seen),
                "fault-thread-error": self.fault_error, "npqfile-source": self.npqfile_source}


class DestinationGuest:
    """Wraps a Workload so that it can run on postcopy RAM: before its (GIL-holding, numpy)
    write of a page, the page is first read through ``first_touch`` with the GIL
    released, so a missing page faults there and waits for the source, not inside numpy
    with the GIL held (which would stop the fault thread from asking for the page)."""

    def __init__(self, workload: Any):
        self.workload = workload
        self.incoming: PostcopyIncoming | None = None
        original = workload._write

        def guarded(block: Any, pages: np.ndarray) -> None:
            inc = self.incoming
            if inc is not None:
                for p in np.unique(pages).tolist():
                    inc.first_touch(block, p)
            original(block, pages)
        workload._write = guarded

    def start(self, ram: Any) -> None:
        self.workload.start(ram)

    def stop(self) -> None:
        self.workload.stop()

    def describe(self) -> dict[str, Any]:
        return self.workload.describe()
