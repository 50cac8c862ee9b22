"""The source's multifd channels as QEMU 10.0 drives them, and the hooks of the engine.

Supports: :class:`MultiFDSend` (``multifd_send_setup`` / ``multifd_send`` /
``multifd_send_sync_main``: one thread per channel writes the 64-byte greeting, then RAM
packets handed to the next idle channel round robin, SYNC packets on request; zero-page
detection ``multifd`` in the channel threads, ``legacy`` on the main channel, ``none``;
compression none / zlib / zstd; per-channel byte counts and QEMU's ``multifd-bytes``
including greetings and headers, as QEMU 10.0 counts them), :func:`connect_channels`
(the extra connections to a ``tcp:``/``unix:`` URI), and the small hooks the engine and
session call: :class:`AccountedFile` (the rate limiter sees the channels' bytes),
:func:`save_pages_multifd` (``ram_save_target_page_multifd``),
:func:`multifd_stats`, :func:`multifd_inprocess`, :func:`multifd_connect`.  The
destination's side is ``npqfile.migration.multifd_recv`` (re-exported here).

Goals: the source uses more than one core (numpy, zlib, zstd and socket calls release
the GIL); a failure on any channel fails the migration naming the channel, never a hang
(a failed thread wakes the main thread, a cancel ends a wait for a busy channel,
``close`` shuts the sockets down).  Protocol details are in ``npqfile.stream.multifd``.
"""

from __future__ import annotations

import itertools
import socket
import threading
from typing import Any

import numpy as np

from npqfile.buffers import PageRun, address_of
from npqfile.channels import iovec
from npqfile.migration.multifd_recv import (
    CHANNEL_TIMEOUT, MultiFDRecv, accept_channels, close_channels, peek_magic,
)
from npqfile.migration.options import migrate_params_check, migration_channels_and_transport_compatible
from npqfile.ram.bufferiszero import buffer_is_zero
from npqfile.stream.multifd import MULTIFD_FLAG_SYNC, PageCodec, encode_init, encode_packet, page_count, \
    partition_zero_pages

__all__ = ["CHANNEL_TIMEOUT", "AccountedFile", "MultiFDRecv", "MultiFDSend", "accept_channels",
           "connect_channels", "multifd_connect", "multifd_inprocess", "multifd_stats", "peek_magic",
           "save_pages_multifd", "start_send"]

