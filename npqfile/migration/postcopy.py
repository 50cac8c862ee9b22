"""Postcopy's source (QEMU's ``postcopy_start`` in ``migration.c``, the postcopy parts of
``ram.c`` and ``savevm.c``, and ``source_return_path_thread``): the guest moves to the
destination before all of its RAM has; pages it touches there are fetched on demand.

Supports :class:`PostcopySource`, the postcopy phase of a
:class:`~npqfile.migration.engine.MigrationEngine`, over any channel with a return path
(a socketpair, ``tcp:``, ``unix:``).  ``setup()`` sends OPEN_RETURN_PATH, a PING and
POSTCOPY_ADVISE before any RAM and starts the return-path thread.  When the engine
switches (``--postcopy-after N`` dirty syncs, or ``auto``), ``run()`` is
``postcopy_start``: sync the dirty bitmap of the stopped guest, send
POSTCOPY_RAM_DISCARD for every page still dirty (``ram_postcopy_send_discard_bitmap``),
with release-ram release every page already sent (``ram_postcopy_migrated_memory_release``),
PING 2, then PACKAGED holding LISTEN, the device state, PING 3 and RUN.  Then pages go
in PART sections in the background, the pages the destination asks for (REQ_PAGES_ID /
REQ_PAGES) first, each page once; with release-ram each page is released once written
(``put_buffer_async(may_free)``).  At the end the RAM END section and EOF
(``qemu_savevm_state_complete_postcopy``), and the outcome waits for the destination's
SHUT.  The destination side is ``npqfile.migration.postcopy_ram``.

Statistics: QEMU's ``postcopy-requests`` (requests received), ``postcopy-bytes`` and
``downtime`` (stop to package sent, as QEMU measures it in postcopy).

Failures: once the package is sent the destination may run the guest, so an I/O error
on either channel, a broken return path or a hostile message leaves the guest split:
the status is ``postcopy-paused`` (QEMU's; npqfile has no recovery, so the pause is
final) and the outcome says so; a destination that reports an error (SHUT 1) gives
``failed``; before the package, errors give ``failed``.  Never ``completed``.

Plan: protocol bytes live in ``npqfile.stream.return_path`` (pure); the RAM side is the
engine's ``rs`` (``npqfile.migration.ram.RAMState``: bitmap, dirty count, saver, sections,
counters), used through its public methods as pre-copy uses them, so pre-copy is
unchanged; of the engine itself only its public ``f``, ``writer``, ``params``, ``stats``,
``ram``, ``hash_at_switchover`` / ``switchover_hashes`` and ``report_progress()``.
"""

from __future__ import annotations

import collections
import struct
import threading
import time
from typing import Any

import numpy as np

from npqfile.channels import MemoryChannel
from npqfile.errors import StreamError
from npqfile.migration.release_ram import POSTCOPY, may_release
from npqfile.qemufile import QEMUFile
from npqfile.ram.runs import mask_runs
from npqfile.stream.constants import (
    MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PACKAGED, MIG_CMD_PING, MIG_CMD_POSTCOPY_ADVISE,
    MIG_CMD_POSTCOPY_LISTEN, MIG_CMD_POSTCOPY_RAM_DISCARD, MIG_CMD_POSTCOPY_RUN, MIG_RP_MSG_PONG,
    MIG_RP_MSG_REQ_PAGES, MIG_RP_MSG_REQ_PAGES_ID, MIG_RP_MSG_SHUT, QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART,
    TARGET_PAGE_SIZE,
)
from npqfile.stream.devices import machine_devices
from npqfile.stream.reader import shown
from npqfile.stream.return_path import (
    PING_BEFORE_PACKAGE, PING_IN_PACKAGE, PING_NPQFILE_SOURCE, ReturnPathParser, advise_payload,
    discard_payloads,
)
from npqfile.stream.savevm import SaveVMWriter

