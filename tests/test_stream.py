"""The savevm container and RAM section v4: exact bytes, round trips, and every strictness rule."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from npqfile.errors import StreamError
from npqfile.stream import RAMSaver, SaveVMWriter, find_vmdesc, load_file, load_stream
from npqfile.stream.constants import (
    MIG_CMD_PING, QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START,
)
from npqfile.stream.devices import RAM, globalstate_state, timer_state
from test_stream_support import (
    PAGE, be64, cstr, footer_bytes, header, load_bytes, make_ram, minimal_stream, page_record, part,
    pattern_pages, ram_start, reader, snapshot_bytes, writer, zero_record,
)


# -- exact bytes -------------------------------------------------------------------------------

def test_header_configuration_and_capabilities_bytes():
    f, ch = writer()
    w = SaveVMWriter(f, machine="pc-i440fx-7.2", capabilities=["x-ignore-shared", "xbzrle"])
    w.write_header()
    w.write_command(MIG_CMD_PING, b"\0\0\0\1")
    w.write_eof()
    f.fflush()
    assert ch.getvalue() == (b"QEVM\0\0\0\3" + b"\x07\0\0\0\x0dpc-i440fx-7.2"
                             + b"\x05" + cstr("configuration/capabilities") + b"\0\0\0\1"
                             + b"\0\0\0\1" + cstr("x-ignore-shared")
                             + b"\x08\0\x02\0\x04\0\0\0\1" + b"\x00")


def test_command_length_checked_like_qemu():
    f, _ = writer()
    w = SaveVMWriter(f)
    with pytest.raises(ValueError, match="PING takes 4 bytes"):
        w.write_command(MIG_CMD_PING, b"")
    with pytest.raises(ValueError, match="unknown migration command"):
        w.write_command(99)


def test_none_stream_layout_matches_qemu_7_2():
    """The structure QEMU 7.2 writes for -M none (real-qemu-recipes.md), byte for byte."""
    ram = make_ram({"ram": pattern_pages(8)})
    data = snapshot_bytes(ram)
    pages = pattern_pages(8)
    expect = header() + ram_start({"ram": 8 * PAGE})
    body = b""
    for i in range(8):
        blk = "ram" if i == 0 else None
        if not pages[i].any():
            body += zero_record(i * PAGE, 0, blk)
        else:
            body += page_record(i * PAGE, pages[i].tobytes(), blk)
    expect += part(body) + part(b"", kind=3)
    expect += b"\x04\0\0\0\0" + cstr("timer") + b"\0\0\0\0\0\0\0\2" + timer_state() + footer_bytes(0)
    expect += b"\x04\0\0\0\4" + cstr("globalstate") + b"\0\0\0\0\0\0\0\1" + globalstate_state() + footer_bytes(4)
    expect += b"\x00"
    assert data[:len(expect)] == expect
    assert data[len(expect)] == 0x06
    (n,) = struct.unpack(">I", data[len(expect) + 1:len(expect) + 5])
    desc = json.loads(data[len(expect) + 5:])
    assert len(data) == len(expect) + 5 + n
    assert [d["name"] for d in desc["devices"]] == ["timer", "globalstate"]
    assert desc["page_size"] == PAGE


def test_globalstate_payload():
    p = globalstate_state("running")
    assert p[:4] == b"\0\0\0\x08" and p[4:12] == b"running\0" and len(p) == 104
    with pytest.raises(ValueError, match="unknown run state"):
        globalstate_state("flying")


# -- round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, {"send_configuration": False, "send_section_footer": False},
                                  {"send_vmdesc": False}, {"compress_level": 1},
                                  {"zero_page_detection": False}])
def test_round_trip_several_blocks(opts):
    ram = make_ram({"pc.ram": pattern_pages(64, 1), "/rom@etc/acpi/tables": pattern_pages(8, 2),
                    "pc.bios": pattern_pages(4, 3)})
    res = load_bytes(snapshot_bytes(ram, **opts))
    assert res.complete
    for b in ram.blocks:
        assert np.array_equal(res.ram.block(b.name).array, b.array), b.name
    st = res.stats
    if opts.get("compress_level"):
        assert st.compressed_pages > 0 and st.normal_pages == 0
    elif opts.get("zero_page_detection") is False:
        assert st.zero_pages == 0 and st.normal_pages == 76
    else:
        n_zero = sum(int((~b.pages.any(axis=1)).sum()) for b in ram.blocks)
        assert st.zero_pages == n_zero and st.normal_pages == 76 - n_zero
    assert res.machine == (None if opts.get("send_configuration") is False else "none")
    assert (res.vmdesc is None) == bool(opts.get("send_vmdesc") is False)


def test_load_into_existing_ram_and_its_checks():
    src = make_ram({"ram": pattern_pages(16)})
    data = snapshot_bytes(src)
    dst = make_ram({"ram": 16 * PAGE})
    load_bytes(data, dst)
    assert np.array_equal(dst.block("ram").array, src.block("ram").array)
    with pytest.raises(StreamError, match='Unknown ramblock "ram", cannot accept migration') as e:
        load_bytes(data, make_ram({"pc.ram": 16 * PAGE}))
    assert e.value.offset is not None and e.value.section == "ram"
    with pytest.raises(StreamError, match=r"Size mismatch: ram: 0x10000 != 0x20000"):
        load_bytes(data, make_ram({"ram": 32 * PAGE}))


def _engine_parts(ram, saver_kwargs=None, f_limit=0):
    """Drive the saver like the migration engine: START, PARTs of a few pages, END."""
    f, ch = writer()
    w = SaveVMWriter(f, send_vmdesc=False)
    saver = RAMSaver(f, ram, **(saver_kwargs or {}))
    w.write_header()
    with w.section(RAM, QEMU_VM_SECTION_START):
        saver.save_setup()
    return f, ch, w, saver


def test_continue_carries_across_sections():
    ram = make_ram({"a": pattern_pages(8, 5), "b": pattern_pages(4, 6)})
    f, ch, w, saver = _engine_parts(ram)
    a, b = ram.block("a"), ram.block("b")
    for blk, idx in ((a, [0, 1, 2]), (a, [3, 4]), (b, [0, 1]), (b, [2, 3]), (a, [5, 6, 7])):
        with w.section(RAM, QEMU_VM_SECTION_PART):
            assert saver.save_pages(blk, idx) == len(idx)
            saver.write_eos()
    with w.section(RAM, QEMU_VM_SECTION_END):
        saver.write_eos()
    w.write_eof()
    f.fflush()
    data = ch.getvalue()
    # the second PART starts with a CONTINUE record (no idstr): offset 3 | flag | 0x20
    second = data.index(b"\x02\0\0\0\x02", data.index(b"\x02\0\0\0\x02") + 1) + 5
    assert struct.unpack(">Q", data[second:second + 8])[0] & 0x20
    res = load_bytes(data)
    for blk in (a, b):
        assert np.array_equal(res.ram.block(blk.name).array, blk.array)
    assert [p["type"] for p in res.stats.parts] == ["start"] + ["part"] * 5 + ["end"]
    assert [p["normal"] + p["zero"] for p in res.stats.parts] == [0, 3, 2, 2, 2, 3, 0]


def test_rate_limited_save_pages_stops_after_the_page_that_crosses():
    ram = make_ram({"ram": np.full((32, PAGE), 7, np.uint8)})
    f, ch, w, saver = _engine_parts(ram)
    f.set_rate_limit(3 * PAGE)
    f.reset_rate_limit()
    done = saver.save_pages(ram.block("ram"), np.arange(32), rate_limited=True)
    assert 1 <= done < 32
    assert saver.stats.normal_pages == done
    f.reset_rate_limit()
    f.set_rate_limit(0)
    assert saver.save_pages(ram.block("ram"), np.arange(done, 32), rate_limited=True) == 32 - done


def test_scattered_indices_and_out_of_range():
    ram = make_ram({"ram": pattern_pages(16)})
    f, ch, w, saver = _engine_parts(ram)
    with w.section(RAM, QEMU_VM_SECTION_PART):
        saver.save_pages(ram.block("ram"), [15, 3, 7, 0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14])
        saver.write_eos()
    with pytest.raises(ValueError, match="out of range"):
        saver.save_pages(ram.block("ram"), [16])
    w.write_eof()
    f.fflush()
    res = load_bytes(ch.getvalue())
    assert np.array_equal(res.ram.block("ram").array, ram.block("ram").array)


def test_xbzrle_stream_round_trip_and_stats():
    pages = pattern_pages(16, 9)
    pages[0] = 0   # page 0 zero in round 1
    ram = make_ram({"ram": pages})
    blk = ram.block("ram")
    f, ch, w, saver = _engine_parts(ram, {"xbzrle_cache_size": 64 * PAGE})
    with w.section(RAM, QEMU_VM_SECTION_PART):            # round 1: all misses
        saver.save_pages(blk, np.arange(16))
        saver.write_eos()
    assert saver.stats.xbzrle_cache_miss == 16 - saver.stats.zero_pages
    blk.array[5 * PAGE + 100] ^= 0xFF                    # small change -> XBZRLE
    blk.array[6 * PAGE:7 * PAGE] = np.random.default_rng(1).integers(0, 256, PAGE, dtype=np.uint8)  # overflow
    blk.array[0 * PAGE + 4095] = 9                       # was zero (cached as zero) -> XBZRLE
    with w.section(RAM, QEMU_VM_SECTION_PART):            # round 2: pages 0, 5, 6 changed, 7 unchanged
        saver.save_pages(blk, [0, 5, 6, 7])
        saver.write_eos()
    st = saver.stats
    assert (st.xbzrle_pages, st.xbzrle_overflow, st.xbzrle_unchanged) == (2, 1, 1)
    with w.section(RAM, QEMU_VM_SECTION_END):
        saver.write_eos()
    w.write_eof()
    f.fflush()
    data = ch.getvalue()
    assert be64(5 * PAGE | 0x40 | 0x20) + b"\x01" in data
    res = load_bytes(data)
    assert np.array_equal(res.ram.block("ram").array, blk.array)
    assert res.stats.xbzrle_pages == 2


def test_release_ram_frees_sent_pages():
    ram = make_ram({"ram": np.full((16, PAGE), 3, np.uint8)})
    f, ch, w, saver = _engine_parts(ram, {"release_ram": True})
    saver.save_pages(ram.block("ram"), np.arange(16))
    f.fflush()
    assert f.released_bytes == 16 * PAGE
    assert not ram.block("ram").array.any()   # MADV_DONTNEED on private memory: zero again


def test_x_ignore_shared_mr_addr_round_trip():
    ram = make_ram({"ram": pattern_pages(4)})
    f, ch = writer()
    w = SaveVMWriter(f, capabilities=["x-ignore-shared"], send_vmdesc=False)
    saver = RAMSaver(f, ram, mr_addr={"ram": 0x100000})
    w.write_header()
    with w.section(RAM, QEMU_VM_SECTION_START):
        saver.save_setup()
    with w.section(RAM, QEMU_VM_SECTION_END):
        saver.save_pages(ram.block("ram"), np.arange(4))
        saver.write_eos()
    w.write_eof()
    f.fflush()
    data = ch.getvalue()
    assert cstr("ram") + be64(4 * PAGE) + be64(0x100000) + be64(0x10) in data
    res = load_bytes(data)
    assert res.capabilities == ["x-ignore-shared"]
    assert np.array_equal(res.ram.block("ram").array, ram.block("ram").array)


# -- hand-made records ---------------------------------------------------------------------

def test_zero_page_any_fill_byte_and_untouched_pages_stay_untouched():
    data = minimal_stream(zero_record(0, 0xAB) + zero_record(PAGE, 0, None) + zero_record(2 * PAGE, 0, None))
    dst = make_ram({"ram": 4 * PAGE})
    blk = dst.block("ram")
    before = blk.resident_pages().copy()
    load_bytes(data, dst)
    assert (blk.pages[0] == 0xAB).all() and not blk.pages[1:].any()
    assert np.array_equal(blk.resident_pages()[1:], before[1:])   # ram_handle_zero: no fault-in


def test_zero_page_clears_a_dirty_destination_page():
    dst = make_ram({"ram": np.full(4 * PAGE, 5, np.uint8)})
    load_bytes(minimal_stream(zero_record(2 * PAGE)), dst)
    assert not dst.block("ram").pages[2].any() and dst.block("ram").pages[1].all()


def test_multifd_flush_and_packaged_and_commands():
    inner = part(page_record(PAGE, b"\x11" * PAGE)) + b"\x00"
    cmds = (b"\x08\0\x01\0\0" + b"\x08\0\x02\0\x04\0\0\0\x07"
            + b"\x08\0\x03\0\x10" + be64(PAGE) + be64(PAGE)
            + b"\x08\0\x06\0\x16" + b"\0" + cstr("ram") + b"\0" + be64(0) + be64(PAGE)
            + b"\x08\0\x0a\0\x04" + cstr("ram")
            + b"\x08\0\x0b\0\0")
    data = (header() + cmds + ram_start({"ram": 4 * PAGE}) + part(be64(0x200) + zero_record(0, 1))
            + b"\x08\0\x07\0\x04" + struct.pack(">I", len(inner)) + inner + b"\x00")
    res = load_bytes(data)
    assert [c["cmd"] for c in res.commands] == ["OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE",
                                                "POSTCOPY_RAM_DISCARD", "RECV_BITMAP", "SWITCHOVER_START", "PACKAGED"]
    assert res.commands[1]["value"] == 7 and res.commands[3]["ranges"] == 1 and res.commands[4]["block"] == "ram"
    assert res.stats.multifd_flushes == 1
    blk = res.ram.block("ram")
    assert (blk.pages[0] == 1).all() and (blk.pages[1] == 0x11).all()


def test_postcopy_page_size_field_is_recognised():
    body = be64(4 * PAGE | 0x04) + cstr("ram") + be64(4 * PAGE) + be64(0x200000) + be64(0x10)
    start = b"\x01\0\0\0\x02" + cstr("ram") + b"\0\0\0\0\0\0\0\x04" + body + footer_bytes(2)
    advise = b"\x08\0\x03\0\x10" + be64(0x201000) + be64(PAGE)
    data = header() + advise + start + part(page_record(0, b"\x22" * PAGE)) + b"\x00"
    res = load_bytes(data)
    assert (res.ram.block("ram").pages[0] == 0x22).all()


def test_stream_without_vmdesc_stops_at_an_unknown_device():
    dev = b"\x04\0\0\0\x09" + cstr("mystery") + b"\0\0\0\0\0\0\0\1" + b"\1\2\3" + footer_bytes(9)
    data = header() + ram_start({"ram": PAGE}) + part(zero_record(0, 3)) + dev + b"\x00"
    with pytest.raises(StreamError, match="cannot size device section 'mystery'"):
        load_bytes(data)
    res = load_bytes(data, partial_ok=True)
    assert not res.complete and "mystery" in res.stopped
    assert (res.ram.block("ram").pages[0] == 3).all()
    desc = {"devices": [{"name": "mystery", "instance_id": 0, "fields": [{"name": "x", "type": "buffer", "size": 3}]}]}
    res = load_bytes(data, vmdesc=desc, decode_devices=True)
    assert res.complete and res.sections[-1].fields == {"x": "010203"}


def test_find_vmdesc_in_file(tmp_path):
    ram = make_ram({"ram": pattern_pages(4)})
    path = tmp_path / "s.bin"
    path.write_bytes(snapshot_bytes(ram))
    doc, off = find_vmdesc(path)
    assert [d["name"] for d in doc["devices"]] == ["timer", "globalstate"]
    assert path.read_bytes()[off] == 0x06
    assert load_file(path).complete
    path.write_bytes(snapshot_bytes(ram, send_vmdesc=False))
    assert find_vmdesc(path) is None


# -- strictness ------------------------------------------------------------------------------

BAD = {
    "bad magic": (b"QEVX\0\0\0\3\0", "not a QEMU migration stream"),
    "v2": (b"QEVM\0\0\0\2\0", "SaveVM v2 format is obsolete"),
    "unknown section type": (header() + b"\x09", "Unknown savevm section type 9"),
    "undeclared block": (minimal_stream(page_record(0, bytes(PAGE), "other")), 'names block "other"'),
    "page beyond block": (minimal_stream(page_record(4 * PAGE, bytes(PAGE))), "beyond the end of block 'ram'"),
    "unknown flag": (minimal_stream(be64(0x01)), "Unknown combination of migration flags: 0x1"),
    "hook": (minimal_stream(be64(0x80)), "RDMA"),
    "continue first": (minimal_stream(page_record(0, bytes(PAGE), None)), "Ack, bad migration stream"),
    "truncated page": (minimal_stream(page_record(0, bytes(100)))[:-30], "truncated stream"),
    "xbzrle flag": (minimal_stream(be64(0x40) + cstr("ram") + b"\x02\0\x02\0\1"), "wrong compression"),
    "xbzrle len": (minimal_stream(be64(0x40) + cstr("ram") + b"\x01\x10\x01"), "len overflow"),
    "xbzrle run past page": (minimal_stream(be64(0x40) + cstr("ram") + b"\x01\0\x04" + b"\xff\x1f\x05\x00"),
                             "bad XBZRLE page"),
    "zlib too long": (minimal_stream(be64(0x100) + cstr("ram") + struct.pack(">I", len(zlib.compress(bytes(2 * PAGE))))
                                     + zlib.compress(bytes(2 * PAGE))), "inflates past a page"),
    "zlib short": (minimal_stream(be64(0x100) + cstr("ram") + struct.pack(">I", len(zlib.compress(bytes(100))))
                                  + zlib.compress(bytes(100))), "inflates to 100 bytes"),
    "zlib garbage": (minimal_stream(be64(0x100) + cstr("ram") + b"\0\0\0\4abcd"), "not valid zlib"),
    "compressed length": (minimal_stream(be64(0x100) + cstr("ram") + b"\0\1\0\0"), "Invalid compressed data length"),
    "mismatched footer": (header() + ram_start({"ram": PAGE})[:-4] + b"\0\0\0\3", "Mismatched section id in footer"),
    "missing footer": (header() + ram_start({"ram": PAGE}) + part(b"", footer=False) + b"\x00", "Missing section footer"),
    "unknown part id": (header() + ram_start({"ram": PAGE}) + part(b"", sid=5), "Unknown section id 5"),
    "ram version": (header() + ram_start({"ram": PAGE}).replace(b"\0\0\0\0\0\0\0\x04", b"\0\0\0\0\0\0\0\x03", 1),
                    "ram: unsupported version 3"),
    "block over total": (header() + b"\x01\0\0\0\2" + cstr("ram") + b"\0\0\0\0\0\0\0\4" + be64(PAGE | 4)
                         + cstr("ram") + be64(2 * PAGE), "more than the 0x1000 left"),
    "bad command length": (header() + b"\x08\0\x02\0\x05" + b"\0" * 5, "PING received with bad length 5"),
    "unknown command": (header() + b"\x08\0\x63\0\0", "unknown migration command 0x63"),
    "packaged short": (header() + b"\x08\0\x07\0\x04\0\0\0\x10" + b"\x00" * 4, "before its declared end"),
    # a mapped-ram stream whose pages sit at file offsets, read from a pipe-like channel
    "mapped-ram not seekable": (b"QEVM\0\0\0\3\x07\0\0\0\4none\x05" + cstr("configuration/capabilities")
                                + b"\0\0\0\1" + b"\0\0\0\1" + cstr("mapped-ram")
                                + ram_start({"ram": PAGE}).replace(be64(PAGE) + be64(0x10), be64(PAGE) + struct.pack(
                                    ">IQQQ", 1, PAGE, 200, 1 << 20) + be64(0x10)),
                                "mapped-ram block 'ram': mapped-ram needs a seekable file"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_streams_are_stream_errors_with_offsets(name):
    data, reason = BAD[name]
    with pytest.raises(StreamError, match=reason) as e:
        load_bytes(data)
    assert e.value.offset is not None and 0 <= e.value.offset <= len(data)
    assert str(e.value).count(" at offset ") == 1


def test_error_names_the_record_offset_and_section():
    data = minimal_stream(zero_record(0) + page_record(9 * PAGE, bytes(PAGE), None))
    with pytest.raises(StreamError) as e:
        load_bytes(data)
    assert e.value.offset == data.index(be64(9 * PAGE | 0x28))
    assert e.value.section == "ram"


def test_max_ram_bytes_caps_creation_before_allocating():
    data = minimal_stream(b"", blocks={"ram": 1 << 40})
    with pytest.raises(StreamError, match="more than the 0x10000000-byte limit"):
        load_bytes(data, max_ram_bytes=1 << 28)


def test_every_truncation_is_a_stream_error():
    data = snapshot_bytes(make_ram({"ram": pattern_pages(4)}))
    eof = data.rindex(b"\x00\x06")   # the EOF byte before the vmdesc
    for n in list(range(0, 200)) + list(range(eof - 300, eof + 1)):
        with pytest.raises(StreamError):
            load_bytes(data[:n])


def test_short_reads_from_the_channel_do_not_matter():
    ram = make_ram({"ram": pattern_pages(12)})
    res = load_stream(reader(snapshot_bytes(ram), chunk=[1, 7, 4093, 3]))
    assert np.array_equal(res.ram.block("ram").array, ram.block("ram").array)


# -- vmdesc walker ---------------------------------------------------------------------------

DEVICE_DESC = {"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1, "fields": [
    {"name": "flag", "type": "bool", "size": 1},
    {"name": "regs", "type": "uint16", "size": 2, "array_len": 3},
    {"name": "neg", "type": "int32", "size": 4},
    {"name": "le", "type": "int32 le", "size": 4},
    {"name": "ptr", "type": "nullptr", "size": 1},
    {"name": "cap", "type": "capability", "size": 0},
    {"name": "blob", "type": "weird-new-type", "size": 3},
    {"name": "big", "type": "buffer", "size": 1000},
    {"name": "inner", "type": "struct", "size": 5, "struct": {
        "vmsd_name": "inner", "version": 1, "fields": [{"name": "x", "type": "uint8", "size": 1}],
        "subsections": [{"vmsd_name": "inner/sub", "version": 2,
                         "fields": [{"name": "y", "type": "uint32", "size": 4}]}]}},
], "subsections": [{"vmsd_name": "dev/extra", "version": 1, "fields": [{"name": "z", "type": "int8", "size": 1}]}]}

DEVICE_BYTES = (b"\x01" + b"\0\1\0\2\0\3" + b"\xff\xff\xff\xfe" + b"\x05\0\0\0" + b"0" + cstr("xbzrle")
                + b"abc" + bytes(1000)
                + b"\x07" + b"\x05" + cstr("inner/sub") + b"\0\0\0\2" + b"\0\0\1\0"
                + b"\x05" + cstr("dev/extra") + b"\0\0\0\1" + b"\xfe")


def _device_stream(payload: bytes) -> bytes:
    dev = b"\x04\0\0\0\x09" + cstr("dev") + b"\0\0\0\0\0\0\0\1" + payload + footer_bytes(9)
    return header() + ram_start({"ram": PAGE}) + dev + b"\x00"


def test_vmdesc_walker_decodes_every_field_type():
    res = load_bytes(_device_stream(DEVICE_BYTES), vmdesc={"page_size": PAGE, "devices": [DEVICE_DESC]},
                     decode_devices=True)
    fields = res.sections[-1].fields
    assert fields["flag"] is True and fields["regs"] == [1, 2, 3] and fields["neg"] == -2 and fields["le"] == 5
    assert fields["ptr"] is None and fields["cap"] == "xbzrle" and fields["blob"] == "616263"
    assert fields["big"] == "<1000 bytes>"
    assert fields["inner"] == {"x": 7, "inner/sub": {"version": 2, "y": 256}}
    assert fields["dev/extra"] == {"version": 1, "z": -2}
    assert res.sections[-1].size == len(DEVICE_BYTES)


@pytest.mark.parametrize("bad, reason", [
    (DEVICE_BYTES[:-20], "not found|Missing section footer|truncated"),
    (DEVICE_BYTES.replace(b"\x05" + cstr("dev/extra"), b"\x06" + cstr("dev/extra")), "subsection 'dev/extra' not found"),
    (DEVICE_BYTES.replace(b"\xfe\x05\0\0\0" + b"0", b"\xfe\x05\0\0\0" + b"1"), "nullptr"),
], ids=["truncated", "subsection", "nullptr"])
def test_vmdesc_walker_errors(bad, reason):
    with pytest.raises(StreamError, match=reason) as e:
        load_bytes(_device_stream(bad), vmdesc={"devices": [DEVICE_DESC]})
    assert e.value.section == "dev"


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d["fields"][1].update(array_len=1 << 40), "more than"),
    (lambda d: d["fields"][0].update(size=-1), "no valid size"),
    (lambda d: d.update(fields={"a": 1}), "not a list"),
    (lambda d: d["fields"][8].update(struct=None), "has no description"),
    (lambda d: d["fields"][0].update(name="\n\0" * 5000, size=[1] * 10000), r"field '\\n\\x00.*…' has no valid size"),
], ids=["array_len", "size", "fields", "struct", "huge-name"])
def test_hostile_vmdesc_is_a_stream_error(mutate, reason):
    desc = json.loads(json.dumps(DEVICE_DESC))
    mutate(desc)
    with pytest.raises(StreamError, match=reason) as e:
        load_bytes(_device_stream(DEVICE_BYTES), vmdesc={"devices": [desc]})
    assert str(e.value).isprintable() and len(str(e.value)) < 300


def test_destination_can_be_closed_after_a_bad_stream_or_a_good_one():
    dst = make_ram({"ram": 4 * PAGE})
    try:
        load_bytes(minimal_stream(zero_record(0) + be64(0x01)), dst)
    except StreamError:
        dst.close()     # no view of the RAM may survive in the exception
    else:
        pytest.fail("no StreamError")
    dst = make_ram({"ram": 4 * PAGE})
    load_bytes(minimal_stream(zero_record(0, 9)), dst)
    dst.close()


# -- names from the wire in messages, and header offsets -----------------------------------------

def _printable_and_bounded(err: StreamError) -> None:
    text = str(err)
    assert text.isprintable(), text
    assert len(text) < 300, text
    assert "\\\\x" not in text, "escaped twice: " + text
    assert err.section is None or (err.section.isprintable() and len(err.section) <= 65)


def test_corrupt_block_name_length_gives_a_printable_bounded_error():
    data = bytearray(minimal_stream(page_record(0, bytes(range(256)) * 16, "ram")))
    name_len_at = data.rindex(b"\x03ram")   # the page record's block name
    data[name_len_at] = 255                  # the name now swallows 252 bytes of the page
    with pytest.raises(StreamError, match=r'names block "ram\\x00\\x01.*…", which') as e:
        load_bytes(bytes(data))
    _printable_and_bounded(e.value)
    assert e.value.section == "ram" and e.value.offset == name_len_at - 8


def test_section_idstr_with_control_bytes_is_printable_in_the_error():
    idstr = b"dev\0\r\n" + bytes(range(0x80, 0x100)) * 2
    data = header() + b"\x04\0\0\0\x09" + cstr(idstr[:255]) + b"\0\0\0\0\0\0\0\1" + b"\x00"
    with pytest.raises(StreamError, match="cannot size device section") as e:
        load_bytes(data)
    _printable_and_bounded(e.value)
    assert e.value.section.startswith("dev\\x00\\r\\n\\x80") and e.value.section.endswith("…")
    assert "(section dev\\x00" in str(e.value)


def test_machine_and_capability_names_are_stored_printable():
    data = (b"QEVM\0\0\0\3\x07\0\0\0\x04pc\n\x00\x05" + cstr("configuration/capabilities") + b"\0\0\0\1"
            + b"\0\0\0\1" + cstr(b"x\x1b[31m\xff") + b"\x00")
    res = load_bytes(data)
    assert res.machine == "pc\\n\\x00"
    assert res.capabilities == ["x\\x1b[31m\\xff"]


def test_wire_name_is_one_to_one_and_shown_never_cuts_an_escape():
    from npqfile.stream.reader import shown, wire_name
    names = [b"ram", b"a\\x80", b"a\x80", "a\u0080".encode(), b"\n", b"\\n", b"\xc3\xa9", b""]
    texts = [wire_name(n) for n in names]
    assert len(set(texts)) == len(texts) and all(t.isprintable() for t in texts)
    assert texts[0] == "ram" and texts[6] == "\u00e9"
    long = wire_name(b"ab" + b"\x01" * 100)
    for limit in range(3, 12):
        cut = shown(long, limit)
        assert cut.endswith("…") and len(cut) <= limit + 1
        assert cut[:-1] == "ab" + "\\x01" * ((limit - 2) // 4)
    assert shown("ram") == "ram"


CONFIG = b"QEVM\0\0\0\3\x07\0\0\0\4none"
CAPS = CONFIG + b"\x05" + cstr("configuration/capabilities") + b"\0\0\0\1"


@pytest.mark.parametrize("data, offset, reason", [
    (b"QEVM", 4, "ends inside the file version"),
    (b"QEVM\0\x09\0\x03", 4, "Unsupported migration stream version 0x90003"),
    (b"QEV", 0, "ends inside the file magic"),
    (b"QEVM\0\0\0\3\x07\0\0", 9, "ends inside the machine name length"),
    (b"QEVM\0\0\0\3\x07\0\1\0\0", 9, "machine name of 65536 bytes"),
    (b"QEVM\0\0\0\3\x07\0\0\0\4no", 13, "ends inside the machine name"),
    (CAPS + b"\0\0\1\1", len(CAPS), "lists 257 capabilities"),
    (CAPS + b"\0\0\0\2" + cstr("xbzrle") + b"\x09ab", len(CAPS) + 11, "ends inside a capability name"),
    (CONFIG + b"\x05" + cstr("configuration/zz") + b"\0\0", len(CONFIG) + 18, "ends inside a subsection version"),
], ids=["version-cut", "version-bad", "magic-cut", "name-length-cut", "name-too-long", "name-cut", "caps-count",
        "cap-name-cut", "subsection-version-cut"])
def test_header_and_configuration_errors_name_the_field_offset(data, offset, reason):
    with pytest.raises(StreamError, match=reason) as e:
        load_bytes(data)
    assert e.value.offset == offset


def test_saver_refuses_blocks_it_did_not_declare_and_non_ram():
    from npqfile.ram import RAMBlock

    ram = make_ram({"ram": 4 * PAGE})
    stranger = RAMBlock("other", 4 * PAGE)
    try:
        f, ch = writer()
        saver = RAMSaver(f, ram)
        saver.save_setup()
        before = f.ftell_fast()
        with pytest.raises(ValueError, match="'other' is not one of this saver's RAM blocks"):
            saver.save_pages(stranger, [0])
        assert f.ftell_fast() == before
        with pytest.raises(TypeError, match="GuestRAM"):
            RAMSaver(f, [stranger])
    finally:
        stranger.close()
        ram.close()


def test_rate_limit_is_checked_before_each_page_as_in_ram_save_iterate():
    ram = make_ram({"ram": np.full(8 * PAGE, 7, np.uint8)})
    try:
        for compress_level in (None, 1):   # the plain (batched) path and the per-page path
            f, ch = writer()
            saver = RAMSaver(f, ram, compress_level=compress_level)
            saver.save_setup()
            f.reset_rate_limit()
            record = PAGE + 8 if compress_level is None else None
            first = saver.save_pages(ram.block("ram"), range(1), rate_limited=True)
            used = f.bytes_xfer
            f.set_rate_limit(used + 1)     # the next page crosses it, the one after is not sent
            assert saver.save_pages(ram.block("ram"), range(1, 8), rate_limited=True) == 1
            assert saver.save_pages(ram.block("ram"), range(2, 8), rate_limited=True) == 0   # already over
            f.reset_rate_limit()
            f.set_rate_limit(0)
            assert saver.save_pages(ram.block("ram"), range(2, 8), rate_limited=True) == 6
            assert first == 1 and (record is None or used == record + 4)
            f.close()
    finally:
        ram.close()


@pytest.mark.parametrize("kind", ["zstd", "lz4"])
def test_a_channel_compressed_stream_is_named_as_such(kind):
    import lz4.frame
    import zstandard

    ram = make_ram({"ram": 4 * PAGE})
    try:
        data = snapshot_bytes(ram)
    finally:
        ram.close()
    packed = zstandard.ZstdCompressor().compress(data) if kind == "zstd" else lz4.frame.compress(data)
    with pytest.raises(StreamError, match=f"this is an? {kind} frame") as e:
        load_bytes(packed)
    assert e.value.offset == 0
