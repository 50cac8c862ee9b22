"""QEMU 10.0's multifd wire protocol: channel greeting, packets, page codecs (no I/O).

Supports: ``MultiFDInit_t`` (:func:`encode_init` / :func:`decode_init`, 64 bytes: be32
magic 0x11223344, be32 version 1, uuid[16], u8 channel id, 39 reserved bytes); the RAM
packet ``MultiFDPacket_t`` (:func:`encode_packet` / :func:`decode_packet`): be32 magic,
version, flags, pages_alloc, normal_pages, next_packet_size, be64 packet_num, be32
zero_pages, 28 reserved bytes, ramblock[256], then be64 offsets (normal pages first,
then zero pages), always padded to :func:`packet_len` = 320 + 8 × pages per packet (a
SYNC packet too, whose pages_alloc is 0), followed by ``next_packet_size`` bytes of page
data; flags SYNC and the compression method (none, zlib, zstd); QEMU's multifd zero-page
partition (:func:`partition_zero_pages`, the same order QEMU puts on the wire); the
per-channel codecs (:class:`PageCodec`: one persistent zlib / zstd stream per channel
and direction, each packet ending with a sync flush, as ``multifd-zlib.c`` and
``multifd-zstd.c`` do).

Goals: QEMU's bytes (checked against packets captured from QEMU 10.0.2), QEMU's checks
(``multifd_recv_initial_packet``, ``multifd_ram_unfill_packet``) made strict: a bad
magic or version, pages over pages_alloc, an offset past its block or not page aligned,
an unknown block, a compression flag other than the one negotiated, a data size that
does not match, a packet inflating past its pages: each a :class:`MultiFDError` naming
the channel, the byte offset in that channel and the reason.  Memory: one packet's
header and page data at a time, decompression bounded by the pages the packet declares.

Plan: pure functions over bytes and numpy arrays; the channel threads that read and
write sockets live in ``npqfile.migration.multifd``.  Differences from QEMU: see README
(unaligned offsets refused, channel id checked with ``>=``).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from npqfile.errors import StreamError

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_FLAG_SYNC = 1 << 0
MULTIFD_FLAG_COMPRESSION_MASK = 0x1F << 1
MULTIFD_FLAG_DEVICE_STATE = 32 << 1          # VFIO device state packets (10.0): not RAM
MULTIFD_PACKET_SIZE = 512 * 1024             # page data per packet
INIT_SIZE = 64                               # sizeof(MultiFDInit_t)
PACKET_HEADER_SIZE = 320                     # sizeof(MultiFDPacket_t) without offsets
RAMBLOCK_NAME_SIZE = 256

# multifd-compression -> the packet flag (multifd.h); qpl / uadk / qatzip need hardware
COMPRESSION_FLAGS = {"none": 0 << 1, "zlib": 1 << 1, "zstd": 2 << 1}
COMPRESSION_NAMES = {v: k for k, v in COMPRESSION_FLAGS.items()} | {4 << 1: "qpl", 8 << 1: "uadk",
                                                                    16 << 1: "qatzip"}
DEFAULT_LEVEL = {"zlib": 1, "zstd": 1}       # multifd-zlib-level, multifd-zstd-level defaults

_INIT = struct.Struct(">II16sB7x32x")
_HEAD = struct.Struct(">IIIIIIQI28x256s")


class MultiFDError(StreamError):
    """A multifd channel that cannot be accepted: ``channel`` names it (``multifd channel
    2``, or ``connection 3`` before its id is known), ``offset`` is the byte offset in it."""

    def __init__(self, reason: str, offset: int | None = None, channel: str | None = None):
        self.channel = channel
        super().__init__(reason, offset, None)

    def __str__(self) -> str:
        where = f" ({self.channel})" if self.channel else ""
        at = f" at offset {self.offset}" if self.offset is not None else ""
        return f"multifd: {self.reason}{at}{where}"


def page_count(page_size: int = 4096) -> int:
    """``multifd_ram_page_count()``: pages per packet (128 for 4 KiB pages)."""
    return MULTIFD_PACKET_SIZE // page_size


def packet_len(page_size: int = 4096) -> int:
    """Bytes of every packet header on the wire, offsets array included (1344 for 4 KiB)."""
    return PACKET_HEADER_SIZE + 8 * page_count(page_size)


# -- the channel greeting ------------------------------------------------------------------
def encode_init(channel_id: int, uuid: bytes = bytes(16)) -> bytes:
    """The 64-byte ``MultiFDInit_t`` a sender writes first on channel ``channel_id``."""
    if not 0 <= channel_id <= 255 or len(uuid) != 16:
        raise ValueError(f"multifd channel id {channel_id} must be 0..255 and the uuid 16 bytes")
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id)


def decode_init(buf: bytes, channels: int, *, uuid: bytes | None = bytes(16), where: str = "") -> int:
    """The channel id of a ``MultiFDInit_t``; raises MultiFDError (offset 0 of the channel)
    for a bad magic, version or uuid (None: any uuid), or an id outside ``0..channels-1``."""
    if len(buf) != INIT_SIZE:
        raise MultiFDError(f"channel closed after {len(buf)} of the {INIT_SIZE}-byte initial packet", 0, where)
    magic, version, their_uuid, cid = _INIT.unpack(buf)
    if magic != MULTIFD_MAGIC:
        raise MultiFDError(f"received packet magic {magic:x} expected {MULTIFD_MAGIC:x}", 0, where)
    if version != MULTIFD_VERSION:
        raise MultiFDError(f"received packet version {version} expected {MULTIFD_VERSION}", 4, where)
    if uuid is not None and their_uuid != uuid:
        raise MultiFDError(f"received uuid '{their_uuid.hex()}' and expected uuid '{uuid.hex()}' "
                           f"for channel {cid}", 8, where)
    if cid >= channels:
        raise MultiFDError(f"received channel id {cid} is not below the number of channels {channels}", 24, where)
    return cid


# -- packets --------------------------------------------------------------------------------
@dataclass
class Packet:
    """A decoded ``MultiFDPacket_t``; ``offsets`` (int64 byte offsets in ``ramblock``)
    holds the normal pages then the zero pages."""
    flags: int
    pages_alloc: int
    normal_pages: int
    zero_pages: int
    next_packet_size: int
    packet_num: int
    ramblock: str
    offsets: np.ndarray

    @property
    def sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)


def encode_packet(*, flags: int, packet_num: int, ramblock: str = "", offsets=(), normal_pages: int = 0,
                  next_packet_size: int = 0, page_size: int = 4096) -> bytes:
    """One packet header as ``multifd_send_fill_packet`` writes it: a SYNC packet (no
    ``offsets``) has pages_alloc 0; a RAM packet has pages_alloc = pages per packet and
    zero_pages = len(offsets) - normal_pages.  Raises ValueError for too many offsets or
    a block name of 256 bytes or more."""
    offs = np.asarray(offsets, dtype=">u8").reshape(-1)
    count = page_count(page_size)
    name = ramblock.encode()
    if offs.size > count or normal_pages > offs.size or len(name) >= RAMBLOCK_NAME_SIZE:
        raise ValueError(f"multifd packet: {offs.size} pages ({normal_pages} normal) for at most "
                         f"{count}, block name of {len(name)} bytes")
    alloc = 0 if flags & MULTIFD_FLAG_SYNC else count
    out = bytearray(packet_len(page_size))
    _HEAD.pack_into(out, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, alloc, normal_pages,
                    next_packet_size, packet_num, offs.size - normal_pages, name)
    out[PACKET_HEADER_SIZE:PACKET_HEADER_SIZE + 8 * offs.size] = offs.tobytes()
    return bytes(out)


def decode_packet(buf, *, blocks: dict[str, int], compression: int, page_size: int = 4096,
                  offset: int = 0, where: str = "") -> Packet:
    """Check and decode one ``packet_len`` header read at byte ``offset`` of channel
    ``where``.  ``blocks`` maps block names to their sizes; ``compression`` is the
    negotiated flag.  Returns the Packet; raises MultiFDError naming the field's offset."""
    def bad(reason: str, at: int) -> MultiFDError:
        return MultiFDError(reason, offset + at, where)

    magic, version, flags, alloc, normal, size, num, zero, raw = _HEAD.unpack_from(buf, 0)
    if magic != MULTIFD_MAGIC:
        raise bad(f"received packet magic {magic:x}, expected {MULTIFD_MAGIC:x}", 0)
    if version != MULTIFD_VERSION:
        raise bad(f"received packet version {version}, expected {MULTIFD_VERSION}", 4)
    if flags & MULTIFD_FLAG_DEVICE_STATE:
        raise bad("received a device state packet (VFIO); only RAM packets are supported", 8)
    if flags & ~(MULTIFD_FLAG_SYNC | MULTIFD_FLAG_COMPRESSION_MASK):
        raise bad(f"received unknown packet flags {flags:#x}", 8)
    count = page_count(page_size)
    if alloc > count:
        raise bad(f"received packet with {alloc} pages, expected {count}", 12)
    if normal > alloc:
        raise bad(f"received packet with {normal} non-zero pages, which exceeds maximum expected pages {alloc}", 16)
    if zero > alloc - normal:
        raise bad(f"received packet with {zero} zero pages, expected maximum {alloc - normal}", 32)
    method = flags & MULTIFD_FLAG_COMPRESSION_MASK
    if normal and method != compression:
        raise bad(f"flags received {method:x} ({COMPRESSION_NAMES.get(method, 'unknown')}) flags expected "
                  f"{compression:x} ({COMPRESSION_NAMES.get(compression, 'unknown')})", 8)
    # next_packet_size means something only with normal pages: QEMU 7.2 leaves a stale
    # value in packets without any (its SYNC packets), and every QEMU ignores it there
    if normal and compression == 0 and size != normal * page_size:
        raise bad(f"next_packet_size {size} is not {normal} pages of {page_size} bytes", 20)
    if normal and compression and size > 2 * MULTIFD_PACKET_SIZE:
        raise bad(f"next_packet_size {size} exceeds the compressed buffer ({2 * MULTIFD_PACKET_SIZE} bytes)", 20)
    if not normal:
        size = 0
    name = ""
    offs = np.empty(0, dtype=np.int64)
    if normal or zero:
        name = bytes(raw[:RAMBLOCK_NAME_SIZE - 1]).split(b"\0", 1)[0].decode("utf-8", "replace")
        block_size = blocks.get(name)
        if block_size is None:
            raise bad(f"unknown ram block {name!r}", 64)
        offs = np.frombuffer(buf, dtype=">u8", count=normal + zero, offset=PACKET_HEADER_SIZE).astype(np.int64)
        wrong = np.flatnonzero((offs.view(np.uint64) > block_size - page_size) | (offs % page_size != 0))
        if wrong.size:
            i = int(wrong[0])
            o = int(offs.view(np.uint64)[i])
            why = "past the end of" if o > block_size - page_size else "not page aligned in"
            raise bad(f"offset {o:#x} is {why} ram block {name!r} ({block_size:#x} bytes)", PACKET_HEADER_SIZE + 8 * i)
    return Packet(flags, alloc, normal, zero, size, num, name, offs)


