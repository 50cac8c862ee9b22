"""XBZRLE page delta encoding and the XBZRLE page cache (QEMU migration/xbzrle.c, page_cache.c).

Supports:
  * ``uleb128_encode_small`` / ``uleb128_decode_small``: QEMU's 14-bit uleb128 (util/cutils.c).
  * ``encode_page(old, new, max_len=4096)``: byte-identical to ``xbzrle_encode_buffer``
    (the portable C encoder), including where it gives up with -1 (here: ``None``).
  * ``decode_page(src, dst)``: ``xbzrle_decode_buffer`` with the same acceptance rules.
  * ``PageCache``: ``page_cache.c`` (direct-mapped slots, "do not evict a fresh page" ageing).

Goals: the bytes on the wire are QEMU's, byte for byte; no Python loop per byte (numpy per page,
per run only for a few runs and in the decoder's parser); malformed input is an ``XBZRLEError`` naming the byte
position and reason, never an IndexError and never a write outside ``dst``.

Plan.  The encoder output is fully determined by the maximal runs of equal bytes (zrun) and of
differing bytes (nzrun): QEMU's word-at-a-time loops are only a speed-up, every one of them ends
with a byte loop that stops at the first byte of the other kind, so run boundaries are exact.
We find all boundaries at once (``np.flatnonzero`` on the change of ``old != new``), compute
every uleb128 length vectorised, decide overflow from the cumulative size with QEMU's three
checks, then fill a preallocated buffer: headers by fancy indexing, data as ``new[diff]``
(the nzrun bytes, concatenated in order, are exactly the changed bytes of ``new``).  Pages with
at most ``_SMALL_RUNS`` runs take a per-run loop instead: cheaper than a dozen numpy calls.
The decoder parses run headers with a tight Python loop (at most 2048 runs per 4 KiB page),
validates the whole input first and only then writes, so a malformed input leaves ``dst``
untouched (QEMU writes run by run and leaves it partially updated).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "ENCODING_FLAG_XBZRLE",
    "XBZRLEError",
    "uleb128_encode_small",
    "uleb128_decode_small",
    "encode_page",
    "decode_page",
    "PageCache",
    "CACHED_PAGE_LIFETIME",
]

# First byte of a RAM_SAVE_FLAG_XBZRLE record's payload (ram.c ENCODING_FLAG_XBZRLE).
ENCODING_FLAG_XBZRLE = 0x01

# uleb128_encode_small asserts this: lengths are at most 14 bits (1 or 2 bytes).
ULEB128_SMALL_MAX = 0x3FFF

# page_cache.c: a cached page of another address is not replaced for this many generations.
CACHED_PAGE_LIFETIME = 2

# Below this many nzruns a Python loop over runs beats a dozen numpy calls (encoder and decoder).
_SMALL_RUNS = 16

_RUN_KIND = {True: "zrun", False: "nzrun"}  # for error messages


class XBZRLEError(ValueError):
    """Malformed XBZRLE data: ``.position`` is the byte index in the encoded data, ``.reason`` why."""

    def __init__(self, reason: str, position: int) -> None:
        super().__init__(f"malformed XBZRLE data at byte {position}: {reason}")
        self.reason = reason
        self.position = position


def _u8_view(buf: Any, what: str, *, writable: bool = False) -> np.ndarray:
    """Return a zero-copy 1-D uint8 view of ``buf`` (numpy array or buffer); ValueError if unusable."""
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 bytes, got dtype {arr.dtype}")
    if arr.ndim != 1:
        if not arr.flags.c_contiguous:
            raise ValueError(f"{what} must be a contiguous page, got shape {arr.shape}")
        arr = arr.reshape(-1)
    if writable and not arr.flags.writeable:
        raise ValueError(f"{what} is read-only")
    return arr


def uleb128_encode_small(n: int) -> bytes:
    """Return QEMU's uleb128 encoding of ``0 <= n <= 0x3fff`` (1 or 2 bytes); ValueError otherwise."""
    if not 0 <= n <= ULEB128_SMALL_MAX:
        raise ValueError(f"uleb128_encode_small: {n} is outside 0..0x3fff")
    if n < 0x80:
        return bytes((n,))
    return bytes(((n & 0x7F) | 0x80, n >> 7))


