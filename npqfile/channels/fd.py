"""Channels over file descriptors: pipes and inherited fds (`fd:N`), regular files (`file:PATH`) and
child processes (`exec:CMD`).

Supports: `FdChannel(fd, mode)` (readv/writev at the fd's own position), `FileChannel(path, mode)`
(preadv/pwritev at the stream position QEMUFile passes, like QEMU's savevm file backend) and
`ExecChannel(cmd, mode)` (`sh -c CMD`, writing its stdin or reading its stdout, like QEMU's `exec:`).
Goals: every writev writes everything (short writes, IOV_MAX, EAGAIN on non-blocking fds are handled in
`base.write_all`), reads straight into the caller's memoryview, and no fd or zombie process left behind.
Plan: the mode picks a reader or writer subclass, so only writers have `writev` and only readers have
`readinto`; closing is idempotent and reports a negative errno like QEMU's close ops.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
from typing import Any, Sequence

from .base import Closing, pick_direction, wait_writable, write_all
from .iovec import splice_available, vmsplice_iov, write_iov


class FdChannel(Closing):
    """A channel over an open file descriptor (QEMU: QIOChannelFile).

    ``FdChannel(fd, "w")`` is an `FdWriter`, ``FdChannel(fd, "r")`` an `FdReader`.  With ``close_fd``
    (default) ``close()`` closes the fd.  Works in blocking and non-blocking mode."""

    def __new__(cls, fd: int, mode: str = "r", **kwargs: Any):
        return object.__new__(pick_direction(cls, FdChannel, mode, FdReader, FdWriter))

    def __init__(self, fd: int, mode: str = "r", *, close_fd: bool = True) -> None:
        self._fd = fd
        self.mode = mode
        self._close_fd = close_fd

    def fileno(self) -> int:
        """The file descriptor (-1 once closed)."""
        return self._fd

    def set_blocking(self, flag: bool) -> None:
        """Switch the fd between blocking and non-blocking mode (OSError if the fd is bad)."""
        os.set_blocking(self._fd, flag)

    def close(self) -> int:
        """Close the fd if this channel owns it; returns 0, or -errno if close(2) failed."""
        fd, self._fd = self._fd, -1
        if fd < 0 or not self._close_fd:
            return 0
        try:
            os.close(fd)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self._fd}>"


class FdReader(FdChannel):
    def readinto(self, buf: memoryview, pos: int) -> int:
        """Read into ``buf`` from the fd's current position (``pos`` is ignored: pipes have none).
        Returns the count (0 at EOF); BlockingIOError when non-blocking and empty; OSError on failure."""
        return os.readv(self._fd, (buf,))


class FdWriter(FdChannel):
    def writev(self, buffers: Sequence[Any], pos: int) -> int:
        """Write all ``buffers`` at the fd's current position; returns the byte count (see write_all)."""
        fd = self._fd
        return write_all(buffers, lambda batch, _offset: os.writev(fd, batch), lambda: wait_writable(fd))

    def writev_iov(self, iov: Any, total: int, pos: int) -> int:
        """``writev`` of native iovecs (see `iovec.write_iov`): the same bytes and syscalls as
        ``writev`` of the buffers they describe; returns ``total``; OSError on failure."""
        fd = self._fd
        return write_iov(fd, iov, total, lambda: wait_writable(fd))

    def is_pipe(self) -> bool:
        """Whether the fd is a pipe or FIFO: then ``splice_iov`` can be used."""
        try:
            return stat.S_ISFIFO(os.fstat(self._fd).st_mode) and splice_available()
        except OSError:
            return False

    def splice_iov(self, iov: Any, total: int, pos: int) -> int:
        """``writev_iov`` by reference (vmsplice, see `iovec.vmsplice_iov`): the memory must
        stay unchanged until read (see ``npqfile.qemufile_zerocopy``)."""
        fd = self._fd
        return vmsplice_iov(fd, iov, total, lambda: wait_writable(fd))


