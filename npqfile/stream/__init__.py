"""QEMU's migration stream on top of a QEMUFile: the savevm container, RAM section v4, XBZRLE, vmdesc.

Supports: writing (``SaveVMWriter``, ``RAMSaver``, ``save_snapshot``) and reading
(``load_stream``, ``load_file``, ``load_uri``, ``RAMLoader``) streams that QEMU 7.2 and
later write and load; the ``timer`` / ``globalstate`` device state of a ``-M none``
machine; the vmdesc JSON; QEMU 10.0's stream and mapped-ram files (``versions``,
``mapped_ram``).  Plan: one concept per module, re-exported here.
"""

from __future__ import annotations

from npqfile.stream.loader import LoadResult, SectionInfo, load_stream
from npqfile.stream.ram_loader import DEFAULT_MAX_RAM_BYTES, RAMLoader
from npqfile.stream.ram_saver import RAMSaver
from npqfile.stream.ram_stats import RAMStats
from npqfile.stream.savevm import SaveStateEntry, SaveVMWriter
from npqfile.stream.snapshot import load_file, load_uri, save_snapshot
from npqfile.stream.versions import QEMU_STREAM_VERSIONS, QemuStreamVersion, stream_version
from npqfile.stream.vmdesc import find_vmdesc

__all__ = [
    "LoadResult", "SectionInfo", "load_stream", "DEFAULT_MAX_RAM_BYTES", "RAMLoader", "RAMSaver",
    "RAMStats", "SaveStateEntry", "SaveVMWriter", "load_file", "load_uri", "save_snapshot", "find_vmdesc",
    "QEMU_STREAM_VERSIONS", "QemuStreamVersion", "stream_version",
]
