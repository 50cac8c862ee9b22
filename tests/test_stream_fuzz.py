"""Hypothesis: round trips of random RAM in random page orders, and arbitrary bytes never escape StreamError."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npqfile.errors import StreamError
from npqfile.stream import RAMSaver, SaveVMWriter
from npqfile.stream.constants import QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START
from npqfile.stream.devices import RAM
from test_stream_support import PAGE, load_bytes, make_ram, minimal_stream, pattern_pages, snapshot_bytes, writer

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def ram_and_orders(draw):
    n_blocks = draw(st.integers(1, 3))
    blocks = {}
    for b in range(n_blocks):
        n = draw(st.integers(1, 12))
        kinds = draw(st.lists(st.sampled_from(["zero", "rand", "fill", "one"]), min_size=n, max_size=n))
        seed = draw(st.integers(0, 2**31))
        rng = np.random.default_rng(seed)
        pages = np.zeros((n, PAGE), np.uint8)
        for i, k in enumerate(kinds):
            if k == "rand":
                pages[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)
            elif k == "fill":
                pages[i] = rng.integers(1, 256)
            elif k == "one":
                pages[i, rng.integers(0, PAGE)] = rng.integers(1, 256)
        blocks[f"blk{b}" if b else "ram"] = pages
    # a send plan: (block name, page indices) chunks in any order, each page at least once
    plan = []
    for name, pages in blocks.items():
        order = draw(st.permutations(list(range(len(pages)))))
        cut = draw(st.integers(1, len(order)))
        plan += [(name, order[:cut]), (name, order[cut:])]
    plan = draw(st.permutations(plan))
    opts = draw(st.sampled_from([{}, {"xbzrle_cache_size": 16 * PAGE}, {"compress_level": 1},
                                 {"zero_page_detection": False}]))
    parts = draw(st.integers(1, 4))
    return blocks, plan, opts, parts


@FUZZ
@given(ram_and_orders())
def test_round_trip_random_ram_random_orders(case):
    blocks, plan, opts, parts = case
    ram = make_ram(blocks)
    f, ch = writer()
    w = SaveVMWriter(f)
    saver = RAMSaver(f, ram, **opts)
    w.write_header()
    with w.section(RAM, QEMU_VM_SECTION_START):
        saver.save_setup()
    for k, (name, idx) in enumerate(plan):
        if k % parts == 0 and k:
            saver.write_eos()
            w.section_footer(RAM)
        if k % parts == 0:
            w.section_header(RAM, QEMU_VM_SECTION_PART)
        if idx:
            saver.save_pages(ram.block(name), idx)
    saver.write_eos()
    w.section_footer(RAM)
    with w.section(RAM, QEMU_VM_SECTION_END):
        saver.write_eos()
    w.write_eof()
    f.fflush()
    res = load_bytes(ch.getvalue())
    for name, pages in blocks.items():
        assert np.array_equal(res.ram.block(name).pages, pages), name


VALID = snapshot_bytes(make_ram({"ram": pattern_pages(6), "b": pattern_pages(2, 3)}), compress_level=1)
VALID_PLAIN = snapshot_bytes(make_ram({"ram": pattern_pages(6)}))


def _only_stream_errors(data: bytes) -> None:
    try:
        res = load_bytes(data, max_ram_bytes=1 << 24, partial_ok=True)
    except StreamError:
        return
    if res.ram is not None:
        res.ram.close()


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data):
    _only_stream_errors(data)


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_a_valid_prefix(tail):
    _only_stream_errors(VALID_PLAIN[:60] + tail)
    _only_stream_errors(minimal_stream(b"")[:-9] + tail)


@FUZZ
@given(st.sampled_from([VALID, VALID_PLAIN]), st.data())
def test_mutations_of_a_valid_stream(base, data):
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    _only_stream_errors(bytes(buf[:cut]))
