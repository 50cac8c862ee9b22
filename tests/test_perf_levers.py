"""The speed levers of issue 12 that change behaviour a test can see (timings are never tested):
``image:`` RAM blocks map a raw image without copying it and never change it; a command loads
only its own subcommand module."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from npqfile.ram import RAMBlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_image_backing_maps_the_file_and_never_writes_it(tmp_path):
    img = tmp_path / "ram.img"
    data = np.random.default_rng(3).integers(0, 256, 64 * 4096, dtype=np.uint8)
    img.write_bytes(data.tobytes())
    os.chmod(img, 0o444)                  # read-only is enough: the file is opened O_RDONLY
    block = RAMBlock("ram", data.nbytes, backing=f"image:{img}")
    try:
        assert block.kind == "image" and np.array_equal(block.array, data)
        block.array[:4096] = 0xAB         # a private copy-on-write page
        assert block.array[0] == 0xAB
    finally:
        del data
        block.close()
    assert img.read_bytes()[:4096] != bytes([0xAB]) * 4096   # the file kept its bytes


def test_image_backing_errors_name_the_block(tmp_path):
    with pytest.raises(OSError, match="image .* of RAM block 'ram'"):
        RAMBlock("ram", 4096, backing=f"image:{tmp_path / 'missing.img'}")
    short = tmp_path / "short.img"
    short.write_bytes(bytes(4096))
    with pytest.raises(ValueError, match="shorter than 8192"):
        RAMBlock("ram", 8192, backing=f"image:{short}")


def test_a_command_imports_only_its_own_module():
    """``npqfile save`` must not pay for migrate's imports (engine, sweep, plotting)."""
    code = ("import sys, npqfile.cli as c\n"
            "try:\n    c.main(['save', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('npqfile.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['npqfile.cli.save']"


# -- the RAM loader's vectorised path for runs of PAGE|CONTINUE records ------------------

def _load_both(data: bytes, blocks: dict[str, int], monkeypatch):
    """Load ``data`` twice, through the run path (1 MiB read-ahead) and record by record;
    returns [(ram arrays or None, stats or None, error text or None)] for each."""
    from npqfile.channels import MemoryReader
    from npqfile.errors import StreamError
    from npqfile.qemufile import READ_AHEAD, QEMUFile
    from npqfile.stream import load_stream, ram_loader
    from test_stream_support import make_ram

    out = []
    for run_min in (ram_loader.PAGE_RUN_MIN_RECORDS, 10 ** 9):
        monkeypatch.setattr(ram_loader, "PAGE_RUN_MIN_RECORDS", run_min)
        ram = make_ram(dict(blocks))
        try:
            res = load_stream(QEMUFile(MemoryReader(data, chunk=300_000), read_ahead=READ_AHEAD), ram)
            stats = {k: v for k, v in res.stats.as_dict().items()}
            err = None
        except StreamError as exc:
            stats, err = None, str(exc)
        out.append(({b.name: b.array.copy() for b in ram.blocks}, stats, err))
        ram.close()
    return out


def test_page_runs_load_what_the_per_record_path_loads(monkeypatch):
    """Adjacent runs, gaps, a page sent twice, a zero page and a second block inside runs
    longer than the read-ahead: same RAM and same counts as record by record."""
    from test_stream_support import PAGE, header, page_record, part, ram_start, zero_record

    rng = np.random.default_rng(5)
    pg = lambda: rng.integers(1, 256, PAGE, dtype=np.uint8).tobytes()  # noqa: E731
    blocks = {"ram": 2048 * PAGE, "vga": 64 * PAGE}
    order = list(range(0, 700)) + list(range(900, 2048, 3)) + [5, 6, 7] + list(range(800, 880))
    body = page_record(0, pg())
    body += b"".join(page_record(p * PAGE, pg(), None) for p in order[1:])
    body += zero_record(6 * PAGE, 0, None) + page_record(3 * PAGE, pg(), "vga")
    body += b"".join(page_record(p * PAGE, pg(), None) for p in range(4, 64))
    data = header() + ram_start(blocks) + part(body) + b"\x00"
    (fast, fast_stats, e1), (slow, slow_stats, e2) = _load_both(data, blocks, monkeypatch)
    assert e1 is None and e2 is None
    assert fast_stats == slow_stats and fast_stats["normal"] == len(order) + 61
    for name in blocks:
        assert np.array_equal(fast[name], slow[name])


@pytest.mark.parametrize("bad", ["flag", "beyond", "backwards", "truncated"])
def test_a_bad_record_inside_a_run_fails_as_record_by_record(monkeypatch, bad):
    """Whatever ends a run (unknown flag, page beyond the block, an address not above the
    previous one, the end of the stream) gives the per-record error at the same offset,
    and the pages before it are loaded exactly as record by record."""
    from test_stream_support import PAGE, be64, header, page_record, part, ram_start

    rng = np.random.default_rng(9)
    blocks = {"ram": 512 * PAGE}
    body = page_record(0, rng.integers(1, 256, PAGE, dtype=np.uint8).tobytes())
    body += b"".join(page_record(p * PAGE, rng.integers(1, 256, PAGE, dtype=np.uint8).tobytes(), None)
                     for p in range(1, 200))
    if bad == "flag":
        body += be64(200 * PAGE | 0x28 | 0x200) + bytes(PAGE)
    elif bad == "beyond":
        body += be64(512 * PAGE | 0x28) + bytes(PAGE)
    elif bad == "backwards":      # valid: a page re-sent out of order, then a truncation
        body += page_record(10 * PAGE, bytes([7]) * PAGE, None) + be64(11 * PAGE | 0x28) + bytes(100)
    body += b"".join(page_record(p * PAGE, bytes(PAGE), None) for p in range(300, 340))
    data = header() + ram_start(blocks) + part(body) + b"\x00"
    if bad == "truncated":
        data = data[:len(data) // 2]
    (fast, _, e1), (slow, _, e2) = _load_both(data, blocks, monkeypatch)
    assert e1 is not None and e1 == e2
    assert np.array_equal(fast["ram"], slow["ram"])
    assert fast["ram"][:PAGE].any() and not fast["ram"][300 * PAGE:].any()


def _written_then_zeroed(zero_tail: bytes, blocks: dict[str, int]) -> bytes:
    """A stream that writes pages 0..599 of ``ram`` with non-zero bytes, then ZERO records
    for 100..399 (pages that became zero: they must be cleared) and ``zero_tail``."""
    from test_stream_support import PAGE, header, page_record, part, ram_start, zero_record

    body = page_record(0, bytes([1]) * PAGE)
    body += b"".join(page_record(p * PAGE, bytes([p % 250 + 1]) * PAGE, None) for p in range(1, 600))
    body += b"".join(zero_record(p * PAGE, 0, None) for p in range(100, 400))
    return header() + ram_start(blocks) + part(body + zero_tail) + b"\x00"


def test_zero_runs_load_what_the_per_record_path_loads(monkeypatch):
    """Runs of ZERO records clear the pages that are not zero already, across a fill byte
    other than 0, a record for another block and a run that goes back: same RAM and same
    counts as record by record."""
    from test_stream_support import PAGE, zero_record

    blocks = {"ram": 1024 * PAGE, "vga": 64 * PAGE}
    tail = zero_record(450 * PAGE, 7, None) + zero_record(2 * PAGE, 0, "vga")
    tail += b"".join(zero_record(p * PAGE, 0, "ram" if p == 500 else None) for p in range(500, 560))
    tail += b"".join(zero_record(p * PAGE, 0, None) for p in range(20, 40))       # goes back
    (fast, fast_stats, e1), (slow, slow_stats, e2) = _load_both(_written_then_zeroed(tail, blocks), blocks,
                                                                monkeypatch)
    assert e1 is None and e2 is None
    assert fast_stats == slow_stats and fast_stats["duplicate"] == 300 + 1 + 1 + 60 + 20
    for name in blocks:
        assert np.array_equal(fast[name], slow[name])
    ram = fast["ram"].reshape(-1, PAGE)
    assert not ram[100:400].any() and not ram[500:560].any() and not ram[20:40].any()
    assert (ram[450] == 7).all() and ram[99].all() and ram[400].all()


@pytest.mark.parametrize("bad", ["flag", "beyond", "truncated"])
def test_a_bad_record_inside_a_zero_run_fails_as_record_by_record(monkeypatch, bad):
    from test_stream_support import PAGE, be64

    blocks = {"ram": 1024 * PAGE}
    tail = {"flag": be64(700 * PAGE | 0x22 | 0x200) + b"\x00",
            "beyond": be64(1024 * PAGE | 0x22) + b"\x00", "truncated": b""}[bad]
    data = _written_then_zeroed(tail, blocks)
    if bad == "truncated":
        data = data[:-(9 * 150 + 30)]      # inside the ZERO records
    (fast, _, e1), (slow, _, e2) = _load_both(data, blocks, monkeypatch)
    assert e1 is not None and e1 == e2
    assert np.array_equal(fast["ram"], slow["ram"])


def test_zero_pages_scattered_between_normal_pages_take_the_per_record_path(monkeypatch):
    """Short runs of ZERO records (here two between normal pages) are not worth the run
    path's numpy set-up: it scans no page for them, and the RAM is loaded as record by record."""
    from npqfile.stream import ram_loader
    from test_stream_support import PAGE, header, page_record, part, ram_start, zero_record

    scans = []
    real = ram_loader.buffer_is_zero
    monkeypatch.setattr(ram_loader, "buffer_is_zero", lambda *a: scans.append(1) or real(*a))
    blocks = {"ram": 600 * PAGE}
    body = page_record(0, bytes([1]) * PAGE) + b"".join(
        zero_record(p * PAGE, 0, None) if p % 3 else page_record(p * PAGE, bytes([p % 250 + 1]) * PAGE, None)
        for p in range(1, 600))
    data = header() + ram_start(blocks) + part(body) + b"\x00"
    (fast, fast_stats, e1), (slow, slow_stats, e2) = _load_both(data, blocks, monkeypatch)
    assert e1 is None and e2 is None and fast_stats == slow_stats
    assert np.array_equal(fast["ram"], slow["ram"])
    assert scans == []


# -- hashing while loading -------------------------------------------------------------

def _stream_of(pages_in_order, blocks, seed=1):
    from test_stream_support import PAGE, header, page_record, part, ram_start

    rng = np.random.default_rng(seed)
    body = b""
    for i, p in enumerate(pages_in_order):
        body += page_record(p * PAGE, rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes(), "ram" if i == 0 else None)
    return header() + ram_start(blocks) + part(body) + b"\x00"


@pytest.mark.parametrize("order", ["in-order", "gaps", "resent", "resent-one-by-one", "backwards"])
def test_hashes_computed_while_loading_are_the_blocks_final_hashes(order):
    """In-order streams are hashed while they load; a page written again below what is
    already queued (re-sent, out of order) makes the block hashed again afterwards: the
    digest is always that of the final bytes."""
    from npqfile.channels import MemoryReader
    from npqfile.qemufile import READ_AHEAD, QEMUFile
    from npqfile.stream import load_stream
    from npqfile.stream.ram_hash import LoadHasher
    from test_stream_support import make_ram

    n = 600
    pages = {"in-order": list(range(n)), "gaps": list(range(0, n, 2)),
             "resent": list(range(n)) + list(range(100, 300)),
             "resent-one-by-one": list(range(n)) + [5],
             "backwards": list(range(300, n)) + list(range(0, 300))}[order]
    blocks = {"ram": n * 4096, "other": 8 * 4096}
    ram = make_ram(dict(blocks))
    hasher = LoadHasher()
    try:
        load_stream(QEMUFile(MemoryReader(_stream_of(pages, blocks)), read_ahead=READ_AHEAD), ram, hasher=hasher)
        bh = hasher.blocks["ram"]
        assert bh.stale == (order not in ("in-order", "gaps"))
        got = hasher.digests(ram)
        assert got == {b.name: b.sha256() for b in ram.blocks}
        assert hasher.blocks["ram"].view is None          # views dropped: the RAM can close
    finally:
        hasher.close()
        ram.close()


def test_the_loader_hashes_what_the_yielding_hasher_has_not_reached():
    """The hashing thread runs at nice 10 and may fall behind: when the stream ends, the
    loader takes over the ranges it has not taken (the thread finishes its current one and
    hands back the next), each hashed once, in order: the digest is the block's."""
    import hashlib
    import threading

    from npqfile.stream.ram_hash import LoadHasher

    data = np.random.default_rng(11).integers(0, 256, 64 * 4096, dtype=np.uint8)
    hasher = LoadHasher()
    bh = hasher.track("ram", memoryview(data))
    by_thread: list[str] = []

    class Starved:
        """A sha256 whose first update, on the hashing thread, waits until the loader
        has started taking over (as a thread that got no CPU until then would)."""
        def __init__(self):
            self.sha = hashlib.sha256()

        def update(self, buf):
            by_thread.append(threading.current_thread().name)
            if by_thread == ["load-hasher"]:
                started.set()
                while not hasher._takeover:
                    threading.Event().wait(0.001)
            self.sha.update(buf)

        def hexdigest(self):
            return self.sha.hexdigest()
    bh.sha = Starved()
    started = threading.Event()
    for end in range(4096, data.nbytes + 1, 4096):      # 64 ranges queued, one page each
        hasher.advance(bh, end)
    assert started.wait(60)                              # the thread is inside its first range

    class Ram:
        blocks = [type("B", (), {"name": "ram", "size": data.nbytes})()]
    assert hasher.digests(Ram()) == {"ram": hashlib.sha256(data.tobytes()).hexdigest()}
    assert by_thread[0] == "load-hasher" and by_thread.count("load-hasher") == 1
    assert len(by_thread) == 64                          # every range once, the rest by the loader


def test_a_failed_load_stops_the_hasher_and_frees_the_ram():
    import threading

    from npqfile.channels import MemoryReader
    from npqfile.migration.destination import Destination
    from test_stream_support import make_ram

    blocks = {"ram": 600 * 4096}
    data = _stream_of(range(600), blocks)
    ram = make_ram(dict(blocks))
    res = Destination(ram).receive(MemoryReader(data[: len(data) * 2 // 3]))
    assert res.status == "failed" and "truncated" in res.error
    assert not [t for t in threading.enumerate() if t.name == "load-hasher"]
    ram.close()                         # no view of the RAM is left behind
    ram = make_ram(dict(blocks))
    res = Destination(ram).receive(MemoryReader(data))
    assert res.status == "completed" and res.hashes == {"ram": ram.block("ram").sha256()}
    ram.close()


def test_incoming_no_hash_skips_the_digests_but_not_for_a_verifying_source(tmp_path):
    from test_stream_support import make_ram, pattern_pages, snapshot_bytes

    stream = tmp_path / "s.bin"
    stream.write_bytes(snapshot_bytes(make_ram({"ram": pattern_pages(8)})))
    cmd = [sys.executable, "-m", "npqfile", "incoming", f"file:{stream}", "--ram", "32K"]
    plain = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    quick = subprocess.run(cmd + ["--no-hash"], cwd=ROOT, capture_output=True, text=True)
    assert plain.returncode == quick.returncode == 0, (plain.stderr, quick.stderr)
    assert "sha256" in plain.stdout and "sha256" not in quick.stdout and "completed" in quick.stdout
    bad = subprocess.run([sys.executable, "-m", "npqfile", "incoming", "tcp:127.0.0.1:0", "--no-hash"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--no-hash" in bad.stderr and "verifies" in bad.stderr


@pytest.mark.parametrize("mix", ["mixed", "all-zero", "none-zero"])
def test_zero_pages_found_by_first_word_then_whole_page(mix):
    """A page whose first word is zero is still read to its end (a non-zero last byte
    makes it a normal page); whole batches of zero or non-zero first words agree too."""
    from npqfile.ram import GuestRAM
    from npqfile.stream.ram_saver import RAMSaver
    from test_stream_support import load_bytes, snapshot_bytes

    n = 700
    kinds = np.random.default_rng(4).integers(0, 3, n) if mix == "mixed" else np.full(n, 0 if mix == "all-zero" else 2)
    pages = np.zeros((n, 4096), np.uint8)
    pages[kinds == 1, 4095] = 7            # first word zero, not a zero page
    pages[kinds == 2, 0] = 9               # first word not zero
    ram = GuestRAM()
    ram.add_block("ram", n * 4096)
    ram.block("ram").array[:] = pages.reshape(-1)
    try:
        res = load_bytes(snapshot_bytes(ram))
        assert res.stats.zero_pages == int(np.count_nonzero(kinds == 0))
        assert np.array_equal(res.ram.block("ram").array, ram.block("ram").array)
        res.ram.close()
        # scattered (dirty) pages go through a gathered copy: the same answer
        chunk = np.arange(n)[::-1][::3].copy()
        mask = RAMSaver(None, ram)._zero_mask(ram.block("ram"), chunk)
        assert np.array_equal(mask, kinds[chunk] == 0)
    finally:
        ram.close()


def test_the_command_line_starts_no_openblas_workers_and_the_package_defers_numpy():
    """``import npqfile`` does not import numpy; ``npqfile.cli`` keeps OpenBLAS to one thread
    before numpy loads (its spinning workers cost each command ~0.17 s of CPU here)."""
    code = ("import os, sys\n"
            "os.environ.pop('OPENBLAS_NUM_THREADS', None)\n"
            "import npqfile\n"
            "early = 'numpy' in sys.modules\n"
            "import npqfile.cli, numpy\n"
            "print(early, os.environ.get('OPENBLAS_NUM_THREADS'), len(os.listdir('/proc/self/task')))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "1", "1"]
