"""``npqfile save BLOCK=RAWFILE ... --machine none -o STREAM``: raw RAM images in, a QEMU stream out.

Supports: one raw image per RAM block (the inverse of ``npqfile analyze --extract``),
the destination's machine name, QEMU's ``send-configuration`` / ``send-section-footer``
switches, an optional vmdesc, the run state the destination enters, zero-page detection,
XBZRLE-free legacy compression (QEMU 7.2 only), the QEMU whose stream is written
(``--qemu-version 7.2|10.0``, see ``npqfile.stream.versions``), QEMU 10.0's mapped-ram
file layout (``--mapped-ram``: a regular file only; zero pages stay holes, and the
summary gives the file's size on disk beside its length).  The output is a path, ``-`` (standard output, never a
terminal; the summary then goes to standard error) or a migration URI (``exec:``,
``tcp:``...).

Goals: a stream that ``qemu-system-x86_64 -M MACHINE -incoming`` with the same blocks
loads.  Images are mapped privately (``image:`` backing: the user's files are
never written, and never copied), and an output that is one of the images is refused.
"""

from __future__ import annotations

import argparse
import os
import sys

from npqfile.channels import open_channel
from npqfile.migration.options import migrate_caps_check, migration_channels_and_transport_compatible
from npqfile.qemufile import QEMUFile
from npqfile.ram import GuestRAM, RAMBlock
from npqfile.stream.devices import RUNSTATES
from npqfile.stream.snapshot import save_snapshot
from npqfile.stream.versions import DEFAULT_STREAM_VERSION, QEMU_STREAM_VERSIONS, stream_version
from npqfile.units import format_bytes

NAME = "save"
HELP = "write raw RAM images (BLOCK=FILE) as a QEMU migration stream"
ORDER = 31
URI_SCHEMES = ("file:", "exec:", "tcp:", "unix:", "fd:", "null:")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("blocks", nargs="+", metavar="BLOCK=RAWFILE", help="RAM block idstr and its raw image")
    p.add_argument("-o", "--output", required=True, metavar="STREAM", help="output file, - for standard output, or migration URI")
    p.add_argument("--machine", default="none", help="destination machine-type name (default: none)")
    p.add_argument("--no-configuration", action="store_true", help="as -global migration.send-configuration=off")
    p.add_argument("--no-section-footer", action="store_true", help="as -global migration.send-section-footer=off")
    p.add_argument("--no-vmdesc", action="store_true", help="omit the trailing vmdesc JSON")
    p.add_argument("--runstate", default="prelaunch", choices=RUNSTATES, help="run state the destination enters")
    p.add_argument("--no-zero-detection", action="store_true", help="send zero pages as normal pages")
    p.add_argument("--compress-level", type=int, metavar="N",
                   help="send pages as legacy COMPRESS_PAGE (zlib N; QEMU 7.2 only, 9.1 removed them)")
    p.add_argument("--qemu-version", choices=list(QEMU_STREAM_VERSIONS),
                   help=f"write the stream this QEMU writes (default {DEFAULT_STREAM_VERSION.name}: "
                        f"the layout both 7.2 and 10.0 load)")
    p.add_argument("--mapped-ram", action="store_true",
                   help="QEMU 9.0+ mapped-ram file layout (implies --qemu-version 10.0 unless given; "
                        "the destination needs the mapped-ram capability and file:)")
    p.add_argument("--zero-copy-send", action=argparse.BooleanOptionalAction, default=None,
                   help="into a pipe, hand RAM pages to the kernel by reference (vmsplice) instead "
                        "of copying them: the same bytes and writes.  Default: on for exec: (npqfile "
                        "waits for the command, so the pages are read before it returns), off for "
                        "fd: and -.  QEMU's capability of that name does this for multifd sockets only")


def _open_block(name: str, path: str) -> RAMBlock:
    """A RAM block that maps the image privately and read-only at the file level
    (``image:`` backing): no copy is made, and nothing npqfile does can change the file."""
    size = os.path.getsize(path)
    if size == 0 or size % 4096:
        raise ValueError(f"image {path!r} for block {name!r} is {size} bytes, not a positive multiple of 4096")
    return RAMBlock(name, size, backing=f"image:{path}")


