"""The helpers that replaced repeated code: the zero scan (ram/bufferiszero), the run
finder (ram/runs), the POSTCOPY_RAM_DISCARD parser (stream/return_path), multifd's
zero-page partition, the option validator (migration/options) and the release record.
Each against a trivial per-page / per-range reference, with the edge cases."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from npqfile.errors import StreamError
from npqfile.ram.bufferiszero import buffer_is_zero
from npqfile.ram.runs import mask_runs
from npqfile.stream import return_path as rpm
from npqfile.stream.multifd import partition_zero_pages

PS = 4096
MIB = 1 << 20


# -- mask_runs ----------------------------------------------------------------------------------
def _runs_reference(mask) -> list[list[int]]:
    out, start = [], None
    for i, v in enumerate(list(mask) + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append([start, i])
            start = None
    return out


@pytest.mark.parametrize("mask, runs", [
    ([], []), ([False] * 5, []), ([True] * 5, [[0, 5]]), ([True], [[0, 1]]), ([False, False, True], [[2, 3]]),
    ([True, False, True, True, False], [[0, 1], [2, 4]]),
])
def test_mask_runs_edge_cases(mask, runs):
    got = mask_runs(np.array(mask, dtype=bool))
    assert got.dtype == np.int64 and got.shape == (len(runs), 2) and got.tolist() == runs


def test_mask_runs_refuses_a_mask_that_is_not_one_dimensional():
    with pytest.raises(ValueError, match="1-D"):
        mask_runs(np.ones((2, 2), dtype=bool))


@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.booleans(), max_size=200))
def test_mask_runs_matches_a_per_page_walk(mask):
    assert mask_runs(np.array(mask, dtype=bool)).tolist() == _runs_reference(mask)


# -- buffer_is_zero -----------------------------------------------------------------------------
def _pages(n: int, nonzero: dict[int, int]) -> np.ndarray:
    pages = np.zeros((n, PS), dtype=np.uint8)
    for page, byte in nonzero.items():
        pages[page, byte] = 0xA5
    return pages


def test_buffer_is_zero_edge_cases():
    pages = _pages(6, {1: 0, 3: PS - 1, 5: PS // 2})     # first byte, last byte, middle
    assert buffer_is_zero(pages).tolist() == [True, False, True, False, True, False]
    assert buffer_is_zero(pages, np.array([], dtype=np.int64)).size == 0
    assert buffer_is_zero(pages[:0]).size == 0
    assert buffer_is_zero(pages, np.array([5])).tolist() == [False]          # the last page alone
    assert buffer_is_zero(pages, np.array([4])).tolist() == [True]
    assert buffer_is_zero(pages, np.arange(6)).tolist() == buffer_is_zero(pages).tolist()
    assert buffer_is_zero(_pages(3, {})).all()                                # all zero
    assert not buffer_is_zero(_pages(3, {0: 7, 1: 0, 2: 9})).any()           # none zero
    with pytest.raises(IndexError):
        buffer_is_zero(pages, np.array([5, 6]))        # past the end: never a short answer


def test_buffer_is_zero_reads_a_run_through_a_view_and_scattered_pages_through_a_copy():
    pages = _pages(8, {2: 5})
    # a run: the result must equal the gathered answer, whatever the path
    assert buffer_is_zero(pages, np.arange(1, 5)).tolist() == [True, False, True, True]
    assert buffer_is_zero(pages, np.array([6, 2, 0])).tolist() == [True, False, True]
    assert buffer_is_zero(pages, np.array([2, 2, 3])).tolist() == [False, False, True]


@settings(max_examples=200, deadline=None)
@given(hs.integers(1, 24).flatmap(lambda n: hs.tuples(
    hs.just(n), hs.dictionaries(hs.integers(0, n - 1), hs.integers(0, PS - 1), max_size=n),
    hs.lists(hs.integers(0, n - 1), max_size=2 * n) | hs.builds(lambda a, b: list(range(min(a, b), max(a, b))),
                                                                  hs.integers(0, n), hs.integers(0, n)))))
def test_buffer_is_zero_matches_a_per_page_reference(case):
    n, nonzero, idx = case
    pages = _pages(n, nonzero)
    idx = np.array(idx, dtype=np.int64)
    want = [not pages[i].any() for i in idx.tolist()]
    assert buffer_is_zero(pages, idx).tolist() == want
    assert buffer_is_zero(pages).tolist() == [not p.any() for p in pages]


def test_ram_saver_zero_mask_keeps_its_switch():
    from npqfile.ram import GuestRAM
    from npqfile.stream.ram_saver import RAMSaver
    ram = GuestRAM()
    try:
        b = ram.add_block("ram", 8 * PS)
        b.pages[3, 100] = 1
        chunk = np.array([1, 3, 7])
        assert RAMSaver(None, ram)._zero_mask(b, chunk).tolist() == [True, False, True]
        assert not RAMSaver(None, ram, zero_page_detection=False)._zero_mask(b, chunk).any()
    finally:
        ram.close()


# -- partition_zero_pages -----------------------------------------------------------------------
def _partition_reference(offsets: np.ndarray, is_zero: np.ndarray):
    """multifd_send_zero_page_detect, swap by swap."""
    offs, zero = offsets.copy(), is_zero.copy()
    i, j = 0, offs.size - 1
    while i <= j:
        if not zero[i]:
            i += 1
            continue
        offs[i], offs[j] = offs[j], offs[i]
        zero[i], zero[j] = zero[j], zero[i]
        j -= 1
    return offs, i


@settings(max_examples=500, deadline=None)
@given(hs.lists(hs.booleans(), max_size=128))
def test_partition_zero_pages_is_qemus_swap_order(zero):
    offs = np.arange(len(zero), dtype=np.uint64) * PS
    is_zero = np.array(zero, dtype=bool)
    got, k = partition_zero_pages(offs, is_zero)
    want, k_want = _partition_reference(offs, is_zero)
    assert k == k_want and got.tolist() == want.tolist() and got.dtype == offs.dtype
    assert offs.tolist() == (np.arange(len(zero)) * PS).tolist()        # the input is untouched


# -- POSTCOPY_RAM_DISCARD -----------------------------------------------------------------------
def _payload(name: bytes, pairs: bytes) -> bytes:
    return bytes([0, len(name)]) + name + b"\0" + pairs


@pytest.mark.parametrize("data, reason, offset", [
    (b"", "invalid length (0)", 0),
    (b"\x00\x01", "invalid length (2)", 0),                                    # truncated header
    (b"\x01\x01r\x00", "invalid version (1)", 0),
    (b"\x00\x05r\x00", "missing nil", 4),                                      # name runs past the end
    (b"\x00\x01rX", "missing nil", 3),
    (_payload(b"r", b"\0" * 15), "invalid length remaining 15", 4),           # odd length
    (_payload(b"r", b"\0" * 33), "invalid length remaining 33", 4),
])
def test_parse_discard_refuses_malformed_payloads_naming_the_byte(data, reason, offset):
    with pytest.raises(rpm.DiscardError) as e:
        rpm.parse_discard(data)
    assert reason in str(e.value) and e.value.offset == offset and f"payload byte {offset}" in str(e.value)


def test_parse_discard_reads_many_ranges_at_once():
    ranges = [(i * 2 * PS, PS) for i in range(4000)]       # about a full 64 KiB payload
    body = b"".join(struct.pack(">QQ", s, n) for s, n in ranges)
    d = rpm.parse_discard(_payload(b"pc.ram", body))
    assert d.block == "pc.ram" and d.ranges == ranges and d.offset == 9 and d.array.shape == (4000, 2)
    assert d.pages(PS) == 4000
    d.check(8000 * PS, PS)
    empty = rpm.parse_discard(_payload(b"r", b""))
    assert empty.ranges == [] and empty.pages(PS) == 0
    empty.check(PS, PS)


@pytest.mark.parametrize("start, length, index", [
    (MIB, PS, 1),                          # starts at the end of the block
    (MIB - PS, 2 * PS, 1),                 # runs past the end
    (PS + 1, PS, 1),                       # not page aligned
    (0, PS + 1, 1),
    (2 ** 64 - PS, 2 * PS, 1),             # start + length wraps around 2**64
    (PS, 2 ** 64 - PS, 1),                 # a huge count
    (2 ** 64 - PS, 2 ** 64 - PS, 1),
])
def test_discard_ranges_outside_the_block_are_refused_without_wrapping(start, length, index):
    body = struct.pack(">QQ", 0, PS) + struct.pack(">QQ", start, length)
    d = rpm.parse_discard(_payload(b"ram", body))
    with pytest.raises(rpm.DiscardError, match="is not whole pages inside block 'ram'") as e:
        d.check(MIB, PS)
    assert e.value.offset == 3 + 3 + 16 * index


def test_discard_payloads_split_arrays_as_lists_and_refuse_negative_ranges():
    pairs = np.array([[i * PS, PS] for i in range(25)], dtype=np.int64)
    assert rpm.discard_payloads("ram", pairs) == rpm.discard_payloads("ram", pairs.tolist())
    assert [len(p) for p in rpm.discard_payloads("ram", pairs)] == [6 + 12 * 16, 6 + 12 * 16, 6 + 16]
    assert rpm.discard_payloads("ram", []) == []
    with pytest.raises(ValueError, match="negative"):
        rpm.discard_payloads("ram", [(0, -PS)])


def test_the_loader_names_the_stream_byte_of_a_bad_discard_payload():
    """The savevm loader uses the same parser; its error points at the bad byte in the
    stream (the old loader's own parser named only the record)."""
    from npqfile.channels import MemoryReader
    from npqfile.qemufile import QEMUFile
    from npqfile.stream.constants import MIG_CMD_POSTCOPY_RAM_DISCARD
    from npqfile.stream.loader import load_stream
    from test_postcopy import _stream      # a stream with RAM block 'ram' (1 MiB) and these commands
    bad = _payload(b"ram", b"\0" * 20)
    data = _stream((MIG_CMD_POSTCOPY_RAM_DISCARD, bad))
    with pytest.raises(StreamError, match="CMD_POSTCOPY_RAM_DISCARD invalid length remaining 20") as e:
        load_stream(QEMUFile(MemoryReader(data)))
    payload_at = data.rindex(bad)
    assert e.value.offset == payload_at + 6
    good = _payload(b"ram", struct.pack(">QQ", 0, PS))
    res = load_stream(QEMUFile(MemoryReader(_stream((MIG_CMD_POSTCOPY_RAM_DISCARD, good)))))
    assert {"block": "ram", "ranges": 1}.items() <= res.commands[-1].items()


def test_rp_constants_live_beside_the_mig_cmd_ones():
    from npqfile.stream import constants
    assert rpm.MIG_RP_MSG_REQ_PAGES_ID is constants.MIG_RP_MSG_REQ_PAGES_ID == 3
    assert rpm.RP_CMD_ARGS is constants.RP_CMD_ARGS


# -- the option validator -----------------------------------------------------------------------
def test_option_checks_name_options_or_parameters():
    from npqfile.migration.options import (
        migrate_caps_check, migrate_params_check, migration_channels_and_transport_compatible,
    )
    from npqfile.stream.versions import stream_version
    v72, v10 = stream_version("7.2"), stream_version("10.0")
    with pytest.raises(ValueError, match="--multifd-channels speaks QEMU 10.0's multifd.*QEMU 7.2 cannot load"):
        migrate_caps_check(multifd=True, peer=v72, prefix="--")
    migrate_caps_check(multifd=True, peer=v10)
    with pytest.raises(ValueError, match="^multifd-channels does not go with compress"):
        migrate_caps_check(multifd=True, compress=True)
    with pytest.raises(ValueError, match="--multifd-channels does not go with --compress"):
        migrate_caps_check(multifd=True, stream_compression=True, prefix="--")
    with pytest.raises(ValueError, match="mapped-ram cannot be combined with XBZRLE"):
        migrate_caps_check(mapped_ram=True, xbzrle=True, version=v10)
    with pytest.raises(ValueError, match="QEMU 7.2 has no mapped-ram"):
        migrate_caps_check(mapped_ram=True, version=v72)
    with pytest.raises(ValueError, match="postcopy cannot be combined with multifd"):
        migrate_caps_check(postcopy_ram=True, multifd=True)
    with pytest.raises(ValueError, match="1..255"):
        migrate_params_check(multifd_channels=0, multifd=True)
    migrate_params_check(multifd_channels=0)
    with pytest.raises(ValueError, match="--multifd-compression needs --multifd-channels"):
        migrate_params_check(multifd_compression="zstd", prefix="--")
    with pytest.raises(ValueError, match="zero-page-detection is a QEMU 9.0\\+ parameter that QEMU 7.2 lacks"):
        migrate_params_check(zero_page_detection="legacy", peer=v72)
    with pytest.raises(ValueError, match="^multifd needs a tcp: or unix: destination, not 'file:x'"):
        migration_channels_and_transport_compatible("file:x", multifd=True)
    with pytest.raises(ValueError, match="-o must be a regular file, not 'exec:cat'"):
        migration_channels_and_transport_compatible("exec:cat", mapped_ram=True, prefix="--", where="-o")
    migration_channels_and_transport_compatible("unix:/s", multifd=True)
    migration_channels_and_transport_compatible("file:/f", mapped_ram=True)


# -- release-ram's record -----------------------------------------------------------------------
def test_release_record_reads_its_bytes_from_the_statistics():
    from npqfile.migration.release_ram import ReleaseRecord
    from npqfile.migration.stats import MigrationStats
    st = MigrationStats(released_bytes=3 * MIB, release_freed_bytes=2 * MIB)
    d = ReleaseRecord(enabled=True, when="postcopy", time=0.5, reason="r").as_dict(st)
    assert d == {"enabled": True, "released-bytes": 2 * MIB, "release-advised-bytes": 3 * MIB, "when": "postcopy",
                 "time-ms": 500.0, "reason": "r"}
