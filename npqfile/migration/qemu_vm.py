"""One QEMU process of the real-QEMU engine: launch, QMP, guest status, always killed.

Supports: :class:`QemuVM` starts ``qemu-system-x86_64 -M pc`` (TCG) running the
dirtyguest (``-kernel`` + its parameter block as ``-initrd``), its RAM a
``memory-backend-file,share=on`` the host can read and hash, QMP on a unix socket (the
``qemu.qmp`` synchronous client); as a destination it adds ``-S -incoming defer`` (its
guest stays paused after the migration, so its RAM is final when hashed).
``cmd(name, **args)`` runs a QMP command; ``query(name, timeout, **args)`` runs one that
may go unanswered (a QEMU busy loading or holding its big lock, or stopped) without
blocking its caller longer than ``timeout``; ``kill()`` ends a QEMU that no longer
answers at once; ``guest_status()`` reads the guest's counters from the RAM file;
``close()`` ends the process it started (QMP ``quit``, then SIGKILL after a grace
period, also for a QEMU that no longer answers) and is idempotent.

Goals: every failure says what happened with QEMU's own words (the last lines of its
stderr), and no process outlives the run, whichever way it ends.  Errors:
:class:`QemuError` (an ``OSError``).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from npqfile.guest import IMAGE, GuestStatus, read_status
from npqfile.qemu import QemuBinary, connect_qmp

RAM_ID = "pc.ram"                 # -M pc's RAM block (the backend id must match it)
START_TIMEOUT = 30.0              # seconds for QEMU to listen on QMP
BOOT_TIMEOUT = 30.0               # seconds for the guest to report it is running
QUIT_GRACE = 2.0                  # seconds for QEMU to answer ``quit`` and exit before SIGKILL


class QemuError(OSError):
    """A QEMU process failed to start, died, or refused a command; the message says which.
    (An OSError: like a channel that cannot be opened, the command line reports it as one
    ``error:`` line.)"""


class QemuVM:
    """One QEMU; ``role`` is "source" or "destination" (names errors and files)."""

    def __init__(self, qemu: QemuBinary, workdir: Path, role: str, ram_size: int, params_file: Path,
                 *, incoming: bool = False):
        self.qemu, self.role, self.ram_size = qemu, role, ram_size
        self.ram_file = workdir / f"{role}.ram"
        self.sock = workdir / f"{role}.qmp"
        self.stderr_path = workdir / f"{role}.err"
        self.proc: subprocess.Popen | None = None
        self.qmp: Any = None
        self._map: mmap.mmap | None = None
        mib = ram_size >> 20
        self.argv = qemu.command(
            "-M", f"pc,memory-backend={RAM_ID}", "-accel", "tcg", "-m", f"{mib}M",
            "-object", f"memory-backend-file,id={RAM_ID},size={mib}M,mem-path={self.ram_file},share=on",
            "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "none",
            "-kernel", str(IMAGE), "-initrd", str(params_file),
            "-qmp", f"unix:{self.sock},server=on,wait=off",
            *(("-S", "-incoming", "defer") if incoming else ()))

    def start(self) -> None:
        """Start QEMU and connect QMP.  Raises QemuError (with QEMU's stderr) if it
        exits or does not listen within START_TIMEOUT."""
        if not self.ram_file.exists():
            with open(self.ram_file, "wb") as f:
                f.truncate(self.ram_size)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)   # Ctrl-C is ours to handle
        self.qmp = connect_qmp(self.sock, lambda: self.proc.poll() is None, START_TIMEOUT)
        if self.qmp is None:
            self.check_alive("starting")
            raise QemuError(f"{self.role} QEMU did not open its QMP socket within {START_TIMEOUT:.0f} s"
                            f"{self._stderr_tail()}")

    def stderr_tail(self) -> str:
        """QEMU's last three stderr lines joined with " / " ("" when it wrote none)."""
        try:
            text = self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return " / ".join(text.splitlines()[-3:])

    def _stderr_tail(self) -> str:
        tail = self.stderr_tail()
        return f": {tail}" if tail else ""

    def check_alive(self, doing: str) -> None:
        """Raise QemuError if the process has exited (while ``doing`` something)."""
        if self.proc is None or self.proc.poll() is None:
            return
        raise QemuError(f"{self.role} QEMU exited with status {self.proc.returncode} while {doing}"
                        f"{self._stderr_tail()}")

    def cmd(self, name: str, **args: Any) -> Any:
        """Run QMP command ``name``; returns its result.  QemuError if QEMU refuses it
        or has gone away."""
        try:
            return self.qmp.cmd(name, **args)
        except Exception as exc:
            self.check_alive(f"running {name}")
            raise QemuError(f"{self.role} QEMU: {name} failed: {exc}") from None

    def query(self, name: str, timeout: float, **args: Any) -> Any | None:
        """Run QMP command ``name`` with ``args``, waiting at most ``timeout`` seconds:
        returns its result, or None when QEMU did not answer in time (its main loop busy,
        or the process stopped; the command stays sent -- QEMU runs it if it resumes --
        and qemu.qmp drops the late answer).  QemuError if QEMU refuses it or has gone
        away."""
        self.qmp.settimeout(timeout)
        try:
            return self.qmp.cmd(name, **args)
        except TimeoutError:            # asyncio.TimeoutError is TimeoutError from 3.11
            self.check_alive(f"running {name}")
            return None
        except Exception as exc:
            self.check_alive(f"running {name}")
            raise QemuError(f"{self.role} QEMU: {name} failed: {exc}") from None
        finally:
            self.qmp.settimeout(None)

    def kill(self) -> None:
        """SIGKILL the process and reap it (a QEMU that does not answer QMP: stopped, or
        its main loop stuck); a stopped process dies too.  Idempotent; ``close()`` still
        releases the rest.  Returns None."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def guest_status(self) -> GuestStatus | None:
        """The guest's status block (None before the guest wrote it)."""
        if self._map is None:
            fd = os.open(self.ram_file, os.O_RDONLY)
            try:
                self._map = mmap.mmap(fd, self.ram_size, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        return read_status(self._map)

    def wait_guest_running(self, stop: threading.Event | None = None) -> GuestStatus | None:
        """Wait until the guest reports it is running; returns its status, or None as soon
        as ``stop`` is set (a cancel).  Raises QemuError if QEMU exits, the guest reports
        an error, or BOOT_TIMEOUT passes."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while stop is None or not stop.is_set():
            self.check_alive("booting the guest")
            st = self.guest_status()
            if st is not None and st.state == "failed":
                raise QemuError(f"the {self.role} guest failed: {st.error}")
            if st is not None and st.state == "running" and st.seconds > 0:
                return st
            if time.monotonic() > deadline:
                raise QemuError(f"the {self.role} guest did not start within {BOOT_TIMEOUT:.0f} s")
            time.sleep(0.02)
        return None

    def close(self) -> None:
        """End QEMU (quit over QMP, SIGKILL after QUIT_GRACE seconds: a stopped or hung
        QEMU never answers) and release the map; idempotent."""
        if self._map is not None:
            self._map.close()
            self._map = None
        answered = True
        if self.qmp is not None:
            try:
                if self.proc is not None and self.proc.poll() is None:
                    self.qmp.settimeout(QUIT_GRACE)
                    self.qmp.cmd("quit")
            except TimeoutError:
                answered = False            # stopped or hung: it will not exit on its own
            except Exception:
                pass
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=QUIT_GRACE if answered else 0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