def _check_output(out: str, images: dict[str, str]) -> None:
    """Refuse an output file that is one of the input images: writing it would
    truncate the image before it is read."""
    if not os.path.exists(out):
        return
    for name, path in images.items():
        if os.path.samefile(out, path):
            raise ValueError(f"output {out!r} is the image of block {name!r}; choose another file")


def _output_uri(out: str) -> str:
    """The migration URI for ``-o OUT``: ``-`` is a duplicate of standard output (``fd:N``,
    so closing the stream leaves fd 1 open), a URI stays, anything else is a file.
    ValueError when ``-`` is a terminal: a binary stream there helps nobody."""
    if out == "-":
        if os.isatty(sys.stdout.fileno()):
            raise ValueError("refusing to write a binary migration stream to a terminal "
                             "(-o -): redirect standard output or name a file")
        sys.stdout.flush()
        return f"fd:{os.dup(sys.stdout.fileno())}"
    return out if out.startswith(URI_SCHEMES) else f"file:{out}"


def zero_copy_default(uri: str, asked: bool | None) -> bool:
    """``--zero-copy-send`` / ``--no-zero-copy-send`` as given, else on for an ``exec:``
    sink only: its pages are read by the command npqfile waits for before returning,
    while a pipe behind ``fd:`` or ``-`` may still hold them after npqfile has exited
    (a page is read when the pipe's reader reads it)."""
    return uri.startswith("exec:") if asked is None else asked


def _version(args: argparse.Namespace):
    """The QEMU stream version asked for; --mapped-ram alone means 10.0.  ValueError for
    combinations that QEMU cannot load, before anything is read or written."""
    name = args.qemu_version
    if name is None:
        name = "10.0" if args.mapped_ram else DEFAULT_STREAM_VERSION.name
    version = stream_version(name)
    migrate_caps_check(compress=args.compress_level is not None, mapped_ram=args.mapped_ram, version=version,
                       prefix="--")
    if args.mapped_ram:
        out = args.output
        uri = out if out == "-" or out.startswith(URI_SCHEMES) else f"file:{out}"
        migration_channels_and_transport_compatible(uri, mapped_ram=True, prefix="--", where="-o")
    return version


def run(args: argparse.Namespace) -> int:
    version = _version(args)
    ram = GuestRAM()
    try:
        images: dict[str, str] = {}
        for spec in args.blocks:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"expected BLOCK=RAWFILE, got {spec!r}")
            if name in images:
                # QEMU's RAM block ids are unique: a second one would be a second block
                # the destination cannot tell apart (it would load both into one)
                raise ValueError(f"block {name!r} is given twice ({name}={images[name]} and {spec}): "
                                 f"each RAM block name may appear once")
            images[name] = path
        out = args.output
        if out.startswith("file:") or not out.startswith(URI_SCHEMES) and out != "-":
            _check_output(out.removeprefix("file:"), images)
        for name, path in images.items():
            ram.add(_open_block(name, path))
        uri = _output_uri(out)
        with QEMUFile(open_channel(uri, "w"), zero_copy_send=zero_copy_default(uri, args.zero_copy_send)) as f:
            stats = save_snapshot(f, ram, machine=args.machine, send_configuration=not args.no_configuration,
                                  send_section_footer=not args.no_section_footer, send_vmdesc=not args.no_vmdesc,
                                  runstate=args.runstate, compress_level=args.compress_level,
                                  zero_page_detection=not args.no_zero_detection,
                                  qemu_version=version, mapped_ram=args.mapped_ram)
            if f.close() < 0 and f.error:
                raise f.error
        disk = ""
        if args.mapped_ram:
            st = os.stat(out.removeprefix("file:"))
            disk = f"; mapped-ram file of {st.st_size} bytes, {st.st_blocks * 512} on disk (zero pages are holes)"
        print(f"wrote {'standard output' if out == '-' else out}: {len(ram)} block(s), "
              f"{format_bytes(ram.total_size)} of RAM for QEMU {version.name}; pages normal {stats.normal_pages}, "
              f"zero {stats.zero_pages}, compressed {stats.compressed_pages}{disk}",
              file=sys.stderr if out == "-" else sys.stdout)
    finally:
        ram.close()
    return 0
