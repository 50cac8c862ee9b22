"""What the benchmarks share: waiting for ``npqfile incoming`` to listen, with a deadline.

Supports ``listening_uri(proc, timeout)``: the URI a child ``npqfile incoming`` prints as
"listening on URI" on its stdout.  Goal: a benchmark never hangs on a destination that is
stuck or died before listening (a bare ``proc.stdout.readline()`` waits forever); it fails
with the child's stderr instead.  Plan: ``select`` on stdout's fd and ``os.read`` one byte
at a time, as tests/proc_support.read_line does, so nothing after the line is taken from
the pipe and nothing hides in a file object's buffer.  Imported by the benchmark scripts,
which run with this directory first on ``sys.path``.
"""

from __future__ import annotations

import os
import select
import subprocess
import time

LISTEN_TIMEOUT = 30.0     # seconds: a destination silent this long is stuck


def listening_uri(proc: subprocess.Popen, timeout: float = LISTEN_TIMEOUT) -> str:
    """Return the URI from the "listening on URI" line ``proc`` prints on stdout (a pipe,
    text or binary mode).  When the line does not come within ``timeout`` seconds, or
    stdout ends first, kills ``proc`` and raises RuntimeError with what it printed and
    its stderr (when piped)."""
    line, deadline, why = b"", time.monotonic() + timeout, f"printed no line within {timeout:g} s"
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            break
        byte = os.read(proc.stdout.fileno(), 1)
        if not byte:
            why = "closed its stdout"
            break
        line += byte
    if not line.startswith(b"listening on ") or not line.endswith(b"\n"):
        if line.endswith(b"\n"):
            why = "printed another line"
        proc.kill()
        err = proc.communicate()[1] if proc.stderr is not None else b""
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        raise RuntimeError(f"npqfile incoming did not listen: it {why}: {line!r} {err}")
    return line.decode().split("listening on ", 1)[1].strip()
