"""A real QEMU ``-M pc`` source migrating live to ``npqfile incoming`` (issue 8, item 6).

The stream declares six RAM blocks (pc.ram, pc.bios, pc.rom, /rom@etc/acpi/tables, ...)
and ends with device sections only the vmdesc after EOF can size.  The same paused VM
first migrates to a file (analysed with its vmdesc found first), then to ``npqfile
incoming`` over a socket: every block must arrive equal.  Needs QEMU (skips locally,
fails in CI); the VM never runs (-S), so its RAM cannot change between the two.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import QEMU_VERSIONS
from npqfile.stream import load_file
from proc_support import fail, read_line, reaped
from qemu_support import RAM_SIZE, QemuVM, exec_save_uri, wait_saved
from test_stream_support import PAGE, pattern_pages

pytestmark = pytest.mark.component
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_incoming(uri: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "npqfile", "incoming", uri, "--max-ram", "1G",
                             "--machine", "any", "--json", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_listening(proc: subprocess.Popen) -> None:
    """Until ``npqfile incoming`` says it listens (printed after listen(): the socket's path
    exists from bind(), a moment earlier, when a connect is still refused)."""
    line = read_line(proc, proc.stderr, what="'listening on' line")     # --json: on stderr
    if not line.startswith("listening on "):       # killed first: it may wait for a connection forever
        fail(proc, f"npqfile incoming printed {line!r} instead of its 'listening on' line")


def _result(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"npqfile incoming did not finish: {err}") from None
    text = out[out.index("{"):]          # after any "listening on" line
    doc = json.loads(text)
    assert proc.returncode == 0 and doc["status"] == "completed", (doc, err)
    return doc


@pytest.mark.parametrize("version", QEMU_VERSIONS)
def test_real_qemu_pc_migrates_live_into_npqfile_incoming(tmp_path, version):
    pattern = pattern_pages(RAM_SIZE // PAGE, seed=8)
    ram_file = tmp_path / "pc-src.bin"
    ram_file.write_bytes(pattern.tobytes())
    stream = tmp_path / "pc.stream"
    sock = str(tmp_path / "in.sock")
    with QemuVM(tmp_path, ram_file, machine="pc", version=version) as vm:   # the reference: a file
        vm.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        vm.cmd("migrate", uri=exec_save_uri(stream))
        vm.wait_migration()
    wait_saved(stream)
    with reaped(_start_incoming(f"unix:{sock}")) as proc:
        # QEMU refuses a second migration of a VM a migration paused: a second VM of the same
        # RAM file and machine (deterministic ROMs and ACPI tables) is the live source
        with QemuVM(tmp_path, ram_file, machine="pc", version=version) as vm:
            _wait_listening(proc)
            vm.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
            vm.cmd("migrate", uri=f"unix:{sock}")
            vm.wait_migration()
            doc = _result(proc)
    ref = load_file(stream)
    try:
        assert ref.complete and len(ref.ram.blocks) >= 4
        expected = {b.name: b.sha256() for b in ref.ram.blocks}
    finally:
        ref.ram.close()
    assert doc["hashes"] == expected
    # the same stream through a pipe: analyze reads it as a stream (device tail, no spooling)
    piped = subprocess.run(f"cat '{stream}' | '{sys.executable}' -m npqfile analyze - --json", shell=True,
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    report = json.loads(piped.stdout)
    assert report["complete"] and {b["name"]: b["sha256"] for b in report["ram"]["blocks"]} == expected
    assert doc["hashes"]["pc.ram"] == hashlib.sha256(pattern.tobytes()).hexdigest()
    assert doc["machine"].startswith("pc-i440fx") or doc["machine"].startswith("pc-")
    assert any(name.startswith("/rom@etc/acpi") for name in doc["hashes"])
    assert np.array_equal(pattern, np.fromfile(ram_file, dtype=np.uint8).reshape(pattern.shape))
