"""The reclaim experiment and its CLI: the backing x advice matrix measured end to end."""

from __future__ import annotations

import json

import pytest

from npqfile.channels import open_channel
from npqfile.cli import main
from npqfile.qemufile import QEMUFile
from npqfile.ram import ADVICES, DEFAULT_ADVICE, GuestRAM
from npqfile.reclaim import BACKINGS, ReclaimConfig, compare_configs, run_reclaim
from npqfile.stream import save_snapshot

SIZE = 4 << 20
PAGES = SIZE // 4096
UNSUPPORTED = {("private", "remove"), ("private", "punch"), ("shared", "free"), ("shared", "punch"),
               ("memfd", "free"), ("file", "free")}


def stream_size(size: int) -> int:
    """Bytes of the -M none stream of one non-zero block ``pc.ram`` of ``size`` bytes."""
    ram = GuestRAM()
    try:
        ram.add_block("pc.ram", size).array[:] = 1
        with QEMUFile(open_channel("null:", "w")) as f:
            save_snapshot(f, ram)
            return f.ftell()
    finally:
        ram.close()


def test_compare_json_matrix(capsys, tmp_path):
    rc = main(["reclaim", "--compare", "--json", "--size", "4M", "--sample-every", "1M",
               "--file-dir", str(tmp_path)])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["host-page-size"] == 4096
    rows = {(r["backing"], r["advice"]): r for r in doc["results"]}
    assert set(rows) == {(b, a) for b in BACKINGS for a in ("none", *ADVICES)}
    assert list(tmp_path.iterdir()) == []  # temporary backing files are removed

    for (backing, advice), r in rows.items():
        if (backing, advice) in UNSUPPORTED:
            assert r["status"] == "unsupported" and r["reason"] in ("EINVAL", "no fd to punch"), r
            assert r["rss-after"] is None and r["cached-pages-after"] is None   # not measured, not 0
            continue
        assert r["status"] == "ok", r
        assert r["rss-before"] == SIZE and r["size"] == SIZE
        assert r["bytes-sent"] == stream_size(SIZE)
        assert [s["sent"] for s in r["samples"]] == [0, 1 << 20, 2 << 20, 3 << 20, 4 << 20]
        assert r["readback-zero"] + r["readback-old"] + r["readback-other"] == PAGES
        if advice == "none":
            assert r["pages-released"] == 0 and r["rss-after"] == SIZE and r["readback"] == "old data"
            continue
        assert r["pages-released"] == PAGES and r["release-errors"] == 0
        if advice == DEFAULT_ADVICE[backing]:
            # the real primitive: the mapping is empty, released pages read back as zero
            assert r["rss-after"] == 0 and r["resident-pages-after"] == 0 and r["readback"] == "zero", r
            if backing != "file":  # ext4 keeps large folios that per-flush punches only partly cover
                assert r["cached-pages-after"] == 0, r
            assert r["rss-peak"] == SIZE

    # what the other advices really do (F4)
    assert rows["private", "free"]["rss-after"] == SIZE and rows["private", "free"]["readback"] == "old data"
    assert rows["private", "free"]["lazyfree-after"] > 0
    for backing in ("shared", "memfd", "file"):
        r = rows[backing, "dontneed"]
        assert r["rss-after"] == 0 and r["cached-pages-after"] == PAGES and r["readback"] == "old data"
        assert r["samples"][-1]["mapping-rss"] == 0 and r["samples"][-1]["backing-kept"] == SIZE
    assert rows["shared", "remove"]["samples"][-1]["backing-kept"] == 0
    for backing in ("memfd", "file"):
        assert rows[backing, "remove"]["readback"] == "zero"
        assert rows[backing, "remove"]["rss-after"] == 0
    assert rows["memfd", "punch"]["cached-pages-after"] == 0
    for backing in BACKINGS:
        assert rows[backing, "cold"]["readback"] == "old data"


def test_table_and_plot(capsys, tmp_path):
    png = tmp_path / "rss.png"
    rc = main(["reclaim", "--size", "2M", "--backing", "shared", "--advice", "dontneed", "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "shared" in out and "dontneed" in out and "old data" in out and "plot written" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_release_and_file_path_backing(tmp_path):
    path = tmp_path / "guest.img"
    r = run_reclaim(ReclaimConfig(size=1 << 20, backing=f"file:{path}", release=False, sink=f"file:{tmp_path / 's'}"))
    assert r.status == "ok" and r.advice == "none" and r.pages_released == 0
    assert path.stat().st_size == 1 << 20  # a user's file is kept
    assert (tmp_path / "s").stat().st_size == r.bytes_sent == stream_size(1 << 20)


@pytest.mark.parametrize("release", ["--release", "--no-release"])
def test_sink_is_a_qemu_stream_that_analyze_loads(capsys, tmp_path, release):
    sink = tmp_path / "reclaim.stream"
    assert main(["reclaim", "--size", "1M", "--json", release, "--sink", f"file:{sink}"]) == 0
    sent = json.loads(capsys.readouterr().out)["results"][0]["bytes-sent"]
    assert main(["analyze", str(sink), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["complete"] and doc["vmdesc"] and doc["size"] == sent
    assert [b["name"] for b in doc["ram"]["blocks"]] == ["pc.ram"]
    assert doc["ram"]["stats"]["normal"] == 256


def test_compare_configs_matrix_shape():
    configs = compare_configs(ReclaimConfig(size=1 << 20), backings=["private"], advices=[None, "dontneed"])
    assert [(c.backing, c.advice, c.release) for c in configs] == [("private", None, False),
                                                                    ("private", "dontneed", True)]


@pytest.mark.parametrize("argv,match", [
    (["--backing", "tmpfs"], "unknown RAM backing 'tmpfs'"),
    (["--sink", "bogus:"], "bogus:"),
    (["--size", "3000"], "not a positive multiple"),
    (["--sample-every", "0"], "must be positive"),
])
def test_user_errors_are_one_line(capsys, argv, match):
    args = argv if "--size" in argv else ["--size", "1M", *argv]
    assert main(["reclaim", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err
