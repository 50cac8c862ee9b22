"""npqfile against real QEMU 7.2 and 10.0: QEMU's streams load into npqfile, npqfile's load into QEMU.

Each test starts qemu-system-x86_64 paused, with its RAM in a file the test controls
(``memory-backend-file,share=on``), drives it over QMP (``qemu.qmp``'s synchronous
client) and always kills it.  QEMU's stderr is part of every assertion message.
In CI (NPQFILE_REQUIRE_COMPONENTS=1) a missing QEMU fails these tests instead of skipping.

Tests where the versions differ on the wire (the ``-M none`` and ``-M pc`` streams,
byte equality, vmdesc, loading ours, postcopy/x-ignore-shared) run against both
versions (``qemu_version`` fixture over ``conftest.QEMU_VERSIONS``); features one
version lacks run against the one that has them (legacy compression: 7.2; mapped-ram:
10.0).  Byte-for-byte tests compare with ``stream_compare.assert_same_stream``: QEMU
ends a PART after 50 ms, so on a busy machine its RAM arrives split differently.
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest

from npqfile.channels import open_channel
from npqfile.errors import StreamError
from npqfile.qemufile import QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream import load_file, save_snapshot
from npqfile.stream.vmdesc import find_vmdesc
from conftest import QEMU_VERSIONS
from qemu_support import MIB, RAM_SIZE, QemuVM, exec_save_uri, wait_saved
from stream_compare import assert_same_stream
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


def qemu_save(tmp_path, pages, *, machine="none", caps=(), params=None, extra=(), version="7.2",
              uri: str | None = None) -> str:
    """Let QEMU ``version`` migrate a guest whose RAM is ``pages`` to a stream file (``uri``
    with ``{}`` for the path: ``file:{}`` for mapped-ram; default a pipe to a file written
    whole, ``exec_save_uri``); returns its path."""
    ram_file = _ram_file(tmp_path, pages, f"src-{machine}.bin")
    out = str(tmp_path / f"qemu-{version}-{machine}-{len(caps)}.stream")
    with QemuVM(tmp_path, ram_file, machine=machine, extra=extra, version=version) as vm:
        if caps:
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        vm.cmd("migrate-set-parameters", **(params or {"max-bandwidth": 100 << 30}))
        vm.cmd("migrate", uri=exec_save_uri(out) if uri is None else uri.format(out))
        vm.wait_migration()
    if uri is None:
        wait_saved(out)
    return out


def qemu_load(tmp_path, stream, *, machine="none", caps=(), extra=(), version="7.2",
              uri="exec:cat {}") -> tuple[np.ndarray, dict]:
    """Let QEMU ``version`` load ``stream`` into a zeroed RAM file (``uri`` with ``{}`` for
    the path: ``file:{}`` for mapped-ram); returns (RAM contents, query-status)."""
    ram_file = _ram_file(tmp_path, None, f"dst-{machine}.bin")
    with QemuVM(tmp_path, ram_file, machine=machine, incoming=True, extra=extra, version=version) as vm:
        if caps:
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        vm.cmd("migrate-incoming", uri=uri.format(stream))
        vm.wait_migration()
        status = vm.cmd("query-status")
        err = vm.stderr()
    return np.fromfile(ram_file, dtype=np.uint8), {"status": status, "stderr": err}


@pytest.fixture(scope="module")
def pattern():
    return pattern_pages(RAM_SIZE // PAGE, seed=42)


@pytest.fixture(params=QEMU_VERSIONS)
def qemu_version(request):
    return request.param


# -- QEMU -> npqfile -----------------------------------------------------------------------

def test_qemu_none_stream_loads_into_npqfile(tmp_path, pattern, qemu_version):
    stream = qemu_save(tmp_path, pattern, version=qemu_version)
    res = load_file(stream)
    assert res.complete and res.machine == "none" and res.vmdesc is not None
    assert [b.name for b in res.ram.blocks] == ["ram"]
    assert np.array_equal(res.ram.block("ram").pages, pattern)
    n_zero = int((~pattern.any(axis=1)).sum())
    assert res.stats.zero_pages == n_zero and res.stats.normal_pages == len(pattern) - n_zero
    assert [s.idstr for s in res.sections if s.type == "full"] == ["timer", "globalstate"]


def test_npqfile_writes_qemus_bytes_exactly(tmp_path, pattern, qemu_version):
    """For -M none, QEMU's stream of a RAM and npqfile's (for that QEMU version) are the
    same bytes (the same records when QEMU split its RAM into other sections)."""
    stream = qemu_save(tmp_path, pattern, version=qemu_version)
    out = _our_stream(tmp_path, pattern, qemu_version=qemu_version)
    assert_same_stream(out, stream)


def test_qemu_pc_stream_many_blocks_and_devices(tmp_path, pattern, qemu_version):
    stream = qemu_save(tmp_path, pattern, machine="pc", version=qemu_version)
    res = load_file(stream, decode_devices=True)
    assert res.complete and res.machine == f"pc-i440fx-{qemu_version}"
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


def test_qemu_postcopy_and_x_ignore_shared_streams(tmp_path, pattern, qemu_version):
    # postcopy-ram over exec: never reports completed (return path); the stream is complete anyway
    ram_file = _ram_file(tmp_path, pattern, "src-post.bin")
    out = str(tmp_path / "post.stream")
    with QemuVM(tmp_path, ram_file, version=qemu_version) as vm:
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
        vm.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        vm.cmd("migrate", uri=f"exec:cat > {out}")
        # wait for the stream to be whole (it loads to its end), not for the file to stop
        # growing for a while: cat may well pause longer than any such while on a busy machine
        deadline = time.monotonic() + 60
        while True:
            try:
                res = load_file(out)
                break
            except (StreamError, FileNotFoundError) as exc:     # the shell has not created it yet
                assert time.monotonic() < deadline, f"QEMU's postcopy stream still incomplete: {exc}"
                assert vm.proc.poll() is None, f"QEMU exited: {vm.stderr()}"
                time.sleep(0.1)
    assert [c["cmd"] for c in res.commands][:3] == ["OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE"]
    assert np.array_equal(res.ram.block("ram").pages, pattern)
    stream = qemu_save(tmp_path, pattern, caps=["x-ignore-shared"], version=qemu_version)
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


@pytest.mark.parametrize("qemu_version, stream_version", [("7.2", "7.2"), ("10.0", "7.2"), ("10.0", "10.0")])
def test_npqfile_stream_loads_into_qemu(tmp_path, pattern, qemu_version, stream_version):
    """Our default (7.2) stream loads into both QEMUs; our 10.0 stream into QEMU 10.0."""
    stream = _our_stream(tmp_path, pattern, qemu_version=stream_version)
    loaded, info = qemu_load(tmp_path, stream, version=qemu_version)
    assert np.array_equal(loaded.reshape(-1, PAGE), pattern), info["stderr"]
    assert info["status"]["status"] == "prelaunch", info
    assert "Expected vmdescription" not in info["stderr"], info["stderr"]


def test_npqfile_stream_without_footers_or_configuration(tmp_path, pattern, qemu_version):
    stream = _our_stream(tmp_path, pattern, send_configuration=False, send_section_footer=False,
                         qemu_version=qemu_version)
    flags = ["-global", "migration.send-section-footer=off", "-global", "migration.send-configuration=off"]
    loaded, info = qemu_load(tmp_path, stream, extra=flags, version=qemu_version)
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


def test_qemu_rejects_wrong_machine_with_its_message(tmp_path, pattern, qemu_version):
    stream = _our_stream(tmp_path, pattern, machine="pc-i440fx-7.2", qemu_version=qemu_version)
    ram_file = _ram_file(tmp_path, None, "dst-bad.bin")
    with QemuVM(tmp_path, ram_file, incoming=True, version=qemu_version) as vm:
        vm.cmd("migrate-incoming", uri=f"exec:cat {stream}")
        try:
            vm.proc.wait(timeout=60)     # QEMU exits on the bad stream; the bound is for a hang
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU did not exit on a wrong machine type: {vm.stderr()}") from None
        err = vm.stderr()
    assert "Machine type received is 'pc-i440fx-7.2' and local is 'none'" in err, err


def test_vmdesc_of_qemu_matches_ours(tmp_path, pattern, qemu_version):
    stream = qemu_save(tmp_path, pattern, version=qemu_version)
    doc, _ = find_vmdesc(stream)
    ours, _ = find_vmdesc(_our_stream(tmp_path, pattern, qemu_version=qemu_version))
    assert doc == ours


def test_cli_extract_from_qemu_then_save_loads_back_into_qemu(tmp_path, pattern, capsys, qemu_version):
    """analyze --extract of QEMU's stream, then npqfile save of the images: QEMU loads it."""
    _extract_then_save(tmp_path, pattern, capsys, qemu_version)


