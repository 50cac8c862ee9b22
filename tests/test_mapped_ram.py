"""mapped-ram files (QEMU 9.0+ ``file:`` layout) and the QEMU 10.0 stream, without a real QEMU.

The real-QEMU side (QEMU 10.0 writes and restores them, byte equality) is in
test_qemu_interop.py; here: the layout, round trips, live rewriting in place, and every
kind of bad header a hostile file can carry, each a clean StreamError naming the block,
the byte offset and the reason.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from npqfile.channels import open_channel
from npqfile.cli import main
from npqfile.errors import StreamError
from npqfile.qemufile import QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream import load_file, load_uri, save_snapshot
from npqfile.stream.mapped_ram import HEADER_SIZE, MappedRamHeader, bitmap_size
from npqfile.stream.versions import features_seen, stream_version
from test_stream_support import PAGE, make_ram, pattern_pages, snapshot_bytes

MIB = 1 << 20


def _save(path, ram, **kwargs):
    with QEMUFile(open_channel(f"file:{path}", "w")) as f:
        save_snapshot(f, ram, qemu_version="10.0", mapped_ram=True, **kwargs)
    return path


def _headers(path) -> list[tuple[int, MappedRamHeader]]:
    """(offset, header) of each block, found through the loader's own report."""
    res = load_file(path)
    out = [(m["header-offset"], MappedRamHeader(m["version"], m["page-size"], m["bitmap-offset"],
                                                 m["pages-offset"])) for m in res.mapped_ram]
    res.ram.close()
    return out


@pytest.fixture
def two_blocks():
    ram = make_ram({"ram": pattern_pages(300, seed=3), "vga.vram": pattern_pages(5, seed=4)})
    yield ram
    ram.close()


def test_round_trip_layout_and_holes(tmp_path, two_blocks):
    path = _save(tmp_path / "mr.bin", two_blocks)
    res = load_file(path)
    try:
        for b in two_blocks.blocks:
            assert np.array_equal(res.ram.block(b.name).array, b.array)
        (off0, h0), (off1, h1) = _headers(path)
        assert h0 == MappedRamHeader.layout(off0, 300 * PAGE, PAGE)
        assert h0.bitmap_offset == off0 + HEADER_SIZE and h0.pages_offset == MIB
        assert h1.pages_offset % MIB == 0 and off1 > h0.pages_offset + 300 * PAGE - 1
        zero = int((~pattern_pages(300, seed=3).any(axis=1)).sum()) + int((~pattern_pages(5, seed=4).any(axis=1)).sum())
        assert res.stats.zero_pages == zero and res.stats.normal_pages == 305 - zero
        # bitmap: little-endian bits, one per page, whole 64-bit words
        raw = path.read_bytes()[h0.bitmap_offset:h0.bitmap_offset + bitmap_size(300)]
        assert len(raw) == 40
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
        assert np.array_equal(bits[:300].astype(bool), pattern_pages(300, seed=3).any(axis=1))
        assert not bits[300:].any()
        # zero pages are holes: never written
        st = path.stat()
        assert st.st_blocks * 512 < st.st_size
        assert features_seen(res)["mapped-ram"] and features_seen(res)["layout"] == "10.0"
    finally:
        res.ram.close()


