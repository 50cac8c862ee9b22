"""ctypes driver for the compiled seed (see seed_build.py and harness.c).

Supports: writable files over a recording backend (every writev call's byte count and iovec
count, the bytes, programmable failure of one call), readable files over a chunked backend
(short reads in a programmed cycle, EOF or an errno at the end), the backend-less dummy
file, the qemu_madvise log, and compression with a z_stream per level.

Goal: the same method names as npqfile.qemufile.QEMUFile where they exist, so one
operation-sequence interpreter can drive both; results come back as Python ints/bytes.
Plan: thin wrappers; the library is loaded once per variant (the madvise log is global per
library, so use one writer at a time).
"""

from __future__ import annotations

import ctypes as C
from functools import cached_property
from pathlib import Path

_vp, _sz, _i64, _u64 = C.c_void_p, C.c_size_t, C.c_int64, C.c_uint64

# name: (restype, argtypes)
_SIGNATURES: dict[str, tuple] = {
    "harness_madv_count": (_sz, []),
    "harness_madv_get": (C.c_int, [_sz, C.POINTER(C.c_size_t), C.POINTER(_sz), C.POINTER(_sz)]),
    "harness_madv_clear": (None, []),
    "harness_sink_new": (_vp, [C.c_long, C.c_long, C.c_int]),
    "harness_sink_free": (None, [_vp]),
    "harness_sink_data": (_vp, [_vp, C.POINTER(_sz)]),
    "harness_sink_ncalls": (_sz, [_vp]),
    "harness_sink_call": (None, [_vp, _sz, C.POINTER(_u64), C.POINTER(C.c_uint32)]),
    "harness_sink_close_calls": (C.c_int, [_vp]),
    "harness_open_sink": (_vp, [_vp]),
    "harness_source_new": (_vp, [C.c_char_p, _sz, C.POINTER(_sz), _sz, C.c_long]),
    "harness_source_free": (None, [_vp]),
    "harness_source_calls": (_sz, [_vp]),
    "harness_source_calls_after_end": (_sz, [_vp]),
    "harness_open_source": (_vp, [_vp]),
    "harness_open_dummy": (_vp, []),
    "harness_peek_buffer": (_sz, [_vp, C.c_char_p, _sz, _sz]),
    "harness_get_buffer_in_place": (_sz, [_vp, C.c_char_p, _sz]),
    "harness_deflate_new": (_vp, [C.c_int]),
    "harness_deflate_free": (None, [_vp]),
    "qemu_fclose": (C.c_int, [_vp]),
    "qemu_fflush": (None, [_vp]),
    "qemu_file_get_error": (C.c_int, [_vp]),
    "qemu_file_set_error": (None, [_vp, C.c_int]),
    "qemu_put_byte": (None, [_vp, C.c_int]),
    "qemu_put_be16": (None, [_vp, C.c_uint]),
    "qemu_put_be32": (None, [_vp, C.c_uint]),
    "qemu_put_be64": (None, [_vp, _u64]),
    "qemu_put_buffer": (None, [_vp, C.c_char_p, _sz]),
    "qemu_put_buffer_async": (None, [_vp, _vp, _sz, C.c_bool]),
    "qemu_put_counted_string": (None, [_vp, C.c_char_p]),
    "qemu_put_compression_data": (C.c_ssize_t, [_vp, _vp, C.c_char_p, _sz]),
    "qemu_put_qemu_file": (C.c_int, [_vp, _vp]),
    "qemu_get_byte": (C.c_int, [_vp]),
    "qemu_peek_byte": (C.c_int, [_vp, C.c_int]),
    "qemu_get_be16": (C.c_uint, [_vp]),
    "qemu_get_be32": (C.c_uint, [_vp]),
    "qemu_get_be64": (_u64, [_vp]),
    "qemu_get_buffer": (_sz, [_vp, C.c_char_p, _sz]),
    "qemu_file_skip": (None, [_vp, C.c_int]),
    "qemu_get_counted_string": (_sz, [_vp, C.c_char_p]),
    "qemu_ftell": (_i64, [_vp]),
    "qemu_ftell_fast": (_i64, [_vp]),
    "qemu_file_rate_limit": (C.c_int, [_vp]),
    "qemu_file_get_rate_limit": (_i64, [_vp]),
    "qemu_file_set_rate_limit": (None, [_vp, _i64]),
    "qemu_file_reset_rate_limit": (None, [_vp]),
    "qemu_update_position": (None, [_vp, _sz]),
}


