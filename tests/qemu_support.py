"""A real QEMU (7.2 by default, 10.0 with version="10.0") as a test peer: one paused qemu-system-x86_64 whose guest RAM is
a file the test controls (``memory-backend-file,share=on``), driven over QMP with
``qemu.qmp``'s synchronous client and always killed.  QEMU's stderr goes into every
assertion message.  Used by test_qemu_interop.py and test_cli_migrate.py.
"""

from __future__ import annotations

import os
import subprocess
import time

from conftest import require_qemu

from npqfile.qemu import connect_qmp

MIB = 1 << 20
RAM_SIZE = 16 * MIB
MACHINE_RAM_ID = {"none": "ram", "pc": "pc.ram"}


def exec_save_uri(path) -> str:
    """An ``exec:`` URI under which QEMU saves its stream to ``path``, whole or not at all.

    On completion QEMU closes the pipe and at once SIGTERMs its command (SIGKILL 10 ms
    later, ``qio_channel_command_abort``), so a plain ``exec:cat > FILE`` loses what the
    pipe still holds when cat is slow to get a CPU.  QEMU signals its child's pid only:
    a subshell (forked because a command follows it) drains the pipe to EOF whatever
    happens to its parent, then renames; :func:`wait_saved` waits for the name."""
    return f"exec:(cat > '{path}.part' && mv '{path}.part' '{path}'); true"


def wait_saved(path, timeout: float = 60.0) -> None:
    """Returns once :func:`exec_save_uri`'s ``path`` exists (renamed whole); AssertionError
    after ``timeout`` seconds (a bound for a hang, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"QEMU's stream {path} was not written whole in {timeout:g} s"
        time.sleep(0.01)


class QemuVM:
    """One paused QEMU whose guest RAM is ``ram_file``; use as a context manager."""

    runs = 0

    def __init__(self, tmp_path, ram_file, *, machine="none", incoming=False, extra=(), size=RAM_SIZE,
                 version: str | None = "7.2"):
        self.qemu = require_qemu(version)
        self.binary = self.qemu.path
        QemuVM.runs += 1
        tag = f"{machine}-{'in' if incoming else 'out'}-{QemuVM.runs}"
        self.sock = str(tmp_path / f"qmp-{tag}.sock")
        self.stderr_path = tmp_path / f"qemu-{tag}.err"
        ram_id = MACHINE_RAM_ID[machine]
        cmd = [*self.qemu.command(), "-M", f"{machine},memory-backend={ram_id}", "-m", str(size // MIB) + "M",
               "-object", f"memory-backend-file,id={ram_id},size={size // MIB}M,mem-path={ram_file},share=on",
               "-nodefaults", "-display", "none", "-S", "-monitor", "none", "-serial", "none",
               "-qmp", f"unix:{self.sock},server=on,wait=off", *extra]
        if incoming:
            cmd += ["-incoming", "defer"]
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err)
        self.qmp = None
        try:
            self.qmp = connect_qmp(self.sock, lambda: self.proc.poll() is None, 20)
            if self.qmp is None:
                raise AssertionError(f"QEMU did not start: {self.stderr()}")
        except BaseException:
            self.close()
            raise

    def stderr(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def cmd(self, name, **args):
        try:
            return self.qmp.cmd(name, **args)
        except Exception as exc:
            raise AssertionError(f"QMP {name} failed: {exc}; QEMU stderr: {self.stderr()}") from None

    def wait_migration(self, timeout=30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited with {self.proc.returncode}: {self.stderr()}")
            st = self.cmd("query-migrate")
            if st.get("status") in ("completed", "failed") or time.monotonic() > deadline:
                assert st.get("status") == "completed", f"migration {st}; QEMU stderr: {self.stderr()}"
                return st
            time.sleep(0.02)

    def close(self) -> None:
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