def test_live_rewrite_in_place_and_zeroed_page_loses_its_bit(tmp_path):
    """A page sent twice is written twice at the same offset; a page that became zero only
    loses its bit (its old bytes stay in the file but are never read), as QEMU does."""
    from npqfile.stream.constants import QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START
    from npqfile.stream.devices import machine_devices, ram_entry
    from npqfile.stream.ram_saver import RAMSaver
    from npqfile.stream.savevm import SaveVMWriter
    ram = make_ram({"ram": np.full((8, PAGE), 7, np.uint8)})
    blk = ram.block("ram")
    path = tmp_path / "live.bin"
    with QEMUFile(open_channel(f"file:{path}", "w")) as f:
        w = SaveVMWriter(f, capabilities=["mapped-ram"], qemu_version="10.0")
        saver = RAMSaver(f, ram, mapped_ram=True)
        se = ram_entry("10.0")
        w.write_header()
        with w.section(se, QEMU_VM_SECTION_START):
            saver.save_setup()
        with w.section(se, QEMU_VM_SECTION_PART):
            saver.save_pages(blk, np.arange(8))
            saver.write_eos()
        size_after_first_pass = path.stat().st_size
        blk.pages[2] = 9          # re-dirtied
        blk.pages[5] = 0          # became zero
        with w.section(se, QEMU_VM_SECTION_END):
            saver.save_pages(blk, np.array([2, 5]))
            saver.write_mapped_ram_bitmaps()
            saver.write_eos()
        for entry, payload, _d in machine_devices("10.0"):
            w.write_full_section(entry, payload)
        w.write_eof()
        w.write_vmdesc([d for _e, _p, d in machine_devices("10.0")])
    (_off, hdr), = _headers(path)
    data = path.read_bytes()
    assert data[hdr.pages_offset + 2 * PAGE] == 9                  # rewritten in place
    assert data[hdr.pages_offset + 5 * PAGE] == 7                  # stale, but its bit is clear
    assert data[hdr.bitmap_offset] == 0b11011111
    assert size_after_first_pass <= len(data) < hdr.pages_offset + 8 * PAGE + 4096
    res = load_file(path)
    assert np.array_equal(res.ram.block("ram").array, blk.array)
    res.ram.close()
    ram.close()


def test_rate_limited_mapped_ram_save_stops_after_the_page_that_crosses(tmp_path):
    """With mapped-ram as without, rate-limited save_pages checks the limit before each
    page (QEMU's ram_save_iterate): the page that crosses it is written, none after it,
    and the zero pages (holes, no bytes) before it are consumed too."""
    from npqfile.stream.ram_saver import RAMSaver
    ram = make_ram({"ram": np.full((64, PAGE), 7, np.uint8)})
    blk = ram.block("ram")
    blk.pages[1] = 0
    with QEMUFile(open_channel(f"file:{tmp_path / 'rl.bin'}", "w")) as f:
        saver = RAMSaver(f, ram, mapped_ram=True)
        saver.save_setup()
        f.set_rate_limit(3 * PAGE)
        f.reset_rate_limit()
        done = saver.save_pages(blk, np.arange(64), rate_limited=True)
        assert done == 5 and f.bytes_xfer == 4 * PAGE      # pages 0, 2, 3, 4 written; 1 a hole
        assert saver.stats.normal_pages == 4 and saver.stats.zero_pages == 1
        assert list(saver.sent_zero) == [False, True, False, False, False]
        assert saver.save_pages(blk, np.arange(done, 64), rate_limited=True) == 0   # already over
        f.reset_rate_limit()
        f.set_rate_limit(0)
        assert saver.save_pages(blk, np.arange(done, 64), rate_limited=True) == 64 - done
    ram.close()


def test_qemu10_none_stream_layout():
    """QEMU 10.0's -M none stream: ram is section 1, globalstate 3, SWITCHOVER_START before
    END, globalstate carries vm_was_suspended, vmdesc opens with the configuration."""
    ram = make_ram({"ram": 4 * PAGE})
    data = snapshot_bytes(ram, qemu_version="10.0")
    ram.close()
    assert data[17:22] == b"\x01\0\0\0\x01"                         # START, section id 1
    assert b"\x08\x00\x0b\x00\x00\x03\x00\x00\x00\x01" in data       # SWITCHOVER_START, then END(1)
    gs = data.index(b"\x0bglobalstate") + 12 + 8
    assert data[gs:gs + 4] == b"\0\0\0\x0a" and data[gs + 36:gs + 38] == b"\x01\x00"
    vmdesc = json.loads(data[data.rindex(b"\x06\0\0") + 5:])
    assert list(vmdesc)[0] == "configuration"
    assert vmdesc["configuration"]["fields"][1] == {"name": "name", "type": "buffer", "size": 4}


def test_stream_versions_table():
    assert stream_version(None).name == "7.2"
    assert stream_version("10.0").mapped_ram and not stream_version("7.2").mapped_ram
    assert stream_version("7.2").compress_pages and not stream_version("10.0").compress_pages
    with pytest.raises(ValueError, match="unknown QEMU stream version '9.9'.*7.2, 10.0"):
        stream_version("9.9")
    with pytest.raises(ValueError, match="no mapped-ram"):
        save_snapshot(None, GuestRAM(), mapped_ram=True)


