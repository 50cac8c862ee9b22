"""npqfile against a real QEMU (7.2 here): QEMU's streams load into npqfile, npqfile's load into QEMU.

Each test starts qemu-system-x86_64 paused, with its RAM in a file the test controls
(``memory-backend-file,share=on``), drives it over QMP (``qemu.qmp``'s synchronous
client) and always kills it.  QEMU's stderr is part of every assertion message.
In CI (NPQFILE_REQUIRE_COMPONENTS=1) a missing QEMU fails these tests instead of skipping.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from npqfile.channels import open_channel
from npqfile.qemufile import QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream import load_file, save_snapshot
from npqfile.stream.vmdesc import find_vmdesc
from qemu_support import MIB, RAM_SIZE, QemuVM
from test_stream_support import PAGE, pattern_pages

pytestmark = pytest.mark.component


def _ram_file(tmp_path, pages: np.ndarray | None, name="ram.bin", size=RAM_SIZE):
    path = tmp_path / name
    if pages is None:
        with open(path, "wb") as fh:
            fh.truncate(size)
    else:
        path.write_bytes(pages.tobytes())
    return path


def qemu_save(tmp_path, pages, *, machine="none", caps=(), params=None, extra=()) -> str:
    """Let QEMU migrate a guest whose RAM is ``pages`` to a stream file; returns its path."""
    ram_file = _ram_file(tmp_path, pages, f"src-{machine}.bin")
    out = str(tmp_path / f"qemu-{machine}.stream")
    with QemuVM(tmp_path, ram_file, machine=machine, extra=extra) as vm:
        if caps:
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        vm.cmd("migrate-set-parameters", **(params or {"max-bandwidth": 100 << 30}))
        vm.cmd("migrate", uri=f"exec:cat > {out}")
        vm.wait_migration()
    return out


def qemu_load(tmp_path, stream, *, machine="none", caps=(), extra=()) -> tuple[np.ndarray, dict]:
    """Let QEMU load ``stream`` into a zeroed RAM file; returns (RAM contents, query-status)."""
    ram_file = _ram_file(tmp_path, None, f"dst-{machine}.bin")
    with QemuVM(tmp_path, ram_file, machine=machine, incoming=True, extra=extra) as vm:
        if caps:
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        vm.cmd("migrate-incoming", uri=f"exec:cat {stream}")
        vm.wait_migration()
        status = vm.cmd("query-status")
        err = vm.stderr()
    return np.fromfile(ram_file, dtype=np.uint8), {"status": status, "stderr": err}


@pytest.fixture(scope="module")
def pattern():
    return pattern_pages(RAM_SIZE // PAGE, seed=42)


# -- QEMU -> npqfile -----------------------------------------------------------------------

def test_qemu_none_stream_loads_into_npqfile(tmp_path, pattern):
    stream = qemu_save(tmp_path, pattern)
    res = load_file(stream)
    assert res.complete and res.machine == "none" and res.vmdesc is not None
    assert [b.name for b in res.ram.blocks] == ["ram"]
    assert np.array_equal(res.ram.block("ram").pages, pattern)
    n_zero = int((~pattern.any(axis=1)).sum())
    assert res.stats.zero_pages == n_zero and res.stats.normal_pages == len(pattern) - n_zero
    assert [s.idstr for s in res.sections if s.type == "full"] == ["timer", "globalstate"]


def test_npqfile_writes_qemus_bytes_exactly(tmp_path, pattern):
    """For -M none, QEMU 7.2's stream of a RAM and npqfile's are the same bytes."""
    stream = qemu_save(tmp_path, pattern)
    ram = GuestRAM()
    ram.add_block("ram", RAM_SIZE).pages[:] = pattern
    out = tmp_path / "ours.stream"
    with QEMUFile(open_channel(f"file:{out}", "w")) as f:
        save_snapshot(f, ram)
    assert out.read_bytes() == open(stream, "rb").read()


def test_qemu_pc_stream_many_blocks_and_devices(tmp_path, pattern):
    stream = qemu_save(tmp_path, pattern, machine="pc")
    res = load_file(stream, decode_devices=True)
    assert res.complete and res.machine.startswith("pc-i440fx")
    names = [b.name for b in res.ram.blocks]
    assert "pc.ram" in names and "pc.bios" in names and len(names) >= 4
    assert np.array_equal(res.ram.block("pc.ram").pages, pattern)
    devices = [s for s in res.sections if s.type == "full"]
    assert len(devices) >= 14
    assert devices[-1].idstr == "globalstate"


def test_qemu_rate_limited_stream_has_many_parts(tmp_path):
    rng = np.random.default_rng(7)
    pages = rng.integers(0, 256, (RAM_SIZE // PAGE, PAGE), dtype=np.uint8)
    stream = qemu_save(tmp_path, pages, params={"max-bandwidth": 32 * MIB, "downtime-limit": 10})
    res = load_file(stream)
    # the current block carries over: later parts begin with CONTINUE records (no idstr)
    assert np.array_equal(res.ram.block("ram").pages, pages)
    parts = [p for p in res.stats.parts if p["type"] == "part"]
    assert len(parts) >= 3, res.stats.parts
    assert sum(p["normal"] for p in res.stats.parts) == len(pages)


def test_qemu_compressed_stream(tmp_path, pattern):
    stream = qemu_save(tmp_path, pattern, caps=["compress"])
    res = load_file(stream)
    assert res.stats.compressed_pages > 0
    assert np.array_equal(res.ram.block("ram").pages, pattern)


def test_qemu_postcopy_and_x_ignore_shared_streams(tmp_path, pattern):
    # postcopy-ram over exec: never reports completed (return path); the stream is complete anyway
    ram_file = _ram_file(tmp_path, pattern, "src-post.bin")
    out = str(tmp_path / "post.stream")
    with QemuVM(tmp_path, ram_file) as vm:
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
        vm.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        vm.cmd("migrate", uri=f"exec:cat > {out}")
        deadline = time.monotonic() + 20
        # "ram" appears in query-migrate only once the migration left the setup state
        while time.monotonic() < deadline and vm.cmd("query-migrate").get("ram", {}).get("remaining", 1) != 0:
            time.sleep(0.02)
        size = -1   # then wait for cat to have written everything: the file stops growing
        while time.monotonic() < deadline and os.path.getsize(out) != size:
            size = os.path.getsize(out)
            time.sleep(0.3)
    res = load_file(out)
    assert [c["cmd"] for c in res.commands][:3] == ["OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE"]
    assert np.array_equal(res.ram.block("ram").pages, pattern)
    stream = qemu_save(tmp_path, pattern, caps=["x-ignore-shared"])
    res = load_file(stream)
    assert res.capabilities == ["x-ignore-shared"] and res.complete
    assert res.stats.pages == 0   # the shared backend is not migrated at all


def test_truncated_qemu_stream_is_a_stream_error(tmp_path, pattern):
    from npqfile.errors import StreamError
    stream = qemu_save(tmp_path, pattern)
    data = open(stream, "rb").read()
    cut = tmp_path / "cut.stream"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(StreamError, match="truncated") as e:
        load_file(cut)
    assert e.value.section == "ram"


# -- npqfile -> QEMU -----------------------------------------------------------------------

def _our_stream(tmp_path, pages, name="ours.stream", **kwargs):
    ram = GuestRAM()
    ram.add_block("ram", RAM_SIZE).pages[:] = pages
    out = tmp_path / name
    with QEMUFile(open_channel(f"file:{out}", "w")) as f:
        save_snapshot(f, ram, **kwargs)
    ram.close()
    return out


def test_npqfile_stream_loads_into_qemu(tmp_path, pattern):
    stream = _our_stream(tmp_path, pattern)
    loaded, info = qemu_load(tmp_path, stream)
    assert np.array_equal(loaded.reshape(-1, PAGE), pattern), info["stderr"]
    assert info["status"]["status"] == "prelaunch", info
    assert "Expected vmdescription" not in info["stderr"], info["stderr"]


def test_npqfile_stream_without_footers_or_configuration(tmp_path, pattern):
    stream = _our_stream(tmp_path, pattern, send_configuration=False, send_section_footer=False)
    flags = ["-global", "migration.send-section-footer=off", "-global", "migration.send-configuration=off"]
    loaded, info = qemu_load(tmp_path, stream, extra=flags)
    assert np.array_equal(loaded.reshape(-1, PAGE), pattern), info["stderr"]


def test_npqfile_compressed_and_xbzrle_stream_loads_into_qemu(tmp_path, pattern):
    """Legacy COMPRESS_PAGE records, then a second round of XBZRLE deltas, into QEMU 7.2."""
    from npqfile.stream import RAMSaver, SaveVMWriter
    from npqfile.stream.constants import QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START
    from npqfile.stream.devices import RAM, none_machine_devices
    ram = GuestRAM()
    blk = ram.add_block("ram", RAM_SIZE)
    blk.pages[:] = pattern
    out = tmp_path / "xbz.stream"
    with QEMUFile(open_channel(f"file:{out}", "w")) as f:
        w = SaveVMWriter(f)
        saver = RAMSaver(f, ram, xbzrle_cache_size=RAM_SIZE, compress_level=1)
        saver.xbzrle_enabled = False          # QEMU: no XBZRLE in the bulk stage; compression instead
        w.write_header()
        with w.section(RAM, QEMU_VM_SECTION_START):
            saver.save_setup()
        with w.section(RAM, QEMU_VM_SECTION_PART):
            saver.save_pages(blk, np.arange(blk.n_pages))
            saver.write_eos()
        saver.xbzrle_enabled = True
        with w.section(RAM, QEMU_VM_SECTION_PART):
            saver.save_pages(blk, np.arange(0, blk.n_pages, 2))   # fills the cache
            saver.write_eos()
        blk.pages[::2, 10] ^= 0x5A                                 # change one byte per even page
        with w.section(RAM, QEMU_VM_SECTION_END):
            saver.save_pages(blk, np.arange(0, blk.n_pages, 2))
            saver.write_eos()
        for se, payload, _d in none_machine_devices():
            w.write_full_section(se, payload)
        w.write_eof()
        w.write_vmdesc([d for _s, _p, d in none_machine_devices()])
    assert saver.stats.compressed_pages > 0 and saver.stats.xbzrle_pages > 0
    expect = blk.pages.copy()
    loaded, info = qemu_load(tmp_path, out, caps=["compress"])
    assert np.array_equal(loaded.reshape(-1, PAGE), expect), info["stderr"]


def test_qemu_rejects_wrong_machine_with_its_message(tmp_path, pattern):
    stream = _our_stream(tmp_path, pattern, machine="pc-i440fx-7.2")
    ram_file = _ram_file(tmp_path, None, "dst-bad.bin")
    with QemuVM(tmp_path, ram_file, incoming=True) as vm:
        vm.cmd("migrate-incoming", uri=f"exec:cat {stream}")
        deadline = time.monotonic() + 10
        while vm.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        err = vm.stderr()
    assert "Machine type received is 'pc-i440fx-7.2' and local is 'none'" in err, err


def test_vmdesc_of_qemu_matches_ours(tmp_path, pattern):
    stream = qemu_save(tmp_path, pattern)
    doc, _ = find_vmdesc(stream)
    ours, _ = find_vmdesc(_our_stream(tmp_path, pattern))
    assert doc == ours


def test_cli_extract_from_qemu_then_save_loads_back_into_qemu(tmp_path, pattern, capsys):
    """analyze --extract of QEMU's stream, then npqfile save of the images: QEMU loads it."""
    import hashlib
    import json

    from npqfile.cli import main
    stream = qemu_save(tmp_path, pattern)
    assert main(["analyze", stream, "--json", "--extract", str(tmp_path / "x")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ram"]["blocks"] == [{"name": "ram", "size": RAM_SIZE,
                                     "sha256": hashlib.sha256(pattern.tobytes()).hexdigest()}]
    out = tmp_path / "back.stream"
    assert main(["save", f"ram={tmp_path / 'x' / 'ram'}", "--machine", "none", "-o", str(out)]) == 0
    assert out.read_bytes() == open(stream, "rb").read()
    loaded, info = qemu_load(tmp_path, out)
    assert np.array_equal(loaded.reshape(-1, PAGE), pattern), info["stderr"]
