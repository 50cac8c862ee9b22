"""``npqfile analyze STREAM``: what a migration stream holds (the peer of QEMU's analyze-migration.py).

Supports: a text report (header, configuration, sections with offsets and sizes,
commands, RAM blocks, page counts per kind and per part), ``--json`` (the same, plus
each block's ``sha256``), ``--fields`` (decoded device state, in either form),
``--extract DIR`` (one sparse file per RAM block, named safely).  Reads what
analyze-migration.py rejects: XBZRLE and compressed pages, postcopy commands,
x-ignore-shared, streams without footers, configuration or (up to the first unsizable
section) vmdesc, and QEMU 9.0+ mapped-ram files (with or without multifd: the same
bytes; a regular file only, as pages sit at fixed offsets), whose per-block headers,
pages present and holes are reported, with the file's size on disk.  ``--json``'s
``qemu-features`` says which post-7.2 features the stream shows
(``npqfile.stream.versions.features_seen``).  The input is a file (its vmdesc, at the very end, is found first), or
a pipe, FIFO or ``-`` (standard input), read as a stream like ``incoming`` reads a
socket: nothing is spooled; device sections after the RAM are kept in memory (bounded)
until the vmdesc that follows EOF sizes them.  A closed standard output (``analyze X |
head``) ends the report quietly, as for any Unix filter.

Goals: a bad stream gives exit status 1 and ``error: REASON at offset N (section S)``
on stderr; a stream cut short by a section that cannot be sized prints what was read,
then that error line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import stat
import sys

import numpy as np

from npqfile.channels import FdChannel
from npqfile.qemufile import READ_AHEAD, QEMUFile
from npqfile.ram import residency
from npqfile.ram.bufferiszero import buffer_is_zero
from npqfile.ram.runs import mask_runs
from npqfile.stream.device_tail import DEFAULT_DEVICE_TAIL_BYTES
from npqfile.stream.loader import LoadResult, load_stream
from npqfile.stream.ram_loader import DEFAULT_MAX_RAM_BYTES
from npqfile.stream.reader import shown
from npqfile.stream.snapshot import load_file
from npqfile.stream.versions import features_seen
from npqfile.units import format_bytes, parse_size

NAME = "analyze"
HELP = "show the sections and RAM of a migration stream (like QEMU's analyze-migration.py)"
ORDER = 30
EXTRACT_CHUNK_PAGES = 4096
HASH_FREE_BYTES = 1 << 30          # block bytes hashed whatever the stream's size
HASH_BYTES_PER_STREAM_BYTE = 512   # more than a 4 KiB page per 9-byte ZERO record
FIELD_TEXT_CHARS = 100          # a decoded field's value in the text report
# The capabilities a reader must be told about: every other one announces itself in the stream.
READER_CAPABILITIES = ("x-ignore-shared",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stream", help="stream file (as written by migrate exec:cat > FILE or npqfile), "
                                  "a FIFO, or - for standard input")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--fields", action="store_true", help="decode device sections' fields via the vmdesc")
    p.add_argument("--extract", metavar="DIR", help="write each RAM block to DIR/<safe name>")
    p.add_argument("--capability", action="append", default=[], choices=READER_CAPABILITIES, metavar="CAP",
                   help="x-ignore-shared: the source had it on but the stream does not say so (streams "
                        "older than QEMU 7.2); the only capability that changes how a stream is read")
    p.add_argument("--max-ram", default=str(DEFAULT_MAX_RAM_BYTES), metavar="SIZE",
                   help="refuse streams declaring more RAM than this (virtual; default 64G)")


def safe_name(name: str) -> str:
    """A block idstr as one file name: ``/rom@etc/acpi/tables`` -> ``rom@etc_acpi_tables``."""
    safe = re.sub(r"[^A-Za-z0-9._@+-]", "_", name.strip("/")).lstrip(".")
    return safe or "block"


def check_extract_dir(directory: str) -> None:
    """Refuse an ``--extract`` target that exists and is not a directory (``/dev/full``)
    before any work, with a message naming it (makedirs would say "File exists")."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(errno.ENOTDIR, f"--extract {directory}: exists and is not a directory")