def test_mapped_ram_needs_a_seekable_file(tmp_path, two_blocks):
    with QEMUFile(open_channel(f"exec:cat > {tmp_path / 'x'}", "w")) as f:
        with pytest.raises(ValueError, match="mapped-ram needs a seekable file"):
            save_snapshot(f, two_blocks, qemu_version="10.0", mapped_ram=True)
    path = _save(tmp_path / "mr.bin", two_blocks)
    with pytest.raises(StreamError, match="mapped-ram block 'ram': mapped-ram needs a seekable file"):
        load_uri(f"exec:cat {path}")


def test_qemufile_offsets_keep_ftell_as_bytes_transferred(tmp_path):
    path = tmp_path / "o.bin"
    with QEMUFile(open_channel(f"file:{path}", "w")) as f:
        f.put_be32(1)
        assert f.set_offset(1 << 20) == 0 and f.tell() == 1 << 20
        assert f.put_buffer_at(b"abcd", 100) == 4
        f.put_be32(2)
        assert f.ftell() == 12          # 4 + 4 at an offset + 4: the jump transferred nothing
    data = path.read_bytes()
    assert len(data) == (1 << 20) + 4 and data[100:104] == b"abcd" and data[-4:] == b"\0\0\0\2"
    with QEMUFile(open_channel(f"exec:cat {path}", "r")) as f:
        with pytest.raises(ValueError, match="seekable"):
            f.set_offset(0)


# -- hostile headers -------------------------------------------------------------------------

def _corrupt(path, block: int, field: str, value: int) -> int:
    """Rewrite one header field of block ``block``; returns the header's offset."""
    off, _h = _headers(path)[block]
    pos = {"version": (0, ">I"), "page_size": (4, ">Q"), "bitmap_offset": (12, ">Q"), "pages_offset": (20, ">Q")}
    at, fmt = pos[field]
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, off + at, value)
    path.write_bytes(bytes(data))
    return off


