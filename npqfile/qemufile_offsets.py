"""QEMUFile at file offsets: QEMU 9.0's ``qemu_set_offset``, ``qemu_get_offset``,
``qemu_put_buffer_at`` and ``qemu_get_buffer_at``, for the mapped-ram file layout.

Supports: moving the stream position of a QEMUFile over a positional channel (a regular
file opened through ``file:``; its ``writev``/``readinto`` honour the position they are
given), and reading or writing a buffer at an absolute file offset without moving the
stream.  Goals: the mapped-ram saver and loader (``npqfile.stream.mapped_ram``) place
pages at fixed offsets and skip whole page regions as QEMU does, without reading or
writing the holes.  Errors: a channel without offsets is a ValueError (QEMU asserts);
an I/O failure is recorded as the file's sticky error and returned as -errno.

Plan: a mixin of ``QEMUFile`` (the state lives there): a writer flushes before it
moves, a reader drops its read-ahead buffer.  As in QEMU, the file position and the
bytes transferred part ways here: ``tell()`` is the file position, ``ftell()`` /
``ftell_fast()`` the bytes transferred (``_xfer_adjust`` adds the bytes put at offsets
and takes away the jumps), which is what bandwidth and statistics want.
"""

from __future__ import annotations

import errno
import os
from typing import Any


class FileOffsets:
    """The offset functions of ``QEMUFile`` (a mixin)."""

    __slots__ = ()

    @property
    def seekable(self) -> bool:
        """True when the channel does I/O at the offsets it is given (a regular file)."""
        return bool(getattr(self._channel, "positional", False))

    def _need_offsets(self, what: str) -> None:
        if self._closed:
            raise ValueError("QEMUFile is closed")
        if not self.seekable:
            raise ValueError(f"{what} needs a seekable file (file: URI on a regular file), "
                             f"not {self._channel!r}")

    def file_size(self) -> int:
        """The size of the underlying file in bytes (``fstat``); OSError if it cannot be read."""
        return os.fstat(self._channel.fileno()).st_size

    def get_offset(self) -> int:
        """qemu_get_offset: the file offset of the next byte put or got (flushes a writer)."""
        self._need_offsets("qemu_get_offset")
        if self._writable:
            self.fflush()
            return self._pos
        return self.tell()

    def set_offset(self, offset: int) -> int:
        """qemu_set_offset(SEEK_SET): the next put or get happens at ``offset``.  A writer
        flushes first.  Returns 0 or the sticky error; ValueError for a negative offset
        or a channel without offsets."""
        self._need_offsets("qemu_set_offset")
        if offset < 0:
            raise ValueError(f"negative file offset {offset}")
        if self._writable:
            ret = self.fflush()
            if ret:
                return ret
        else:
            self._buf_index = self._buf_size = 0
        self._xfer_adjust -= offset - self._pos     # a jump transfers nothing
        self._pos = offset
        return self._last_error

    def put_buffer_at(self, buf: Any, pos: int) -> int:
        """qemu_put_buffer_at: write all of ``buf`` at file offset ``pos`` now (the stream
        position does not move).  Returns the byte count, or -errno once an error is
        recorded (nothing is written after an error)."""
        self._need_offsets("qemu_put_buffer_at")
        if not self._writable:
            raise ValueError("cannot write to a readable QEMUFile")
        if self._last_error:
            return self._last_error
        view = memoryview(buf).cast("B")
        try:
            n = self._channel.writev([view], pos)
        except OSError as exc:
            self.set_error(-(exc.errno or errno.EIO), f"write of {len(view)} bytes at file offset {pos} "
                                                       f"failed: {exc.strerror or exc}")
            return self._last_error
        if n != len(view):
            self.set_error(-errno.EIO, f"short write at file offset {pos}: {n} of {len(view)} bytes")
            return self._last_error
        self._bytes_xfer += n      # counts towards the rate limit, as QEMU's qemu_file_transferred
        self._xfer_adjust += n     # and towards ftell
        return n

    def get_buffer_at(self, buf: Any, pos: int) -> int:
        """qemu_get_buffer_at: fill ``buf`` from file offset ``pos`` (the stream position
        does not move).  Returns the bytes read: fewer than ``len(buf)`` only at the end
        of the file (no error recorded: the caller says what was missing), or -errno
        after an I/O error (recorded)."""
        self._need_offsets("qemu_get_buffer_at")
        if self._writable:
            raise ValueError("cannot read from a writable QEMUFile")
        if self._last_error:
            return self._last_error
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            try:
                n = self._channel.readinto(view[done:], pos + done)
            except InterruptedError:
                continue
            except OSError as exc:
                self.set_error(-(exc.errno or errno.EIO), f"read at file offset {pos + done} failed: "
                                                           f"{exc.strerror or exc}")
                return self._last_error
            if not n:
                break
            done += n
        return done
