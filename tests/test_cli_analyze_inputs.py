"""``npqfile analyze`` inputs and outputs users break (issue 8, items 4 and 6): standard
input that is not a stream or never ends, a closed standard output, ``--extract``
targets that are not directories or hold symbolic links, the RAM limit's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import require
from proc_support import read_line
from npqfile.cli import main
from test_stream_hostile import _live_pc_like_stream
from test_stream_support import PAGE, header, make_ram, minimal_stream, part, pattern_pages, ram_start, snapshot_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _analyze(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) -> subprocess.Popen:
    require(sys.executable is not None, "a Python subprocess")
    return subprocess.Popen([sys.executable, "-m", "npqfile", "analyze", *map(str, argv)], cwd=ROOT,
                            stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, bytes, bytes]:
    """Wait for ``proc`` while its standard input stays open (communicate() would close
    it: an old analyze spooling to EOF would then pass).  Its output is small."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("analyze waited for the end of standard input") from None
    out = proc.stdout.read() if proc.stdout and not proc.stdout.closed else b""
    err = proc.stderr.read()
    for pipe in (proc.stdout, proc.stderr):
        if pipe and not pipe.closed:
            pipe.close()
    return proc.returncode, out, err


def test_standard_input_magic_is_checked_before_anything_is_read_to_the_end():
    proc = _analyze("-")
    proc.stdin.write(b"QEVX" + bytes(100))
    proc.stdin.flush()                    # and the writer never closes: no spooling to EOF
    try:
        code, out, err = _finish(proc)
    finally:
        proc.stdin.close()
    assert code == 1 and b"not a QEMU migration stream: magic 0x51455658" in err


@pytest.mark.parametrize("data", [snapshot_bytes(make_ram({"ram": pattern_pages(8)})), _live_pc_like_stream()],
                         ids=["npqfile", "device-tail"])
def test_standard_input_is_read_as_a_stream_up_to_its_vmdesc(data):
    """A source that keeps its end open after the vmdesc (npqfile's waits for a verdict)
    still gets a report: the stream ends at its vmdesc, not at end of file."""
    proc = _analyze("-", "--json")
    proc.stdin.write(data)
    proc.stdin.flush()
    try:
        code, out, err = _finish(proc)
    finally:
        proc.stdin.close()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["complete"] and doc["vmdesc"] and doc["size"] == len(data)


def test_a_closed_standard_output_ends_the_report_quietly(tmp_path):
    stream = tmp_path / "many-parts.stream"
    stream.write_bytes(header() + ram_start({"ram": 4 * PAGE}) + part(b"") * 5000 + b"\x00")
    proc = _analyze(stream, stdin=subprocess.DEVNULL)
    first = read_line(proc, proc.stdout, what="first report line")
    proc.stdout.close()                   # | head -1
    code, _, err = _finish(proc)
    assert first.startswith(b"stream   ")
    assert code == 0 and err == b"", err


def test_extract_refuses_a_non_directory_and_symbolic_links(tmp_path, capsys):
    stream = tmp_path / "s.stream"
    stream.write_bytes(snapshot_bytes(make_ram({"ram": pattern_pages(4)})))
    assert main(["analyze", str(stream), "--extract", "/dev/full"]) == 1
    err = capsys.readouterr().err
    assert "--extract /dev/full: exists and is not a directory" in err and "File exists" not in err
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, out_dir / "ram")
    assert main(["analyze", str(stream), "--extract", str(out_dir)]) == 1
    assert "is a symbolic link; refusing to write through it" in capsys.readouterr().err
    assert victim.read_bytes() == b"precious"
    os.unlink(out_dir / "ram")
    os.mkfifo(out_dir / "ram")
    assert main(["analyze", str(stream), "--extract", str(out_dir)]) == 1
    assert "is not a regular file" in capsys.readouterr().err


def test_the_ram_limit_error_names_the_option(tmp_path, capsys):
    stream = tmp_path / "big.stream"
    stream.write_bytes(minimal_stream(b"", blocks={"ram": 1 << 30}))
    assert main(["analyze", str(stream), "--max-ram", "16M"]) == 1
    err = capsys.readouterr().err
    assert "(--max-ram)" in err and "max_ram_bytes" not in err


def test_declared_but_unwritten_ram_is_neither_hashed_nor_scanned(tmp_path, capsys):
    """Three 20 GiB blocks declared by a few hundred bytes: analyze used to hash 60 GiB of
    zeros (and --extract scanned them).  Hashing is bounded per stream byte; --extract
    skips memory the stream never wrote (the file is a hole of the right size)."""
    from test_stream_support import page_record
    gib20 = 20 << 30
    blocks = {"a": gib20, "b": gib20, "small": 4 * PAGE}
    stream = tmp_path / "declared.stream"
    stream.write_bytes(header() + ram_start(blocks) + part(page_record(PAGE, b"\x5a" * PAGE, block="a")
                                                           + page_record(0, b"\x33" * PAGE, block="small")) + b"\x00")
    code, out, err = (main(["analyze", str(stream), "--json", "--max-ram", "64G", "--extract", str(tmp_path / "x")]),
                      *capsys.readouterr())
    assert code == 0, err
    doc = json.loads(out)
    digests = {b["name"]: b["sha256"] for b in doc["ram"]["blocks"]}
    import hashlib
    assert digests["a"] is None and digests["b"] is None
    assert digests["small"] == hashlib.sha256(b"\x33" * PAGE + bytes(3 * PAGE)).hexdigest()
    assert any("block 'a'" in w and "not hashed" in w for w in doc["warnings"])
    image = tmp_path / "x" / "a"
    assert image.stat().st_size == gib20 and image.stat().st_blocks * 512 < 1 << 20
    with open(image, "rb") as fh:
        fh.seek(PAGE)
        assert fh.read(PAGE) == b"\x5a" * PAGE