BAD = {
    # field, value (or a function of the header), expected reason
    "version": ("version", lambda h, size: 2, "header version 2 is not supported"),
    "page size": ("page_size", lambda h, size: 8192, "header page size 8192 differs from the stream's page size 4096"),
    "bitmap past the file": ("bitmap_offset", lambda h, size: size - 4, "points past the end of the file"),
    "bitmap over the header": ("bitmap_offset", lambda h, size: h.bitmap_offset - 10, "overlaps the header"),
    "pages unaligned": ("pages_offset", lambda h, size: h.pages_offset + 100, "is not aligned to the page size"),
    "pages over the bitmap": ("pages_offset", lambda h, size: h.bitmap_offset // PAGE * PAGE, "overlaps the bitmap"),
    "pages past the file": ("pages_offset", lambda h, size: size // PAGE * PAGE, "points past the end of the file"),
}


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("block", [0, 1])
def test_bad_headers_are_stream_errors_naming_block_and_offset(tmp_path, two_blocks, name, block, capsys):
    path = _save(tmp_path / "mr.bin", two_blocks)
    field, value, reason = BAD[name]
    _off, hdr = _headers(path)[block]
    off = _corrupt(path, block, field, value(hdr, path.stat().st_size))
    block_name = two_blocks.blocks[block].name
    with pytest.raises(StreamError, match=reason) as e:
        load_file(path)
    assert f"mapped-ram block '{block_name}'" in str(e.value)
    assert e.value.offset == off and e.value.section == "ram"
    assert main(["analyze", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err and f"at offset {off}" in err


def test_bitmap_bits_past_the_block_are_refused(tmp_path):
    ram = make_ram({"small": pattern_pages(5, seed=1)})
    path = _save(tmp_path / "mr.bin", ram)
    ram.close()
    (_off, hdr), = _headers(path)
    data = bytearray(path.read_bytes())
    data[hdr.bitmap_offset + 1] |= 0x04          # bit 10 of a 5-page block
    path.write_bytes(bytes(data))
    with pytest.raises(StreamError, match="mapped-ram block 'small': bitmap bit 10 is set but the block "
                                          "has only 5 pages") as e:
        load_file(path)
    assert e.value.offset == hdr.bitmap_offset + 1


def test_truncated_mapped_ram_file_is_a_clean_error(tmp_path, two_blocks):
    path = _save(tmp_path / "mr.bin", two_blocks)
    (_o0, h0), _ = _headers(path)
    path.write_bytes(path.read_bytes()[:h0.pages_offset + 10 * PAGE])
    with pytest.raises(StreamError, match="mapped-ram block 'ram': pages region .* points past the end of the file"):
        load_file(path)


def test_declared_ram_over_the_limit_is_refused_before_reading(tmp_path, two_blocks):
    path = _save(tmp_path / "mr.bin", two_blocks)
    with pytest.raises(StreamError, match="more than the"):
        load_file(path, max_ram_bytes=64 * PAGE)


def test_cli_save_and_migrate_mapped_ram_options(tmp_path, capsys):
    pattern_pages(64, seed=2).tofile(tmp_path / "r.raw")
    out = tmp_path / "o.mr"
    assert main(["save", f"ram={tmp_path / 'r.raw'}", "--mapped-ram", "-o", str(out)]) == 0
    assert "on disk" in capsys.readouterr().out
    assert main(["analyze", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mapped-ram"]["blocks"][0]["pages-offset"] == MIB
    for argv, message in [
        (["save", f"ram={tmp_path / 'r.raw'}", "--mapped-ram", "--qemu-version", "7.2", "-o", str(out)],
         "QEMU 7.2 has no mapped-ram"),
        (["save", f"ram={tmp_path / 'r.raw'}", "--qemu-version", "10.0", "--compress-level", "1", "-o", str(out)],
         "QEMU 9.1 removed RAM_SAVE_FLAG_COMPRESS_PAGE"),
        (["save", f"ram={tmp_path / 'r.raw'}", "--mapped-ram", "-o", "exec:cat"], "-o must be a regular file"),
        (["migrate", "--size", "1M", "--mapped-ram"], "it needs --to file:PATH"),
        (["migrate", "--size", "1M", "--qemu-version", "10.0", "--compress", "zlib"], "QEMU 9.1 removed"),
    ]:
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert message in err, (argv, err)


def test_cli_migrate_mapped_ram_to_a_file(tmp_path, capsys):
    out = tmp_path / "live.mr"
    assert main(["migrate", "--size", "8M", "--to", f"file:{out}", "--mapped-ram", "--json", "--quiet",
                 "--workload", "hotset:rate=2000"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ver = doc["npqfile"]["verification"]
    assert ver["ok"] is True and ver["on-disk-bytes"] <= ver["file-bytes"] == out.stat().st_size
    res = load_file(out)
    assert res.capabilities == ["mapped-ram"] and features_seen(res)["layout"] == "10.0"
    res.ram.close()


def test_features_seen_reports_multifd_flush_and_the_layout():
    from test_stream_support import be64, load_bytes, minimal_stream
    res = load_bytes(minimal_stream(be64(0x200) + be64(0x200)))
    seen = features_seen(res)
    assert seen["multifd-flush"] == 2 and seen["mapped-ram"] is False and seen["layout"] == "7.2"
    ram = make_ram({"ram": 4 * PAGE})
    for version in ("7.2", "10.0"):
        seen = features_seen(load_bytes(snapshot_bytes(ram, qemu_version=version)))
        assert seen["layout"] == version and seen["switchover-start"] == (version == "10.0")
        assert seen["vmdesc-configuration"] == (version == "10.0")   # read after EOF
    ram.close()


def test_analyze_of_a_mapped_ram_file_on_standard_input_is_a_clean_error(tmp_path, two_blocks):
    """analyze reads a pipe as a stream: a mapped-ram file needs its offsets, so it says so."""
    import subprocess
    import sys
    path = _save(tmp_path / "mr.bin", two_blocks)
    with open(path, "rb") as fh:     # standard input redirected from the file: seekable, read in place
        proc = subprocess.run([sys.executable, "-m", "npqfile", "analyze", "-"], stdin=fh, capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 0 and "4 pages present, 1 holes" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "npqfile", "analyze", "-"], input=path.read_bytes(),
                          capture_output=True, timeout=60)        # a pipe: no offsets
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("error: mapped-ram block 'ram': mapped-ram needs a seekable file"), err
