"""multifd against real QEMU: QEMU 10.0 and 7.2 send to ``npqfile incoming``, npqfile sends to QEMU 10.0.

The guests are paused ``-M none`` machines whose RAM is a file (``qemu_support``); the
source RAM is random with zero runs, so both normal and zero pages travel.  Nothing
here depends on timing: each run waits for ``completed`` and compares every byte.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npqfile.migration.session import fill_guest
from npqfile.ram import GuestRAM
from proc_support import read_line, reaped
from qemu_support import QemuVM

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16 << 20


def _listen_uri(tmp_path: Path) -> str:
    """Where QEMU's -incoming listens: a unix socket in the test's own directory.  A TCP
    port found free by binding port 0 and closing it is a race (anyone may take it
    before QEMU binds it); a path nobody else uses is not."""
    return f"unix:{tmp_path / 'mig.sock'}"


def _multifd(vm: QemuVM, channels: int, compression: str, zero: str | None) -> None:
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    extra = {} if zero is None else {"zero-page-detection": zero}     # 9.0+
    vm.cmd("migrate-set-parameters", **{"multifd-channels": channels, "multifd-compression": compression, **extra})


@pytest.mark.parametrize("version, channels, compression, zero", [
    ("10.0", 1, "none", "multifd"), ("10.0", 2, "zlib", "multifd"), ("10.0", 4, "zstd", "multifd"),
    ("10.0", 8, "none", "multifd"), ("10.0", 2, "none", "legacy"), ("10.0", 2, "zstd", "none"),
    # QEMU 7.2: a SYNC before every RAM EOS and no MULTIFD_FLUSH; stale next_packet_size in SYNC packets
    ("7.2", 2, "none", None), ("7.2", 4, "zlib", None),
])
def test_qemu_source_to_npqfile_incoming(tmp_path, version, channels, compression, zero):
    ram_file = tmp_path / "src.ram"
    data = np.random.default_rng(channels).integers(0, 256, SIZE, dtype=np.uint8)
    data[:SIZE // 4] = 0                     # zero pages: whole packets of them
    data[SIZE // 2:SIZE // 2 + 5 * 4096] = 0  # and some inside packets
    data.tofile(ram_file)
    with QemuVM(tmp_path, ram_file, version=version, size=SIZE) as vm:
        with reaped(subprocess.Popen([sys.executable, "-m", "npqfile", "incoming", "tcp:127.0.0.1:0", "--ram", "16M",
                                      "--json", "--timeout", "60", "--multifd-channels", str(channels),
                                      "--multifd-compression", compression],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) as dst:
            port = read_line(dst, dst.stderr).strip().rsplit(":", 1)[1]   # --json: status lines on stderr
            _multifd(vm, channels, compression, zero)
            vm.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            st = vm.wait_migration()
            out, err = dst.communicate(timeout=60)
    assert dst.returncode == 0, err
    res = json.loads(out)
    assert res["status"] == "completed"
    assert res["hashes"]["ram"] == hashlib.sha256(data.tobytes()).hexdigest()
    if version == "10.0":       # 10.0 counts the same bytes (7.2 leaves greetings out, and more)
        assert res["multifd"]["multifd-bytes"] == st["ram"]["multifd-bytes"]
    assert len(res["multifd"]["per-channel"]) == channels
    if zero == "multifd":
        assert res["multifd"]["zero"] >= SIZE // 4 // 4096


@pytest.mark.parametrize("channels, compression, zero", [
    (2, "none", "multifd"), (4, "zlib", "legacy"), (1, "zstd", "none"), (8, "none", "multifd"),
])
def test_npqfile_source_to_qemu_10(tmp_path, channels, compression, zero):
    ram_file = tmp_path / "dst.ram"
    with open(ram_file, "wb") as fh:
        fh.truncate(SIZE)
    uri = _listen_uri(tmp_path)
    with QemuVM(tmp_path, ram_file, version="10.0", size=SIZE, incoming=True) as vm:
        _multifd(vm, channels, compression, zero)
        vm.cmd("migrate-incoming", uri=uri)
        src = subprocess.run([sys.executable, "-m", "npqfile", "migrate", "--size", "16M",
                              "--to", uri, "--peer", "qemu", "--multifd-channels", str(channels),
                              "--multifd-compression", compression, "--zero-page-detection", zero,
                              "--init", "mixed", "--workload", "idle", "--json", "--quiet"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert src.returncode == 3, src.stderr       # completed, not verified (QEMU sends no verdict)
        vm.wait_migration()
    d = json.loads(src.stdout)
    assert d["status"] == "completed" and d["ram"]["multifd-bytes"] > SIZE // 2
    expected = GuestRAM()
    try:
        expected.add_block("ram", SIZE)
        fill_guest(expected, "mixed", 1)
        assert np.array_equal(np.fromfile(ram_file, dtype=np.uint8), expected.block("ram").array)
    finally:
        expected.close()


def test_npqfile_live_migration_with_a_dirtying_guest_into_qemu_10(tmp_path):
    """Pages re-sent in later passes over other channels: QEMU 10.0 ends with the
    source's final RAM (each pass's SYNC + MULTIFD_FLUSH orders them)."""
    from npqfile.migration.engine import MigrationParams
    from npqfile.migration.session import MigrationConfig, run_migration

    ram_file = tmp_path / "dst.ram"
    with open(ram_file, "wb") as fh:
        fh.truncate(SIZE)
    uri = _listen_uri(tmp_path)
    src = GuestRAM()
    try:
        src.add_block("ram", SIZE)
        fill_guest(src, "mixed", 3)
        with QemuVM(tmp_path, ram_file, version="10.0", size=SIZE, incoming=True) as vm:
            _multifd(vm, 3, "zstd", "multifd")
            vm.cmd("migrate-incoming", uri=uri)
            params = MigrationParams(multifd_channels=3, multifd_compression="zstd", time_limit=60,
                                     max_bandwidth=40 << 20)       # several passes while the guest writes
            st = run_migration(MigrationConfig(size=SIZE, to=uri, params=params, peer="qemu",
                                               workload="hotset:rate=4000,hot=0.2,bytes=64"), ram=src)
            assert st.status == "completed" and st.completion == "not-verified", st.outcome
            vm.wait_migration()
        assert st.dirty_sync_count >= 3 and st.destination == {}
        assert np.array_equal(np.fromfile(ram_file, dtype=np.uint8), src.block("ram").array)
    finally:
        src.close()

