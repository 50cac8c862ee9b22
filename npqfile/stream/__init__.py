"""QEMU's migration stream on top of a QEMUFile: the savevm container, RAM section v4, XBZRLE, vmdesc.

Supports: writing (``SaveVMWriter``, ``RAMSaver``, ``save_snapshot``) and reading
(``load_stream``, ``load_file``, ``load_uri``, ``RAMLoader``) streams that QEMU 7.2 and
later write and load; the ``timer`` / ``globalstate`` device state of a ``-M none``
machine; the vmdesc JSON; QEMU 10.0's stream and mapped-ram files (``versions``,
``mapped_ram``).  Plan: one concept per module, re-exported here (lazily).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Re-exported lazily (PEP 562): `npqfile save` needs the writer, not the loader, and the
# loader's import alone costs ~10 ms inside the command's time.
_EXPORTS = {
    "LoadResult": "loader", "SectionInfo": "loader", "load_stream": "loader",
    "DEFAULT_MAX_RAM_BYTES": "ram_loader", "RAMLoader": "ram_loader", "RAMSaver": "ram_saver",
    "RAMStats": "ram_stats", "SaveStateEntry": "savevm", "SaveVMWriter": "savevm",
    "load_file": "snapshot", "load_uri": "snapshot", "save_snapshot": "snapshot",
    "QEMU_STREAM_VERSIONS": "versions", "QemuStreamVersion": "versions", "stream_version": "versions",
    "find_vmdesc": "vmdesc",
}

if TYPE_CHECKING:
    from npqfile.stream.loader import LoadResult, SectionInfo, load_stream
    from npqfile.stream.ram_loader import DEFAULT_MAX_RAM_BYTES, RAMLoader
    from npqfile.stream.ram_saver import RAMSaver
    from npqfile.stream.ram_stats import RAMStats
    from npqfile.stream.savevm import SaveStateEntry, SaveVMWriter
    from npqfile.stream.snapshot import load_file, load_uri, save_snapshot
    from npqfile.stream.versions import QEMU_STREAM_VERSIONS, QemuStreamVersion, stream_version
    from npqfile.stream.vmdesc import find_vmdesc


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'npqfile.stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"npqfile.stream.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "LoadResult", "SectionInfo", "load_stream", "DEFAULT_MAX_RAM_BYTES", "RAMLoader", "RAMSaver",
    "RAMStats", "SaveStateEntry", "SaveVMWriter", "load_file", "load_uri", "save_snapshot", "find_vmdesc",
    "QEMU_STREAM_VERSIONS", "QemuStreamVersion", "stream_version",
]
