"""QEMUFile: QEMU's buffered migration stream (migration/qemu-file.c) in Python.

What it supports: everything the seed's QEMUFile does -- big-endian puts and gets,
counted strings, a 32 KiB staging buffer, up to 64 queued iovecs with zero-copy
``put_buffer_async`` views, release of sent guest RAM (``may_free``), rate limiting,
RAM-control hooks, legacy page compression -- over any channel that follows the
protocol in ``npqfile.channels`` (a ``writev`` for writers, a ``readinto`` for readers).

Goals: the bytes handed to the channel and the points where they are handed over
(``fflush``) are the seed's, so that a user who knows QEMU can reason about our
streams exactly as about QEMU's; the bugs QEMU fixed since the seed are fixed here too
(see README, "Differences from QEMU"); and the per-page path stays cheap enough to
stream a GiB in well under a second.

Plan: one class, two directions fixed at construction; its puts and ``fflush`` are in
``qemufile_write`` and its gets in ``qemufile_read`` (mixins, so each reads in one
sitting), the state, lifetime, errors, positions, rate limit and hooks here.  Write side: small puts are
copied into ``_buf`` and described by internal iovec entries; ``put_buffer_async``
queues the caller's memory itself.  An iovec entry is a list
``[view, start, length, may_free, root]``: for the staging buffer ``view`` is None and
``start`` is the offset in ``_buf``; for caller memory ``view`` is the caller's
(C-contiguous) memoryview -- or the list of views coalesced into one run, whose single
view is cut from ``root`` at flush time -- ``root`` the object that owns the memory (an
mmap for RAM, see ``npqfile.buffers``) and ``start`` its address, computed only when
needed (coalescing or release), because taking an address costs more than the rest of
a put.  Read side: ``_buf[_buf_index:_buf_size]`` holds read-ahead
bytes, refilled by ``_fill_buffer`` which never returns short without an error.

Not thread-safe, like QEMU's: one thread drives one QEMUFile.
"""

from __future__ import annotations

import errno
import logging
import operator
import os
from collections.abc import Callable
from typing import Any

from npqfile.errors import FileError
from npqfile.qemufile_offsets import FileOffsets
from npqfile.qemufile_read import ReadSide
from npqfile.qemufile_write import WriteSide, compress_bound
from npqfile.qemufile_zerocopy import SpliceHeaders

__all__ = [
    "QEMUFile",
    "IO_BUF_SIZE",
    "MAX_IOV_SIZE",
    "compress_bound",
    "RAM_CONTROL_SETUP",
    "RAM_CONTROL_ROUND",
    "RAM_CONTROL_HOOK",
    "RAM_CONTROL_FINISH",
    "RAM_CONTROL_BLOCK_REG",
    "RAM_SAVE_FLAG_HOOK",
    "RAM_SAVE_CONTROL_NOT_SUPP",
    "RAM_SAVE_CONTROL_DELAYED",
]

log = logging.getLogger(__name__)

IO_BUF_SIZE = 32768
# A loading reader's buffer (opt-in, ``read_ahead=READ_AHEAD``): QEMU reads ahead at most
# IO_BUF_SIZE; reading more per syscall is invisible on the wire and lets the RAM loader
# take a few hundred page records per fill (ram_loader's fast path).  Peeks stay bounded
# by io_buf_size, as in QEMU; only ftell (the channel position) moves further ahead.
READ_AHEAD = 1 << 20
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
MAX_IOV_SIZE = min(_IOV_MAX, 64)

# RAM control hooks (the seed's QEMUFileHooks; RDMA used them).
RAM_CONTROL_SETUP = 0
RAM_CONTROL_ROUND = 1
RAM_CONTROL_HOOK = 2
RAM_CONTROL_FINISH = 3
RAM_CONTROL_BLOCK_REG = 4
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_CONTROL_NOT_SUPP = -1000
RAM_SAVE_CONTROL_DELAYED = -2000

_LENGTH = operator.itemgetter(2)  # of an iovec entry


