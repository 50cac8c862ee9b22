"""Whole streams in one call: save a GuestRAM as a QEMU stream, load a stream file or URI.

Supports: :func:`save_snapshot` (header, configuration, the RAM section as START + one
PART + END, the ``timer`` and ``globalstate`` sections, EOF, vmdesc: the layout of a
``-M none`` QEMU 7.2 stream, or with ``qemu_version="10.0"`` QEMU 10.0's, byte for byte
for the same RAM; ``mapped_ram=True`` writes QEMU 10.0's mapped-ram file), :func:`load_file` (finds
the vmdesc at the end of the file first, so device sections can be stepped over) and
:func:`load_uri` (any readable migration URI: ``file:``, ``exec:``, ``tcp:``...).

Goals: the one-liners the CLI and the interop tests need, built only from the public
pieces (SaveVMWriter, RAMSaver, load_stream), so they double as the reference for how
the migration engine drives them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from npqfile.channels import open_channel
from npqfile.qemufile import READ_AHEAD, QEMUFile
from npqfile.ram import GuestRAM
from npqfile.stream.constants import QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START
from npqfile.stream.devices import machine_devices, ram_entry
from npqfile.stream.ram_saver import RAMSaver
from npqfile.stream.ram_stats import RAMStats
from npqfile.stream.savevm import SaveVMWriter
from npqfile.stream.versions import QemuStreamVersion, stream_version
from npqfile.stream.vmdesc import find_vmdesc

if TYPE_CHECKING:
    from npqfile.stream.loader import LoadResult

PASS_PAGES = 1 << 18   # page indices handed to save_pages per call (1 GiB of 4 KiB pages)


def save_snapshot(f: QEMUFile, ram: GuestRAM, *, machine: str = "none", send_configuration: bool = True,
                  send_section_footer: bool = True, send_vmdesc: bool = True, runstate: str = "prelaunch",
                  xbzrle_cache_size: int = 0, compress_level: int | None = None,
                  zero_page_detection: bool = True, release_ram: bool = False,
                  qemu_version: QemuStreamVersion | str | None = None, mapped_ram: bool = False,
                  progress: Callable[[int], None] | None = None, progress_every: int = 1 << 20) -> RAMStats:
    """Write all of ``ram`` as one complete migration stream to the writable QEMUFile ``f``.

    Returns the RAM statistics.  ``machine`` must be the destination's machine-type name
    (``none``; ``pc-i440fx-7.2`` for ``-M pc`` on 7.2).  ``runstate`` is what the
    ``globalstate`` section tells the destination to enter.  ``release_ram`` sends normal
    pages ``may_free`` (released once written).  ``progress(ram_bytes)`` is called after
    every ``progress_every`` bytes of a block's pages (whole pages, at least one) with the
    RAM bytes queued so far.  Flushes ``f`` at the end; raises the file's FileError if
    any write failed, ValueError for bad arguments.  ``qemu_version`` ("7.2" default,
    "10.0") picks the QEMU whose stream is written (ValueError for compressed pages to a
    QEMU that removed them); ``mapped_ram`` writes the mapped-ram layout (10.0 only; ``f``
    must be a seekable file; zero pages stay holes).
    """
    version = stream_version(qemu_version)
    if compress_level is not None:
        version.check_compress_pages()
    if mapped_ram:
        version.check_mapped_ram()
    w = SaveVMWriter(f, machine=machine, send_configuration=send_configuration,
                     send_section_footer=send_section_footer, send_vmdesc=send_vmdesc,
                     capabilities=("mapped-ram",) if mapped_ram else (), qemu_version=version)
    devices = machine_devices(version, runstate)
    RAM = ram_entry(version)
    saver = RAMSaver(f, ram, xbzrle_cache_size=xbzrle_cache_size, compress_level=compress_level,
                     zero_page_detection=zero_page_detection, release_ram=release_ram, mapped_ram=mapped_ram)
    w.write_header()
    with w.section(RAM, QEMU_VM_SECTION_START):
        saver.save_setup()
    sent = 0
    with w.section(RAM, QEMU_VM_SECTION_PART):
        for block in ram.blocks:
            step = PASS_PAGES if progress is None else max(1, min(PASS_PAGES, progress_every // block.page_size))
            for start in range(0, block.n_pages, step):
                end = min(start + step, block.n_pages)
                saver.save_pages(block, np.arange(start, end))
                sent += (end - start) * block.page_size
                if progress is not None:
                    progress(sent)
        saver.write_eos()
    w.switchover_start()
    with w.section(RAM, QEMU_VM_SECTION_END):
        saver.write_mapped_ram_bitmaps()
        saver.write_eos()
    for se, payload, _desc in devices:
        w.write_full_section(se, payload)
    w.write_eof()
    w.write_vmdesc([desc for _se, _payload, desc in devices], saver.page_size)
    f.fflush()
    if f.get_error():
        raise f.error
    return saver.stats


def _load(f: QEMUFile, **kwargs) -> LoadResult:
    from npqfile.stream.loader import load_stream   # here: `save` never pays for the loader
    try:
        return load_stream(f, **kwargs)
    finally:
        f.close()


def load_file(path: str | os.PathLike, ram: GuestRAM | None = None, **kwargs) -> LoadResult:
    """Load the stream file ``path`` (see :func:`~npqfile.stream.loader.load_stream` for
    ``ram`` and the keyword arguments).  The trailing vmdesc, if any, is located first.
    Returns the LoadResult; raises StreamError for a bad stream, OSError if unreadable.
    """
    if kwargs.get("vmdesc") is None:
        found = find_vmdesc(path)
        kwargs["vmdesc"], kwargs["vmdesc_offset"] = found if found else (None, None)
    f = QEMUFile(open_channel(f"file:{os.fspath(path)}", "r"), read_ahead=READ_AHEAD)
    return _load(f, ram=ram, **kwargs)


def load_uri(uri: str, ram: GuestRAM | None = None, **kwargs) -> LoadResult:
    """Load a stream from any readable migration URI (``file:`` URIs get the vmdesc lookup)."""
    if uri.startswith("file:"):
        return load_file(uri[5:], ram, **kwargs)
    f = QEMUFile(open_channel(uri, "r"), read_ahead=READ_AHEAD)
    return _load(f, ram=ram, **kwargs)