def _open_extract_file(path: str) -> int:
    """Open ``path`` for a block image without following a symbolic link planted there
    and without blocking on a FIFO; anything but a regular file is refused.  Returns
    the fd; OSError naming the path otherwise."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"--extract: {path} is a symbolic link; refusing to write through it") from None
        if exc.errno == errno.ENXIO:   # a FIFO nobody reads
            raise OSError(errno.ENXIO, f"--extract: {path} is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"--extract: {path} is not a regular file")
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _written_pages(block, start: int, count: int) -> np.ndarray | None:
    """A bool per page ``start .. start+count-1`` of a private block the loader created:
    does it hold memory of its own (pagemap present and exclusive, or swapped out)?  A page no record
    wrote reads as zeros (at most the shared zero page is mapped).  None when it cannot
    be told (not private, no pagemap): then every page is scanned."""
    if block.kind != "private":
        return None
    ps = block.page_size
    try:
        pm = residency.read_pagemap(block.address + start * ps, count * ps)
    except OSError:
        return None
    mask = residency.PM_PRESENT | residency.PM_EXCLUSIVE
    own = ((pm & mask) == mask) | ((pm & residency.PM_SWAPPED) != 0)   # swapped out: written too
    return residency.per_target_page(own, ps, count)


def extract(result: LoadResult, directory: str) -> list[str]:
    """Write each RAM block to ``directory`` as a sparse file; returns the paths. OSError on
    failure (a non-directory target, a symbolic link or non-regular file in the way)."""
    check_extract_dir(directory)
    os.makedirs(directory, exist_ok=True)
    paths, used = [], set()
    for block in result.ram.blocks if result.ram else []:
        name = safe_name(block.name)
        while name in used:
            name += "_"
        used.add(name)
        path = os.path.join(directory, name)
        fd = _open_extract_file(path)
        try:
            ps = block.page_size
            for start in range(0, block.n_pages, EXTRACT_CHUNK_PAGES):
                pages = block.pages[start:start + EXTRACT_CHUNK_PAGES]
                written = _written_pages(block, start, len(pages))
                if written is not None and not written.any():
                    continue   # memory the stream never wrote: zeros, a hole, nothing to scan
                nonzero = ~buffer_is_zero(pages)
                if written is not None:
                    nonzero &= written
                # runs of non-zero pages are written; zero pages stay holes
                for a, b in mask_runs(nonzero).tolist():
                    os.pwrite(fd, pages[a:b], (start + a) * ps)
            os.ftruncate(fd, block.size)
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def load_input(path: str, **kwargs) -> tuple[LoadResult, int]:
    """Load the analyze input ``path`` (keyword arguments as for ``load_stream``).

    A regular file (or block device) is read in place, its trailing vmdesc found first.
    ``-`` (standard input), a FIFO, a pipe or a character device is read as a stream:
    the magic is checked first, as for any stream, and device sections after the RAM
    are kept (at most DEFAULT_DEVICE_TAIL_BYTES) until the vmdesc after EOF sizes them;
    nothing is copied to disk.  Returns ``(result, size in bytes)`` (for a stream, the
    bytes read).  Raises OSError naming ``path`` when it cannot be opened or is a
    directory, StreamError for a malformed stream.
    """
    if path == "-":
        src = os.dup(sys.stdin.fileno())
    else:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    shown_path = "standard input" if path == "-" else path
    try:
        mode = os.fstat(src).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, f"{shown_path} is a directory, not a migration stream")
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            size = os.lseek(src, 0, os.SEEK_END)
            return load_file(path if path != "-" else f"/proc/self/fd/{src}", **kwargs), size
        f = QEMUFile(FdChannel(os.dup(src), "r"), read_ahead=READ_AHEAD)
        try:
            result = load_stream(f, device_tail_bytes=DEFAULT_DEVICE_TAIL_BYTES, **kwargs)
            return result, f.tell()
        finally:
            f.close()
    finally:
        os.close(src)


def block_digests(result: LoadResult, size: int) -> dict[str, str | None]:
    """sha256 of each block, as long as the bytes hashed stay within HASH_FREE_BYTES plus
    HASH_BYTES_PER_STREAM_BYTE per byte of the ``size``-byte stream; None for the blocks
    past that budget (a note in ``result.warnings`` says why).  A real stream carries at
    least a 9-byte ZERO record per 4 KiB page it sends, so only memory the stream never
    wrote (blocks declared but not sent: a few hundred bytes declaring tens of GiB) is
    left unhashed, instead of spinning for minutes over zeros.  Never raises."""
    budget = HASH_FREE_BYTES + HASH_BYTES_PER_STREAM_BYTE * size
    out: dict[str, str | None] = {}
    for b in result.ram.blocks if result.ram else []:
        if b.size <= budget:
            budget -= b.size
            out[b.name] = b.sha256()
        else:
            out[b.name] = None
            result.warnings.append(
                f"block '{shown(b.name)}' ({format_bytes(b.size)}) not hashed: a {size}-byte stream cannot have "
                f"written that much; hashing memory the stream never wrote is bounded (at most "
                f"{format_bytes(HASH_FREE_BYTES)} plus {HASH_BYTES_PER_STREAM_BYTE} bytes per stream byte)")
    return out


def to_json(result: LoadResult, path: str, size: int) -> dict:
    """The report as a JSON-ready dict (``path`` as the user named it, ``size`` in bytes),
    lowercase-hyphenated names (``section-id``, ``target-page-bits``) and QEMU's page
    counter names in ``ram.stats``; npqfile/schemas/analyze.json describes it."""
    ram = result.ram
    digests = block_digests(result, size)
    return {
        "stream": path,
        "size": size,
        "complete": result.complete,
        "stopped": result.stopped,
        "machine": result.machine,
        "capabilities": result.capabilities,
        "target-page-bits": result.target_page_bits,
        "sections": [{k.replace("_", "-"): v for k, v in vars(s).items() if k != "fields" or v is not None}
                     for s in result.sections],
        "commands": [{k.replace("_", "-"): v for k, v in c.items()} for c in result.commands],
        "ram": {
            "blocks": [{"name": b.name, "size": b.size, "sha256": digests[b.name]}
                       for b in (ram.blocks if ram else [])],
            "stats": result.stats.as_dict(),
        },
        "vmdesc": result.vmdesc is not None,
        "warnings": result.warnings,
        "qemu-features": features_seen(result),
        "mapped-ram": _mapped_ram_report(result, path),
        # sections, commands and RAM parts counted but not listed (the lists stop at
        # npqfile.stream.loader.MAX_LISTED entries, so memory follows the declared RAM)
        "not-listed": {"sections": result.sections_not_listed, "commands": result.commands_not_listed,
                       "parts": result.parts_not_listed},
    }


def _mapped_ram_report(result: LoadResult, path: str) -> dict | None:
    """Per-block mapped-ram headers and the file's size on disk (holes are zero pages)."""
    if not result.mapped_ram:
        return None
    try:
        st = os.stat(path)
        on_disk = st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else None
    except OSError:
        on_disk = None
    return {"blocks": result.mapped_ram, "on-disk-bytes": on_disk}


