"""Page compression choices for ``npqfile migrate``: zlib in QEMU's wire format, zstd/lz4 on the wire.

Supports: ``parse_compress("zlib:6" | "zstd[:LEVEL]" | "lz4" | "none")`` -> :class:`Compression`;
zlib pages travel as QEMU's legacy ``RAM_SAVE_FLAG_COMPRESS_PAGE`` records (a real QEMU
with the ``compress`` capability loads them); zstd and lz4 exist in QEMU only for
multifd, which a single-channel stream has no record for, so here they compress the
channel under the unchanged QEMU stream (:class:`CompressingWriter` /
:class:`DecompressingReader`), like ``migrate "exec:zstd | ..."`` -- the destination must
be told the same ``--compress``.  The statistics say which kind was used
(``"where": "pages"`` or ``"channel"``) and how many bytes went in and out.

Goals: the QEMU stream bytes never change for zstd/lz4; a missing package is a clear
ValueError naming it; the channel holds standard data (one zstd frame, or a sequence of
LZ4 frames) that ``zstd -d`` / ``lz4 -d`` decode.  Plan: the writer compresses each
``writev`` batch and flushes the compressor block (so the destination can decode
everything sent so far -- a live stream must never stall in a compressor buffer) and
ends the zstd frame on ``close()``; the reader decodes into a pending buffer and serves
``readinto`` from it.  Each side passes its inner channel the position in the
*compressed* stream (``file:`` channels read and write at that offset).
"""

from __future__ import annotations

import errno
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from npqfile.channels import flat_bytes

READ_CHUNK = 1 << 18
_FRAME_MAGIC = {"zstd": b"\x28\xb5\x2f\xfd", "lz4": b"\x04\x22\x4d\x18"}
_KNOWN_MAGIC = {b"QEVM": "'QEVM', a plain QEMU migration stream: drop --compress",
                _FRAME_MAGIC["zstd"]: "a zstd frame: give --compress zstd",
                _FRAME_MAGIC["lz4"]: "an lz4 frame: give --compress lz4"}


@dataclass(frozen=True)
class Compression:
    method: str                  # none, zlib, zstd, lz4
    level: int | None = None

    @property
    def page_level(self) -> int | None:
        """The zlib level for RAMSaver's COMPRESS_PAGE records, or None."""
        return self.level if self.method == "zlib" else None

    @property
    def on_channel(self) -> bool:
        return self.method in ("zstd", "lz4")


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        pkg = "zstandard" if name == "zstandard" else "lz4"
        raise ValueError(f"compression {pkg.split('.')[0]!r} needs the Python package {pkg!r}, "
                         "which is not installed") from None


def parse_compress(spec: str | None) -> Compression:
    """``none``, ``zlib[:0-9]`` (default 1, QEMU's compress-level default), ``zstd[:1-22]``
    (default 3) or ``lz4``.  Raises ValueError for anything else or a missing package."""
    if spec in (None, "", "none"):
        return Compression("none")
    method, _, level_text = spec.partition(":")
    defaults = {"zlib": 1, "zstd": 3, "lz4": 0}
    if method not in defaults:
        raise ValueError(f"unknown compression {spec!r} (choose none, zlib[:LEVEL], zstd[:LEVEL], lz4)")
    try:
        level = int(level_text) if level_text else defaults[method]
    except ValueError:
        raise ValueError(f"bad compression level in {spec!r}") from None
    ranges = {"zlib": (0, 9), "zstd": (1, 22), "lz4": (0, 16)}
    lo, hi = ranges[method]
    if not lo <= level <= hi:
        raise ValueError(f"{method} level must be {lo}..{hi}, got {level}")
    if method == "zstd":
        _module("zstandard")
    elif method == "lz4":
        _module("lz4.frame")
    return Compression(method, level)


# What a codec wrapper takes from the connection it wraps: only calls that act on the
# connection itself.  Anything else -- native I/O (writev_iov, splice_iov), positional
# offsets -- would move or address bytes past the codec.
FORWARDED = frozenset({"close", "fileno", "shutdown", "get_return_path", "set_blocking", "set_stall_timeout",
                       "error", "pid", "returncode"})


def _forwarded(self, name: str) -> Any:
    """``__getattr__`` of the wrappers: the FORWARDED attributes of ``inner``."""
    if name in FORWARDED:
        return getattr(self.inner, name)
    # (nothing of self is read here: this runs for attributes __init__ has not set yet too)
    raise AttributeError(f"{type(self).__name__} has no {name!r} (its bytes go through its codec)")


