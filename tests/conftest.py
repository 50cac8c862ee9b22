"""Shared test helpers.

``require(condition, what)``: tests that need a real component (QEMU, gcc, a subprocess,
a socket) call it; locally a missing component skips the test, but in CI (``.ci/run``
sets ``NPQFILE_REQUIRE_COMPONENTS=1``) it fails, so CI can never pass by skipping.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

REQUIRE_COMPONENTS = os.environ.get("NPQFILE_REQUIRE_COMPONENTS") == "1"


def require(condition: bool, what: str) -> None:
    if condition:
        return
    if REQUIRE_COMPONENTS:
        pytest.fail(f"required component missing: {what} (NPQFILE_REQUIRE_COMPONENTS=1)")
    pytest.skip(f"component missing: {what}")


QEMU_VERSIONS = ("7.2", "10.0")   # interop tests parametrise over both; CI installs both


def require_qemu(version: str | None = None):
    """The real QEMU ``version`` ("7.2", "10.0"; None: the one on PATH) as an
    ``npqfile.qemu.QemuBinary``; skips (fails in CI) when it is not installed."""
    from npqfile.qemu import QemuNotFound, find_qemu
    try:
        return find_qemu(version)
    except QemuNotFound as exc:
        require(False, f"QEMU {version or ''}: {exc}")


def require_program(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"program {name!r} on PATH")
    return path  # type: ignore[return-value]


def require_module(name: str, extra: str) -> None:
    """The optional Python module ``name`` (installed by ``pip install 'npqfile[EXTRA]'``)
    can be imported; skips (fails in CI) when it cannot."""
    require(importlib.util.find_spec(name) is not None, f"{name} (pip install 'npqfile[{extra}]')")


@pytest.fixture
def started(monkeypatch):
    """The ``QemuVM``s the test's runs start, in order; at teardown any still running (the
    engine failed to end it, an assertion failed first) is resumed and killed, so a
    failing test leaves no QEMU behind.  Whether the engine ended them is the test's own
    assertion, made before this."""
    import signal

    from npqfile.migration.qemu_vm import QemuVM

    vms: list = []
    real_start = QemuVM.start

    def start(vm):
        vms.append(vm)
        real_start(vm)
    monkeypatch.setattr(QemuVM, "start", start)
    yield vms
    for vm in vms:
        if vm.proc is not None and vm.proc.poll() is None:
            os.kill(vm.proc.pid, signal.SIGCONT)
            vm.proc.kill()
            vm.proc.wait()