def uleb128_decode_small(buf: Any, pos: int = 0) -> tuple[int, int]:
    """Decode a 14-bit uleb128 at ``buf[pos]``; return ``(value, nbytes)``.

    Like QEMU, a 2-byte form with a small value (e.g. ``80 00``) is accepted.  Raises
    XBZRLEError when the value needs more than 14 bits (second byte has bit 7 set, as ``80 80``)
    or when ``buf`` ends inside the number.
    """
    size = len(buf)
    if pos >= size:
        raise XBZRLEError("truncated uleb128", pos)
    b0 = int(buf[pos])
    if b0 < 0x80:
        return b0, 1
    if pos + 1 >= size:
        raise XBZRLEError("truncated uleb128", pos)
    b1 = int(buf[pos + 1])
    if b1 & 0x80:
        raise XBZRLEError("uleb128 longer than 14 bits", pos)
    return (b0 & 0x7F) | (b1 << 7), 2


def encode_page(old: Any, new: Any, *, max_len: int = 4096) -> bytes | None:
    """Encode ``new`` as a delta against ``old`` exactly as QEMU's ``xbzrle_encode_buffer``.

    ``old`` and ``new`` are one page each (numpy uint8 or buffers), equal length, a multiple of 8.
    Returns ``b""`` when the page is unchanged (QEMU 0: the page is not sent), ``None`` when the
    encoding does not fit in ``max_len`` bytes (QEMU -1: a normal page is sent instead), else the
    encoded bytes (trailing zrun omitted).  ValueError on mismatched/unaligned pages or, for
    pages over 16 KiB, a run longer than 0x3fff (QEMU asserts).
    """
    o = _u8_view(old, "old page")
    n = _u8_view(new, "new page")
    slen = o.size
    if n.size != slen:
        raise ValueError(f"old page has {slen} bytes but new page has {n.size}")
    if slen % 8:
        raise ValueError(f"page length {slen} is not a multiple of 8 (xbzrle_encode_buffer asserts)")
    if slen == 0:
        return b""
    # The top-of-loop overflow check runs before the "buffer unchanged" test.
    if max_len < 2:
        return None
    diff = o != n
    if not diff.any():
        return b""

    # Boundaries of the nzruns: run j is [bounds[2j], bounds[2j+1]), a maximal run of changes.
    d8 = diff.view(np.int8)
    inner = np.flatnonzero(d8[1:] != d8[:-1]) + 1
    first, last = bool(diff[0]), bool(diff[-1])
    npairs = (inner.size + first + last) // 2
    # Each pair costs at least 2 length bytes plus its data: a sure overflow needs no layout.
    if 2 * npairs + int(np.count_nonzero(diff)) > max_len:
        return None
    if npairs <= _SMALL_RUNS:
        bounds = inner.tolist()
        if first:
            bounds.insert(0, 0)
        if last:
            bounds.append(slen)
        return _encode_runs(n, bounds, max_len)
    if first or last:
        inner = np.concatenate(([0] if first else [], inner, [slen] if last else []))
        inner = inner.astype(np.intp, copy=False)
    return _encode_runs_vectorised(n, diff, inner, max_len)


def _encode_runs(new: np.ndarray, bounds: list[int], max_len: int) -> bytes | None:
    """Emit few runs the way the C loop does, with its overflow checks in its order."""
    out = bytearray()
    prev = 0
    for start, end in zip(bounds[0::2], bounds[1::2]):
        if len(out) + 2 > max_len:
            return None
        out += uleb128_encode_small(start - prev)
        if len(out) + 2 > max_len:
            return None
        out += uleb128_encode_small(end - start)
        if len(out) + end - start > max_len:
            return None
        out += new[start:end].tobytes()
        prev = end
    # A trailing zrun is omitted, but the loop's top-of-iteration check still runs for it.
    if prev != new.size and len(out) + 2 > max_len:
        return None
    return bytes(out)