class QEMUFile(WriteSide, ReadSide, FileOffsets):
    """A migration stream over ``channel``; see the module docstring.

    ``QEMUFile(channel)`` is ``qemu_fopen_ops``: writable when the channel has
    ``writev``, readable when it has ``readinto`` (exactly one of the two).
    ``io_buf_size`` and ``max_iov`` are QEMU's IO_BUF_SIZE and MAX_IOV_SIZE.
    ``read_ahead`` (readers only): the most bytes one channel read may take (default
    ``io_buf_size``, QEMU's; loaders pass READ_AHEAD).  ``zero_copy_send`` (writers; QEMU's
    capability name): on a pipe channel, the pages of ``put_records(..., PageRun)`` go into
    the pipe by reference (vmsplice) -- their bytes are read when the pipe's reader reads
    them, so the memory must be guest RAM or otherwise unchanged or dirty-tracked until
    then; see ``qemufile_zerocopy``.  Ignored on other channels.
    """

    __slots__ = (
        "_channel", "_writable", "_io_buf_size", "_max_iov", "_buf", "_bufmv",
        "_buf_index", "_buf_size", "_iov", "_tail", "_has_free",
        "_pos", "_bytes_xfer", "_xfer_limit", "_last_error", "_error", "_hooks",
        "_closed", "_no_puts", "_xfer_adjust", "_last_obj", "_last_root", "released_bytes", "release_errors", "_eof", "_splice", "__weakref__",
    )

    def __init__(self, channel: Any, *, io_buf_size: int = IO_BUF_SIZE, max_iov: int = MAX_IOV_SIZE,
                 read_ahead: int | None = None, zero_copy_send: bool = False):
        can_write = callable(getattr(channel, "writev", None))
        can_read = callable(getattr(channel, "readinto", None))
        if can_write == can_read:
            what = "both writev and readinto" if can_write else "neither writev nor readinto"
            raise ValueError(f"a QEMUFile channel needs exactly one direction; {channel!r} has {what}")
        if io_buf_size < 16:
            raise ValueError(f"io_buf_size must be at least 16, not {io_buf_size}")
        if not 1 <= max_iov <= _IOV_MAX:
            raise ValueError(f"max_iov must be in 1..{_IOV_MAX}, not {max_iov}")
        if read_ahead is None:
            read_ahead = io_buf_size
        elif read_ahead < io_buf_size:
            raise ValueError(f"read_ahead must be at least io_buf_size ({io_buf_size}), not {read_ahead}")
        self._channel = channel
        self._writable = can_write
        self._io_buf_size = io_buf_size
        self._max_iov = max_iov
        self._buf = bytearray(io_buf_size if can_write else read_ahead)
        self._bufmv = memoryview(self._buf)
        self._buf_index = 0
        self._buf_size = 0  # 0 when writing
        self._iov: list[list] = []
        self._tail: list | None = None  # the last iovec when it is staging buffer ending at _buf_index
        self._has_free = False  # some queued iovec is may_free
        self._pos = 0  # start of buffer when writing, end of buffer when reading
        self._bytes_xfer = 0
        self._xfer_adjust = 0  # ftell minus file position: bytes put at offsets, less offset jumps
        self._xfer_limit = 0
        self._last_error = 0
        self._error: FileError | None = None
        self._hooks: Any = None
        self._closed = False
        self._eof = False  # the channel reported end of stream (the -EIO recorded then)
        self._no_puts = not can_write  # puts refused (reader, closed) or no-ops (error)
        self._last_obj: Any = None  # memoryview.obj of the last async buffer and its root:
        self._last_root: Any = None  # resolving a root walks numpy bases, so cache one
        self.released_bytes = 0  # bytes of guest RAM released after successful writes
        self.release_errors = 0  # release calls that failed (reported, not fatal, as in QEMU)
        # zero_copy_send on a pipe: RAM pages of the native page path go in by reference
        self._splice: SpliceHeaders | None = None
        if zero_copy_send and can_write and getattr(channel, "is_pipe", lambda: False)():
            self._splice = SpliceHeaders()

    # -- lifetime ---------------------------------------------------------------------

    def __enter__(self) -> QEMUFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "w" if self._writable else "r"
        return f"<QEMUFile {mode} pos={self._pos} error={self._last_error} channel={self._channel!r}>"

    @property
    def channel(self) -> Any:
        return self._channel

    @property
    def is_writable(self) -> bool:
        """qemu_file_is_writable."""
        return self._writable

    def close(self) -> int:
        """qemu_fclose: flush, close the channel, return 0 (or the channel's positive
        result) or a negative errno.  The first stream error wins over the close result;
        a close error is recorded (and returned) rather than hidden.  Idempotent."""
        if self._closed:
            return self._last_error
        self.fflush()
        ret = self._last_error
        close = getattr(self._channel, "close", None)
        if close is not None:
            why = None
            try:
                ret2 = close()
            except OSError as exc:
                ret2, why = -(exc.errno or errno.EIO), str(exc)
            ret2 = 0 if ret2 is None else int(ret2)
            if ret2 < 0:
                why = why or getattr(self._channel, "error", None) or os.strerror(-ret2)
                self.set_error(ret2, f"closing the channel failed ({why})")
            if ret >= 0:
                ret = ret2
        if self._last_error:
            ret = self._last_error
        self._closed = self._no_puts = True
        self._iov.clear()
        self._buf_index = self._buf_size = 0  # gets fall to the checked path
        self._last_obj = self._last_root = None
        if self._splice is not None:
            self._splice.close()
            self._splice = None
        return ret

    def shutdown(self) -> int:
        """qemu_file_shutdown: record -EIO first (so a racing reader never takes zeros
        for data), then shut the channel down.  Returns 0, -ENOSYS when the channel
        cannot shut down (the error is recorded anyway), or -EIO when shutdown failed."""
        if not self._last_error:
            self.set_error(-errno.EIO, "stream shut down")
        shutdown = getattr(self._channel, "shutdown", None)
        if shutdown is None:
            return -errno.ENOSYS
        try:
            shutdown(True, True)
        except OSError as exc:
            log.warning("shutdown of %r failed: %s", self._channel, exc)
            return -errno.EIO
        return 0

    def get_return_path(self) -> QEMUFile | None:
        """qemu_file_get_return_path: a QEMUFile for the opposite direction on the same
        connection, or None when the channel has none."""
        get = getattr(self._channel, "get_return_path", None)
        if get is None:
            return None
        ch = get()
        return None if ch is None else QEMUFile(ch, io_buf_size=self._io_buf_size, max_iov=self._max_iov)

    def set_blocking(self, flag: bool) -> None:
        """qemu_file_set_blocking: passed to the channel when it supports it."""
        fn = getattr(self._channel, "set_blocking", None)
        if fn is not None:
            fn(flag)

    # -- errors -----------------------------------------------------------------------

    def get_error(self) -> int:
        """qemu_file_get_error: 0, or the first error as a negative errno."""
        return self._last_error

    def set_error(self, ret: int, msg: str | None = None) -> None:
        """qemu_file_set_error: record ``ret`` (a negative errno) unless an error is
        already recorded; the first error and its message stick."""
        if self._last_error == 0 and ret != 0:
            self._last_error = ret
            self._no_puts = True
            code = abs(ret)
            try:
                text = os.strerror(code)
            except ValueError:
                text = f"error {code}"
            if not msg:
                msg = text
            elif text not in msg:
                msg = f"{msg}: {text}"
            self._error = FileError(code, msg)

    @property
    def at_eof(self) -> bool:
        """True when the recorded error is the end of the stream (the channel read 0
        bytes), not a read error or a ``shutdown()`` (both also -EIO, as in QEMU)."""
        return self._eof

    @property
    def error(self) -> FileError | None:
        """The first error as an exception (errno and message), or None."""
        return self._error

    # -- positions and rate limiting --------------------------------------------------

    @property
    def _queued(self) -> int:
        """Bytes described by the queued iovecs."""
        return sum(map(_LENGTH, self._iov))

    def ftell_fast(self) -> int:
        """qemu_ftell_fast: bytes written plus bytes queued, without flushing."""
        return self._pos + self._queued + self._xfer_adjust

    def ftell(self) -> int:
        """qemu_ftell: flush, then the byte count the channel took (writers) or the
        stream offset of the end of the read-ahead buffer (readers).  Like QEMU's
        ``qemu_file_transferred``, bytes put at file offsets count and jumps of
        ``set_offset`` do not (see ``qemufile_offsets``)."""
        self.fflush()
        return self._pos + self._xfer_adjust

    def tell(self) -> int:
        """Logical stream offset of the next byte to put or get (not in QEMU: readers
        need it to name the offset of a bad record)."""
        if self._writable:
            return self._pos + self._queued
        return self._pos - (self._buf_size - self._buf_index)

    def update_position(self, n: int) -> None:
        """qemu_update_position: credit ``n`` bytes sent outside the stream (RDMA)."""
        self._pos += n

    def rate_limit(self) -> bool:
        """qemu_file_rate_limit: True when an error is recorded or more than the limit
        was queued since the last reset (a limit of 0 means unlimited)."""
        if self._last_error:
            return True
        return 0 < self._xfer_limit < self._bytes_xfer

    def get_rate_limit(self) -> int:
        return self._xfer_limit

    def set_rate_limit(self, limit: int) -> None:
        """Bytes allowed per window (QEMU: max_bandwidth / 10 per 100 ms)."""
        self._xfer_limit = int(limit)

    def reset_rate_limit(self) -> None:
        """Start a new window: the byte count starts again from 0."""
        self._bytes_xfer = 0

    @property
    def bytes_xfer(self) -> int:
        """Bytes queued since the last ``reset_rate_limit``."""
        return self._bytes_xfer

    # -- RAM control hooks ------------------------------------------------------------

    def set_hooks(self, hooks: Any) -> None:
        """qemu_file_set_hooks: ``hooks`` may define before_ram_iterate(f, flags, data),
        after_ram_iterate(f, flags, data), hook_ram_load(f, flags, data) and
        save_page(f, block_offset, offset, size) -> (ret, bytes_sent); each returns a
        negative errno on failure."""
        self._hooks = hooks

    def _hook(self, name: str) -> Callable | None:
        return getattr(self._hooks, name, None) if self._hooks is not None else None

    def _call_hook(self, name: str, flags: int, data: Any) -> bool:
        """Run hook ``name`` if installed; a negative result becomes the stream error.
        Returns whether the hook exists."""
        fn = self._hook(name)
        if fn is None:
            return False
        ret = fn(self, flags, data)
        if ret is not None and not isinstance(ret, int):
            raise TypeError(f"{name} hook returned {ret!r}; hooks return 0 or a negative errno")
        if ret is not None and ret < 0:
            self.set_error(ret, f"{name} hook failed")
        return True

    def ram_control_before_iterate(self, flags: int) -> None:
        self._call_hook("before_ram_iterate", flags, None)

    def ram_control_after_iterate(self, flags: int) -> None:
        self._call_hook("after_ram_iterate", flags, None)

    def ram_control_load_hook(self, flags: int, data: Any = None) -> None:
        """Without a load hook, only RAM_CONTROL_HOOK is an error (-EINVAL): the source
        sent a hook record that needs a hook here."""
        if not self._call_hook("hook_ram_load", flags, data) and flags == RAM_CONTROL_HOOK:
            self.set_error(-errno.EINVAL, "RAM hook record received but no load hook is installed")

    def ram_control_save_page(self, block_offset: int, offset: int, size: int) -> tuple[int, int]:
        """Returns ``(ret, bytes_sent)``; ``ret`` is RAM_SAVE_CONTROL_NOT_SUPP without a
        save_page hook.  Accounting as in the seed."""
        fn = self._hook("save_page")
        if fn is None:
            return RAM_SAVE_CONTROL_NOT_SUPP, 0
        result = fn(self, block_offset, offset, size)
        try:
            ret, bytes_sent = result
        except (TypeError, ValueError):
            raise TypeError(f"the save_page hook must return (ret, bytes_sent), not {result!r}") from None
        if ret != RAM_SAVE_CONTROL_NOT_SUPP:
            self._bytes_xfer += size
        if ret not in (RAM_SAVE_CONTROL_DELAYED, RAM_SAVE_CONTROL_NOT_SUPP):
            if bytes_sent > 0:
                self.update_position(bytes_sent)
            elif ret < 0:
                self.set_error(ret, "save_page hook failed")
        return ret, bytes_sent
