"""multifd channels as QEMU 10.0 drives them: sender and receiver threads over sockets.

Supports: :class:`MultiFDSend` (``multifd_send_setup`` / ``multifd_send`` /
``multifd_send_sync_main``: one thread per channel writes the 64-byte greeting, then RAM
packets handed to the next idle channel round robin, SYNC packets on request; zero-page
detection ``multifd`` in the channel threads, ``legacy`` on the main channel, ``none``;
compression none / zlib / zstd; per-channel byte counts and QEMU's ``multifd-bytes``
including greetings and headers, as QEMU 10.0 counts them), :class:`MultiFDRecv`
(``multifd_recv_new_channel`` / ``multifd_recv_thread`` / ``multifd_recv_sync_main``:
a thread per channel reads packets straight into guest RAM; the main stream's
``RAM_SAVE_FLAG_MULTIFD_FLUSH`` waits until every channel has read its SYNC packet, then
releases them, so a page re-sent in a later round never lands before an older copy),
:func:`accept_channels` (the destination's accept loop: channels told apart by their
first four bytes as QEMU does, ``QEVM`` = main, anything else must be a multifd
greeting; a channel that does not open in time is an error naming the missing ids) and
:func:`connect_channels` (the source's extra connections to a ``tcp:``/``unix:`` URI);
the small hooks the engine and session call: :class:`AccountedFile` (the rate limiter
sees the channels' bytes), :func:`check_params`, :func:`save_pages_multifd`
(``ram_save_target_page_multifd``), :func:`multifd_stats`, :func:`multifd_inprocess`,
:func:`multifd_connect`.

Goals: the source uses more than one core (numpy, zlib, zstd and socket calls release
the GIL); a failure on any channel fails the migration with the channel, byte offset and
reason, never a hang (a failed thread wakes the main thread; ``close`` shuts the sockets
down); memory bounded: one packet header, one compressed packet and one decompressed
packet per channel.  Protocol details are in ``npqfile.stream.multifd``.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from typing import Any

import numpy as np

from npqfile.stream.multifd import (
    INIT_SIZE, MULTIFD_FLAG_SYNC, MULTIFD_PACKET_SIZE, MultiFDError, PageCodec, decode_init, decode_packet,
    encode_init, encode_packet, packet_len, page_count, partition_zero_pages,
)

ZERO_PAGE_DETECTION = ("none", "legacy", "multifd")
CHANNEL_TIMEOUT = 10.0      # seconds the destination waits for the remaining channels
_SYNC = object()


def zero_mask(block, idx: np.ndarray) -> np.ndarray:
    """Which pages ``idx`` of ``block`` are all zero (numpy, GIL released for the scan)."""
    if not idx.size:
        return np.zeros(0, dtype=bool)
    if idx[-1] - idx[0] + 1 == idx.size:
        pages = block.pages[idx[0]:idx[-1] + 1]            # contiguous: a view, no copy
    else:
        pages = block.pages[idx]
    return ~pages.reshape(idx.size, -1).view(np.uint64).any(axis=1)


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
            o._fail(f"multifd channel {self.id}: {exc}")
            o._ready.release()
            self.sem_sync.release()

    def _send_pages(self, block, offs: np.ndarray) -> None:
        o, ps = self.owner, self.owner.page_size
        if o.zero_page_detection == "multifd":
            offs, normal = partition_zero_pages(offs, zero_mask(block, offs // ps))
        else:
            normal = offs.size
        flat = memoryview(block.array)
        pages = [flat[p:p + ps] for p in offs[:normal].tolist()]
        data = pages
        if self.codec.flag and normal:
            data = [self.codec.compress(pages)]
        size = sum(len(d) for d in data)
        head = encode_packet(flags=self.codec.flag, packet_num=next(o._packet_num), ramblock=block.name,
                             offsets=offs, normal_pages=normal, next_packet_size=size, page_size=ps)
        self._write([head, *data])
        self.packets += 1
        self.normal += normal
        self.zero += offs.size - normal


class MultiFDSend:
    """The source's multifd channels over the writable channels ``channels`` (their
    index is the channel id).  ``queue_pages`` / ``flush_and_sync`` / ``close``; raise
    OSError naming the channel once any channel failed."""

    def __init__(self, channels: list, *, compression: str = "none", level: int | None = None,
                 zero_page_detection: str = "multifd", page_size: int = 4096, uuid: bytes = bytes(16)):
        if zero_page_detection not in ZERO_PAGE_DETECTION:
            raise ValueError(f"zero-page-detection must be one of {', '.join(ZERO_PAGE_DETECTION)}, "
                             f"not {zero_page_detection!r}")
        if not 1 <= len(channels) <= 255:
            raise ValueError(f"multifd-channels must be 1..255, not {len(channels)}")
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
        for c in self.chans:
            if abort or self.error:
                try:
                    c.channel.shutdown(True, True)
                except (OSError, AttributeError):
                    pass
            c.sem.release()
        for c in self.chans:
            c.thread.join(10)
            try:
                c.channel.close()
            except OSError:
                pass


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


# -- the destination ----------------------------------------------------------------------
class _RecvChannel:
    def __init__(self, owner: MultiFDRecv, cid: int, channel: Any, where: str):
        self.owner, self.id, self.channel = owner, cid, channel
        self.where = f"multifd channel {cid}, {where}"
        self.codec = PageCodec(owner.compression)
        self.offset = INIT_SIZE
        self.packets = 0
        self.normal = 0
        self.zero = 0
        self.done = False
        fd = channel.fileno() if hasattr(channel, "fileno") else -1
        # a socket object on the channel's fd (detached at the end): recvmsg_into fills a
        # packet's pages, scattered over guest RAM, with one call
        self.sock = socket.socket(fileno=fd) if fd >= 0 else None
        self.thread = threading.Thread(target=self._run, name=f"mig/dst/recv_{cid}", daemon=True)

    def _readv(self, views: list, what: str) -> None:
        """Fill every buffer of ``views`` in order (recvmsg_into when on a socket)."""
        if self.sock is None:
            for v in views:
                self._read(v, what)
            return
        total = sum(len(v) for v in views)
        got = 0
        while views:
            n = self.sock.recvmsg_into(views[:1024])[0]
            if n == 0:
                raise MultiFDError(f"channel closed after {got} of the {total} bytes of {what}",
                                   self.offset + got, self.where)
            got += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views = views[1:]
            if n:
                views[0] = views[0][n:]
        self.offset += got

    def _read(self, buf: memoryview, what: str, eof_ok: bool = False) -> bool:
        """Fill ``buf``; False at a clean end of stream (only when ``eof_ok``)."""
        got = 0
        while got < len(buf):
            n = self.channel.readinto(buf[got:], self.offset + got)
            if n == 0:
                if got == 0 and eof_ok:
                    return False
                raise MultiFDError(f"channel closed after {got} of the {len(buf)} bytes of {what}",
                                   self.offset + got, self.where)
            got += n
        self.offset += got
        return True

    def _run(self) -> None:
        o = self.owner
        ps = o.page_size
        head = memoryview(bytearray(packet_len(ps)))
        comp = memoryview(bytearray(2 * MULTIFD_PACKET_SIZE)) if self.codec.flag else None
        plain = np.empty((page_count(ps), ps), dtype=np.uint8) if self.codec.flag else None
        try:
            while not o.exiting:
                at = self.offset
                if not self._read(head, "a packet header", eof_ok=True):
                    break
                pkt = decode_packet(head, blocks=o.sizes, compression=self.codec.flag, page_size=ps,
                                    offset=at, where=self.where)
                self.packets += 1
                if pkt.normal_pages or pkt.zero_pages:
                    self._pages(pkt, comp, plain)
                if pkt.sync:
                    o._arrive(self)
        except Exception as exc:        # a thread's end must reach the main thread, whatever ended it
            if not isinstance(exc, MultiFDError):
                exc = MultiFDError(str(exc) or type(exc).__name__, self.offset, self.where)
            o._fail(exc)
        finally:
            self.done = True
            if self.sock is not None:
                self.sock.detach()
            o._arrive(None)

    def _pages(self, pkt, comp, plain) -> None:
        o, ps = self.owner, self.owner.page_size
        block = o.blocks[pkt.ramblock]
        idx = pkt.offsets // ps
        normal, zero = idx[:pkt.normal_pages], idx[pkt.normal_pages:]
        if normal.size:
            at = self.offset
            if comp is None:
                flat = memoryview(block.array)
                self._readv([flat[p * ps:(p + 1) * ps] for p in normal.tolist()], "page data")
            else:
                self._read(comp[:pkt.next_packet_size], "compressed page data")
                out = plain[:normal.size]
                try:
                    self.codec.decompress(comp[:pkt.next_packet_size], memoryview(out).cast("B"))
                except ValueError as exc:
                    raise MultiFDError(f"packet {pkt.packet_num}: {exc}", at, self.where) from None
                block.pages[normal] = out
            self.normal += normal.size
        if zero.size:
            # multifd_recv_zero_page_process: only pages that are not zero already
            nz = zero[block.pages[zero].reshape(zero.size, -1).view(np.uint64).any(axis=1)]
            block.pages[nz] = 0
            self.zero += zero.size


class MultiFDRecv:
    """The destination's multifd channels into ``ram`` (a GuestRAM whose blocks the
    source's packets name).  ``add_channel`` each connection after its greeting was
    peeked; ``sync_main`` at every MULTIFD_FLUSH; ``finish`` at the end of the stream."""

    def __init__(self, ram, channels: int, *, compression: str = "none", page_size: int = 4096,
                 uuid: bytes | None = None):
        if not 1 <= channels <= 255:
            raise ValueError(f"multifd-channels must be 1..255, not {channels}")
        self.n = channels
        self.compression = compression
        PageCodec(compression)       # ValueError for an unknown method, before any thread
        self.page_size = page_size
        self.uuid = uuid
        self.blocks = {b.name: b for b in ram.blocks}
        self.sizes = {name: b.size for name, b in self.blocks.items()}
        self.chans: dict[int, _RecvChannel] = {}
        self.main: Any = None           # the main channel, shut down when a multifd channel fails
        self.exiting = False
        self.error: MultiFDError | None = None
        self._cond = threading.Condition()
        self._arrived = 0
        self._generation = 0
        self.seen_flush = False
        self.per_section: bool | None = None    # decided at the first RAM EOS (main_record)

    def add_channel(self, channel: Any, where: str) -> int:
        """Read the greeting of ``channel`` (``where`` names the connection in errors),
        start its thread; returns the channel id.  MultiFDError for a bad greeting or an
        id already set up."""
        buf = bytearray(INIT_SIZE)
        got = 0
        while got < INIT_SIZE:
            n = channel.readinto(memoryview(buf)[got:], got)
            if n == 0:
                break
            got += n
        cid = decode_init(bytes(buf[:got]), self.n, uuid=self.uuid, where=where)
        if self.uuid is None:
            self.uuid = bytes(buf[8:24])    # QEMU checks its own -uuid; we have none: all channels agree
        if cid in self.chans:
            raise MultiFDError(f"received id '{cid}' already setup", 24, where)
        c = _RecvChannel(self, cid, channel, where)
        self.chans[cid] = c
        c.thread.start()
        return cid

    def _fail(self, exc: MultiFDError) -> None:
        with self._cond:
            if self.exiting:
                return          # after close() or a first error: an artifact of the shutdown
            self.error = exc
            self.exiting = True
            self._cond.notify_all()
        # wake the other channels and the main stream's reader: the migration has failed
        for ch in [c.channel for c in self.chans.values()] + [self.main]:
            try:
                ch.shutdown(True, False)
            except (OSError, AttributeError):
                pass

    def _arrive(self, chan: _RecvChannel | None) -> None:
        """A channel read a SYNC packet (``chan``) and waits for the main thread, or a
        thread ended (None)."""
        with self._cond:
            if chan is None:
                self._cond.notify_all()
                return
            gen = self._generation
            self._arrived += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._generation != gen or self.exiting)

    def main_record(self, offset: int, eos: bool = False) -> None:
        """The main stream reached a MULTIFD_FLUSH (``eos`` False) or a RAM EOS.  QEMU 8.1+
        syncs at each flush and always flushes in the setup section; a source whose first
        RAM EOS came without one syncs at every EOS instead (QEMU 7.2, or
        ``multifd-flush-after-each-section=on``) -- the two are told apart there, as
        QEMU's destination is told by that property."""
        if not eos:
            self.seen_flush = True
            self.sync_main(offset)
            return
        if self.per_section is None:
            self.per_section = not self.seen_flush
        if self.per_section:
            self.sync_main(offset)

    def sync_main(self, offset: int | None = None) -> None:
        """``multifd_recv_sync_main``: wait until every channel has read a SYNC packet,
        then release them all.  Raises the first channel error, or MultiFDError when a
        channel ended before its SYNC (``offset``: the main stream's, for the message)."""
        with self._cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self._arrived >= self.n:
                    break
                ended = [c.id for c in self.chans.values() if c.done]
                if ended:
                    raise MultiFDError(f"channel closed before its SYNC packet for the sync at main stream "
                                       f"offset {offset}", self.chans[ended[0]].offset, self.chans[ended[0]].where)
                self._cond.wait(1.0)
            self._arrived = 0
            self._generation += 1
            self._cond.notify_all()

    def finish(self, timeout: float = CHANNEL_TIMEOUT) -> None:
        """After the main stream: wait for every channel to end (the source closes them),
        then raise the first error.  A channel still open after ``timeout`` is shut down."""
        deadline = time.monotonic() + timeout
        for c in self.chans.values():
            c.thread.join(max(0.0, deadline - time.monotonic()))
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop every channel thread and close the channels; never raises."""
        with self._cond:
            self.exiting = True
            self._cond.notify_all()
        for c in self.chans.values():
            try:
                c.channel.shutdown(True, True)
            except (OSError, AttributeError):
                pass
        for c in self.chans.values():
            c.thread.join(10)
            try:
                c.channel.close()
            except OSError:
                pass

    def stats(self) -> dict:
        """Per-channel packets, pages and bytes received."""
        return {"channels": self.n, "compression": self.compression,
                "multifd-bytes": sum(c.offset for c in self.chans.values()),
                "normal": sum(c.normal for c in self.chans.values()),
                "zero": sum(c.zero for c in self.chans.values()),
                "per-channel": [{"id": c.id, "bytes": c.offset, "packets": c.packets, "normal": c.normal,
                                 "zero": c.zero} for c in sorted(self.chans.values(), key=lambda c: c.id)]}


# -- connections ------------------------------------------------------------------------------
def peek_magic(channel: Any, timeout: float) -> bytes:
    """The first 4 bytes of an accepted socket channel, left in place (MSG_PEEK); fewer
    when the peer closed first.  TimeoutError when nothing came within ``timeout``."""
    sock = socket.socket(fileno=channel.fileno())
    try:
        sock.settimeout(timeout)
        try:
            return sock.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL)
        except TimeoutError:
            raise TimeoutError(f"connection sent nothing within {timeout} s") from None
        finally:
            sock.settimeout(None)
    finally:
        sock.detach()


def accept_channels(listener, recv: MultiFDRecv, first_timeout: float | None,
                    timeout: float = CHANNEL_TIMEOUT) -> Any:
    """Accept the main channel and ``recv.n`` multifd channels in any order; returns the
    main channel's reader.  Raises MultiFDError (a bad greeting, a second main channel, a
    channel id twice, channels missing after ``timeout`` seconds from the first) or
    TimeoutError (nobody connected within ``first_timeout``)."""
    main = None
    k = 0
    deadline = None
    listener.set_backlog(recv.n + 1)
    try:
        while main is None or len(recv.chans) < recv.n:
            if deadline is None:
                conn = listener.accept(first_timeout)
                deadline = time.monotonic() + timeout
            else:
                left = deadline - time.monotonic()
                try:
                    conn = listener.accept(max(left, 0.001))
                except TimeoutError:
                    missing = sorted(set(range(recv.n)) - set(recv.chans))
                    what = (f"multifd channel(s) {missing}" if missing else "") + \
                           (" and " if missing and main is None else "") + ("the main channel" if main is None else "")
                    raise MultiFDError(f"{what} did not connect within {timeout} s "
                                       f"({len(recv.chans)} of {recv.n} multifd channels open)", None,
                                       f"connection {k + 1}") from None
            k += 1
            where = f"connection {k}"
            try:
                magic = peek_magic(conn, max(1.0, (deadline or 0) - time.monotonic()))
            except TimeoutError as exc:
                conn.close()
                raise MultiFDError(str(exc), 0, where) from None
            if magic == b"QEVM":
                if main is not None:
                    conn.close()
                    raise MultiFDError("a second main channel (QEVM) connected", 0, where)
                main = recv.main = conn
            else:
                try:
                    recv.add_channel(conn, where)
                except MultiFDError:
                    conn.close()
                    raise
    except BaseException:
        if main is not None:
            main.close()
        recv.close()
        raise
    return main


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
def check_params(params) -> None:
    """ValueError for a MigrationParams multifd cannot run with (QEMU's
    ``migrate_caps_check`` refuses xbzrle and compress with multifd too)."""
    n = params.multifd_channels
    if not 0 <= n <= 255:
        raise ValueError(f"multifd-channels must be 1..255, not {n}")
    PageCodec(params.multifd_compression)
    if params.multifd_zero_page not in ZERO_PAGE_DETECTION:
        raise ValueError(f"zero-page-detection must be one of {', '.join(ZERO_PAGE_DETECTION)}, "
                         f"not {params.multifd_zero_page!r}")
    if n and params.xbzrle_cache_size:
        raise ValueError("multifd is not compatible with xbzrle")
    if n and params.compress_level is not None:
        raise ValueError("multifd is not compatible with compress (use --multifd-compression)")
    if n and params.release_ram:
        raise ValueError("multifd with release-ram is not supported here")


def start_send(channels: list, params) -> MultiFDSend:
    """A MultiFDSend over ``channels`` configured from a MigrationParams."""
    return MultiFDSend(channels, compression=params.multifd_compression, zero_page_detection=params.multifd_zero_page)


def save_pages_multifd(mf: MultiFDSend, saver, block, idx: np.ndarray) -> int:
    """``ram_save_target_page_multifd``: with ``legacy`` detection zero pages go to the
    main channel as ZERO records, the rest to the multifd channels.  Returns len(idx)."""
    n = idx.size
    if mf.zero_page_detection == "legacy":
        zero = zero_mask(block, idx)
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
    if not uri.startswith(("tcp:", "unix:")):
        raise ValueError(f"multifd needs a tcp: or unix: destination, not {uri!r}")
    return start_send(connect_channels(uri, params.multifd_channels), params)
