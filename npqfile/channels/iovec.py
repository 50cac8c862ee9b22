"""Native iovec I/O: ``writev``/``pwritev``/``readv``/``vmsplice`` of an iovec array numpy built.

Supports: `available()`, `iovec_array(count)` (a C-contiguous ``(count, 2)`` uint64 array laid out
as ``struct iovec``) and `write_iov(fd, iov, total, wait, pos=None)`, the native twin of
`base.write_all`: every byte or OSError, partial writes resumed, EINTR retried, EAGAIN waited on;
`read_iov`, its reading twin (readv straight into guest RAM); `vmsplice_iov` (pages into a pipe by
reference, see ``npqfile.qemufile_zerocopy``).

Goals: the RAM section's bulk path (``QEMUFile.put_records`` of a `npqfile.buffers.PageRun`) hands
the kernel exactly the iovecs the buffer-object path would -- the same ``writev`` calls, so QEMU's
flush points and bytes are unchanged -- without a Python object per page: numpy computes the
addresses of the headers and pages, and ctypes calls libc with the GIL released.  Measured here
(1 GiB of random pages into ``exec:cat > /dev/null``), the per-page memoryviews and their checks
cost about a quarter of a save; the kernel's copy is the rest.

Plan: one libc lookup at import (``available()`` is False where ctypes cannot find ``writev``:
channels then simply offer no ``writev_iov`` and QEMUFile keeps its buffer-object path).  The
caller owns the memory the array points to and keeps it alive and mapped for the call; the array
itself is modified when the kernel writes part of it (the rest is re-based in place).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Callable

import numpy as np

from .base import IOV_MAX

__all__ = ["available", "iovec_array", "read_iov", "splice_available", "vmsplice_iov", "write_iov"]

_IOVEC_BYTES = 16   # struct iovec on LP64: void *iov_base; size_t iov_len


def _libc_calls() -> dict[str, Callable[..., int]] | None:
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        # the process's own symbols include libc's (find_library would run ldconfig)
        libc = ctypes.CDLL(None, use_errno=True)
        calls = {"writev": libc.writev, "pwritev": libc.pwritev, "readv": libc.readv}
    except (OSError, AttributeError):
        return None
    calls["writev"].argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    calls["pwritev"].argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    calls["readv"].argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    vmsplice = getattr(libc, "vmsplice", None)
    if vmsplice is not None:
        vmsplice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        calls["vmsplice"] = vmsplice
    for call in calls.values():
        call.restype = ctypes.c_ssize_t
    return calls


_CALLS = _libc_calls()


def available() -> bool:
    """Whether native iovec writes work here (64-bit, a libc with writev/pwritev)."""
    return _CALLS is not None


def iovec_array(count: int) -> np.ndarray:
    """An uninitialised ``(count, 2)`` uint64 array: row i is iovec i (base address, length)."""
    return np.empty((count, 2), dtype=np.uint64)


def write_iov(fd: int, iov: np.ndarray, total: int, wait: Callable[[], None], pos: int | None = None) -> int:
    """Write every byte the iovecs ``iov`` describe (``total`` bytes, their sum) to ``fd``,
    at file offset ``pos`` (pwritev) or at the fd's own position (writev, ``pos`` None).

    Returns ``total``.  A short write re-bases the rest of ``iov`` in place and goes on;
    EINTR retries (Python's signal handlers run first: a KeyboardInterrupt propagates);
    EAGAIN (a non-blocking fd) calls ``wait()``, which returns when the fd can take more or
    raises.  OSError with the errno for a failed call, EIO for a call that wrote nothing."""
    calls = _calls()
    if pos is None:
        writev = calls["writev"]
        return _iov_loop(lambda ptr, n, done: writev(fd, ptr, n), iov, total, wait)
    pwritev = calls["pwritev"]
    return _iov_loop(lambda ptr, n, done: pwritev(fd, ptr, n, pos + done), iov, total, wait)


def read_iov(fd: int, iov: np.ndarray, total: int, wait: Callable[[], None]) -> int:
    """Fill every buffer the iovecs ``iov`` describe (``total`` bytes) from ``fd``, in order:
    readv(2) straight into the caller's memory (multifd's pages into guest RAM).  Returns
    ``total``, or the bytes read before the end of the stream (fewer: the caller reports
    the truncation).  Short reads re-base ``iov`` in place; EINTR retries; EAGAIN calls
    ``wait()``; OSError for a failed call."""
    readv = _calls()["readv"]
    return _iov_loop(lambda ptr, n, done: readv(fd, ptr, n), iov, total, wait, eof_ok=True)


def splice_available() -> bool:
    """Whether ``vmsplice_iov`` works here."""
    return _CALLS is not None and "vmsplice" in _CALLS


def vmsplice_iov(fd: int, iov: np.ndarray, total: int, wait: Callable[[], None]) -> int:
    """``write_iov`` into the pipe ``fd`` by reference: vmsplice(2) puts the pages the
    iovecs point at into the pipe without copying them, and the reader copies them out.
    The memory must therefore stay mapped and unchanged until the reader has consumed it
    (not only until this call returns): see ``QEMUFile(zero_copy_send=True)``.  Returns
    and raises as ``write_iov``; EBADF when ``fd`` is not a pipe."""
    calls = _calls()
    if "vmsplice" not in calls:
        raise OSError(errno.ENOSYS, "vmsplice is not available here")
    vmsplice = calls["vmsplice"]
    return _iov_loop(lambda ptr, n, done: vmsplice(fd, ptr, n, 0), iov, total, wait)


def _calls() -> dict[str, Callable[..., int]]:
    if _CALLS is None:
        raise OSError(errno.ENOSYS, "native iovec writes are not available here")
    return _CALLS


def _iov_loop(call: Callable[[int, int, int], int], iov: np.ndarray, total: int,
              wait: Callable[[], None], eof_ok: bool = False) -> int:
    """``call(address of the first iovec, count, bytes done so far) -> bytes or -1`` until
    ``total`` bytes are moved; see ``write_iov``.  A call that moves nothing is EIO, or
    with ``eof_ok`` (reads) the end of the stream: the count so far is returned."""
    if iov.dtype != np.uint64 or iov.ndim != 2 or iov.shape[1] != 2 or not iov.flags.c_contiguous:
        raise ValueError("iov must be a C-contiguous (n, 2) uint64 array")
    count = iov.shape[0]
    base = iov.ctypes.data
    first = 0
    done = 0
    while done < total:
        batch = min(count - first, IOV_MAX)
        if batch <= 0:
            raise ValueError(f"iov describes fewer than {total} bytes")
        ret = call(base + first * _IOVEC_BYTES, batch, done)
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                wait()
                continue
            raise OSError(err, os.strerror(err))
        if ret == 0:
            if eof_ok:
                return done
            raise OSError(errno.EIO, f"write made no progress after {done} of {total} bytes")
        done += ret
        if done >= total:
            break
        # The kernel took part: skip the iovecs written in full, re-base a partial one.
        ends = np.cumsum(iov[first:first + batch, 1])
        whole = int(np.searchsorted(ends, ret, side="right"))
        part = ret - (int(ends[whole - 1]) if whole else 0)
        first += whole
        if part:
            iov[first, 0] += part
            iov[first, 1] -= part
    if done > total:
        raise OSError(errno.EIO, f"channel bug: the kernel reported {done} bytes for a write of {total}")
    return done
