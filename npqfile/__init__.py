"""npqfile: QEMU's migration stream (QEMUFile) in Python over numpy views of mmap'd RAM.

The package is layered like QEMU's migration code:

- ``npqfile.qemufile``: the stream itself (buffering, iovecs, sticky errors, release-ram);
- ``npqfile.channels``: the transports under it (fd, file, socket, exec, memory, null);
- ``npqfile.ram``: guest RAM blocks, dirty bitmaps, release and residency;
- ``npqfile.stream``: QEMU's savevm container, RAM section and XBZRLE on top of a QEMUFile;
- ``npqfile.migration``: the pre-copy engine, workloads and statistics;
- ``npqfile.cli``: the ``npqfile`` command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from npqfile.errors import FileError, StreamError
from npqfile.lazy import lazy_exports

if TYPE_CHECKING:
    from npqfile.qemufile import QEMUFile

# QEMUFile (and numpy with it) on first use: the command line sets up the process first
__getattr__ = lazy_exports(__name__, {"QEMUFile": "qemufile"})

__all__ = ["QEMUFile", "FileError", "StreamError"]
__version__ = "0.1.0"
