"""``npqfile analyze`` and ``npqfile save``: reports, JSON, extraction, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading

import numpy as np
import pytest

from npqfile.cli import main
from npqfile.stream import RAMSaver, SaveVMWriter
from npqfile.stream.constants import QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START
from npqfile.stream.devices import RAM
from test_stream_support import (
    PAGE, be64, cstr, footer_bytes, header, make_ram, minimal_stream, pattern_pages, ram_start, part, snapshot_bytes,
    writer, zero_record,
)


@pytest.fixture
def raw_images(tmp_path):
    images = {"pc.ram": pattern_pages(32, 1), "/rom@etc/acpi/tables": pattern_pages(4, 2)}
    paths = {}
    for i, (name, pages) in enumerate(images.items()):
        p = tmp_path / f"img{i}.raw"
        p.write_bytes(pages.tobytes())
        paths[name] = p
    return images, paths


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_save_then_analyze_json_and_extract_is_the_identity(tmp_path, capsys, raw_images):
    images, paths = raw_images
    stream = tmp_path / "s.stream"
    code, out, err = _run(capsys, "save", *[f"{n}={p}" for n, p in paths.items()], "--machine", "pc-i440fx-7.2",
                          "-o", stream)
    assert code == 0, err
    code, out, err = _run(capsys, "analyze", stream, "--json", "--extract", tmp_path / "x")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["complete"] and doc["machine"] == "pc-i440fx-7.2"
    blocks = {b["name"]: b for b in doc["ram"]["blocks"]}
    for name, pages in images.items():
        assert blocks[name]["size"] == pages.nbytes
        assert blocks[name]["sha256"] == hashlib.sha256(pages.tobytes()).hexdigest()
    extracted = tmp_path / "x" / "rom@etc_acpi_tables"
    assert extracted.read_bytes() == images["/rom@etc/acpi/tables"].tobytes()
    assert (tmp_path / "x" / "pc.ram").read_bytes() == images["pc.ram"].tobytes()
    st = doc["ram"]["stats"]
    n_zero = sum(int((~p.any(axis=1)).sum()) for p in images.values())
    assert st["duplicate"] == n_zero and st["normal"] == 36 - n_zero
    assert [p["type"] for p in st["parts"]] == ["start", "part", "end"]
    assert [s["idstr"] for s in doc["sections"]][-2:] == ["timer", "globalstate"]


def test_extract_leaves_zero_pages_as_holes(tmp_path, capsys):
    ram = make_ram({"ram": np.zeros((256, PAGE), np.uint8)})
    ram.block("ram").pages[3] = 1
    stream = tmp_path / "z.stream"
    stream.write_bytes(snapshot_bytes(ram))
    assert _run(capsys, "analyze", stream, "--extract", tmp_path / "x")[0] == 0
    st = os.stat(tmp_path / "x" / "ram")
    assert st.st_size == 256 * PAGE and st.st_blocks * 512 < 64 * PAGE


def test_text_report_counts_xbzrle_and_compressed_pages(tmp_path, capsys):
    ram = make_ram({"ram": pattern_pages(16, 4)})
    blk = ram.block("ram")
    f, ch = writer()
    w = SaveVMWriter(f)
    saver = RAMSaver(f, ram, xbzrle_cache_size=64 * PAGE, compress_level=1)
    saver.xbzrle_enabled = False
    w.write_header()
    with w.section(RAM, QEMU_VM_SECTION_START):
        saver.save_setup()
    with w.section(RAM, QEMU_VM_SECTION_PART):
        saver.save_pages(blk, np.arange(16))
        saver.write_eos()
    saver.xbzrle_enabled = True
    with w.section(RAM, QEMU_VM_SECTION_PART):
        saver.save_pages(blk, np.arange(16))
        saver.write_eos()
    blk.pages[:, 7] ^= 1
    with w.section(RAM, QEMU_VM_SECTION_END):
        saver.save_pages(blk, np.arange(16))
        saver.write_eos()
    w.write_eof()
    f.fflush()
    stream = tmp_path / "x.stream"
    stream.write_bytes(ch.getvalue())
    code, out, err = _run(capsys, "analyze", stream)
    assert code == 0, err
    assert f"xbzrle 16, compressed {saver.stats.compressed_pages}" in out
    assert "part 3    end" in out and "machine  none" in out


@pytest.mark.parametrize("data", [
    b"QEVX" + bytes(20),
    minimal_stream(zero_record(0, 0, "nope")),
    minimal_stream(zero_record(0))[:-12],
])
def test_bad_stream_is_one_error_line_and_status_1(tmp_path, capsys, data):
    stream = tmp_path / "bad.stream"
    stream.write_bytes(data)
    for argv in (["analyze", stream], ["analyze", stream, "--json"]):
        code, out, err = _run(capsys, *argv)
        assert code == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and " at offset " in lines[0], err
        assert "Traceback" not in err


def test_unsizable_section_prints_what_was_read_then_the_error(tmp_path, capsys):
    dev = b"\x04\0\0\0\x09" + cstr("mystery") + b"\0\0\0\0\0\0\0\1" + b"\1\2\3" + footer_bytes(9)
    stream = tmp_path / "p.stream"
    stream.write_bytes(header() + ram_start({"ram": PAGE}) + part(zero_record(0, 5)) + dev + b"\x00")
    code, out, err = _run(capsys, "analyze", stream, "--json")
    assert code == 1
    doc = json.loads(out)
    assert not doc["complete"] and doc["ram"]["blocks"][0]["sha256"] == hashlib.sha256(bytes([5]) * PAGE).hexdigest()
    assert err.strip() == f"error: {doc['stopped']}"
    assert "(section mystery)" in err


def test_save_errors(tmp_path, capsys):
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"x" * 100)
    for argv in (["save", "ram", "-o", tmp_path / "o"], ["save", f"ram={odd}", "-o", tmp_path / "o"],
                 ["save", f"ram={tmp_path / 'missing'}", "-o", tmp_path / "o"]):
        code, out, err = _run(capsys, *argv)
        assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_save_refuses_to_overwrite_its_own_input(tmp_path, capsys):
    image = tmp_path / "ram.raw"
    data = bytes(range(256)) * 4096
    image.write_bytes(data)
    for out in (str(image), f"file:{image}"):
        assert main(["save", f"ram={image}", "-o", out]) == 1
        assert "is the image of block 'ram'" in capsys.readouterr().err
    assert image.read_bytes() == data


# -- inputs that cannot seek, names from the wire, options, the command itself -----------------------

def test_analyze_reads_a_fifo_and_standard_input(tmp_path, capsys, monkeypatch):
    data = snapshot_bytes(make_ram({"ram": pattern_pages(40, 3)}))   # more than a pipe holds
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as fh:
            fh.write(data)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    code, out, err = _run(capsys, "analyze", fifo, "--json")
    feeder.join(30)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["complete"] and doc["vmdesc"] and doc["size"] == len(data) and doc["stream"] == str(fifo)

    r, w = os.pipe()
    feeder = threading.Thread(target=lambda: (os.write(w, data), os.close(w)), daemon=True)
    feeder.start()
    with os.fdopen(r, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        code, out, err = _run(capsys, "analyze", "-")
    feeder.join(30)
    assert code == 0, err
    assert out.startswith(f"stream   - ({len(data)} bytes)") and "normal 30, zero 10" in out


def test_analyze_names_a_directory_it_cannot_read(tmp_path, capsys):
    code, out, err = _run(capsys, "analyze", tmp_path)
    assert code == 1 and err == f"error: [Errno 21] {tmp_path} is a directory, not a migration stream\n"


def test_fields_work_in_the_text_report_and_bad_capabilities_are_refused(tmp_path, capsys):
    stream = tmp_path / "s.stream"
    stream.write_bytes(snapshot_bytes(make_ram({"ram": pattern_pages(4)}), runstate="running"))
    code, out, err = _run(capsys, "analyze", stream, "--fields")
    assert code == 0, err
    assert "cpu_ticks_offset = 0" in out and "size = 8" in out and "runstate = 72756e6e696e6700" in out
    assert "cpu_ticks_offset" not in _run(capsys, "analyze", stream)[1]
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(stream), "--capability", "bogus"])
    assert e.value.code == 2
    assert "argument --capability: invalid choice: 'bogus'" in capsys.readouterr().err
    assert _run(capsys, "analyze", stream, "--capability", "x-ignore-shared")[0] == 1   # no mr_addr fields


def test_corrupt_stream_error_line_is_printable(tmp_path, capsys):
    data = bytearray(minimal_stream(be64(0x08) + cstr("ram") + bytes(range(256)) * 16))
    data[data.rindex(b"\x03ram")] = 255
    stream = tmp_path / "bad.stream"
    stream.write_bytes(bytes(data))
    code, out, err = _run(capsys, "analyze", stream)
    line = err.rstrip("\n")
    assert code == 1 and "\n" not in line and line.isprintable() and len(line) < 200, err
    assert line.startswith('error: RAM record names block "ram\\x00\\x01') and "…" in line


def test_save_to_standard_output(tmp_path, capsys, monkeypatch, raw_images):
    _, paths = raw_images
    blocks = [f"{n}={p}" for n, p in paths.items()]
    assert _run(capsys, "save", *blocks, "-o", tmp_path / "ref.stream")[0] == 0
    with open(tmp_path / "stdout", "wb") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        code, out, err = _run(capsys, "save", *blocks, "-o", "-")
    assert code == 0 and err.startswith("wrote standard output: 2 block(s)"), err
    assert (tmp_path / "stdout").read_bytes() == (tmp_path / "ref.stream").read_bytes()
    assert not (tmp_path / "-").exists() and not os.path.exists("-")
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "wb") as tty:
            monkeypatch.setattr(sys, "stdout", tty)
            code, out, err = _run(capsys, "save", *blocks, "-o", "-")
    finally:
        os.close(master)
    assert code == 1 and "refusing to write a binary migration stream to a terminal" in err


def test_top_level_help_and_version(capsys):
    from npqfile import __version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"npqfile {__version__}\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "npqfile: QEMU's migration stream" in out and "``" not in out and "module" not in out
    for command in ("migrate", "incoming", "analyze", "save", "reclaim"):
        assert f"\n    {command} " in out