# -- the source ---------------------------------------------------------------------------
class _SendChannel:
    def __init__(self, owner: MultiFDSend, cid: int, channel: Any, codec: PageCodec):
        self.owner, self.id, self.channel, self.codec = owner, cid, channel, codec
        self.sem = threading.Semaphore(0)
        self.sem_sync = threading.Semaphore(0)
        self.job: Any = None
        self.pending_sync = False
        self.bytes = 0
        self.packets = 0
        self.normal = 0
        self.zero = 0
        self.thread = threading.Thread(target=self._run, name=f"mig/src/send_{cid}", daemon=True)
        # a socket channel takes native iovecs: a packet's pages need no Python object each
        self.native = getattr(channel, "writev_iov", None) if iovec.available() else None

    def _write(self, buffers: list) -> None:
        n = self.channel.writev(buffers, self.bytes)
        self.bytes += n

    def _run(self) -> None:
        o = self.owner
        try:
            self._write([encode_init(self.id, o.uuid)])
            while True:
                o._ready.release()
                self.sem.acquire()
                if o.exiting:
                    return
                if self.job is not None:
                    block, offs = self.job
                    self._send_pages(block, offs)
                    self.job = None
                else:
                    self._write([encode_packet(flags=MULTIFD_FLAG_SYNC, packet_num=next(o._packet_num),
                                               page_size=o.page_size)])
                    self.packets += 1
                    self.pending_sync = False
                    self.sem_sync.release()
        except Exception as exc:        # a thread's end must reach the main thread, whatever ended it
            o._fail(f"multifd channel {self.id}, writing at offset {self.bytes}: {exc}")
            o._ready.release()
            self.sem_sync.release()

    def _send_pages(self, block, offs: np.ndarray) -> None:
        o, ps = self.owner, self.owner.page_size
        if o.zero_page_detection == "multifd":
            offs, normal = partition_zero_pages(offs, buffer_is_zero(block.pages, offs // ps))
        else:
            normal = offs.size
        run = PageRun(block.array, offs[:normal], ps)
        if self.codec.flag and normal:
            data = [self.codec.compress(run[:])]
            size = len(data[0])
        else:
            data, size = run, normal * ps
        head = encode_packet(flags=self.codec.flag, packet_num=next(o._packet_num), ramblock=block.name,
                             offsets=offs, normal_pages=normal, next_packet_size=size, page_size=ps)
        if data is run and self.native is not None:
            # the packet as one writev of native iovecs: header, then each page in place
            iov = iovec.iovec_array(1 + normal)
            iov[0] = (address_of(memoryview(head)), len(head))
            iov[1:, 0] = run.offsets + np.uint64(run.address())
            iov[1:, 1] = ps
            self.bytes += self.native(iov, len(head) + size, self.bytes)
        else:
            self._write([head, *(run[:] if data is run else data)])
        self.packets += 1
        self.normal += normal
        self.zero += offs.size - normal


class MultiFDSend:
    """The source's multifd channels over the writable channels ``channels`` (their
    index is the channel id).  ``queue_pages`` / ``flush_and_sync`` / ``close``; raise
    OSError naming the channel once any channel failed."""

    def __init__(self, channels: list, *, compression: str = "none", level: int | None = None,
                 zero_page_detection: str = "multifd", page_size: int = 4096, uuid: bytes = bytes(16)):
        migrate_params_check(multifd_channels=len(channels), multifd_compression=compression,
                             zero_page_detection=zero_page_detection, multifd=True)
        self.page_size = page_size
        self.count = page_count(page_size)
        self.zero_page_detection = zero_page_detection
        self.compression = compression
        self.uuid = uuid
        self.exiting = False
        self.error: str | None = None
        self._packet_num = itertools.count()
        self._ready = threading.Semaphore(0)
        self._next = 0
        self.cancel: threading.Event | None = None     # the engine's migrate_cancel
        self.queued_pages = 0           # pages handed to queue_pages (the iteration statistics)
        self._block = None
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self.chans = [_SendChannel(self, i, ch, PageCodec(compression, level)) for i, ch in enumerate(channels)]
        for c in self.chans:
            c.thread.start()

    # -- accounting (QEMU's mig_stats.multifd_bytes) ----------------------------------------
    @property
    def bytes(self) -> int:
        """Bytes written on all multifd channels so far (greetings, headers, page data)."""
        return sum(c.bytes for c in self.chans)

    def stats(self) -> dict:
        """``multifd-bytes`` plus per-channel bytes, packets and pages."""
        return {"multifd-bytes": self.bytes, "channels": len(self.chans), "compression": self.compression,
                "zero-page-detection": self.zero_page_detection,
                "per-channel": [{"id": c.id, "bytes": c.bytes, "packets": c.packets, "normal": c.normal,
                                 "zero": c.zero} for c in self.chans]}

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self.exiting = True

    def _check(self) -> None:
        if self.error is not None:
            raise OSError(f"multifd send failed: {self.error}")

    def _wait(self, sem: threading.Semaphore) -> None:
        """Acquire ``sem``; a cancelled migration or a closed sender stops the wait (a
        channel blocked in a write to a peer that stopped reading must not hang us)."""
        while not sem.acquire(timeout=0.2):
            self._check()               # a failed channel ended the wait: its error, not "cancelled"
            if self.exiting or (self.cancel is not None and self.cancel.is_set()):
                raise OSError("multifd send failed: migration cancelled while waiting for a channel")

    # -- multifd_queue_page / multifd_send ------------------------------------------------------
    def queue_pages(self, block, idx: np.ndarray) -> None:
        """Queue pages ``idx`` of ``block``: full packets (128 pages of one block) go to
        idle channels; the rest waits for more pages or ``flush_and_sync``."""
        if self._block is not block and self._pending_n:
            self._send_pending()
        self._block = block
        self.queued_pages += len(idx)
        offs = np.asarray(idx, dtype=np.int64) * self.page_size
        while offs.size:
            take = offs[:self.count - self._pending_n]
            self._pending.append(take)
            self._pending_n += take.size
            offs = offs[take.size:]
            if self._pending_n == self.count:
                self._send_pending()

    def _send_pending(self) -> None:
        job = (self._block, np.concatenate(self._pending))
        self._pending, self._pending_n = [], 0
        self._wait(self._ready)
        self._check()
        n = len(self.chans)
        for k in range(n):
            c = self.chans[(self._next + k) % n]
            if c.job is None and not c.pending_sync:
                self._next = (c.id + 1) % n
                c.job = job
                c.sem.release()
                return
        raise RuntimeError("multifd: a channel was ready but none idle")   # a bug, not input

    def flush_and_sync(self) -> None:
        """``multifd_ram_flush_and_sync``: send the partial packet, then a SYNC packet on
        every channel, and wait until each channel has written it.  The caller then puts
        ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` on the main channel."""
        if self._pending_n:
            self._send_pending()
        self._check()
        for c in self.chans:
            c.pending_sync = True
            c.sem.release()
        for c in self.chans:
            self._wait(self._ready)
            self._wait(c.sem_sync)
            self._check()

    def close(self, *, abort: bool = False) -> None:
        """Stop the threads and close the channels (``abort``: shut them down first, which
        also wakes a thread blocked in a write).  Returns nothing; never raises."""
        self.exiting = True
        close_channels(self.chans, shutdown=bool(abort or self.error), wake=lambda c: c.sem.release())


class AccountedFile:
    """The main QEMUFile as the rate limiter sees it with multifd on: positions and the
    window budget include the bytes the multifd channels wrote (QEMU's
    ``migration_transferred_bytes`` adds ``multifd_bytes``)."""

    def __init__(self, f, multifd: MultiFDSend):
        self.f, self.multifd = f, multifd
        self._base = 0

    def ftell_fast(self) -> int:
        return self.f.ftell_fast() + self.multifd.bytes

    def reset_rate_limit(self) -> None:
        self.f.reset_rate_limit()
        self._base = self.multifd.bytes

    def set_rate_limit(self, limit: int) -> None:
        self.f.set_rate_limit(limit)

    def get_rate_limit(self) -> int:
        return self.f.get_rate_limit()

    def rate_limit(self) -> bool:
        limit = self.f.get_rate_limit()
        if self.f.rate_limit():
            return True
        return 0 < limit < self.f.bytes_xfer + self.multifd.bytes - self._base

    def fflush(self) -> int:
        return self.f.fflush()


def connect_channels(uri: str, n: int) -> list:
    """``n`` more connections to the ``tcp:``/``unix:`` URI the main channel went to."""
    from npqfile.channels import open_channel
    out = []
    try:
        for _ in range(n):
            out.append(open_channel(uri, "w"))
    except BaseException:
        for ch in out:
            ch.close()
        raise
    return out


# -- hooks for the engine -------------------------------------------------------------------
def start_send(channels: list, params) -> MultiFDSend:
    """A MultiFDSend over ``channels`` configured from a MigrationParams."""
    return MultiFDSend(channels, compression=params.multifd_compression, zero_page_detection=params.multifd_zero_page)


def save_pages_multifd(mf: MultiFDSend, saver, block, idx: np.ndarray) -> int:
    """``ram_save_target_page_multifd``: with ``legacy`` detection zero pages go to the
    main channel as ZERO records, the rest to the multifd channels.  Returns len(idx)."""
    n = idx.size
    if mf.zero_page_detection == "legacy":
        zero = buffer_is_zero(block.pages, idx)
        if zero.any():
            saver.save_pages(block, idx[zero])
            idx = idx[~zero]
    mf.queue_pages(block, idx)
    return n


def multifd_stats(mf: MultiFDSend, st) -> None:
    """Fold the channels into MigrationStats ``st``: ``multifd`` (QEMU's multifd-bytes
    and per-channel counts), pages into ram, bytes into the stream and RAM totals (QEMU
    10.0's ``ram.transferred`` includes ``multifd-bytes``)."""
    info = mf.stats()
    st.multifd = info
    total = info["multifd-bytes"]
    st.stream_bytes += total
    st.ram_queued += total
    st.ram_transferred += total
    st.ram.normal_pages += sum(c["normal"] for c in info["per-channel"])
    st.ram.zero_pages += sum(c["zero"] for c in info["per-channel"])


def multifd_inprocess(dest_ram, params, main=None) -> tuple[MultiFDSend, MultiFDRecv]:
    """Socketpairs for an in-process run: the sender and the receiver (into ``dest_ram``)
    of ``params.multifd_channels`` channels, greetings exchanged; ``main``: the main
    channel's reader, shut down if a multifd channel fails."""
    from npqfile.channels import SocketChannel
    n = params.multifd_channels
    pairs = [socket.socketpair() for _ in range(n)]
    mf = start_send([SocketChannel(a, "w") for a, _ in pairs], params)
    recv = MultiFDRecv(dest_ram, n, compression=params.multifd_compression)
    recv.main = main
    try:
        for i, (_, b) in enumerate(pairs):
            recv.add_channel(SocketChannel(b, "r"), f"connection {i + 2}")
    except BaseException:
        mf.close(abort=True)
        recv.close()
        raise
    return mf, recv


def multifd_connect(uri: str, params) -> MultiFDSend:
    """The sender of ``params.multifd_channels`` new connections to ``uri`` (tcp:/unix:
    only: QEMU's multifd needs a socket per channel).  ValueError for another URI."""
    migration_channels_and_transport_compatible(uri, multifd=True)
    return start_send(connect_channels(uri, params.multifd_channels), params)
