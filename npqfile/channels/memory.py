"""In-memory channels for tests and benchmarks: `MemoryChannel` (collect the stream), `MemoryReader`
(replay bytes, optionally in short reads) and `NullChannel` (count and discard).

Goals: let tests see exactly what QEMUFile wrote and when it flushed (`.writes`), exercise short reads
and full-disk errors deterministically, and measure QEMUFile's own cost without I/O (`NullChannel`).
Plan: plain bytearray appends of flat byte views (no numpy broadcasting surprises); the null writer only
sums buffer sizes.
"""

from __future__ import annotations

import errno
import itertools
import operator
from typing import Any, Callable, Iterable, Sequence

from .base import Closing, flat_bytes, nbytes

_NBYTES = operator.attrgetter("nbytes")


class MemoryChannel(Closing):
    """A write channel that appends everything to a bytearray (URI ``mem:``).

    ``getvalue()`` returns the bytes written so far; ``.writes`` lists the byte count of each writev
    call (one entry per QEMUFile flush).  With ``limit`` the channel behaves like a full disk: a write
    that would go past ``limit`` bytes stores what fits and raises OSError(ENOSPC).
    ``MemoryChannel.reader(data, chunk=...)`` builds the matching read channel."""

    def __init__(self, *, limit: int | None = None) -> None:
        self._data = bytearray()
        self.writes: list[int] = []
        self.limit = limit
        self.closed = False

    def writev(self, buffers: Sequence[Any], pos: int) -> int:
        """Append all ``buffers``; returns the byte count.  OSError(ENOSPC) past ``limit``,
        ValueError for a closed channel or a non-contiguous buffer."""
        if self.closed:
            raise ValueError("write to a closed mem: channel")
        start = len(self._data)
        data = self._data
        for buf in buffers:
            data += flat_bytes(buf)
        count = len(data) - start
        if self.limit is not None and len(data) > self.limit:
            del data[max(self.limit, start):]
            self.writes.append(len(data) - start)
            raise OSError(errno.ENOSPC, f"mem: channel full ({self.limit} bytes)")
        self.writes.append(count)
        return count

    def getvalue(self) -> bytes:
        """Everything written so far, as bytes."""
        return bytes(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> int:
        """Mark the channel closed (the data stays readable with getvalue()).  Returns 0."""
        self.closed = True
        return 0

    @staticmethod
    def reader(data: bytes | bytearray | memoryview,
               *, chunk: int | Sequence[int] | Callable[[int], int] | None = None) -> MemoryReader:
        """A read channel over ``data`` (see `MemoryReader` for ``chunk``)."""
        return MemoryReader(data, chunk=chunk)


class MemoryReader(Closing):
    """A read channel that replays ``data``.

    ``chunk`` caps the bytes returned by each ``readinto`` call, to simulate short reads:
    None = as much as fits; an int = at most that many every call; a sequence of ints = call k gets at
    most ``chunk[k % len(chunk)]`` (the pattern repeats); a callable = ``chunk(k)`` for call k (0-based).
    Every cap must be >= 1 (ValueError otherwise).  ``.calls`` counts readinto calls; ``pos`` is ignored."""

    def __init__(self, data: bytes | bytearray | memoryview,
                 *, chunk: int | Sequence[int] | Callable[[int], int] | None = None) -> None:
        self._data = memoryview(bytes(data))
        self._offset = 0
        self.calls = 0
        self._caps: Callable[[int], int] | None
        if chunk is None:
            self._caps = None
        elif isinstance(chunk, int):
            self._caps = lambda _k: chunk
        elif callable(chunk):
            self._caps = chunk
        else:
            pattern = list(chunk)
            if not pattern:
                raise ValueError("MemoryReader: chunk pattern is empty")
            cycle: Iterable[int] = itertools.cycle(pattern)
            self._caps = lambda _k: next(cycle)  # type: ignore[call-overload]

    def readinto(self, buf: memoryview, pos: int) -> int:
        """Copy the next bytes into ``buf``; returns the count (0 at the end of data)."""
        call = self.calls
        self.calls += 1
        target = flat_bytes(buf)
        want = len(target)
        if self._caps is not None:
            cap = self._caps(call)
            if cap < 1:
                raise ValueError(f"MemoryReader: chunk size for read {call} is {cap}, must be >= 1")
            want = min(want, cap)
        start = self._offset
        piece = self._data[start:start + want]
        target[: len(piece)] = piece
        self._offset = start + len(piece)
        return len(piece)

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self._data) - self._offset

    def close(self) -> int:
        return 0


class NullChannel(Closing):
    """A write channel that discards everything (URI ``null:``) and counts it.

    ``.bytes_written`` totals the bytes, ``.calls`` the writev calls.  Cheap by design: it only sums
    buffer sizes (nbytes, right for multi-dimensional arrays) and never touches the data."""

    def __init__(self) -> None:
        self.bytes_written = 0
        self.calls = 0

    def writev(self, buffers: Sequence[Any], pos: int) -> int:
        """Count ``buffers``; returns their total size in bytes."""
        try:
            count = sum(map(_NBYTES, buffers))       # memoryviews and arrays: a C loop
        except AttributeError:
            count = sum(map(nbytes, buffers))
        self.bytes_written += count
        self.calls += 1
        return count

    def close(self) -> int:
        return 0