def partition_zero_pages(offsets: np.ndarray, is_zero: np.ndarray) -> tuple[np.ndarray, int]:
    """``multifd_send_zero_page_detect``'s in-place partition, vectorised.  QEMU walks ``i``
    from the left and swaps each zero page with the last unexamined one (``j``, moving
    left).  Returns (offsets in QEMU's wire order, number of normal pages ``k``) -- the
    order QEMU's packets show; the inputs are not modified.

    The same order without the walk: a normal page before ``k`` never moves; the zero
    pages before ``k`` (``H``, left to right) take the normal pages from ``k`` on in
    right-to-left order; and position ``n - 1 - m`` (from ``k`` on) receives the zero page
    ``i`` held at the m-th swap: first the first zero page, then after each swap the page
    swapped in if it was zero, else the next of ``H`` (``k`` itself once ``H`` is used up)."""
    offs = np.array(offsets, copy=True)
    zero = np.asarray(is_zero, dtype=bool)
    n = offs.size
    k = n - int(np.count_nonzero(zero))
    if k == n:
        return offs, n
    tail, tail_zero = offs[k:][::-1], zero[k:][::-1]     # what j meets, in its order
    head_zero = np.flatnonzero(zero[:k])
    out = offs.copy()
    out[head_zero] = tail[~tail_zero]
    holders = np.append(head_zero, k)                   # where i stands at each swap
    after = np.cumsum(~tail_zero[:-1])                  # normal pages j has met so far
    held = np.empty(n - k, dtype=offs.dtype)
    held[0] = offs[holders[0]]
    held[1:] = np.where(tail_zero[:-1], tail[:-1], offs[holders[after]])
    out[k:] = held[::-1]
    return out, k


