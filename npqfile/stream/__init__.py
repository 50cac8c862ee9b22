"""QEMU's migration stream on top of a QEMUFile: the savevm container, RAM section v4, XBZRLE, vmdesc.

Supports: writing (``SaveVMWriter``, ``RAMSaver``, ``save_snapshot``) and reading
(``load_stream``, ``load_file``, ``load_uri``, ``RAMLoader``) streams that QEMU 7.2 and
later write and load; the ``timer`` / ``globalstate`` device state of a ``-M none``
machine; the vmdesc JSON; QEMU 10.0's stream and mapped-ram files (``versions``,
``mapped_ram``).  Plan: one concept per module, re-exported here (lazily).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from npqfile.lazy import lazy_exports

if TYPE_CHECKING:
    from npqfile.stream.loader import LoadResult, SectionInfo, load_stream
    from npqfile.stream.ram_loader import DEFAULT_MAX_RAM_BYTES, RAMLoader
    from npqfile.stream.ram_saver import RAMSaver
    from npqfile.stream.ram_stats import RAMStats
    from npqfile.stream.savevm import SaveStateEntry, SaveVMWriter
    from npqfile.stream.snapshot import load_file, load_uri, save_snapshot
    from npqfile.stream.versions import QEMU_STREAM_VERSIONS, QemuStreamVersion, stream_version
    from npqfile.stream.vmdesc import find_vmdesc

# `npqfile save` needs the writer, not the loader (whose import alone is ~10 ms of its time)
__getattr__ = lazy_exports(__name__, {
    "LoadResult": "loader", "SectionInfo": "loader", "load_stream": "loader",
    "DEFAULT_MAX_RAM_BYTES": "ram_loader", "RAMLoader": "ram_loader", "RAMSaver": "ram_saver",
    "RAMStats": "ram_stats", "SaveStateEntry": "savevm", "SaveVMWriter": "savevm",
    "load_file": "snapshot", "load_uri": "snapshot", "save_snapshot": "snapshot",
    "QEMU_STREAM_VERSIONS": "versions", "QemuStreamVersion": "versions", "stream_version": "versions",
    "find_vmdesc": "vmdesc",
})

__all__ = [
    "LoadResult", "SectionInfo", "load_stream", "DEFAULT_MAX_RAM_BYTES", "RAMLoader", "RAMSaver",
    "RAMStats", "SaveStateEntry", "SaveVMWriter", "load_file", "load_uri", "save_snapshot", "find_vmdesc",
    "QEMU_STREAM_VERSIONS", "QemuStreamVersion", "stream_version",
]
