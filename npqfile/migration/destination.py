"""The incoming side of a migration: load a stream into a GuestRAM and report what arrived.

Supports: :class:`Destination` -- ``receive(channel)`` loads a whole QEMU stream (any
read channel: the other end of a socketpair, an accepted TCP/Unix connection, a file,
an ``exec:`` command's output) into its own GuestRAM with
:func:`~npqfile.stream.loader.load_stream`, checks the machine name as QEMU does
(``Machine type received is 'X' and local is 'Y'``), hashes every block (sha256) and,
when the connection has a return path, sends the verdict back; ``start(channel)`` does
the same in a thread (the in-process destination).  :func:`block_hashes` is shared with
the source, which hashes its RAM at switchover.

The verification message (not QEMU's; sent only AFTER the QEMU stream has ended, so the
stream bytes stay QEMU's): ``b"NPQV"``, be32 length, then that many bytes of UTF-8 JSON
``{"status": "completed"|"failed", "error": str|null, "hashes": {block: sha256 hex},
"load-time": seconds, "hash-time": seconds}``.  QEMU itself opens a return path only with its capability; a
real QEMU source never reads this, a real QEMU destination never sends it (the npqfile
source then reports the migration as not verified).  When the stream opened QEMU's return
path (OPEN_RETURN_PATH: postcopy, see ``postcopy_ram``) that path carries QEMU's messages
(PONG, REQ_PAGES, SHUT) and the verdict follows SHUT only for an npqfile source.

Goals: a failure is a result (``status``/``error``), never an exception lost in a thread.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from npqfile.channels.base import wait_readable
from npqfile.errors import FileError, StreamError
from npqfile.migration import postcopy_ram
from npqfile.qemufile import READ_AHEAD, QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream.device_tail import DEFAULT_DEVICE_TAIL_BYTES
from npqfile.stream.loader import load_stream
from npqfile.stream.ram_hash import LoadHasher
from npqfile.stream.ram_loader import DEFAULT_MAX_RAM_BYTES

VERIFY_MAGIC = b"NPQV"
MAX_VERIFY_BYTES = 1 << 20
JOIN_POLL = 0.05                # seconds between two looks at join()'s cancel fd


def _no_multifd(offset: int, eos: bool = False) -> None:
    """A destination without multifd channels meets RAM_SAVE_FLAG_MULTIFD_FLUSH: the pages
    travel on channels nobody reads (the source would wait for them forever)."""
    if not eos:
        raise StreamError("the source migrates with multifd (RAM_SAVE_FLAG_MULTIFD_FLUSH): its pages travel "
                          "on multifd channels; give incoming --multifd-channels N", offset - 8, "ram")


def block_hashes(ram: GuestRAM) -> dict[str, str]:
    """sha256 hex digest of every block, by block name."""
    return {b.name: b.sha256() for b in ram.blocks}


@dataclass
class DestinationResult:
    """What the destination loaded; ``status`` is ``completed`` or ``failed`` (see ``error``)."""
    status: str = "active"
    error: str | None = None
    machine: str | None = None
    load_time: float = 0.0          # seconds from the start of receive() to the end of the stream
    hash_time: float = 0.0          # seconds spent hashing the blocks afterwards
    hashes: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    bytes: int = 0
    stats_multifd: dict = field(default_factory=dict)
    postcopy: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {"status": self.status, "error": self.error, "machine": self.machine,
               "load-time": round(self.load_time, 6), "hash-time": round(self.hash_time, 6), "hashes": self.hashes, "bytes": self.bytes,
               "ram": self.stats, "warnings": self.warnings} | ({"multifd": self.stats_multifd} if self.stats_multifd else {})
        return out | ({"postcopy": self.postcopy} if self.postcopy else {})


class Destination:
    """Loads one incoming migration into ``ram`` (or a GuestRAM created from the stream's
    block list, at most ``max_ram_bytes``).  ``machine``: the expected machine name (None:
    any).  ``hash_blocks``: compute the per-block sha256 after loading (needed by remote
    sources).  ``device_tail_bytes``: device sections after the RAM (a real QEMU's) are
    kept, up to this many bytes, until the vmdesc after EOF sizes them."""

    def __init__(self, ram: GuestRAM | None = None, *, machine: str | None = "none",
                 max_ram_bytes: int = DEFAULT_MAX_RAM_BYTES, hash_blocks: bool = True,
                 device_tail_bytes: int = DEFAULT_DEVICE_TAIL_BYTES, multifd: Any = None, guest: Any = None,
                 max_ram_name: str = "max_ram_bytes"):
        self.guest = guest              # a Workload run on this RAM from POSTCOPY_RUN on
        self.ram = ram
        self.device_tail_bytes = device_tail_bytes   # device state kept until the vmdesc sizes it
        self.multifd = multifd          # a MultiFDRecv whose channels are open (npqfile.migration.multifd)
        self.machine = machine
        self.max_ram_bytes = max_ram_bytes
        self.max_ram_name = max_ram_name    # what errors call the limit (the CLI: --max-ram)
        self.hash_blocks = hash_blocks
        self.result = DestinationResult()
        self._thread: threading.Thread | None = None
        self.file: QEMUFile | None = None

    def receive(self, channel: Any, *, reply: bool = True) -> DestinationResult:
        """Load the stream from the read channel ``channel`` and close it.  With ``reply``
        and a return path, send the verification message.  Returns the result (a bad
        stream or I/O error gives ``status="failed"`` and ``error``, not an exception)."""
        res = self.result
        t0 = time.monotonic()
        f = self.file = QEMUFile(channel, read_ahead=READ_AHEAD)      # self.file: for live polls (events)
        pc = postcopy_ram.PostcopyIncoming(f, postcopy_ram.DestinationGuest(self.guest) if self.guest is not None else None)
        # Hash blocks while they load when only the main stream writes RAM and no source
        # waits on a return path (with one, the source is still sending meanwhile and a
        # hashing thread would take its CPU).
        overlap = (self.hash_blocks and self.multifd is None and self.guest is None
                   and not callable(getattr(channel, "get_return_path", None)))
        hasher = LoadHasher() if overlap else None
        try:
            mf = self.multifd
            # the machine type is checked at the configuration section, as QEMU does:
            # a mismatch fails before any RAM is read, and closing makes the source stop
            loaded = load_stream(f, self.ram, max_ram_bytes=self.max_ram_bytes, max_ram_name=self.max_ram_name,
                                 machine=self.machine, device_tail_bytes=self.device_tail_bytes,
                                 on_multifd_flush=mf.main_record if mf is not None else _no_multifd,
                                 postcopy=pc, hasher=hasher)
            if mf is not None:
                mf.finish()            # every channel ended cleanly after its last SYNC
                res.stats_multifd = mf.stats()
            res.bytes = f.tell()
            self.ram = loaded.ram
            res.machine = loaded.machine
            res.warnings = list(loaded.warnings)
            res.stats = {k: v for k, v in loaded.stats.as_dict().items() if k != "parts"}
            res.load_time = time.monotonic() - t0
            pc.stop()          # postcopy: the guest stops, RAM is unregistered
            if (self.hash_blocks or pc.ram is not None) and self.ram is not None:
                h0 = time.monotonic()
                # postcopy: RAM as received (the guest has written to it since)
                res.hashes = (pc.received_hashes() if pc.ram is not None
                              else hasher.digests(self.ram) if hasher is not None else block_hashes(self.ram))
                res.hash_time = time.monotonic() - h0
            res.status = "completed"
        except (StreamError, FileError, OSError, ValueError, KeyError) as exc:
            if self.multifd is not None:
                # a channel's own error explains a main stream cut short by it
                exc = self.multifd.error or exc
                self.multifd.close()
            res.status, res.error = "failed", str(exc)
            res.bytes = f.tell()            # what was received before the failure, not 0
            if pc.state in ("listening", "running"):
                # the source may still hold pages the guest here needs: the guest is split
                res.status = "postcopy-paused"
                res.error += "; the guest is split between source and destination (QEMU: postcopy-paused)"
            res.load_time = time.monotonic() - t0
        finally:
            if hasher is not None:
                hasher.close()
        if pc.ram is not None or pc.rp is not None:
            res.postcopy = pc.summary()
        if pc.rp is not None:
            # QEMU's return path: SHUT, then npqfile's verdict only to an npqfile source
            pc.finish(res.status == "completed", self._verdict() if reply else None)
        else:
            pc.stop()
            if reply:
                self._reply(f)
        f.close()
        return res

    def _verdict(self) -> dict:
        res = self.result
        return {"status": res.status, "error": res.error, "hashes": res.hashes, "load-time": res.load_time,
                "hash-time": res.hash_time, "postcopy": res.postcopy}

    def _reply(self, f: QEMUFile) -> None:
        """Send the verification message on the return path, if there is one."""
        try:
            rp = f.get_return_path()
        except OSError:
            return
        if rp is None:
            return
        body = json.dumps(self._verdict()).encode()
        rp.put_buffer(VERIFY_MAGIC + struct.pack(">I", len(body)) + body)
        rp.fflush()
        rp.close()   # errors here mean the source went away; nothing more to tell it

    # -- in-process (thread) -----------------------------------------------------------
    def start(self, channel: Any) -> None:
        """``receive(channel, reply=False)`` in a daemon thread; ``join()`` for the result."""
        self._thread = threading.Thread(target=self.receive, args=(channel,), kwargs={"reply": False},
                                        name="migration-destination", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None, cancel_fd: int | None = None) -> DestinationResult | None:
        """Wait up to ``timeout`` seconds (None: no limit) for the thread.  Returns the
        result (a thread still running after ``timeout`` gives a failed one), or None
        when ``cancel_fd`` (e.g. ``MigrationControl.wait_fd()``) became readable first:
        the thread then still runs and still uses this destination's RAM.  The thread's
        end is seen at once; a cancel within JOIN_POLL (no descriptor of our own: a join
        given up leaves nothing to close)."""
        t = self._thread
        if t is None:
            return self.result
        deadline = None if timeout is None else time.monotonic() + timeout
        while t.is_alive():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.result.status, self.result.error = "failed", f"destination still loading after {timeout} s"
                return self.result
            if cancel_fd is None:
                t.join(left)
            elif wait_readable([cancel_fd], 0):
                return None
            else:
                t.join(JOIN_POLL if left is None else min(JOIN_POLL, left))
        return self.result

    @property
    def running(self) -> bool:
        """The in-process thread is still loading (or hashing)."""
        return self._thread is not None and self._thread.is_alive()


def read_verification(f: QEMUFile) -> dict[str, Any] | None:
    """Read the destination's verification message from the return-path QEMUFile ``f``.
    Returns the decoded dict, or None when the peer closed without sending one (not an
    npqfile destination).  Raises StreamError for a malformed message."""
    head = bytearray(8)
    if f.get_buffer(head) != 8:
        return None
    if bytes(head[:4]) != VERIFY_MAGIC:
        raise StreamError(f"return path: expected the {VERIFY_MAGIC!r} verification message, got {bytes(head[:4])!r}")
    (n,) = struct.unpack(">I", head[4:])
    if n > MAX_VERIFY_BYTES:
        raise StreamError(f"return path: verification message of {n} bytes (at most {MAX_VERIFY_BYTES})")
    body = bytearray(n)
    if f.get_buffer(body) != n:
        raise StreamError("return path: verification message truncated")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise StreamError(f"return path: verification message is not JSON: {exc}") from None