BACKGROUND_CHUNK = 64        # background pages between looks at the request queue
SHUT_TIMEOUT = 120.0         # seconds the source waits for the destination's SHUT


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
        self._last_sync_dirty: int | None = None

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
    def due(self, synced: bool) -> bool:
        """migrate-start-postcopy as guestperf issues it: once dirty-sync-count exceeds
        ``postcopy_after``; with ``auto``, at the first sync whose dirty pages did not
        shrink since the previous sync (pre-copy stopped making progress).  Returns
        whether to switch now (the pre-copy loop asks after each look at the bitmap)."""
        e = self.e
        pa = e.params.postcopy_after
        if pa != "auto":
            return e.stats.dirty_sync_count > pa
        if not synced:
            return False
        last, self._last_sync_dirty = self._last_sync_dirty, e.rs.dirty
        return last is not None and e.rs.dirty >= last

    def run(self, stop_t: float) -> None:
        """Switch to postcopy (the guest was stopped at ``stop_t``) and send the rest.
        Sets engine.stats.status; raises OSError for an I/O failure before the package
        was sent (the engine then reports ``failed``: the destination never ran)."""
        e, st, f, rs = self.e, self.e.stats, self.e.f, self.e.rs
        excluded = e.switchover_sync()              # ram_postcopy_send_discard_bitmap syncs first
        self._check_rp()
        w = e.writer
        w.switchover_start()                        # QEMU 10.0's postcopy_start sends it first
        discards = 0
        for b in e.ram.blocks:                      # pages dirtied since they were sent
            runs = mask_runs(rs.bitmap[b.name])
            runs[:, 1] -= runs[:, 0]                # (first page, pages) -> bytes below
            for payload in discard_payloads(b.name, runs * b.page_size):
                w.write_command(MIG_CMD_POSTCOPY_RAM_DISCARD, payload)
                discards += 1
        # QEMU sends whole pages in postcopy (save_xbzrle_page: not in postcopy): without
        # its cache the saver never XBZRLE-encodes again, even when its search wraps
        rs.saver.cache = None
        rs.saver.xbzrle_enabled = False
        rs.saver.compress_level = None
        w.write_command(MIG_CMD_PING, struct.pack(">I", PING_BEFORE_PACKAGE))
        self._send_package()
        f.fflush()
        if f.get_error():
            raise f.error
        self.active = True
        if e.params.release_ram:
            # ram_postcopy_migrated_memory_release, as in QEMU's postcopy_start only once the
            # package (LISTEN, devices, RUN) is written: a switch that failed to go out must
            # leave the source its RAM.  The destination now has every clean page.
            rs.release_clean()
            rs.saver.release_ram = may_release(POSTCOPY)[0]  # from now on each page is released once sent
        self._bytes0 = rs.transferred()
        st.status = "postcopy-active"
        st.downtime = time.monotonic() - stop_t - excluded     # QEMU: stop to package sent
        st.postcopy = {"discard-messages": discards, "switch-sync": st.dirty_sync_count}
        e.report_progress()
        f.set_rate_limit(0)                         # max-postcopy-bandwidth 0: unlimited
        try:
            self._background()
        except OSError as exc:
            self._pause(f"error: {exc}")
            return
        if self.rp_error is not None:
            self._pause(f"error: {self.rp_error}")
            return
        if self.shut is not None and rs.dirty:
            # the destination gave up (SHUT 1: RP: Sibling indicated error) with pages unsent
            st.status = "failed"
            st.outcome = (f"error: the destination ended the migration (SHUT {self.shut}) with {rs.dirty} pages "
                          f"not sent; the guest is split between source and destination")
            e.f.shutdown()
            return
        self._finish()

    def _send_package(self) -> None:
        """PACKAGED: LISTEN, the device state, PING 3, RUN, as one blob with its length."""
        e = self.e
        buf = MemoryChannel()
        pf = QEMUFile(buf)
        pw = SaveVMWriter(pf, machine=e.params.machine, qemu_version=e.params.qemu_version)
        pw.write_command(MIG_CMD_POSTCOPY_LISTEN)
        for se, payload, _desc in machine_devices(e.params.qemu_version, e.params.runstate):
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
        from npqfile.migration.ram import MAX_WAIT
        e, f, rs = self.e, self.e.f, self.e.rs
        while rs.dirty and self.rp_error is None and self.shut is None and not rs.cancel.is_set():
            deadline = time.monotonic() + MAX_WAIT
            with rs.ram_section(QEMU_VM_SECTION_PART):
                while rs.dirty and self.rp_error is None and time.monotonic() < deadline:
                    if self._serve_requests():
                        f.fflush()                  # a faulting guest waits for these
                    rs.find_and_save(BACKGROUND_CHUNK, False)
                    if f.get_error():
                        raise f.error
                rs.write_eos()
            st = e.stats
            st.part_sections += 1
            e.report_progress()
        if rs.cancel.is_set():
            raise OSError("migrate_cancel during postcopy")

    def _serve_requests(self) -> int:
        """Send the still-dirty pages of every queued request; returns pages sent."""
        rs = self.e.rs
        sent = 0
        while True:
            with self._lock:
                if not self._queue:
                    return sent
                block, first, count = self._queue.popleft()
                self._queued[block.name][first:first + count] = False
            idx = np.flatnonzero(rs.bitmap[block.name][first:first + count]) + first
            if not idx.size:
                continue                            # already sent in the background
            n = rs.save_pages(block, idx)           # released once sent under release-ram
            sent += n
            self.pages_requested += n

    def _finish(self) -> None:
        """qemu_savevm_state_complete_postcopy, then wait for SHUT."""
        e, st, f, rs = self.e, self.e.stats, self.e.f, self.e.rs
        with rs.ram_section(QEMU_VM_SECTION_END):
            rs.write_eos(counted=False)             # not in ram_counters.transferred
        e.writer.write_eof()
        f.fflush()
        if f.get_error():
            self._pause(f"error: {f.error}")
            return
        rs.close_iteration()
        if not self._rp_done.wait(SHUT_TIMEOUT):
            self._pause(f"error: no SHUT from the destination within {SHUT_TIMEOUT:g} s")
            return
        if self.rp_error is not None:
            self._pause(f"error: {self.rp_error}")
        elif self.shut:
            st.status, st.outcome = "failed", f"error: the destination reported an error (SHUT {self.shut})"
        else:
            # "postcopy", or "postcopy: max-iterations" when auto switched at a limit
            st.status, st.outcome = "completed", st.outcome if st.outcome.startswith("postcopy") else "postcopy"

    def await_close(self) -> None:
        """await_return_path_close_on_source after a pre-copy completion: wait for SHUT;
        a destination error (SHUT 1) or a broken return path fails the migration."""
        st = self.e.stats
        self.e.f.fflush()
        deadline = time.monotonic() + SHUT_TIMEOUT
        while not self._rp_done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self.e.rs.cancel.is_set():
                # migrate_cancel while QEMU's source is still in ``device`` (awaiting the
                # return path's close): cancelled; the guest and its RAM stay here
                st.status, st.converged, st.outcome = "cancelled", False, "cancelled while waiting for SHUT"
                self.e.f.shutdown()
                return
            if time.monotonic() >= deadline:
                break
        if not self._rp_done.is_set():
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
                "postcopy-bytes": self.e.rs.transferred() - self._bytes0 if self.active else 0,
                "pages-requested-sent": self.pages_requested,
                "pongs": self.pongs, "shut": self.shut, "return-path-error": self.rp_error}

    def close(self) -> None:
        """Stop the return-path thread (shutting the connection down if it still runs)
        and close the return path."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self.e.f.channel.shutdown(True, True)
            except (OSError, AttributeError, TypeError, ValueError):
                pass            # already closed: the thread then ends on its own
            self._thread.join(5.0)
        rp, self.return_path = self.return_path, None
        if rp is not None:
            try:
                rp.close()
            except ValueError:
                pass            # already closed by whoever read the verdict