def _encode_runs_vectorised(new: np.ndarray, diff: np.ndarray, bounds: np.ndarray,
                            max_len: int) -> bytes | None:
    """Emit many runs at once; same bytes and same overflow decision as ``_encode_runs``."""
    # Successive differences of [s0, e0, s1, e1, ...] are the lengths [zrun0, nzrun0, zrun1, ...].
    lengths = bounds.copy()
    lengths[1:] -= bounds[:-1]
    if new.size > ULEB128_SMALL_MAX and int(lengths.max()) > ULEB128_SMALL_MAX:
        raise ValueError("run longer than 0x3fff bytes: uleb128_encode_small cannot encode it")
    two = lengths >= 0x80
    sizes = 1 + two  # uleb128 bytes of each length ...
    sizes[1::2] += lengths[1::2]  # ... plus the data of each nzrun
    end_off = np.cumsum(sizes)
    total = int(end_off[-1])
    # QEMU's checks in closed form.  A pair adds at least 3 bytes, so both "d + 2 > dlen" checks
    # inside a pair are implied by the check after its nzrun length, "d + nzrun_len > dlen", and
    # d only grows: that leaves the final size, plus the top-of-loop check of the trailing zrun.
    if total > max_len:
        return None
    if int(bounds[-1]) != new.size and total + 2 > max_len:
        return None

    out = np.empty(total, dtype=np.uint8)
    is_data = np.ones(total, dtype=bool)
    pos = end_off - sizes  # where each length starts
    out[pos] = (lengths & 0x7F) | (two << 7)
    is_data[pos] = False
    if two.any():
        high = pos[two] + 1
        out[high] = lengths[two] >> 7
        is_data[high] = False
    # The nzrun bytes, concatenated in order, are exactly the changed bytes of the new page.
    out[is_data] = new[diff]
    return out.tobytes()


def decode_page(src: Any, dst: Any) -> int:
    """Apply XBZRLE data ``src`` onto the previous page content in ``dst`` (QEMU xbzrle_decode_buffer).

    ``dst`` is the writable page (numpy uint8 view, memoryview, bytearray); only bytes inside
    nzruns are written.  Returns the decoded length ``d`` (end of the last nzrun).  Raises
    XBZRLEError (position = byte index in ``src``) on: a length needing more than 14 bits, fewer
    than 2 bytes left where a length starts (QEMU's rule), a zero-length zrun other than the first,
    a zero-length nzrun, a run past the end of ``dst``, or nzrun data past the end of ``src``.
    The whole input is validated before anything is written, so on error ``dst`` is unchanged.
    """
    s = src if isinstance(src, bytes) else bytes(src)
    out = _u8_view(dst, "destination page", writable=True)
    slen = len(s)
    dlen = out.size
    i = d = 0
    runs: list[tuple[int, int, int]] = []  # (dst offset, src offset, count) of each nzrun
    zrun = True  # the input alternates: zrun length, nzrun length + data, zrun length, ...
    while i < slen:
        # QEMU wants 2 bytes left even for a 1-byte length: an nzrun needs at least 1 data byte.
        if slen - i < 2:
            raise XBZRLEError(f"truncated uleb128 ({_RUN_KIND[zrun]} length)", i)
        count = s[i]
        width = 1
        if count & 0x80:
            if s[i + 1] & 0x80:
                raise XBZRLEError(f"uleb128 longer than 14 bits ({_RUN_KIND[zrun]} length)", i)
            count = (count & 0x7F) | (s[i + 1] << 7)
            width = 2
        if zrun:
            if i and not count:
                raise XBZRLEError("zero-length zrun", i)
            d += count
            if d > dlen:
                raise XBZRLEError(f"zrun past the end of the page ({d} > {dlen})", i)
            i += width
        else:
            if not count:
                raise XBZRLEError("zero-length nzrun", i)
            if d + count > dlen:
                raise XBZRLEError(f"nzrun past the end of the page ({d + count} > {dlen})", i)
            i += width
            if i + count > slen:
                raise XBZRLEError(f"nzrun data truncated ({count} bytes, {slen - i} left)", i)
            runs.append((d, i, count))
            d += count
            i += count
        zrun = not zrun
    if not zrun:  # input ended right after a zrun length
        raise XBZRLEError("truncated uleb128 (nzrun length)", i)

    data = np.frombuffer(s, dtype=np.uint8)
    if len(runs) <= _SMALL_RUNS:
        for dpos, spos, count in runs:
            out[dpos:dpos + count] = data[spos:spos + count]
    else:
        table = np.array(runs, dtype=np.intp)
        counts = table[:, 2]
        # Mark every data byte of src, then move each by its run's (dst - src) offset.
        # Data runs never touch (a length header lies between them), so plain stores suffice.
        mark = np.zeros(slen + 1, dtype=np.int8)
        mark[table[:, 1]] = 1
        mark[table[:, 1] + counts] = -1
        src_idx = np.flatnonzero(np.cumsum(mark[:slen]))
        out[src_idx + np.repeat(table[:, 0] - table[:, 1], counts)] = data[src_idx]
    return d


