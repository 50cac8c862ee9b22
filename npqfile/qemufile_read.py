"""The read side of QEMUFile: read-ahead buffer, peeks, gets.

Supports: the seed's ``get_byte``, ``get_be16/32/64``, ``get_buffer`` (straight into a
numpy view of RAM), ``get_buffer_in_place``, ``peek_byte``, ``peek_buffer``, ``skip``
and ``get_counted_string``.

Goals: the seed's values and sticky errors (end of stream is -EIO; gets return 0 or
garbage then, as in QEMU, so callers check ``get_error``), without its silent short
reads: a fill returns data or records an error, a non-blocking channel is waited on.

Plan: a mixin of ``QEMUFile``.  ``_buf[_buf_index:_buf_size]`` holds read-ahead bytes;
``_fill_buffer`` moves them to the front and reads more; fast paths serve gets from the
buffer with one slice or one ``struct`` unpack.
"""

from __future__ import annotations

import errno
import struct
import time
from typing import Any

from npqfile.buffers import flat_bytes
from npqfile.channels.base import wait_readable

_be16 = struct.Struct(">H")
_be32 = struct.Struct(">I")
_be64 = struct.Struct(">Q")


class ReadSide:
    """The gets and peeks of ``QEMUFile`` (a mixin: the state lives there)."""

    __slots__ = ()

    def _fill_buffer(self) -> int:
        """qemu_fill_buffer: move the pending bytes to the front and read more.

        Returns the bytes read (> 0), 0 when an error is (now) recorded -- end of
        stream is a sticky -EIO -- never a short read without an error.  A
        non-blocking channel with nothing to read is waited on."""
        if self._writable:
            raise ValueError("cannot read from a writable QEMUFile")
        if self._closed:
            raise ValueError("QEMUFile is closed")
        i, size = self._buf_index, self._buf_size
        pending = size - i
        if pending > 0 and i > 0:
            self._bufmv[:pending] = self._bufmv[i:size]
        self._buf_index = 0
        self._buf_size = pending
        if self._last_error:
            return 0
        room = self._bufmv[pending:]
        while True:
            try:
                n = self._channel.readinto(room, self._pos)
            except (BlockingIOError, InterruptedError):
                n = None
            except OSError as exc:
                self.set_error(-(exc.errno or errno.EIO), f"read at stream offset {self._pos} failed: {exc.strerror or exc}")
                return 0
            if n is None:
                self._wait_readable()
                continue
            break
        if not isinstance(n, int) or not 0 <= n <= len(room):
            self.set_error(-errno.EIO, f"channel readinto returned {n!r} for a {len(room)}-byte buffer")
            return 0
        if n > 0:
            self._buf_size += n
            self._pos += n
            return n
        self._eof = not self._last_error   # only if end of stream is the first error
        self.set_error(-errno.EIO, f"unexpected end of stream at offset {self._pos}")
        return 0

    def _wait_readable(self) -> None:
        fileno = getattr(self._channel, "fileno", None)
        if fileno is None:
            time.sleep(0.001)
            return
        wait_readable([fileno()], 1.0)

    def _check_readable_peek(self, size: int, offset: int) -> None:
        if self._writable:
            raise ValueError("cannot peek a writable QEMUFile")
        if self._closed:
            raise ValueError("QEMUFile is closed")
        if not 0 <= offset < self._io_buf_size:
            raise ValueError(f"peek offset {offset} outside 0..{self._io_buf_size - 1}")
        if not 0 <= size <= self._io_buf_size - offset:
            raise ValueError(f"peek of {size} bytes at offset {offset} exceeds the {self._io_buf_size}-byte buffer")

    def peek_buffer(self, size: int, offset: int = 0) -> memoryview:
        """qemu_peek_buffer: a view of ``size`` bytes starting ``offset`` bytes ahead,
        without consuming them.  Shorter only at end of stream or error (recorded).
        The view is valid until the next operation on this file."""
        self._check_readable_peek(size, offset)
        index = self._buf_index + offset
        pending = self._buf_size - index
        while pending < size:
            filled = self._fill_buffer()
            # the fill moved the pending bytes to the front even when it read nothing
            index = self._buf_index + offset
            pending = self._buf_size - index
            if filled <= 0:
                break
        if pending <= 0:
            return self._bufmv[0:0]
        return self._bufmv[index:index + min(size, pending)]

    def buffered(self) -> memoryview:
        """The read-ahead bytes already in the buffer, not consumed and without any I/O
        (not in QEMU: a reader parses many records from it at once, then skips them).
        The view is valid until the next operation on this file."""
        return self._bufmv[self._buf_index:self._buf_size]

    def skip(self, n: int) -> None:
        """qemu_file_skip: consume ``n`` buffered bytes; does nothing when fewer than
        ``n`` are buffered (as in QEMU: peek first)."""
        if n < 0:
            raise ValueError(f"cannot skip a negative byte count ({n})")
        if self._buf_index + n <= self._buf_size:
            self._buf_index += n

    def get_buffer(self, buf: Any) -> int:
        """qemu_get_buffer: fill the writable buffer ``buf`` (bytearray, memoryview,
        numpy view of RAM) from the stream.  Returns the bytes copied: fewer than
        ``len(buf)`` only at end of stream or error, which is then recorded."""
        dst = flat_bytes(buf)
        if dst.readonly:
            raise TypeError("get_buffer needs a writable buffer")
        size = dst.nbytes
        i = self._buf_index
        if self._buf_size - i >= size:  # fast path: all of it is buffered
            dst[:] = self._bufmv[i:i + size]
            self._buf_index = i + size
            return size
        done = 0
        while done < size:
            src = self.peek_buffer(min(size - done, self._io_buf_size), 0)
            n = len(src)
            if n == 0:
                break
            dst[done:done + n] = src
            self._buf_index += n
            done += n
        return done

    def get_buffer_partial(self, buf: Any) -> int:
        """Fill the start of ``buf`` with what is at hand: the buffered bytes, or one
        channel read's worth when none are buffered (not in QEMU; for readers that must
        not wait for bytes that may never come, e.g. a tail of unknown length).  Returns
        the bytes copied, >= 1 unless at end of stream or error (then recorded)."""
        dst = flat_bytes(buf)
        if dst.readonly:
            raise TypeError("get_buffer_partial needs a writable buffer")
        if not dst.nbytes:
            return 0
        src = self.peek_buffer(1, 0)
        if not len(src):
            return 0
        i = self._buf_index
        n = min(dst.nbytes, self._buf_size - i)
        dst[:n] = self._bufmv[i:i + n]
        self._buf_index = i + n
        return n

    def get_buffer_in_place(self, buf: Any) -> memoryview:
        """qemu_get_buffer_in_place: ``len(buf)`` bytes, as a view of the internal buffer
        when they fit (valid until the next operation), else copied into ``buf`` and
        returned as a view of it.  Shorter only at end of stream or error."""
        dst = flat_bytes(buf)
        size = dst.nbytes
        if size < self._io_buf_size:
            src = self.peek_buffer(size, 0)
            if len(src) == size:
                self._buf_index += size
                return src
        return dst[: self.get_buffer(dst)]

    def peek_byte(self, offset: int = 0) -> int:
        """qemu_peek_byte: the byte ``offset`` ahead, not consumed; 0 at end of stream
        or error (recorded: check ``get_error``)."""
        index = self._buf_index + offset
        if index < self._buf_size and offset >= 0:
            return self._buf[index]
        view = self.peek_buffer(1, offset)
        return view[0] if len(view) else 0

    def get_byte(self) -> int:
        """qemu_get_byte: the next byte, or 0 at end of stream/error (recorded)."""
        i = self._buf_index
        if i < self._buf_size:
            self._buf_index = i + 1
            return self._buf[i]
        v = self.peek_byte(0)
        self.skip(1)
        return v

    def _get_small(self, unpacker: struct.Struct, n: int) -> int:
        i = self._buf_index
        if self._buf_size - i < n:
            v = 0
            for _ in range(n):
                v = (v << 8) | self.get_byte()
            return v
        self._buf_index = i + n
        return unpacker.unpack_from(self._buf, i)[0]

    def get_be16(self) -> int:
        """qemu_get_be16 (unsigned; garbage plus a recorded -EIO at end of stream)."""
        return self._get_small(_be16, 2)

    def get_be32(self) -> int:
        """qemu_get_be32 (unsigned; garbage plus a recorded -EIO at end of stream)."""
        return self._get_small(_be32, 4)

    def get_be64(self) -> int:
        """qemu_get_be64 (unsigned; garbage plus a recorded -EIO at end of stream)."""
        return self._get_small(_be64, 8)

    def get_counted_string(self) -> bytes:
        """qemu_get_counted_string: a length byte and that many bytes.  Returns b"" on a
        short read (check ``get_error``) -- and for an empty string, as in QEMU."""
        n = self.get_byte()
        out = bytearray(n)
        got = self.get_buffer(out)
        return bytes(out) if got == n else b""