class FileChannel(FdChannel):
    """A regular file: mode "w" creates/truncates it (0666 & ~umask), mode "r" opens it read-only.

    On regular files and block devices I/O is positional (pwritev/preadv at the ``pos`` QEMUFile passes),
    like QEMU's savevm file backend, so the stream offset and the file offset are the same number; other
    paths (FIFOs, /dev/stdout) use plain writev/readv.  Open errors are OSError naming the path."""

    def __new__(cls, path: str | os.PathLike, mode: str = "r", **kwargs: Any):
        return object.__new__(pick_direction(cls, FileChannel, mode, FileReader, FileWriter))

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        flags = os.O_RDONLY if mode == "r" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        super().__init__(os.open(path, flags | os.O_CLOEXEC, 0o666), mode)
        self.path = os.fspath(path)
        # FIFOs, ttys and /dev/stdout-style paths have no offsets (ESPIPE): use the fd's own position.
        kind = os.fstat(self._fd).st_mode
        self.positional = stat.S_ISREG(kind) or stat.S_ISBLK(kind)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} fd={self._fd}>"


class FileReader(FileChannel, FdReader):
    def readinto(self, buf: memoryview, pos: int) -> int:
        """Read into ``buf`` from file offset ``pos``; returns the count, 0 at end of file; OSError on failure."""
        if not self.positional:
            return os.readv(self._fd, (buf,))
        return os.preadv(self._fd, (buf,), pos)


class FileWriter(FileChannel, FdWriter):
    def writev(self, buffers: Sequence[Any], pos: int) -> int:
        """Write all ``buffers`` at file offset ``pos``; returns the byte count; OSError on failure."""
        if not self.positional:
            return super().writev(buffers, pos)
        fd = self._fd
        return write_all(buffers, lambda batch, offset: os.pwritev(fd, batch, offset),
                         lambda: wait_writable(fd), pos)

    def writev_iov(self, iov: Any, total: int, pos: int) -> int:
        """Native iovecs at file offset ``pos`` (positional files) or the fd's position."""
        fd = self._fd
        return write_iov(fd, iov, total, lambda: wait_writable(fd), pos if self.positional else None)


# Signals a reader's command may die of because WE closed its stdout early: not a command failure.
_CLOSED_EARLY_SIGNALS = frozenset({signal.SIGPIPE, signal.SIGTERM, signal.SIGKILL})
EPIPE_WAIT = 1.0   # seconds a writer waits, after a broken pipe, for the command's exit status


def _how(status: int) -> str:
    """A Popen return code in words: ``command exited with status N`` / ``was killed by signal N``."""
    return f"command exited with status {status}" if status >= 0 else f"command was killed by signal {-status}"


PIPE_SIZE = 1 << 20   # F_SETPIPE_SZ for exec: pipes; /proc/sys/fs/pipe-max-size is 1 MiB by default


def _grow_pipe(fd: int) -> None:
    """Give the pipe ``fd`` a 1 MiB buffer (or the largest allowed).  A default 64 KiB pipe makes the
    writer and the command ping-pong every 64 KiB; measured here it caps a stream at 0.75-1.8 GB/s,
    1 MiB gives 2-3 GB/s.  Only the kernel's buffering changes, never the bytes; where the kernel
    refuses (an unprivileged user over pipe-max-size) the default stays."""
    setsz = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    for size in (PIPE_SIZE, 256 << 10):
        try:
            fcntl.fcntl(fd, setsz, size)
            return
        except OSError:
            continue


