"""The channel contract and the write-everything loop shared by every OS channel.

Supports: the `Channel`/`WriteChannel`/`ReadChannel` protocols QEMUFile codes against, the buffer helpers
(`nbytes`, `flat_bytes`, from `npqfile.buffers`: bytes, bytearrays, memoryviews and C-contiguous numpy
arrays of any shape), and `write_all`, the loop that turns a kernel's partial writev/sendmsg into "all or OSError".
Goals: QEMU's `writev_buffer` semantics (the caller expects every byte written, qemu_fflush treats a short
count as an error) without copying buffers, and without Python work per byte.
Plan: hand the caller's buffer objects straight to the kernel in batches of at most IOV_MAX; only when the
kernel writes part of a batch, re-slice the remaining buffers (a flat byte view of the partial one).
"""

from __future__ import annotations

import errno
import operator
import os
import select
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from npqfile.buffers import flat_bytes, nbytes

__all__ = ["IOV_MAX", "Channel", "Closing", "ReadChannel", "WriteChannel", "flat_bytes", "nbytes",
           "pick_direction", "wait_writable", "write_all"]


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        value = -1
    # Linux's UIO_MAXIOV; sysconf may answer -1 ("no limit") on exotic systems.
    return value if value > 0 else 1024


IOV_MAX: int = _iov_max()


@runtime_checkable
class Channel(Protocol):
    """What every channel under a QEMUFile provides (QEMU: QEMUFileOps over a QIOChannel).

    A channel is DIRECTIONAL: a write channel has ``writev`` and no ``readinto``; a read channel has
    ``readinto`` and no ``writev``.  QEMUFile picks its direction by which of the two exists.

    Optional methods (QEMUFile checks with ``hasattr``):
      ``shutdown(read: bool, write: bool) -> int`` stop I/O, waking a blocked reader/writer (sockets);
      ``get_return_path() -> channel | None`` same connection, opposite direction;
      ``set_blocking(flag: bool)``; ``fileno() -> int`` (select() on it after BlockingIOError).
    ``close()`` returns 0 (or None) on success and a negative errno on failure; closing twice is harmless.
    """

    def close(self) -> int | None: ...


@runtime_checkable
class WriteChannel(Channel, Protocol):
    def writev(self, buffers: Sequence[Any], pos: int) -> int:
        """Write ALL ``buffers`` in order (``pos`` = stream offset of the first byte) and return the byte
        count.  Loops over short writes; raises OSError on failure (bytes may have been written)."""
        ...


@runtime_checkable
class ReadChannel(Channel, Protocol):
    def readinto(self, buf: memoryview, pos: int) -> int:
        """Read at most ``len(buf)`` bytes into ``buf`` and return how many: >= 1, or 0 at end of stream.
        Raises OSError on failure; a non-blocking channel with no data raises BlockingIOError."""
        ...


def wait_writable(fd: int, timeout: float | None = None) -> bool:
    """Block until ``fd`` accepts more data (a non-blocking fd said EAGAIN; writev must finish
    anyway) or has an error to report; returns False when ``timeout`` seconds passed first.
    poll(2), not select(2): select refuses an fd of 1024 or more (ValueError)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def wait_readable(fds: list[int], timeout: float | None = None) -> list[int]:
    """Block until one of ``fds`` has data, an end or an error to report, or ``timeout``
    seconds passed (None: no limit); returns the ready ones, in the order given (empty on
    a timeout).  poll(2), not select(2): select refuses an fd of 1024 or more (ValueError)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ready = {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)}
    return [fd for fd in fds if fd in ready]


_NBYTES = operator.attrgetter("nbytes")


def write_all(buffers: Sequence[Any], send: Callable[[Sequence[Any], int], int], wait: Callable[[], None],
              pos: int = 0, limit: int = IOV_MAX) -> int:
    """Write every buffer through ``send(batch, offset) -> bytes written`` and return the total.

    ``send`` gets at most ``limit`` buffers and the stream offset of the batch's first byte (for
    positional writes).  Partial writes re-slice the rest; EINTR retries; EAGAIN calls ``wait()``.
    A send that writes nothing for a non-empty batch raises OSError(EIO) instead of spinning.
    Errors from ``send`` propagate as OSError (some bytes may have been written: the stream is broken)."""
    try:
        # memoryviews and numpy arrays (all QEMUFile passes) say their size in C: a Python
        # call per buffer cost more than the writev itself on a fast sink
        sizes = list(map(_NBYTES, buffers))
    except AttributeError:     # bytes, bytearray, other buffer objects
        sizes = [nbytes(b) for b in buffers]
    total = sum(sizes)
    pending: Sequence[Any] = buffers
    if 0 in sizes:  # empty iovecs could make a whole batch write 0 bytes and look like no progress
        pending = [b for b, s in zip(buffers, sizes) if s]
        sizes = [s for s in sizes if s]
    count = len(pending)
    done = 0
    first = 0
    while done < total:
        end = min(count, first + limit)
        batch = pending[first:end]
        try:
            written = send(batch, pos + done)
        except InterruptedError:
            continue
        except BlockingIOError:
            wait()
            continue
        if written <= 0:
            raise OSError(errno.EIO, f"write made no progress after {done} of {total} bytes")
        done += written
        if written == (total - done + written if end == count else sum(sizes[first:end])):
            first = end  # the common case: the whole batch went out
            continue
        while first < end and written >= sizes[first]:
            written -= sizes[first]
            first += 1
        if written:
            if pending is buffers:
                pending = list(buffers)  # never modify the caller's list
            pending[first] = flat_bytes(pending[first])[written:]
            sizes[first] -= written
    return done


class Closing:
    """Context-manager mixin: ``with channel:`` closes it on exit."""

    def close(self) -> int | None:  # pragma: no cover - every channel overrides it
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pick_direction(cls: type, base: type, mode: str, reader: type, writer: type) -> type:
    """The concrete class for ``base(..., mode)``: ``reader`` for "r", ``writer`` for "w".

    Lets ``FdChannel(fd, "w")`` return an object that has writev and no readinto (and vice versa) while
    ``isinstance(ch, FdChannel)`` still holds.  ValueError for any other mode."""
    if cls is not base:
        return cls  # a concrete subclass was asked for directly
    if mode == "r":
        return reader
    if mode == "w":
        return writer
    raise ValueError(f"{base.__name__}: mode must be 'r' or 'w', not {mode!r}")
