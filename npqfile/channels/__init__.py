"""Transports under QEMUFile: real OS channels plus in-memory ones for tests and benchmarks.

Supports: the `Channel` protocol (see `base`), `FdChannel`, `FileChannel`, `ExecChannel` (`fd`),
`SocketChannel` and `Listener` (`sockets`), `MemoryChannel`, `MemoryReader`, `NullChannel` (`memory`),
and QEMU migration URIs via `open_channel(uri, mode)` / `listen(uri)` (`uri`).
Goals: QEMU's QIOChannel behaviour where QEMUFile can see it — writev writes everything or raises,
readinto returns 0 only at end of stream, channels are directional, errors name the URI.
Plan: one module per transport family; this package re-exports the public names.
"""

from __future__ import annotations

from .base import IOV_MAX, Channel, ReadChannel, WriteChannel, flat_bytes, nbytes, write_all
from .fd import ExecChannel, ExecReader, ExecWriter, FdChannel, FdReader, FdWriter, FileChannel, FileReader, FileWriter
from .memory import MemoryChannel, MemoryReader, NullChannel
from .sockets import Listener, SocketChannel, SocketReader, SocketWriter
from .uri import SCHEMES, listen, open_channel

__all__ = [
    "IOV_MAX", "Channel", "ReadChannel", "WriteChannel", "flat_bytes", "nbytes", "write_all",
    "ExecChannel", "ExecReader", "ExecWriter", "FdChannel", "FdReader", "FdWriter",
    "FileChannel", "FileReader", "FileWriter",
    "MemoryChannel", "MemoryReader", "NullChannel",
    "Listener", "SocketChannel", "SocketReader", "SocketWriter",
    "SCHEMES", "listen", "open_channel",
]
