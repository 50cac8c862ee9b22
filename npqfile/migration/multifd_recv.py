"""The destination's multifd channels as QEMU 10.0 reads them (``multifd_recv_*``).

Supports: :class:`MultiFDRecv` (``multifd_recv_new_channel`` / ``multifd_recv_thread``
/ ``multifd_recv_sync_main``: a thread per channel reads packets straight into guest RAM;
the main stream's ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` waits until every channel has read its
SYNC packet, then releases them, so a page re-sent in a later round never lands before
an older copy; a source that syncs per section, QEMU 7.2, is recognised at its first
RAM EOS) and :func:`accept_channels` (the accept loop: channels told apart by their
first four bytes as QEMU does, ``QEVM`` = main, anything else must be a multifd
greeting; a channel that does not open in time is an error naming the missing ids), and
:func:`close_channels` (ending channel threads, for the source's channels too).

Goals: a bad packet, a channel that ends early or never opens fails the migration with
the channel, its byte offset and the reason, never a hang and never a write outside a
page the packet may name; memory bounded: per channel one packet header, one
compressed packet and one decompressed packet.  The source side and the engine hooks
are in ``npqfile.migration.multifd``; the wire format in ``npqfile.stream.multifd``.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import numpy as np

from npqfile.channels import iovec
from npqfile.channels.base import wait_readable
from npqfile.migration.options import migrate_params_check
from npqfile.ram.bufferiszero import buffer_is_zero
from npqfile.stream.multifd import (
    INIT_SIZE, MULTIFD_PACKET_SIZE, MultiFDError, PageCodec, decode_init, decode_packet, packet_len, page_count,
)

CHANNEL_TIMEOUT = 10.0      # seconds the destination waits for the remaining channels


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
        self.native = self.sock is not None and iovec.available()
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

    def _read_iov(self, iov: np.ndarray, total: int, what: str) -> None:
        """``_readv`` of native iovecs (on a socket): every byte or MultiFDError."""
        fd = self.sock.fileno()
        got = iovec.read_iov(fd, iov, total, lambda: wait_readable([fd]))
        if got < total:
            raise MultiFDError(f"channel closed after {got} of the {total} bytes of {what}",
                               self.offset + got, self.where)
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
        # the decompressed packet, and a spare byte after it that shows a packet holding more
        plain = np.empty(page_count(ps) * ps + 1, dtype=np.uint8) if self.codec.flag else None
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
            if comp is None and self.native:
                # readv of native iovecs: the kernel fills each page in place in guest RAM
                # (decode_packet checked every offset against the block)
                iov = iovec.iovec_array(normal.size)
                iov[:, 0] = normal.astype(np.uint64) * np.uint64(ps) + np.uint64(block.address)
                iov[:, 1] = ps
                self._read_iov(iov, normal.size * ps, "page data")
            elif comp is None:
                flat = memoryview(block.array)
                self._readv([flat[p * ps:(p + 1) * ps] for p in normal.tolist()], "page data")
            else:
                self._read(comp[:pkt.next_packet_size], "compressed page data")
                size = normal.size * ps
                try:
                    self.codec.decompress(comp[:pkt.next_packet_size], memoryview(plain), size)
                except ValueError as exc:
                    raise MultiFDError(f"packet {pkt.packet_num}: {exc}", at, self.where) from None
                block.pages[normal] = plain[:size].reshape(-1, ps)
            self.normal += normal.size
        if zero.size:
            # multifd_recv_zero_page_process: only pages that are not zero already
            nz = zero[~buffer_is_zero(block.pages, zero)]
            block.pages[nz] = 0
            self.zero += zero.size


def close_channels(chans: list, *, shutdown: bool, wake: Any = None) -> None:
    """End multifd channel threads (either side's): shut each ``c.channel`` down first
    when ``shutdown`` (that wakes a thread blocked in I/O), call ``wake(c)`` (a thread
    waiting for work), then join each thread (10 s at most) and close its channel.
    Returns None; never raises for a channel that is already closed."""
    for c in chans:
        if shutdown:
            try:
                c.channel.shutdown(True, True)
            except (OSError, AttributeError):
                pass
        if wake is not None:
            wake(c)
    for c in chans:
        c.thread.join(10)
        try:
            c.channel.close()
        except OSError:
            pass


class MultiFDRecv:
    """The destination's multifd channels into ``ram`` (a GuestRAM whose blocks the
    source's packets name).  ``add_channel`` each connection after its greeting was
    peeked; ``sync_main`` at every MULTIFD_FLUSH; ``finish`` at the end of the stream."""

    def __init__(self, ram, channels: int, *, compression: str = "none", page_size: int = 4096,
                 uuid: bytes | None = None):
        migrate_params_check(multifd_channels=channels, multifd_compression=compression, multifd=True)
        self.n = channels
        self.compression = compression
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
        close_channels(list(self.chans.values()), shutdown=True)

    def stats(self) -> dict:
        """Per-channel packets, pages and bytes received."""
        return {"channels": self.n, "compression": self.compression,
                "multifd-bytes": sum(c.offset for c in self.chans.values()),
                "normal": sum(c.normal for c in self.chans.values()),
                "zero": sum(c.zero for c in self.chans.values()),
                "per-channel": [{"id": c.id, "bytes": c.offset, "packets": c.packets, "normal": c.normal,
                                 "zero": c.zero} for c in sorted(self.chans.values(), key=lambda c: c.id)]}


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
