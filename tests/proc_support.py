"""Reading a child process's output in tests without ever hanging, and never leaving it behind.

Supports :func:`read_line`: the next line a subprocess prints on one of its pipes, within a
deadline; and :func:`reaped`: ``with reaped(Popen(...)) as proc:`` kills the child if the
block leaves it running (a failed assertion) and always waits for it; and :func:`wait_for_eof`:
read and drop what a peer sends on a file descriptor until it closes its side (the tests'
in-process destinations hold back their answer until the source has hung up).  A bare ``proc.stdout.readline()`` blocks forever on a child that never prints
(stuck, or printing somewhere else), which hangs the whole suite; here a child that
prints nothing in time is killed and the test fails with the child's stderr.

Plan: ``select`` on the pipes' fds and ``os.read`` one byte at a time, so nothing beyond
the line is taken from the pipe (a later ``communicate()`` or ``read_line`` still sees the
rest) and nothing sits in a file object's buffer where ``select`` cannot see it.  A line
started on one pipe and not yet finished is kept on the process object for the next call.
The deadline bounds a hang; it is not a timing assertion (the children print their line
in well under a second on an idle machine).
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import subprocess
import time
from typing import IO, Any, Iterator

import pytest

LINE_TIMEOUT = 60.0      # seconds: a child silent this long is stuck


def read_line(proc: subprocess.Popen, *streams: IO[Any], timeout: float = LINE_TIMEOUT,
              what: str = "line") -> Any:
    """The next whole line (with its newline) printed by ``proc`` on any of ``streams``
    (default: its stdout), as ``str`` for a text-mode pipe and ``bytes`` otherwise.  At the
    end of every stream, returns what is left ("" or b"" when nothing), as ``readline`` does.
    When no line comes within ``timeout`` seconds, kills ``proc`` and fails the test with
    its stderr (``what`` names the awaited line in that message)."""
    streams = streams or (proc.stdout,)
    partial: dict[int, bytearray] = proc.__dict__.setdefault("_read_line_partial", {})
    deadline = time.monotonic() + timeout
    alive = list(streams)
    while alive:
        left = deadline - time.monotonic()
        if left <= 0:
            fail(proc, f"no {what} within {timeout:g} s")
        for s in select.select(alive, [], [], left)[0]:
            buf = partial.setdefault(s.fileno(), bytearray())
            byte = os.read(s.fileno(), 1)
            if not byte:
                alive.remove(s)
                continue
            buf += byte
            if byte == b"\n":
                line = bytes(buf)
                buf.clear()
                return _decoded(s, line)
    s = streams[0]
    rest = bytes(partial.pop(s.fileno(), b""))
    return _decoded(s, rest)


def _decoded(stream: IO[Any], data: bytes) -> Any:
    if isinstance(stream, io.TextIOBase):
        return data.decode(getattr(stream, "encoding", None) or "utf-8", errors="replace")
    return data


def fail(proc: subprocess.Popen, why: str) -> None:
    """Kill ``proc``, collect its remaining stderr and fail the test with both."""
    proc.kill()
    partial = proc.__dict__.get("_read_line_partial", {})
    taken = bytes(partial.get(proc.stderr.fileno(), b"")) if proc.stderr is not None else b""
    try:
        _out, err = proc.communicate(timeout=LINE_TIMEOUT)
    except (subprocess.TimeoutExpired, ValueError):
        err = None
    if isinstance(err, str):
        err = err.encode()
    err = (taken + (err or b"")).decode(errors="replace")       # what read_line took included
    pytest.fail(f"{why} from {' '.join(map(str, proc.args)) if isinstance(proc.args, list) else proc.args}; "
                f"stderr: {err!r}")


@contextlib.contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Yields ``proc``; on leaving the block (normally or by an exception) kills it if it is
    still running, then closes its pipes and waits for it (``Popen.__exit__``), so no test
    leaves a child behind whatever fails.  A block that wants the child's output calls
    ``proc.communicate()`` itself."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with proc:
            pass


def wait_for_eof(fd: int, timeout: float = LINE_TIMEOUT) -> None:
    """Read and drop whatever arrives on ``fd`` (blocking or not) until the peer closes its
    side (end of file or a reset).  Returns then; raises ``TimeoutError`` when the peer is
    still open after ``timeout`` seconds -- a bound on a hang (the caller is often a
    destination thread that would otherwise never end), not a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"fd {fd}: the peer did not close its side within {timeout:g} s")
        try:
            if not os.read(fd, 1 << 16):
                return
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return