class ExecChannel(FdChannel):
    """``sh -c CMD`` as a channel, like QEMU's ``exec:`` migration (QIOChannelCommand).

    Mode "w" writes the command's stdin (its stdout is /dev/null); mode "r" reads its stdout (its stdin is
    /dev/null); stderr is inherited, as in QEMU.  ``close()`` closes the pipe and always reaps the process:

    * writer: waits for the command to exit (``timeout`` seconds, default unlimited: the command must get
      to consume the whole stream — QEMU instead SIGTERMs a command that has not exited yet);
    * reader: waits ``timeout`` seconds (default 1), then SIGTERM, then SIGKILL.

    ``close()`` returns 0 if the command exited with status 0 and -EIO otherwise (non-zero status, killed
    by a signal, or it had to be killed); ``.error`` then says why and ``.returncode`` has the status.
    A reader closed before end of stream whose command died of SIGPIPE/SIGTERM/SIGKILL (or whose shell
    exited with 128 + one of those) is not an error: that death is the close's doing.  A reader that
    reaches end of stream raises OSError naming a non-zero exit status (see ``ExecReader.readinto``).
    Spawn failures raise OSError naming the command."""

    def __new__(cls, cmd: str, mode: str = "r", **kwargs: Any):
        return object.__new__(pick_direction(cls, ExecChannel, mode, ExecReader, ExecWriter))

    def __init__(self, cmd: str, mode: str = "r", *, timeout: float | None = None) -> None:
        self.cmd = cmd
        self.returncode: int | None = None
        self.error: str | None = None
        self._eof = False
        writing = mode == "w"
        self._timeout = timeout if timeout is not None or writing else 1.0
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", cmd],
                stdin=subprocess.PIPE if writing else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if writing else subprocess.PIPE)
        except OSError as exc:
            raise OSError(exc.errno, f"exec:{cmd}: cannot start /bin/sh: {exc.strerror}") from exc
        pipe = proc.stdin if writing else proc.stdout
        assert pipe is not None
        # Own a plain fd (no Python buffering in the way) and drop the file object.
        try:
            fd = os.dup(pipe.fileno())
        except OSError:
            self._kill(proc)
            raise
        finally:
            pipe.close()
        _grow_pipe(fd)
        self._proc: subprocess.Popen | None = proc
        super().__init__(fd, mode)

    @property
    def pid(self) -> int | None:
        """The child's pid while it is not yet reaped."""
        return self._proc.pid if self._proc is not None else None

    def close(self) -> int:
        """Close the pipe, reap the command; 0 on success, -EIO if the command failed (see class doc)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return super().close()
        try:
            ret = super().close()
        finally:
            status = self._reap(proc)
        self.returncode = status
        # The shell reports a child killed by signal N as status 128+N.
        signum = -status if status < 0 else status - 128
        if status == 0 or (self.mode == "r" and not self._eof and signum in _CLOSED_EARLY_SIGNALS):
            return ret
        self.error = f"exec:{self.cmd}: {_how(status)}"
        return -errno.EIO

    def _reap(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait(self._timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                return proc.wait(1.0)
            except subprocess.TimeoutExpired:
                return self._kill(proc)
        except BaseException:  # e.g. KeyboardInterrupt while waiting: still leave no zombie
            self._kill(proc)
            raise

    def _exit_status_now(self) -> str:
        """After a broken pipe: how the command ended (waiting ``EPIPE_WAIT`` seconds at most,
        as its stdin closes while it exits, a moment before it can be reaped)."""
        proc = self._proc
        if proc is None:
            return "command already closed"
        try:
            status = proc.wait(EPIPE_WAIT)
        except subprocess.TimeoutExpired:
            return "command closed its input and is still running"
        self.returncode = status
        return _how(status)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> int:
        proc.kill()
        return proc.wait()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} exec:{self.cmd} pid={self.pid}>"


class ExecReader(ExecChannel, FdReader):
    def readinto(self, buf: memoryview, pos: int) -> int:
        """Read the command's stdout into ``buf``; returns the count, 0 at EOF; OSError on
        failure.  At EOF the command is given ``EPIPE_WAIT`` seconds to exit: a non-zero
        status is an OSError naming it (``exec:false: command exited with status 1``), not
        a silent end of stream the reader would call truncated."""
        count = os.readv(self._fd, (buf,))
        if count == 0:
            self._eof = True
            proc = self._proc
            if proc is not None:
                try:
                    status = proc.wait(EPIPE_WAIT)
                except subprocess.TimeoutExpired:
                    return 0
                self.returncode = status
                if status != 0:
                    raise OSError(errno.EIO, f"exec:{self.cmd}: the stream ended and the {_how(status)}")
        return count


class ExecWriter(ExecChannel, FdWriter):
    def writev(self, buffers: Sequence[Any], pos: int) -> int:
        """Write all ``buffers`` to the command's stdin; returns the byte count.  OSError on
        failure; a broken pipe (the command stopped reading) says how the command ended,
        e.g. ``exec:false: Broken pipe: command exited with status 1``."""
        try:
            return super().writev(buffers, pos)
        except BrokenPipeError as exc:
            raise self._broken(exc) from None

    def writev_iov(self, iov: Any, total: int, pos: int) -> int:
        """Native iovecs to the command's stdin; a broken pipe is reported as by ``writev``."""
        try:
            return super().writev_iov(iov, total, pos)
        except BrokenPipeError as exc:
            raise self._broken(exc) from None

    def splice_iov(self, iov: Any, total: int, pos: int) -> int:
        """Native iovecs into the command's stdin by reference; errors as ``writev``'s."""
        try:
            return super().splice_iov(iov, total, pos)
        except BrokenPipeError as exc:
            raise self._broken(exc) from None

    def _broken(self, exc: BrokenPipeError) -> BrokenPipeError:
        return BrokenPipeError(exc.errno, f"exec:{self.cmd}: {exc.strerror}: {self._exit_status_now()}")
