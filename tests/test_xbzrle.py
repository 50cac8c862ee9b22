"""Tests for npqfile.stream.xbzrle: QEMU's test-xbzrle.c anchors, reference-model equivalence,
malformed-input handling and the page cache (page_cache.c semantics)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npqfile.stream.xbzrle import (
    CACHED_PAGE_LIFETIME,
    ENCODING_FLAG_XBZRLE,
    PageCache,
    XBZRLEError,
    decode_page,
    encode_page,
    uleb128_decode_small,
    uleb128_encode_small,
)

PAGE = 4096


# ---------------------------------------------------------------------------------------------
# Reference models, written byte by byte from the grammar and QEMU's rules (tests only).

def ref_encode(old: bytes, new: bytes, dlen: int) -> bytes | None:
    """xbzrle_encode_buffer as a plain byte loop: same checks, same order; None for -1."""
    slen = len(old)
    out = bytearray()
    i = 0
    while i < slen:
        if len(out) + 2 > dlen:
            return None
        zrun = 0
        while i < slen and old[i] == new[i]:
            zrun += 1
            i += 1
        if zrun == slen:
            return b""
        if i == slen:
            return bytes(out)
        out += uleb128_encode_small(zrun)
        if len(out) + 2 > dlen:
            return None
        start = i
        while i < slen and old[i] != new[i]:
            i += 1
        out += uleb128_encode_small(i - start)
        if len(out) + (i - start) > dlen:
            return None
        out += new[start:i]
    return bytes(out)


def ref_decode(src: bytes, dst: bytearray) -> int:
    """xbzrle_decode_buffer as a plain loop, writing progressively like QEMU; -1 on error."""
    def uleb(pos: int) -> tuple[int, int]:
        if src[pos] < 0x80:
            return src[pos], 1
        if src[pos + 1] & 0x80:
            return -1, -1
        return (src[pos] & 0x7F) | (src[pos + 1] << 7), 2

    i = d = 0
    while i < len(src):
        if len(src) - i < 2:
            return -1
        count, ret = uleb(i)
        if ret < 0 or (i and not count):
            return -1
        i += ret
        d += count
        if d > len(dst):
            return -1
        if len(src) - i < 2:
            return -1
        count, ret = uleb(i)
        if ret < 0 or not count:
            return -1
        i += ret
        if d + count > len(dst) or i + count > len(src):
            return -1
        dst[d:d + count] = src[i:i + count]
        d += count
        i += count
    return d


def changed_page(rng: np.random.Generator, old: np.ndarray, nruns: int, max_run: int) -> np.ndarray:
    """A copy of ``old`` with up to ``nruns`` random ranges of changed bytes."""
    new = old.copy()
    for _ in range(nruns):
        start = int(rng.integers(0, old.size))
        length = int(rng.integers(1, max_run + 1))
        seg = new[start:start + length]
        seg ^= rng.integers(1, 256, seg.size, dtype=np.uint8)  # xor with non-zero: really changed
    return new


# ---------------------------------------------------------------------------------------------
# uleb128 (test-xbzrle.c /xbzrle/uleb)

def test_uleb_round_trip_all_14_bit_values():
    for value in range(0x4000):
        enc = uleb128_encode_small(value)
        assert len(enc) == (1 if value < 0x80 else 2)
        assert uleb128_decode_small(enc, 0) == (value, len(enc))
        assert uleb128_decode_small(b"\xee" + enc, 1) == (value, len(enc))


def test_uleb_rejects_more_than_14_bits_and_truncation():
    with pytest.raises(XBZRLEError, match="14 bits") as exc:
        uleb128_decode_small(b"\x80\x80", 0)
    assert exc.value.position == 0
    with pytest.raises(XBZRLEError, match="truncated uleb128") as exc:
        uleb128_decode_small(b"\x01\x85", 1)
    assert exc.value.position == 1
    with pytest.raises(XBZRLEError, match="truncated uleb128"):
        uleb128_decode_small(b"", 0)
    assert uleb128_decode_small(b"\x80\x00", 0) == (0, 2)  # non-canonical form accepted, as QEMU
    for bad in (-1, 0x4000):
        with pytest.raises(ValueError):
            uleb128_encode_small(bad)


# ---------------------------------------------------------------------------------------------
# Encoder anchors (test-xbzrle.c)

def test_flag_value():
    assert ENCODING_FLAG_XBZRLE == 0x01


def test_unchanged_pages_encode_to_nothing():
    page = np.zeros(PAGE, dtype=np.uint8)
    assert encode_page(page, page.copy()) == b""
    page[1001:1500] = np.arange(1, 500, dtype=np.uint8)
    page[1503], page[1505] = 107, 109
    assert encode_page(page, page) == b""
    assert encode_page(memoryview(page.tobytes()), memoryview(page.tobytes())) == b""


def test_single_changed_last_byte_is_four_bytes():
    old = np.zeros(PAGE, dtype=np.uint8)
    new = old.copy()
    new[PAGE - 1] = 1
    enc = encode_page(old, new)
    assert enc == bytes.fromhex("ff1f0101")
    assert len(enc) == len(uleb128_encode_small(4095)) + 2
    dst = old.copy()
    assert decode_page(enc, dst) == PAGE
    assert np.array_equal(dst, new)


def test_even_bytes_changed_overflows():
    old = np.zeros(PAGE, dtype=np.uint8)
    new = old.copy()
    new[0:PAGE - 2:2] = 1
    assert encode_page(old, new) is None
    assert ref_encode(old.tobytes(), new.tobytes(), PAGE) is None


def test_qemu_encode_decode_ranges_10000():
    # encode_decode_range() of test-xbzrle.c, with a seeded generator instead of g_test_rand.
    rng = np.random.default_rng(20130101)
    for diff_len in rng.integers(0, PAGE - 1006, 10000):
        buffer = np.zeros(PAGE, dtype=np.uint8)
        test = np.zeros(PAGE, dtype=np.uint8)
        i = np.arange(1, diff_len + 1)
        buffer[1000 + i] = i & 0xFF
        test[1000 + i] = (i + 4) & 0xFF
        buffer[1000 + diff_len + 3], test[1000 + diff_len + 3] = 103, 107
        buffer[1000 + diff_len + 5], test[1000 + diff_len + 5] = 105, 109
        enc = encode_page(test, buffer)
        assert enc  # small change: never overflows, never empty
        rc = decode_page(enc, test)
        assert rc < PAGE
        assert np.array_equal(test, buffer)


# ---------------------------------------------------------------------------------------------
# Overflow-check placement (QEMU checks d + 2 at the top of every iteration, even for the
# trailing zrun it then omits, d + 2 before the nzrun length and d + nzrun_len after it).

@pytest.mark.parametrize("index, max_len, expected", [
    (0, 1, None), (0, 3, None), (0, 4, None), (0, 5, "000107"),   # trailing zrun costs 2 "bytes"
    (4095, 3, None), (4095, 4, "ff1f0107"),                      # no trailing zrun: exact fit
    (200, 3, None), (200, 5, None), (200, 6, "c8010107"),
])
def test_overflow_boundaries(index, max_len, expected):
    old = np.zeros(PAGE, dtype=np.uint8)
    new = old.copy()
    new[index] = 7
    want = None if expected is None else bytes.fromhex(expected)
    assert ref_encode(old.tobytes(), new.tobytes(), max_len) == want
    assert encode_page(old, new, max_len=max_len) == want


@pytest.mark.parametrize("nruns, max_run", [(1, 200), (5, 200), (40, 30), (300, 3)])
@pytest.mark.parametrize("trailing_zrun", [True, False])
def test_overflow_boundaries_around_exact_size(nruns, max_run, trailing_zrun):
    rng = np.random.default_rng(nruns)
    old = np.zeros(PAGE, dtype=np.uint8)
    new = changed_page(rng, old, nruns, max_run)
    new[-1] = 0 if trailing_zrun else 1
    size = len(ref_encode(old.tobytes(), new.tobytes(), PAGE))
    for max_len in range(size - 3, size + 4):
        want = ref_encode(old.tobytes(), new.tobytes(), max_len)
        assert encode_page(old, new, max_len=max_len) == want
        assert (want is None) == (max_len < size + (2 if trailing_zrun else 0))


def test_tiny_max_len_overflows_even_unchanged_page():
    page = np.zeros(64, dtype=np.uint8)
    assert encode_page(page, page, max_len=1) is None  # QEMU: top check before "unchanged"
    assert ref_encode(page.tobytes(), page.tobytes(), 1) is None


def test_encoder_rejects_bad_pages():
    with pytest.raises(ValueError, match="multiple of 8"):
        encode_page(np.zeros(12, np.uint8), np.zeros(12, np.uint8))
    with pytest.raises(ValueError, match="4096"):
        encode_page(np.zeros(PAGE, np.uint8), np.zeros(2048, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_page(np.zeros(512, np.uint64), np.zeros(512, np.uint64))
    old = np.zeros(32768, np.uint8)
    new = old.copy()
    new[-1] = 1
    with pytest.raises(ValueError, match="0x3fff"):
        encode_page(old, new, max_len=32768)


# ---------------------------------------------------------------------------------------------
# Equivalence with the byte-loop reference, both code paths (few runs / many runs)

@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       nruns=st.sampled_from([0, 1, 2, 5, 15, 16, 17, 30, 100, 600, 2000]),
       max_run=st.sampled_from([1, 2, 7, 130, 300]),
       size=st.sampled_from([8, 64, 4096]),
       max_len=st.one_of(st.just(PAGE), st.integers(0, 4200)))
def test_encoder_matches_reference_and_round_trips(seed, nruns, max_run, size, max_len):
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 4, size, dtype=np.uint8) * 85  # few values: many accidental equal bytes
    new = changed_page(rng, old, nruns, max_run)
    enc = encode_page(old, new, max_len=max_len)
    assert enc == ref_encode(old.tobytes(), new.tobytes(), max_len)
    if enc is not None:
        assert len(enc) <= max_len
        dst = old.copy()
        assert decode_page(enc, dst) <= size
        assert np.array_equal(dst, new)


def test_encoder_matches_reference_on_random_pages():
    rng = np.random.default_rng(7)
    for nruns in (0, 1, 3, 16, 17, 40, 400, 3000):
        old = rng.integers(0, 256, PAGE, dtype=np.uint8)
        new = changed_page(rng, old, nruns, 9)
        assert encode_page(old, new) == ref_encode(old.tobytes(), new.tobytes(), PAGE)
    fully_random = rng.integers(0, 256, PAGE, dtype=np.uint8)
    assert encode_page(old, fully_random) is None
    assert ref_encode(old.tobytes(), fully_random.tobytes(), PAGE) is None


# ---------------------------------------------------------------------------------------------
# Decoder: malformed input, bounds, destination kinds

@pytest.mark.parametrize("data, position, reason", [
    (b"\x00", 0, "truncated uleb128"),
    (b"\x01\x01\x05\x07", 3, "truncated uleb128"),
    (b"\x00\x00\x05", 1, "zero-length nzrun"),
    (b"\x01\x01\x05\x00\x01\x06", 3, "zero-length zrun"),
    (b"\x80\x80\x01\x01", 0, "14 bits"),
    (b"\x01\x80\x80\x01", 1, "14 bits"),
    (b"\xff\x7f\x01\x01", 0, "zrun past the end of the page"),
    (b"\xff\x1f\x02\x01\x02", 2, "nzrun past the end of the page"),
    (b"\x00\x04\x01\x02\x03", 2, "nzrun data truncated"),
])
def test_decoder_rejects_malformed(data, position, reason):
    dst = np.arange(PAGE, dtype=np.uint32).astype(np.uint8)
    before = dst.copy()
    with pytest.raises(XBZRLEError, match=reason) as exc:
        decode_page(data, dst)
    assert exc.value.position == position
    assert ref_decode(data, bytearray(before.tobytes())) == -1
    assert np.array_equal(dst, before)  # validated before writing: dst untouched


def test_decoder_first_zrun_may_be_zero_and_empty_input_decodes_nothing():
    dst = np.zeros(PAGE, dtype=np.uint8)
    assert decode_page(b"\x00\x01\x07", dst) == 1
    assert dst[0] == 7 and not dst[1:].any()
    assert decode_page(b"\x80\x00\x01\x09", dst) == 1  # 2-byte zero zrun at the start
    assert dst[0] == 9
    assert decode_page(b"", dst) == 0


def test_decoder_destinations():
    old = np.zeros(PAGE, dtype=np.uint8)
    new = changed_page(np.random.default_rng(3), old, 40, 5)
    enc = encode_page(old, new)
    for dst in (bytearray(PAGE), memoryview(bytearray(PAGE))):
        assert decode_page(enc, dst) <= PAGE
        assert bytes(dst) == new.tobytes()
    with pytest.raises(ValueError, match="read-only"):
        decode_page(enc, bytes(PAGE))
    with pytest.raises(ValueError, match="read-only"):
        decode_page(enc, np.frombuffer(bytes(PAGE), dtype=np.uint8))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64) | st.lists(st.sampled_from(
           [b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff", b"\x20", b"\x80\x00", b"\xff\x1f", b"\xaa"]),
           max_size=40).map(b"".join),
       size=st.sampled_from([8, 64, 256]))
def test_decoder_on_arbitrary_bytes_matches_qemu_and_stays_inside(data, size):
    rng = np.random.default_rng(len(data))
    backing = rng.integers(0, 256, size + 32, dtype=np.uint8)
    guard = backing.copy()
    dst = backing[16:16 + size]
    expected = bytearray(dst.tobytes())
    rc = ref_decode(data, expected)
    try:
        got = decode_page(data, dst)
    except XBZRLEError as exc:
        assert rc == -1
        assert 0 <= exc.position <= len(data)
        assert np.array_equal(backing, guard)
    else:
        assert got == rc
        assert dst.tobytes() == bytes(expected)
        assert np.array_equal(backing[:16], guard[:16])
        assert np.array_equal(backing[16 + size:], guard[16 + size:])


# ---------------------------------------------------------------------------------------------
# Page cache (migration/page_cache.c)

def test_cache_size_rules():
    assert PageCache(64 << 20).num_slots == 16384
    assert PageCache(4096).num_slots == 1
    assert PageCache(1 << 16, page_size=16384).num_slots == 4
    for bad in (0, 2048, 3 * 4096, (64 << 20) + 4096):
        with pytest.raises(ValueError, match="power of two"):
            PageCache(bad)
    with pytest.raises(ValueError, match="page size"):
        PageCache(1 << 20, page_size=3000)


def test_cache_lookup_insert_and_counters():
    cache = PageCache(8 * PAGE)
    page = np.full(PAGE, 5, dtype=np.uint8)
    assert cache.lookup(3 * PAGE) is None
    assert cache.insert(3 * PAGE, page, generation=1)
    page[:] = 6  # the cache holds a copy
    hit = cache.lookup(3 * PAGE)
    assert hit is not None and (hit == 5).all()
    hit[0] = 9  # a view into the cache: QEMU updates the cached page in place
    assert cache.get_cached_data(3 * PAGE)[0] == 9
    assert cache.get_cached_data(4 * PAGE) is None
    assert (cache.hits, cache.misses, cache.num_items) == (1, 1, 1)
    assert cache.insert(5 * PAGE, memoryview(bytes(PAGE)), generation=1)
    assert cache.num_items == 2
    with pytest.raises(ValueError, match="expected 4096"):
        cache.insert(0, bytes(100), generation=1)


def test_cache_slot_mapping_and_fresh_page_protection():
    cache = PageCache(4 * PAGE)
    a, b = 1 * PAGE + 100, 5 * PAGE  # same slot: (addr / page) & 3 == 1
    assert cache.cache_pos(a) == cache.cache_pos(b) == 1
    assert cache.insert(a, np.full(PAGE, 1, np.uint8), generation=10)
    # Another address may not evict a page younger than CACHED_PAGE_LIFETIME generations.
    assert CACHED_PAGE_LIFETIME == 2
    assert not cache.insert(b, np.full(PAGE, 2, np.uint8), generation=11)
    assert cache.lookup(b) is None and cache.lookup(a)[0] == 1
    # A hit with a generation refreshes the age (cache_is_cached), postponing eviction.
    assert cache.lookup(a, generation=11) is not None
    assert not cache.insert(b, np.full(PAGE, 2, np.uint8), generation=12)
    assert cache.insert(b, np.full(PAGE, 2, np.uint8), generation=13)
    assert cache.lookup(a) is None and cache.lookup(b)[0] == 2
    # The same address is always refreshed, whatever its age.
    assert cache.insert(b, np.full(PAGE, 3, np.uint8), generation=13)
    assert cache.lookup(b)[0] == 3
    assert cache.num_items == 1