def _print_fields(values: dict, indent: str, out) -> None:
    """Decoded device fields, one per line; subsections nest.  Names and values come
    from the stream and its vmdesc, already printable; long values are cut."""
    for name, value in values.items():
        if isinstance(value, dict):
            print(f"{indent}{name}:", file=out)
            _print_fields(value, indent + "  ", out)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            print(f"{indent}{name} = {shown(text, FIELD_TEXT_CHARS)}", file=out)


def _print_text(result: LoadResult, path: str, size: int, out) -> None:
    st = result.stats
    digests = block_digests(result, size)
    print(f"stream   {path} ({size} bytes)", file=out)
    print(f"machine  {result.machine if result.machine is not None else '(no configuration section)'}", file=out)
    if result.capabilities:
        print(f"caps     {', '.join(result.capabilities)}", file=out)
    for c in result.commands:
        extra = ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("cmd", "offset", "len"))
        print(f"command  {c['cmd']:<20} at {c['offset']:>10}  len {c['len']}{'  ' + extra if extra else ''}", file=out)
    print(f"{'offset':>10}  {'type':<5} {'id':>4}  {'idstr':<28} {'inst':>4} {'ver':>3} {'bytes':>12}  footer", file=out)
    for s in result.sections:
        print(f"{s.offset:>10}  {s.type:<5} {s.section_id:>4}  {s.idstr:<28} {s.instance_id:>4} "
              f"{s.version_id:>3} {s.size:>12}  {'yes' if s.footer else 'no'}", file=out)
        if s.fields is not None:
            _print_fields(s.fields, " " * 14, out)
    if result.ram:
        print("RAM blocks:", file=out)
        for b in result.ram.blocks:
            digest = digests[b.name] or "(not hashed, see note)"
            print(f"  {b.name:<28} {b.size:>12} ({format_bytes(b.size)})  sha256 {digest}", file=out)
    print(f"pages    normal {st.normal_pages}, zero {st.zero_pages}, xbzrle {st.xbzrle_pages}, "
          f"compressed {st.compressed_pages} (total {st.pages}; {st.pages_bytes} bytes of RAM section "
          f"payload, setup and EOS records included)", file=out)
    for i, p in enumerate(st.parts):
        print(f"  part {i:<4} {p['type']:<5} at {p['offset']:>10}: normal {p['normal']}, zero {p['zero']}, "
              f"xbzrle {p['xbzrle']}, compressed {p['compressed']} ({p['bytes']} bytes)", file=out)
    for m in result.mapped_ram:
        print(f"mapped-ram {shown(m['name'])}: header at {m['header-offset']}, bitmap at {m['bitmap-offset']}, "
              f"pages at {m['pages-offset']}: {m['pages-present']} pages present, {m['holes']} holes", file=out)
    report = _mapped_ram_report(result, path)
    if report and report["on-disk-bytes"] is not None:
        print(f"mapped-ram file {size} bytes, {report['on-disk-bytes']} on disk", file=out)
    print(f"vmdesc   {'yes' if result.vmdesc is not None else 'no'}", file=out)
    if result.sections_not_listed or result.commands_not_listed or result.parts_not_listed:
        print(f"note     not listed: {result.sections_not_listed} sections, {result.commands_not_listed} "
              f"commands, {result.parts_not_listed} RAM parts (counted above)", file=out)
    for w in result.warnings:
        print(f"note     {w}", file=out)


def _stdout_closed() -> None:
    """The reader of standard output went away (``| head``): send the rest of the
    report nowhere, so neither this run nor the interpreter's exit flush complains."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run(args: argparse.Namespace) -> int:
    max_ram = parse_size(args.max_ram)
    if args.extract:
        check_extract_dir(args.extract)
    result, size = load_input(args.stream, max_ram_bytes=max_ram, max_ram_name="--max-ram",
                              capabilities=args.capability, decode_devices=args.fields, partial_ok=True)
    try:
        try:
            if args.json:
                json.dump(to_json(result, args.stream, size), sys.stdout, indent=2)
                print()
            else:
                _print_text(result, args.stream, size, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_closed()
        if args.extract:
            for p in extract(result, args.extract):
                print(f"wrote {p}", file=sys.stderr)
    finally:
        if result.ram is not None:
            result.ram.close()
    if not result.complete:
        print(f"error: {result.stopped}", file=sys.stderr)
        return 1
    return 0
