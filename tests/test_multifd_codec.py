"""multifd page codecs: hostile compressed packets stay bounded and are named.

``PageCodec.decompress`` must never produce (or allocate) more than the packet's pages
plus a small constant, whatever the data claims: zstd frames with a lying content size,
without one, RLE bombs, frames back to back, windows above what QEMU's highest
``multifd-zstd-level`` needs, trailing or missing bytes; zlib the same, and a zlib
stream that ends (QEMU's source only sync-flushes).  Good streams keep one context per
channel across packets, as QEMU's destination does.  The receiver turns a codec error
into a MultiFDError naming the channel, the byte offset and the packet.
"""

from __future__ import annotations

import socket
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from conftest import require_module
from npqfile.channels import SocketChannel
from npqfile.migration.multifd_recv import MultiFDRecv
from npqfile.ram import GuestRAM
from npqfile.stream.multifd import (
    COMPRESSION_FLAGS, MultiFDError, PageCodec, encode_init, encode_packet, packet_len,
)

PS = 4096


def _need_zstd():
    require_module("zstandard", "fast")


# -- hand-made zstd frames (RFC 8878): header, then raw / RLE blocks -------------------
def _frame(window_log: int = 20, content_size: int | None = None, blocks: bytes = b"") -> bytes:
    """A zstd frame header (no single segment, no checksum, no dictionary) and ``blocks``;
    ``content_size`` is declared in 8 bytes when given, whatever the blocks hold."""
    fhd, fcs = 0, b""
    if content_size is not None:
        fhd, fcs = 3 << 6, struct.pack("<Q", content_size)
    return struct.pack("<IBB", 0xFD2FB528, fhd, (window_log - 10) << 3) + fcs + blocks


def _rle(n: int, byte: int = 0x41, last: bool = False) -> bytes:
    """An RLE block: ``n`` (at most 128 KiB) copies of ``byte`` from 4 bytes of input."""
    return struct.pack("<I", n << 3 | 1 << 1 | last)[:3] + bytes([byte])


def _zstd_packets(pages_per_packet: list[int], seed: int = 3) -> tuple[list[bytes], list[bytes]]:
    """Packets as QEMU's source makes them (one stream, a block flush per packet)."""
    rng = np.random.default_rng(seed)
    tx = PageCodec("zstd")
    plains, datas = [], []
    for n in pages_per_packet:
        pages = [rng.integers(0, 8, PS, dtype=np.uint8).tobytes() for _ in range(n)]
        plains.append(b"".join(pages))
        datas.append(tx.compress(pages))
    return plains, datas


BOMB = _rle(1 << 17) * 4096           # 16 KiB declaring 512 MiB of output


@pytest.mark.parametrize("name, data, pages, error", [
    ("bomb, content size 1 TiB", _frame(20, 1 << 40, BOMB), 1, "inflates to more than (the )?4096 bytes"),
    ("bomb, no content size", _frame(20, None, BOMB), 2, "inflates to more than (the )?8192 bytes"),
    ("window of 128 MiB", _frame(27, None, _rle(PS, last=True)), 1, "not valid.*too much memory"),
    ("window of 2 GiB", _frame(31, None, _rle(PS, last=True)), 1, "not valid.*too much memory"),
    ("three frames for two pages", _frame(20, PS, _rle(PS, last=True)) * 3, 2, "more than (the )?8192 bytes"),
    ("trailing garbage", _frame(20, None, _rle(PS)) + b"\xff" * 8, 1, "not valid"),
    ("trailing page data", _frame(20, None, _rle(PS) + _rle(1)), 1, "more than (the )?4096 bytes"),
    ("a block past the page", _frame(20, None, _rle(PS + 1)), 1, "more than (the )?4096 bytes"),
    ("a page of two blocks, then more", _frame(20, None, _rle(PS - 1) + _rle(2)), 1, "more than (the )?4096 bytes"),
    ("truncated", _frame(20, None, _rle(PS) + _rle(PS))[:-3], 2, "inflates to 4096 bytes, expected 8192"),
    ("empty", b"", 1, "inflates to 0 bytes, expected 4096"),
    ("not zstd", b"\xff" * 100, 1, "not valid"),
])
def test_hostile_zstd_packets_are_refused_within_the_packet(name, data, pages, error):
    _need_zstd()
    out = bytearray(pages * PS + 16)
    with pytest.raises(ValueError, match=error):
        PageCodec("zstd").decompress(data, memoryview(out)[:pages * PS])
    assert not any(out[pages * PS:]), "the codec wrote past the packet's pages"