def _extract_then_save(tmp_path, pattern, capsys, qemu_version):
    import hashlib
    import json

    from npqfile.cli import main
    stream = qemu_save(tmp_path, pattern, version=qemu_version)
    capsys.readouterr()
    assert main(["analyze", stream, "--json", "--extract", str(tmp_path / "x")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ram"]["blocks"] == [{"name": "ram", "size": RAM_SIZE,
                                     "sha256": hashlib.sha256(pattern.tobytes()).hexdigest()}]
    assert doc["qemu-features"]["layout"] == qemu_version
    out = tmp_path / "back.stream"
    assert main(["save", f"ram={tmp_path / 'x' / 'ram'}", "--machine", "none", "-o", str(out),
                 "--qemu-version", qemu_version]) == 0
    assert_same_stream(out, stream)
    loaded, info = qemu_load(tmp_path, out, version=qemu_version)
    assert np.array_equal(loaded.reshape(-1, PAGE), pattern), info["stderr"]


# -- the byte-for-byte tests are deterministic (issue 8, item 7) ------------------------------

def test_stream_comparison_survives_qemu_splitting_the_ram_into_parts(tmp_path, pattern, qemu_version):
    """QEMU rate-limited to split its RAM into several PARTs (what a busy machine does
    through the 50 ms limit): the raw bytes differ from ours, the comparison still holds."""
    stream = qemu_save(tmp_path, pattern, params={"max-bandwidth": 32 * MIB, "downtime-limit": 10},
                       version=qemu_version)
    assert len([p for p in load_file(stream).stats.parts if p["type"] == "part"]) >= 2
    out = _our_stream(tmp_path, pattern, qemu_version=qemu_version)
    assert out.read_bytes() != open(stream, "rb").read()     # what the old byte test compared
    assert assert_same_stream(out, stream) == "records"