class CompressingWriter:
    """A write channel that compresses what it is given (zstd or lz4 frames) into ``inner``."""

    def __init__(self, inner: Any, comp: Compression):
        self.inner = inner
        self.comp = comp
        self.bytes_in = 0
        self.bytes_out = 0
        self._finished = False
        self._closed = False
        if comp.method == "zstd":
            zstd = _module("zstandard")
            self._z = zstd.ZstdCompressor(level=comp.level).compressobj()
            self._flush_mode = zstd.COMPRESSOBJ_FLUSH_BLOCK
            self._finish_mode = zstd.COMPRESSOBJ_FLUSH_FINISH
        else:
            self._lz4 = _module("lz4.frame")

    def _compress(self, data: bytes) -> bytes:
        if self.comp.method == "zstd":
            return self._z.compress(data) + self._z.flush(self._flush_mode)
        # one LZ4 frame per batch: frames concatenate, and each is complete on arrival
        return self._lz4.compress(data, compression_level=self.comp.level)

    def writev(self, buffers: Sequence[Any], pos: int) -> int:
        """Compress ``buffers`` and write the result; returns the uncompressed count."""
        data = b"".join(flat_bytes(b) for b in buffers)
        out = self._compress(data)
        self.inner.writev([out], self.bytes_out)
        self.bytes_in += len(data)
        self.bytes_out += len(out)
        return len(data)

    def finish(self) -> int:
        """End the zstd frame (LZ4 frames are complete per batch); later calls do
        nothing.  Returns 0, or a negative errno when writing the frame end failed.  A
        peer that already hung up (EPIPE, ECONNRESET) is not an error: the epilogue
        follows the whole QEMU stream, which that peer read before closing."""
        if self._finished:
            return 0
        self._finished = True
        if self.comp.method != "zstd":
            return 0
        try:
            tail = self._z.flush(self._finish_mode)
            if tail:
                self.inner.writev([tail], self.bytes_out)
                self.bytes_out += len(tail)
        except (BrokenPipeError, ConnectionResetError):
            return 0
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return 0

    def close(self) -> int:
        """``finish()``, then close ``inner``.  Returns 0, or a negative errno when the
        frame end could not be written or closing failed (``inner`` is closed either
        way).  Idempotent."""
        ret = self.finish()
        if self._closed:
            return ret
        self._closed = True
        close = getattr(self.inner, "close", None)
        ret2 = close() if close is not None else 0
        return ret if ret < 0 else int(ret2 or 0)

    __getattr__ = _forwarded


class DecompressingReader:
    """A read channel that decodes what ``inner`` delivers (the peer of CompressingWriter)."""

    def __init__(self, inner: Any, comp: Compression):
        self.inner = inner
        self.comp = comp
        self._pending = bytearray()
        self._raw = bytearray(READ_CHUNK)
        self._raw_pos = 0            # compressed bytes consumed: the inner channel's position
        self._eof = False
        self._head: bytearray | None = bytearray()   # the first bytes, until the frame magic is checked
        if comp.method == "zstd":
            zstd = _module("zstandard")
            self._z = zstd.ZstdDecompressor().decompressobj()
            self._errors: tuple[type[BaseException], ...] = (zstd.ZstdError,)
        else:
            self._lz4 = _module("lz4.frame")
            self._d = self._lz4.LZ4FrameDecompressor()
            self._errors = (RuntimeError, ValueError)    # what lz4.frame raises on bad input

    def _decode(self, data: bytes) -> bytes:
        if self.comp.method == "zstd":
            return self._z.decompress(data)
        out = []
        while data:
            out.append(self._d.decompress(data))
            if not self._d.eof:
                break
            data = self._d.unused_data
            self._d = self._lz4.LZ4FrameDecompressor()
        return b"".join(out)

    def readinto(self, buf: memoryview, pos: int) -> int:
        """Decoded bytes into ``buf``: >= 1, or 0 at end of stream; OSError for corrupt input."""
        while not self._pending and not self._eof:
            # ``pos`` counts decoded bytes; a positional inner channel (file:) needs
            # its own offset, the compressed bytes read so far
            n = self.inner.readinto(memoryview(self._raw), self._raw_pos)
            if n == 0:
                self._eof = True
                break
            self._raw_pos += n
            data = bytes(self._raw[:n])
            if self._head is not None:
                self._head += data
                if len(self._head) < 4:
                    continue
                data, self._head = self._check_magic(bytes(self._head)), None
            try:
                self._pending += self._decode(data)
            except self._errors as exc:
                raise OSError(errno.EIO, f"{self.comp.method} decompression failed at compressed offset "
                                         f"{self._raw_pos - n}..{self._raw_pos}: {exc}") from None
        if self._eof and self._head:
            self._check_magic(bytes(self._head))   # fewer than 4 bytes in all: not a frame either
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        del self._pending[:n]
        return n

    def _check_magic(self, head: bytes) -> bytes:
        """Return ``head`` when it starts with the method's frame magic; otherwise raise
        OSError(EIO) saying the stream is not compressed that way and what it is (a
        decoder's own message, or "truncated stream", would hide that)."""
        if head[:4] == _FRAME_MAGIC[self.comp.method]:
            return head
        found = head[:4]
        hint = _KNOWN_MAGIC.get(found)
        raise OSError(errno.EIO, f"the stream is not {self.comp.method}-compressed: it starts with "
                                 f"{found.hex() or 'nothing'}" + (f" ({hint})" if hint else ""))

    __getattr__ = _forwarded