def test_zstd_frames_the_source_may_send_are_accepted():
    """A frame that lies about its content size inside a packet, frames back to back,
    and the 32 MiB window of multifd-zstd-level 20 (QEMU's highest) all decode."""
    _need_zstd()
    import zstandard
    out = bytearray(2 * PS)
    PageCodec("zstd").decompress(_frame(20, 1 << 40, _rle(2 * PS)), memoryview(out))
    assert out == b"A" * 2 * PS
    PageCodec("zstd").decompress(_frame(20, PS, _rle(PS, 1, True)) + _frame(20, PS, _rle(PS, 2, True)),
                                 memoryview(out))
    assert out == b"\1" * PS + b"\2" * PS
    c = zstandard.ZstdCompressor(level=20).compressobj()
    data = c.compress(b"x" * PS) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    assert zstandard.get_frame_parameters(data).window_size == 32 << 20
    PageCodec("zstd").decompress(data, memoryview(out)[:PS])
    assert out[:PS] == b"x" * PS


def test_zstd_keeps_one_stream_per_channel_across_packets():
    """QEMU's source compresses a channel's packets as one stream (ZSTD_e_flush per
    packet), so later packets refer back to earlier ones: decoding them with a fresh
    context fails, with the channel's context gives the pages."""
    _need_zstd()
    plains, datas = _zstd_packets([3, 128, 1, 64])
    rx = PageCodec("zstd")
    for plain, data in zip(plains, datas):
        out = np.empty(len(plain), dtype=np.uint8)
        rx.decompress(data, memoryview(out))
        assert out.tobytes() == plain
    with pytest.raises(ValueError):
        PageCodec("zstd").decompress(datas[1], memoryview(bytearray(len(plains[1]))))


def test_zstd_decompression_allocates_no_more_than_the_packet():
    """tracemalloc: decoding a bomb for a one-page packet allocates a few KiB (the old
    1 KiB feed produced up to 32 MiB for one chunk before it checked), and a good
    128-page packet given a spare byte after its pages (as the receiver does) is
    inflated in place: no copy of its 512 KiB."""
    _need_zstd()
    bomb, good = _frame(20, 1 << 40, BOMB), _zstd_packets([128])[1][0]
    for data, out, size in [(bomb, bytearray(PS), ()), (good, bytearray(128 * PS + 1), (128 * PS,))]:
        rx = PageCodec("zstd")
        tracemalloc.start()
        try:
            rx.decompress(data, memoryview(out), *size)
        except ValueError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 << 10, f"{peak} bytes allocated to decode one packet"


# -- zlib -------------------------------------------------------------------------------
def _zlib_packet(pages: list[bytes], co=None) -> bytes:
    co = co or zlib.compressobj(1)
    return b"".join(co.compress(p) for p in pages) + co.flush(zlib.Z_SYNC_FLUSH)


@pytest.mark.parametrize("name, data, pages, error", [
    ("bomb", _zlib_packet([bytes(64 << 20)]), 1, "inflates to more than (the )?4096 bytes"),
    ("stream end", zlib.compress(bytes(PS)), 1, "Z_STREAM_END"),
    ("stream end, then more", zlib.compress(bytes(PS)) + b"\xff" * 8, 1, "Z_STREAM_END"),
    ("trailing page data", _zlib_packet([bytes(PS + 1)]), 1, "more than (the )?4096 bytes"),
    ("truncated", _zlib_packet([bytes(2 * PS)])[:-8], 2, r"inflates to \d+ bytes, expected 8192"),
    ("empty", b"", 1, "inflates to 0 bytes, expected 4096"),
    ("not zlib", b"\xff" * 100, 1, "not valid"),
])
def test_hostile_zlib_packets_are_refused_within_the_packet(name, data, pages, error):
    out = bytearray(pages * PS + 16)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=error):
            PageCodec("zlib").decompress(data, memoryview(out)[:pages * PS])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(data) + pages * PS + (64 << 10)
    assert not any(out[pages * PS:])


# -- the receiver names the channel, offset and packet --------------------------------
@pytest.mark.parametrize("method", ["zstd", "zlib"])
def test_receiver_names_a_bomb_packet_and_leaves_guest_ram_alone(method):
    if method == "zstd":
        _need_zstd()
        bomb = _frame(20, None, BOMB)
    else:
        bomb = _zlib_packet([bytes(64 << 20)])
    ram = GuestRAM()
    ram.add_block("ram", 1 << 20)
    recv = MultiFDRecv(ram, 1, compression=method)
    a, b = socket.socketpair()
    try:
        a.sendall(encode_init(0))
        recv.add_channel(SocketChannel(b, "r"), "connection 2")
        a.sendall(encode_packet(flags=COMPRESSION_FLAGS[method], packet_num=5, ramblock="ram", offsets=[PS],
                                normal_pages=1, next_packet_size=len(bomb)) + bomb)
        with pytest.raises(MultiFDError) as ei:
            recv.sync_main(100)
        msg = str(ei.value)
        assert "packet 5:" in msg and "inflates to more than" in msg and "(multifd channel 0, connection 2)" in msg
        assert ei.value.offset == 64 + packet_len(PS)        # where the packet's page data starts
        assert not ram.block("ram").array.any()
    finally:
        a.close()
        recv.close()
        ram.close()