def test_byte_for_byte_tests_are_stable_under_cpu_load(tmp_path, pattern, capsys):
    """The test of the tests: the byte-for-byte interop tests, run again while busy-loop
    processes (twice as many as cores) compete with QEMU for the CPU, still pass."""
    import sys
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        how = []
        for round_ in range(2):      # the stream comparison twice, the CLI round trip once, per QEMU
            for version in QEMU_VERSIONS:
                d = tmp_path / f"{version}-{round_}"
                d.mkdir()
                stream = qemu_save(d, pattern, version=version)
                how.append(assert_same_stream(_our_stream(d, pattern, qemu_version=version), stream))
                if round_ == 0:
                    (d / "cli").mkdir()
                    _extract_then_save(d / "cli", pattern, capsys, version)
    finally:
        for p in hogs:
            p.kill()
        for p in hogs:
            p.wait()
    # "records" means QEMU split its RAM: the old byte comparison would have failed there
    print("comparisons under load:", how)
    assert set(how) <= {"bytes", "records"} and len(how) == 2 * len(QEMU_VERSIONS)


def test_compressed_pages_are_refused_for_qemu_10(tmp_path, pattern):
    """QEMU 9.1 removed COMPRESS_PAGE (0x100): writing it for a 10.0 destination is refused
    before anything is written (no QEMU needed to know that)."""
    with pytest.raises(ValueError, match="QEMU 9.1 removed RAM_SAVE_FLAG_COMPRESS_PAGE"):
        _our_stream(tmp_path, pattern, name="c.stream", qemu_version="10.0", compress_level=1)
    assert (tmp_path / "c.stream").stat().st_size == 0


# -- mapped-ram (QEMU 9.0+ file: layout; QEMU 10.0 only) --------------------------------------

MAPPED_RAM_CAPS = {"plain": ["mapped-ram"], "multifd": ["mapped-ram", "multifd"]}


@pytest.mark.parametrize("caps", sorted(MAPPED_RAM_CAPS))
def test_qemu10_mapped_ram_file_loads_analyzes_and_extracts(tmp_path, pattern, capsys, caps):
    import json

    from npqfile.cli import main
    stream = qemu_save(tmp_path, pattern, caps=MAPPED_RAM_CAPS[caps], version="10.0", uri="file:{}")
    res = load_file(stream)
    assert res.complete and res.capabilities == ["mapped-ram"]
    assert np.array_equal(res.ram.block("ram").pages, pattern)
    n_zero = int((~pattern.any(axis=1)).sum())
    assert res.mapped_ram == [{"name": "ram", "header-offset": res.mapped_ram[0]["header-offset"], "version": 1,
                               "page-size": PAGE, "bitmap-offset": res.mapped_ram[0]["header-offset"] + 28,
                               "pages-offset": 1 << 20, "pages-present": len(pattern) - n_zero, "holes": n_zero}]
    res.ram.close()
    # npqfile writes the same file
    ours = _our_stream(tmp_path, pattern, name="ours-mr.stream", qemu_version="10.0", mapped_ram=True)
    assert assert_same_stream(ours, stream) in ("bytes", "records")
    assert main(["analyze", stream, "--json", "--extract", str(tmp_path / "x")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["qemu-features"]["mapped-ram"] is True and doc["qemu-features"]["layout"] == "10.0"
    assert doc["qemu-features"]["multifd-flush"] == 0   # mapped-ram never sends MULTIFD_FLUSH
    assert doc["mapped-ram"]["on-disk-bytes"] < os.path.getsize(stream)
    assert (tmp_path / "x" / "ram").read_bytes() == pattern.tobytes()


@pytest.mark.parametrize("caps", sorted(MAPPED_RAM_CAPS))
def test_qemu10_restores_npqfiles_mapped_ram_file(tmp_path, pattern, capsys, caps):
    from npqfile.cli import main
    pattern.tofile(tmp_path / "ram.raw")
    out = tmp_path / "ours.mr"
    assert main(["save", f"ram={tmp_path / 'ram.raw'}", "--mapped-ram", "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "for QEMU 10.0" in summary and "on disk (zero pages are holes)" in summary
    assert out.stat().st_blocks * 512 < out.stat().st_size        # a sparse file
    loaded, info = qemu_load(tmp_path, out, caps=MAPPED_RAM_CAPS[caps], version="10.0", uri="file:{}")
    assert np.array_equal(loaded.reshape(-1, PAGE), pattern), info["stderr"]
    assert info["status"]["status"] == "prelaunch", info