# -- page codecs ------------------------------------------------------------------------------
ZSTD_WINDOW_MAX = 1 << 25   # multifd-zstd-level 20 (QEMU's highest) streams need a 32 MiB window


class _Drained(Exception):
    """The zstd reader asked for input past the end of the packet."""


class _PacketFeed:
    """What a channel's zstd stream reader pulls its input from: one packet's data, then
    :class:`_Drained` (never an end of input: the stream goes on in the next packet)."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = None

    def read(self, size: int):
        data, self.data = self.data, None
        if data is None:
            raise _Drained
        return data


class PageCodec:
    """One channel's compression state for one direction (``multifd-zlib.c`` /
    ``multifd-zstd.c``): ``compress(pages)`` returns a packet's data (every page, then a
    sync flush), ``decompress(data, out, size)`` fills ``out[:size]`` exactly or raises
    ValueError.  ``none`` passes pages through.

    Decompression keeps one stream per channel across packets, as QEMU's destination
    does (its stream is set up once per channel; the source only flushes per packet, so
    a packet refers back to earlier ones), and is bounded by the packet: at most
    ``size`` + 1 bytes are produced, whatever the data declares (a huge content size, a
    window above :data:`ZSTD_WINDOW_MAX`, a bomb, more frames, trailing bytes).  zstd
    inflates straight into ``out`` with one library call per packet
    (``stream_reader().readinto1``: it never writes past the buffer and allocates
    nothing per packet); the byte after the pages catches a packet that holds more,
    even when the decoder still buffers it.  zlib inflates at most ``size`` + 1 bytes."""

    def __init__(self, method: str = "none", level: int | None = None):
        if method not in COMPRESSION_FLAGS:
            raise ValueError(f"multifd-compression must be one of {', '.join(COMPRESSION_FLAGS)}, not {method!r}")
        self.method = method
        self.flag = COMPRESSION_FLAGS[method]
        self.level = DEFAULT_LEVEL.get(method, 0) if level is None else level
        self._c = self._d = None
        self._feed = _PacketFeed()
        self._spare = bytearray()

    def compress(self, pages) -> bytes:
        """A packet's page data: the pages (buffers) through this channel's stream."""
        if self.method == "zlib":
            if self._c is None:
                self._c = zlib.compressobj(self.level)
            parts = [self._c.compress(p) for p in pages]
            parts.append(self._c.flush(zlib.Z_SYNC_FLUSH))
            return b"".join(parts)
        import zstandard
        if self._c is None:
            self._c = zstandard.ZstdCompressor(level=self.level).compressobj()
        parts = [self._c.compress(p) for p in pages]
        parts.append(self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        return b"".join(parts)

    def decompress(self, data, out: memoryview, size: int | None = None) -> None:
        """Inflate ``data`` into ``out[:size]`` (``size`` defaults to ``len(out)``; ``out``
        writable, C-contiguous, bytes).  A byte of ``out`` past ``size`` may be overwritten:
        given one, zstd needs no copy.  Returns None; raises ValueError when the data is
        not valid or does not give exactly ``size`` bytes (the channel's stream is then
        reset: the migration fails with it)."""
        size = len(out) if size is None else size
        try:
            if self.method == "zlib":
                self._zlib(data, out, size)
            elif len(out) > size:
                self._zstd(data, out[:size + 1], size)
            else:
                # no spare byte after the pages: inflate beside them, then copy
                if len(self._spare) < size + 1:
                    self._spare = bytearray(size + 1)
                self._zstd(data, memoryview(self._spare)[:size + 1], size)
                out[:size] = memoryview(self._spare)[:size]
        except ValueError:
            self._d = None
            raise

    def _zlib(self, data, out: memoryview, want: int) -> None:
        if self._d is None:
            self._d = zlib.decompressobj()
        try:
            got = self._d.decompress(data, want + 1)
        except zlib.error as exc:
            raise ValueError(f"zlib data is not valid: {exc}") from None
        if self._d.eof:
            # QEMU's source only sync-flushes; its inflate() loop fails on Z_STREAM_END too
            raise ValueError("zlib stream ends (Z_STREAM_END) inside the packet")
        if self._d.unconsumed_tail or len(got) != want:
            raise ValueError(f"zlib data inflates to {'more than ' if len(got) > want else ''}"
                             f"{min(len(got), want)} bytes, expected {want}")
        out[:want] = got

    def _zstd(self, data, buf: memoryview, want: int) -> None:
        """Inflate into ``buf`` (``want`` + 1 bytes).  readinto1 returns after the first
        decoder call that gives output; that call runs until the input is used up or
        ``buf`` is full, so when the reader next asks for input (:class:`_Drained`) the
        decoder holds no output: ``buf`` was never full, ``done`` is every byte."""
        import zstandard
        if self._d is None:
            dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW_MAX)
            # frames back to back are one stream to QEMU's ZSTD_decompressStream() too
            self._d = dctx.stream_reader(self._feed, read_size=2 * MULTIFD_PACKET_SIZE,
                                         read_across_frames=True, closefd=False)
        self._feed.data = data
        done = 0
        try:
            while done <= want:
                n = self._d.readinto1(buf[done:])
                if not n:       # the reader's end of output: not reached with _PacketFeed
                    break
                done += n
        except _Drained:
            pass
        except zstandard.ZstdError as exc:
            raise ValueError(f"zstd data is not valid: {exc}") from None
        finally:
            self._feed.data = None
        if done != want:
            raise ValueError(f"zstd data inflates to {'more than ' if done > want else ''}"
                             f"{min(done, want)} bytes, expected {want}")
