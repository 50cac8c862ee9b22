"""Real QEMU binaries: finding one, its firmware folder and its version.

Supports: ``connect_qmp`` (QMP of a QEMU that is starting, retried until it listens) and
``find_qemu(spec)`` where ``spec`` is a path to a ``qemu-system-x86_64``, a version
("7.2", "10.0") or None (``$NPQFILE_QEMU``, else the one on PATH).  QEMU 10.0 is installed here
beside Debian's packaged 7.2 by unpacking Debian's bookworm-backports packages into one folder
(``.ci/install-qemu10``, default ``/opt/qemu-10.0``, or ``$NPQFILE_QEMU10``); such a binary needs
``-L FOLDER/usr/share/qemu`` for its firmware, which ``QemuBinary.args`` supplies.

Goal: the real-QEMU engine, the tests and the benchmarks all pick QEMU the same way, and every
run records which QEMU it used.  Errors: ``QemuNotFound`` (a ``LookupError``) names what was
looked for and where.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

QEMU10_DEFAULT_PREFIX = "/opt/qemu-10.0"
SYSTEM_BINARY = "qemu-system-x86_64"


class QemuNotFound(LookupError):
    """No usable QEMU binary for the request; the message says what was tried."""


@dataclass(frozen=True)
class QemuBinary:
    """A runnable QEMU: ``path``, its ``version`` ("10.0.2"), and ``args`` to pass first
    (``-L DATADIR`` when its firmware is not where the binary was built to look)."""
    path: str
    version: str
    args: tuple[str, ...] = field(default=())

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.version.split(".") if x.isdigit())

    def command(self, *rest: str) -> list[str]:
        """The argv that runs this QEMU with ``rest``."""
        return [self.path, *self.args, *rest]


@lru_cache(maxsize=None)
def _probe(path: str) -> QemuBinary:
    """Version and firmware folder of the binary at ``path``; QemuNotFound if it does not run."""
    args: tuple[str, ...] = ()
    # an unpacked Debian package: PREFIX/usr/bin/qemu-system-x86_64 + PREFIX/usr/share/qemu
    datadir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "share", "qemu")
    if not os.path.abspath(path).startswith("/usr/bin/") and os.path.isdir(datadir):
        args = ("-L", datadir)
    try:
        out = subprocess.run([path, *args, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuNotFound(f"{path}: does not run ({exc})") from None
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out.stdout)
    if out.returncode != 0 or m is None:
        raise QemuNotFound(f"{path}: --version gave status {out.returncode}: {(out.stderr or out.stdout).strip()[:200]}")
    return QemuBinary(path, m.group(1), args)


def _qemu10_path() -> str:
    env = os.environ.get("NPQFILE_QEMU10")
    if env:
        return env
    return os.path.join(QEMU10_DEFAULT_PREFIX, "usr", "bin", SYSTEM_BINARY)


def find_qemu(spec: str | None = None) -> QemuBinary:
    """The QEMU that ``spec`` names: a path, a version ("7.2", "10.0") or None (``$NPQFILE_QEMU``,
    else ``qemu-system-x86_64`` on PATH).  Raises QemuNotFound naming what was tried."""
    if spec is None:
        spec = os.environ.get("NPQFILE_QEMU") or None
    if spec is None:
        path = shutil.which(SYSTEM_BINARY)
        if path is None:
            raise QemuNotFound(f"no {SYSTEM_BINARY} on PATH (install qemu-system-x86, or give --qemu PATH)")
        return _probe(path)
    if re.fullmatch(r"\d+\.\d+", spec):
        candidates = [_qemu10_path()] if spec.split(".")[0] == "10" else []
        which = shutil.which(SYSTEM_BINARY)
        if which:
            candidates.append(which)
        for path in candidates:
            if os.path.exists(path):
                try:
                    qb = _probe(path)
                except QemuNotFound:
                    continue
                if qb.version.startswith(spec + ".") or qb.version == spec:
                    return qb
        raise QemuNotFound(f"no QEMU {spec} found (tried {', '.join(candidates) or 'PATH'}; "
                           f"QEMU 10.0: .ci/install-qemu10 or $NPQFILE_QEMU10)")
    if not os.path.exists(spec):
        raise QemuNotFound(f"{spec}: no such QEMU binary")
    return _probe(spec)


def connect_qmp(sock: str | os.PathLike, alive: Callable[[], bool], timeout: float) -> Any:
    """Connect ``qemu.qmp``'s synchronous client to the QMP socket ``sock`` of a QEMU that is
    starting.  QEMU creates the socket file at bind() and listens just after, so a connect in
    between is refused: retry every 10 ms.  Returns the connected client, or None when
    ``alive()`` turns False (QEMU exited) or ``timeout`` seconds pass; the caller says why
    (with QEMU's stderr)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        if os.path.exists(sock):
            qmp = QEMUMonitorProtocol(str(sock))
            try:
                qmp.connect()
            except Exception:   # qemu.qmp wraps ECONNREFUSED in its own error types
                qmp.close()
            else:
                return qmp
        time.sleep(0.01)
    return None
