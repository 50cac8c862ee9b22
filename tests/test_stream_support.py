"""Helpers shared by the stream tests (no tests here): building RAM, streams, records."""

from __future__ import annotations

import struct

import numpy as np

from npqfile.channels import MemoryChannel, MemoryReader
from npqfile.qemufile import QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream import load_stream, save_snapshot
from npqfile.stream.constants import QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION

PAGE = 4096


def pattern_pages(n_pages: int, seed: int = 0) -> np.ndarray:
    """Pages of every interesting kind: random, zero, one repeated byte, zero but for one byte."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n_pages, PAGE), dtype=np.uint8)
    kinds = np.arange(n_pages) % 4
    for i in np.flatnonzero(kinds == 0):
        out[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)
    for i in np.flatnonzero(kinds == 2):
        out[i] = (i % 255) + 1
    for i in np.flatnonzero(kinds == 3):
        out[i, rng.integers(0, PAGE)] = rng.integers(1, 256)
    return out


def make_ram(blocks: dict[str, np.ndarray | int]) -> GuestRAM:
    """GuestRAM with one private block per entry: a page array / bytes (contents) or an int (size)."""
    ram = GuestRAM()
    for name, data in blocks.items():
        if isinstance(data, int):
            ram.add_block(name, data)
        else:
            arr = np.asarray(data, dtype=np.uint8).reshape(-1)
            ram.add_block(name, arr.size).array[:] = arr
    return ram


def writer() -> tuple[QEMUFile, MemoryChannel]:
    ch = MemoryChannel()
    return QEMUFile(ch), ch


def reader(data: bytes, chunk=None) -> QEMUFile:
    return QEMUFile(MemoryReader(data, chunk=chunk))


def snapshot_bytes(ram: GuestRAM, **kwargs) -> bytes:
    f, ch = writer()
    save_snapshot(f, ram, **kwargs)
    return ch.getvalue()


def load_bytes(data: bytes, ram: GuestRAM | None = None, **kwargs):
    return load_stream(reader(data), ram, **kwargs)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def cstr(s: bytes | str) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return bytes([len(b)]) + b


def header(config: bytes | None = b"none") -> bytes:
    out = struct.pack(">II", QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)
    if config is not None:
        out += b"\x07" + struct.pack(">I", len(config)) + config
    return out


def ram_start(blocks: dict[str, int], sid: int = 2, footer: bool = True) -> bytes:
    """A START section for 'ram' declaring ``blocks`` ({name: size})."""
    body = be64(sum(blocks.values()) | 0x04)
    for name, size in blocks.items():
        body += cstr(name) + be64(size)
    body += be64(0x10)
    return b"\x01" + struct.pack(">I", sid) + cstr("ram") + struct.pack(">II", 0, 4) + body + (
        footer_bytes(sid) if footer else b"")


def part(body: bytes, sid: int = 2, footer: bool = True, kind: int = 2) -> bytes:
    """A PART (or END with kind=3) section whose payload is ``body`` + EOS."""
    return bytes([kind]) + struct.pack(">I", sid) + body + be64(0x10) + (footer_bytes(sid) if footer else b"")


def footer_bytes(sid: int) -> bytes:
    return b"\x7e" + struct.pack(">I", sid)


def page_record(offset: int, data: bytes, block: str | None = "ram") -> bytes:
    """A PAGE record (CONTINUE when ``block`` is None)."""
    if block is None:
        return be64(offset | 0x08 | 0x20) + data
    return be64(offset | 0x08) + cstr(block) + data


def zero_record(offset: int, fill: int = 0, block: str | None = "ram") -> bytes:
    if block is None:
        return be64(offset | 0x02 | 0x20) + bytes([fill])
    return be64(offset | 0x02) + cstr(block) + bytes([fill])


def minimal_stream(records: bytes, blocks: dict[str, int] | None = None) -> bytes:
    """header + ram START + one PART holding ``records`` + EOF."""
    return header() + ram_start(blocks or {"ram": 4 * PAGE}) + part(records) + b"\x00"