class SeedLib:
    """One compiled variant, with typed entry points (attribute access: lib.qemu_put_byte)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.dll = C.CDLL(str(self.path))
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(self.dll, name)
            fn.restype, fn.argtypes = res, args
        self._zstreams: dict[int, int] = {}

    def __getattr__(self, name: str):
        return getattr(self.dll, name)

    def zstream(self, level: int) -> int:
        """A z_stream set up with deflateInit(level), cached per level (reset on every use)."""
        if level not in self._zstreams:
            z = self.dll.harness_deflate_new(level)
            if not z:
                raise ValueError(f"deflateInit rejected level {level}")
            self._zstreams[level] = z
        return self._zstreams[level]

    def madvise_log(self) -> list[tuple[int, int, int]]:
        """(address, length, writev calls before it) of every qemu_madvise call since the
        last clear (SeedWriter clears); OverflowError if the C log overflowed."""
        out, addr, size, after = [], C.c_size_t(), C.c_size_t(), C.c_size_t()
        for i in range(self.dll.harness_madv_count()):
            if self.dll.harness_madv_get(i, C.byref(addr), C.byref(size), C.byref(after)) != 0:
                raise OverflowError("madvise log overflowed")
            out.append((addr.value, size.value, after.value))
        return out


class _SeedFile:
    """Common part of seed files: the QEMUFile pointer, errors, positions, close, and the
    backend (``backend``, freed by the library function named ``_free_backend``)."""

    lib: SeedLib
    f: int | None
    backend: int | None = None
    _free_backend = ""

    def free(self) -> None:
        """Close the file if still open and free the backend."""
        if self.f is not None:
            self.fclose()
        if self.backend is not None:
            getattr(self.lib, self._free_backend)(self.backend)
            self.backend = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def get_error(self) -> int:
        return self.lib.qemu_file_get_error(self.f)

    def set_error(self, ret: int) -> None:
        self.lib.qemu_file_set_error(self.f, ret)

    def ftell(self) -> int:
        return self.lib.qemu_ftell(self.f)

    def fclose(self) -> int:
        """qemu_fclose; returns its result (the file is freed)."""
        ret = self.lib.qemu_fclose(self.f)
        self.f = None
        return ret


class SeedWriter(_SeedFile):
    """A writable seed QEMUFile; writev call `fail_call` (0-based) returns `fail_ret`."""

    _free_backend = "harness_sink_free"

    def __init__(self, lib: SeedLib, *, fail_call: int = -1, fail_ret: int = 0, close_ret: int = 0):
        self.lib = lib
        self.backend = lib.harness_sink_new(fail_call, fail_ret, close_ret)
        self.f = lib.harness_open_sink(self.backend)
        lib.harness_madv_clear()

    @property
    def written(self) -> bytes:
        """Every byte the backend accepted, in order."""
        n = C.c_size_t()
        p = self.lib.harness_sink_data(self.backend, C.byref(n))
        return C.string_at(p, n.value) if n.value else b""

    @property
    def calls(self) -> list[tuple[int, int]]:
        """(bytes requested, iovec count) of each writev call."""
        b, c = C.c_uint64(), C.c_uint32()
        out = []
        for i in range(self.lib.harness_sink_ncalls(self.backend)):
            self.lib.harness_sink_call(self.backend, i, C.byref(b), C.byref(c))
            out.append((b.value, c.value))
        return out

    @property
    def close_calls(self) -> int:
        return self.lib.harness_sink_close_calls(self.backend)

    def put_byte(self, v: int) -> None:
        self.lib.qemu_put_byte(self.f, v)

    def put_be16(self, v: int) -> None:
        self.lib.qemu_put_be16(self.f, v)

    def put_be32(self, v: int) -> None:
        self.lib.qemu_put_be32(self.f, v)

    def put_be64(self, v: int) -> None:
        self.lib.qemu_put_be64(self.f, v)

    def put_buffer(self, data: bytes) -> None:
        self.lib.qemu_put_buffer(self.f, bytes(data), len(data))

    def put_buffer_at(self, address: int, size: int, may_free: bool = False) -> None:
        """qemu_put_buffer_async on raw memory the caller keeps alive until the next flush."""
        self.lib.qemu_put_buffer_async(self.f, address, size, may_free)

    def put_counted_string(self, s: bytes) -> None:
        if b"\0" in s:
            raise ValueError("the seed's counted strings are C strings (no NUL)")
        self.lib.qemu_put_counted_string(self.f, s)

    def put_compression_data(self, data: bytes, level: int) -> int:
        return self.lib.qemu_put_compression_data(self.f, self.lib.zstream(level), bytes(data), len(data))

    def put_qemu_file(self, src: SeedDummy) -> int:
        return self.lib.qemu_put_qemu_file(self.f, src.f)

    def fflush(self) -> None:
        self.lib.qemu_fflush(self.f)

    def ftell_fast(self) -> int:
        return self.lib.qemu_ftell_fast(self.f)

    def update_position(self, n: int) -> None:
        self.lib.qemu_update_position(self.f, n)

    def rate_limit(self) -> bool:
        return bool(self.lib.qemu_file_rate_limit(self.f))

    def get_rate_limit(self) -> int:
        return self.lib.qemu_file_get_rate_limit(self.f)

    def set_rate_limit(self, n: int) -> None:
        self.lib.qemu_file_set_rate_limit(self.f, n)

    def reset_rate_limit(self) -> None:
        self.lib.qemu_file_reset_rate_limit(self.f)


class SeedDummy(SeedWriter):
    """The backend-less file QEMU's compression threads write into (no writev_buffer)."""

    def __init__(self, lib: SeedLib):
        self.lib = lib
        self.f = lib.harness_open_dummy()