class PageCache:
    """QEMU's XBZRLE page cache (migration/page_cache.c), storage in one numpy array.

    ``size_bytes // page_size`` direct-mapped slots; an address maps to slot
    ``(addr // page_size) & (num_slots - 1)``.  Like QEMU (migrate_params_check, cache_init),
    the size must be a power of two no less than the page size: ValueError otherwise.
    Addresses are ram_addr_t values (block offset + offset in block), non-negative.
    """

    def __init__(self, size_bytes: int, page_size: int = 4096) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        if size_bytes < page_size or size_bytes & (size_bytes - 1):
            raise ValueError(
                f"xbzrle cache size {size_bytes} is not a power of two no less than the "
                f"target page size ({page_size})")
        self.page_size = page_size
        self.size_bytes = size_bytes
        self.num_slots = size_bytes // page_size
        self._mask = self.num_slots - 1
        # np.zeros is lazily backed by the kernel: untouched slots cost no RAM.
        self._data = np.zeros((self.num_slots, page_size), dtype=np.uint8)
        self._addr = np.full(self.num_slots, -1, dtype=np.int64)  # -1: slot never filled
        self._age = np.zeros(self.num_slots, dtype=np.int64)
        self.num_items = 0
        self.hits = 0
        self.misses = 0

    def cache_pos(self, addr: int) -> int:
        """Return the slot index of ``addr`` (QEMU cache_get_cache_pos)."""
        return (addr // self.page_size) & self._mask

    def lookup(self, addr: int, generation: int | None = None) -> np.ndarray | None:
        """Return a writable view of the cached page of ``addr``, or None (counted in hits/misses).

        With ``generation`` a hit also refreshes the slot's age, as QEMU's cache_is_cached does.
        """
        pos = self.cache_pos(addr)
        if self._addr[pos] != addr:
            self.misses += 1
            return None
        self.hits += 1
        if generation is not None:
            self._age[pos] = generation
        return self._data[pos]

    def get_cached_data(self, addr: int) -> np.ndarray | None:
        """Return the cached page of ``addr`` like lookup, without touching stats or age."""
        pos = self.cache_pos(addr)
        return self._data[pos] if self._addr[pos] == addr else None

    def insert(self, addr: int, data: Any, generation: int) -> bool:
        """Copy one page ``data`` into the slot of ``addr`` (QEMU cache_insert).

        Returns False, changing nothing, when the slot holds another address that is still fresh
        (its age + CACHED_PAGE_LIFETIME > generation); True when stored.  ValueError when
        ``data`` is not one page.
        """
        page = _u8_view(data, "cached page")
        if page.size != self.page_size:
            raise ValueError(f"cached page has {page.size} bytes, expected {self.page_size}")
        pos = self.cache_pos(addr)
        held = int(self._addr[pos])
        if held == -1:
            self.num_items += 1
        elif held != addr and int(self._age[pos]) + CACHED_PAGE_LIFETIME > generation:
            return False
        self._data[pos] = page
        self._age[pos] = generation
        self._addr[pos] = addr
        return True