class SeedReader(_SeedFile):
    """A readable seed QEMUFile over `data`, served in a cycle of `chunks` sizes; at the end
    get_buffer returns `end_ret` (0 = EOF, or -errno)."""

    _free_backend = "harness_source_free"

    def __init__(self, lib: SeedLib, data: bytes, chunks: list[int] = (), end_ret: int = 0):
        self.lib = lib
        arr = (C.c_size_t * max(1, len(chunks)))(*chunks)
        self.backend = lib.harness_source_new(bytes(data), len(data), arr, len(chunks), end_ret)
        self.f = lib.harness_open_source(self.backend)

    @property
    def calls(self) -> int:
        """get_buffer calls made so far."""
        return self.lib.harness_source_calls(self.backend)

    @property
    def calls_after_end(self) -> int:
        """get_buffer calls made after the data was exhausted."""
        return self.lib.harness_source_calls_after_end(self.backend)

    def get_byte(self) -> int:
        return self.lib.qemu_get_byte(self.f)

    def peek_byte(self, offset: int = 0) -> int:
        return self.lib.qemu_peek_byte(self.f, offset)

    def get_be16(self) -> int:
        return self.lib.qemu_get_be16(self.f)

    def get_be32(self) -> int:
        return self.lib.qemu_get_be32(self.f)

    def get_be64(self) -> int:
        return self.lib.qemu_get_be64(self.f)

    def skip(self, n: int) -> None:
        self.lib.qemu_file_skip(self.f, n)

    @cached_property
    def _scratch(self) -> C.Array:
        return C.create_string_buffer(1 << 20)

    def _read(self, fn, n: int, *extra) -> bytes:
        buf = self._scratch if n <= len(self._scratch) else C.create_string_buffer(n)
        got = fn(self.f, buf, n, *extra)
        return buf.raw[:got]

    def get_buffer(self, n: int) -> bytes:
        return self._read(self.lib.qemu_get_buffer, n)

    def peek_buffer(self, n: int, offset: int = 0) -> bytes:
        return self._read(self.lib.harness_peek_buffer, n, offset)

    def get_buffer_in_place(self, n: int) -> bytes:
        return self._read(self.lib.harness_get_buffer_in_place, n)

    def get_counted_string(self) -> bytes:
        """The string qemu_get_counted_string stored (b"" when it returned 0)."""
        buf = C.create_string_buffer(257)
        ret = self.lib.qemu_get_counted_string(self.f, buf)
        return buf.raw[:ret]
