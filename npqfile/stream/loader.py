"""The savevm container reader: a whole QEMU migration stream, section by section.

Supports: the header (magic, version 3; version 2 is refused as QEMU does), the
configuration section (machine name, then the ``target-page-bits``, ``capabilities``
and ``uuid`` subsections; ``mapped-ram`` there switches the RAM setup to QEMU 9.0+'s
file layout, read by ``mapped_ram.py``), START/PART/END/FULL sections with or without footers, every
``0x08`` command (parsed and reported; PACKAGED's embedded stream is parsed in place),
EOF and the trailing vmdesc.  RAM sections go to :class:`RAMLoader`; other sections are
stepped over with the vmdesc (given by the caller, found at the end of a file) or, for
``timer`` and ``globalstate``, with built-in descriptions.

Goals: QEMU's ``qemu_loadvm_state`` checks and messages (``Unknown savevm section type``,
``Missing section footer for``, ``Mismatched section id in footer``...), each a
StreamError with the byte offset and section; no other exception escapes on arbitrary
bytes.  A stream whose device section cannot be sized (no vmdesc, an unknown live
section) is read up to that section: an error by default, or with ``partial_ok`` a
result that says where and why it stopped.

Plan: :func:`load_stream` drives a :class:`StreamReader`; results accumulate in a
:class:`LoadResult` (sections, commands, RAM statistics, the GuestRAM loaded).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from npqfile.errors import StreamError
from npqfile.ram import GuestRAM
from npqfile.stream.constants import (
    MAX_VM_CMD_PACKAGED_SIZE, MIG_CMD_ARGS, MIG_CMD_PACKAGED, MIG_CMD_PING, MIG_CMD_POSTCOPY_ADVISE,
    MIG_CMD_POSTCOPY_RAM_DISCARD, MIG_CMD_RECV_BITMAP, QEMU_VM_COMMAND, QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION, QEMU_VM_FILE_VERSION_COMPAT,
    QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START, QEMU_VM_SUBSECTION, QEMU_VM_VMDESCRIPTION, RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION, SECTION_TYPE_NAMES,
)
from npqfile.channels import MemoryReader
from npqfile.qemufile import QEMUFile
from npqfile.stream.constants import MIG_CMD_POSTCOPY_RUN
from npqfile.stream.device_tail import read_device_tail
from npqfile.stream.devices import BUILTIN_VMDESC
from npqfile.stream.ram_hash import LoadHasher
from npqfile.stream.ram_loader import DEFAULT_MAX_RAM_BYTES, RAMLoader
from npqfile.stream.ram_stats import RAMStats
from npqfile.stream.reader import StreamReader, shown, wire_name
from npqfile.stream.return_path import DiscardError, parse_discard
from npqfile.stream.vmdesc import WalkBudget, check_page_size, device_index, parse_vmdesc, walk_vmsd

MAX_MACHINE_NAME = 4096          # configuration name length we accept (QEMU allocates whatever is sent)
MAX_VMDESC_BYTES = 64 << 20      # a vmdesc is tens of KiB; refuse to buffer gigabytes of "JSON"
MAX_PACKAGED_DEPTH = 2
# Sections and commands listed in a LoadResult; beyond that they are only counted, so
# memory follows the declared RAM, not the stream's length (millions of empty PARTs or
# PINGs are a few bytes each on the wire).
MAX_LISTED = 10000

# Whole streams compressed on the channel (npqfile migrate --compress zstd|lz4, or a
# user's pipeline) start with a frame magic instead of QEVM: say so.
_COMPRESSED_MAGIC = {
    0x28B52FFD: "; this is a zstd frame: decompress it first (zstd -dc FILE | npqfile analyze -), "
                "or give incoming --compress zstd",
    0x11223344: "; this is a multifd channel's greeting (QEMU's multifd capability): "
                "give incoming --multifd-channels N",
    0x04224D18: "; this is an lz4 frame: decompress it first (lz4 -dc FILE | npqfile analyze -), "
                "or give incoming --compress lz4",
}


@dataclass
class SectionInfo:
    """One section as it appeared on the wire."""
    type: str                      # start / part / end / full
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int                    # of the section type byte
    size: int = 0                  # payload bytes (header and footer excluded)
    footer: bool = False
    fields: dict | None = None     # decoded device state (decode_devices=True)


@dataclass
class LoadResult:
    """What :func:`load_stream` read. ``ram`` is the destination GuestRAM (None if no RAM section)."""
    ram: GuestRAM | None = None
    stats: RAMStats = field(default_factory=RAMStats)
    machine: str | None = None
    capabilities: list[str] = field(default_factory=list)
    target_page_bits: int | None = None
    sections: list[SectionInfo] = field(default_factory=list)
    commands: list[dict] = field(default_factory=list)
    vmdesc: dict | None = None
    complete: bool = False
    stopped: str | None = None     # why reading stopped early (partial_ok=True)
    warnings: list[str] = field(default_factory=list)
    end_offset: int = 0
    mapped_ram: list[dict] = field(default_factory=list)   # per block: header, pages present, holes
    sections_not_listed: int = 0   # sections read beyond the first MAX_LISTED (counted only)
    commands_not_listed: int = 0   # commands likewise

    @property
    def parts_not_listed(self) -> int:
        """RAM section payloads counted in ``stats`` but not listed in ``stats.parts``."""
        return self.stats.parts_not_listed


class _Loader:
    def __init__(self, f, ram, *, vmdesc, vmdesc_offset, max_ram_bytes, capabilities, decode_devices, partial_ok,
                 device_tail_bytes, max_ram_name, postcopy=None, machine=None, hasher=None):
        self.machine = machine
        self.r = StreamReader(f)
        self.res = LoadResult()
        self.devices = device_index(vmdesc)
        page_size = check_page_size(vmdesc, vmdesc_offset)
        self.ram = RAMLoader(ram, max_ram_bytes=max_ram_bytes, page_size=page_size, max_ram_name=max_ram_name,
                             hasher=hasher)
        self.walks = WalkBudget()
        self.res.stats = self.ram.stats
        self.ram.ignore_shared = "x-ignore-shared" in capabilities
        self.decode = decode_devices
        self.partial_ok = partial_ok
        self.open: dict[int, SectionInfo] = {}    # section id -> its START/FULL info
        self.device_tail_bytes = device_tail_bytes
        self.deferred = False                     # reading from a kept device tail
        self.footers_seen = False
        self.postcopy = postcopy                  # acts on commands (npqfile.migration.postcopy_ram)
        self.postcopy_run = False

    # -- top level ---------------------------------------------------------------------
    def run(self) -> LoadResult:
        r, res = self.r, self.res
        magic = r.be32("the file magic")
        if magic != QEMU_VM_FILE_MAGIC:
            hint = _COMPRESSED_MAGIC.get(magic, "")
            raise r.error(f"not a QEMU migration stream: magic {magic:#010x}, expected "
                          f"{QEMU_VM_FILE_MAGIC:#010x} (QEVM){hint}")
        r.begin()
        version = r.be32("the file version")
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise r.error("SaveVM v2 format is obsolete and don't work anymore")
        if version != QEMU_VM_FILE_VERSION:
            raise r.error(f"Unsupported migration stream version {version:#x}")
        if r.peek_u8() == QEMU_VM_CONFIGURATION:
            self._configuration()
        try:
            self._sections(depth=0)
        except _Stop as stop:
            res.stopped = str(stop.error)
            if not self.partial_ok:
                raise stop.error from None
            res.end_offset = self.r.offset
            return self._finish()
        res.complete = True
        self._vmdesc_after_eof()
        res.end_offset = self.r.offset
        return self._finish()

    def _finish(self) -> LoadResult:
        self.res.ram = self.ram.ram
        self.res.mapped_ram = self.ram.mapped_ram_blocks
        return self.res

    def _sections(self, depth: int) -> None:
        """qemu_loadvm_state_main: records until QEMU_VM_EOF."""
        while True:
            r = self.r      # a deferred device tail replaces the reader (see _defer_to_vmdesc)
            r.section = None
            at = r.begin()
            t = r.u8("a section type")
            if t == QEMU_VM_EOF:
                return
            if t in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
                self._section_start_full(t, at)
            elif t in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
                self._section_part_end(t, at)
            elif t == QEMU_VM_COMMAND:
                if self._command(at, depth) and depth:
                    return      # POSTCOPY_RUN ends the package (QEMU's LOADVM_QUIT)
            else:
                raise r.error(f"Unknown savevm section type {t}")

    # -- configuration ---------------------------------------------------------------------
    def _configuration(self) -> None:
        r, res = self.r, self.res
        r.section = "configuration"
        r.begin()
        r.u8("the configuration marker")
        r.begin()
        n = r.be32("the machine name length")
        if n > MAX_MACHINE_NAME:
            raise r.error(f"configuration machine name of {n} bytes (at most {MAX_MACHINE_NAME})")
        r.begin()
        res.machine = wire_name(r.read(n, "the machine name"))
        while r.peek_u8() == QEMU_VM_SUBSECTION:
            at = r.begin()
            r.u8("a subsection marker")
            name = r.name("a subsection name")
            r.begin()
            r.be32("a subsection version")
            r.begin()
            if name == "configuration/target-page-bits":
                res.target_page_bits = r.be32("target page bits")
            elif name == "configuration/capabilities":
                count = r.be32("the capability count")
                if count > 256:
                    raise r.error(f"configuration lists {count} capabilities (at most 256)")
                res.capabilities = [self._capability(r) for _ in range(count)]
                # QEMU 9.0+ file layout: each block's pages at fixed file offsets (mapped_ram.py)
                self.ram.mapped_ram = "mapped-ram" in res.capabilities
                self.ram.ignore_shared = self.ram.ignore_shared or "x-ignore-shared" in res.capabilities
            elif name == "configuration/uuid":
                r.skip(16, "the VM uuid")
            else:
                raise r.error(f"unknown configuration subsection '{shown(name)}'", at)
        if self.machine is not None and res.machine != self.machine:
            # configuration_post_load: QEMU refuses the stream here, before any RAM
            raise r.error(f"Machine type received is '{shown(res.machine)}' and local is '{self.machine}'")
        r.section = None

    @staticmethod
    def _capability(r: StreamReader) -> str:
        r.begin()
        return r.name("a capability name")

    # -- sections --------------------------------------------------------------------------
    def _section_start_full(self, t: int, at: int) -> None:
        r = self.r
        sid = r.be32("a section id")
        idstr = r.name("a section idstr")
        r.section = idstr
        instance = r.be32("an instance id")
        version = r.be32("a version id")
        info = SectionInfo(SECTION_TYPE_NAMES[t], sid, idstr, instance, version, at)
        if sid not in self.open and len(self.open) >= MAX_LISTED:
            raise r.error(f"more than {MAX_LISTED} distinct section ids", at)
        self.open[sid] = info
        self._payload(info)

    def _section_part_end(self, t: int, at: int) -> None:
        r = self.r
        sid = r.be32("a section id")
        start = self.open.get(sid)
        if start is None:
            raise r.error(f"Unknown section id {sid} in a {SECTION_TYPE_NAMES[t]} section (no START had it)")
        r.section = start.idstr
        info = SectionInfo(SECTION_TYPE_NAMES[t], sid, start.idstr, start.instance_id, start.version_id, at)
        self._payload(info)

    def _payload(self, info: SectionInfo) -> None:
        r = self.r
        begin = r.offset
        if info.idstr == RAM_SECTION_IDSTR and info.instance_id == 0:
            if info.version_id != RAM_SECTION_VERSION:
                raise r.error(f"ram: unsupported version {info.version_id} (only 4)")
            self.ram.load(r, info.type, info.section_id)
        elif info.type == "full":
            desc = self.devices.get((info.idstr, info.instance_id)) or BUILTIN_VMDESC.get((info.idstr, info.version_id))
            if desc is None and self.device_tail_bytes and not self.deferred and r.limit is None:
                try:
                    r = self._defer_to_vmdesc(info)
                except StreamError as exc:
                    raise _Stop(exc) from None   # as for a file without vmdesc: read up to here
                desc = self.devices.get((info.idstr, info.instance_id))
            if desc is None:
                raise _Stop(r.error(f"cannot size device section '{shown(info.idstr)}' (instance {info.instance_id}, "
                                    f"version {info.version_id}): device sections carry no length and "
                                    f"no vmdesc describes it", info.offset))
            values = walk_vmsd(r, desc, self.walks)
            info.fields = values if self.decode else None
        else:
            raise _Stop(r.error(f"cannot size live section '{shown(info.idstr)}' ({info.type}): only RAM "
                                f"iterative sections can be read", info.offset))
        info.size = r.offset - begin
        info.footer = self._footer(info)
        if len(self.res.sections) < MAX_LISTED:
            self.res.sections.append(info)
        else:
            self.res.sections_not_listed += 1

    def _defer_to_vmdesc(self, info: SectionInfo) -> StreamReader:
        """A device section nothing describes yet, on a stream that cannot be searched
        for its vmdesc first (a socket, a pipe): keep the rest of the stream in memory
        (bounded by ``device_tail_bytes``) until the vmdesc QEMU sends after EOF arrives,
        then read on from the kept bytes with it.  Returns the new reader; raises
        StreamError when no vmdesc comes within the bound."""
        r = self.r
        start = r.offset
        tail, doc, _ = read_device_tail(r.f, self.device_tail_bytes, start, r.section)
        self.devices = device_index(doc)
        self.deferred = True
        kept = StreamReader(QEMUFile(MemoryReader(tail)), offset=start)
        kept.section, kept.record = r.section, r.record
        self.r = kept
        return kept

    def _footer(self, info: SectionInfo) -> bool:
        """check_section_footer: ``0x7e`` + the same section id, once footers are in use."""
        r = self.r
        at = r.begin()
        if r.peek_u8() != QEMU_VM_SECTION_FOOTER:
            if self.footers_seen:
                raise r.error(f"Missing section footer for {shown(info.idstr)}")
            return False
        r.u8("a section footer")
        sid = r.be32("a footer section id")
        if sid != info.section_id:
            raise r.error(f"Mismatched section id in footer for {shown(info.idstr)}: read {sid:#x} expected {info.section_id:#x}", at)
        self.footers_seen = True
        return True

    # -- commands ----------------------------------------------------------------------------
    def _command(self, at: int, depth: int) -> bool:
        """One command; returns True for POSTCOPY_RUN (after which QEMU's loader quits the
        package it is in: a postcopy package holds LISTEN, devices, PING and RUN, no EOF)."""
        r = self.r
        cmd = r.be16("a command number")
        n = r.be16("a command length")
        name, want = MIG_CMD_ARGS.get(cmd, (None, None))
        if name is None:
            raise r.error(f"unknown migration command {cmd:#x} (length {n})")
        if want >= 0 and n != want:
            raise r.error(f"{name} received with bad length {n} (expected {want})")
        data = r.read(n, f"the {name} payload")
        entry: dict[str, Any] = {"cmd": name, "offset": at, "len": n}
        if cmd == MIG_CMD_PING:
            entry["value"] = struct.unpack(">I", data)[0]
        elif cmd == MIG_CMD_POSTCOPY_ADVISE:
            if n not in (0, 16):
                raise r.error(f"POSTCOPY_ADVISE received with bad length {n} (0 or 16)")
            if n == 16:
                summary, tps = struct.unpack(">QQ", data)
                entry.update(ram_pagesize_summary=summary, target_page_size=tps)
                self.ram.postcopy_pagesize_summary = summary
        elif cmd == MIG_CMD_POSTCOPY_RAM_DISCARD:
            entry.update(self._discard(data))
        elif cmd == MIG_CMD_RECV_BITMAP:
            if n < 1 or data[0] != n - 1:
                raise r.error(f"RECV_BITMAP payload of {n} bytes is not one counted string")
            entry["block"] = wire_name(data[1:])
        if len(self.res.commands) < MAX_LISTED:
            self.res.commands.append(entry)
        else:
            self.res.commands_not_listed += 1
        if self.postcopy is not None:
            self.postcopy.command(cmd, data, self)   # acts on it (return path, discard, listen, run)
        if cmd == MIG_CMD_PACKAGED:
            self._packaged(struct.unpack(">I", data)[0], depth)
        if cmd == MIG_CMD_POSTCOPY_RUN:
            self.postcopy_run = True
        return cmd == MIG_CMD_POSTCOPY_RUN

    def _discard(self, data: bytes) -> dict:
        """POSTCOPY_RAM_DISCARD (just read: ``data`` ends at the reader's offset), parsed by
        the one parser (return_path.parse_discard); errors name the stream byte."""
        r = self.r
        try:
            d = parse_discard(data)
        except DiscardError as exc:
            raise r.error(str(exc), r.offset - len(data) + exc.offset) from None
        return {"block": d.block, "ranges": len(d.ranges)}

    def _packaged(self, length: int, depth: int) -> None:
        """PACKAGED: the next ``length`` bytes are a stream of sections ending in EOF."""
        r = self.r
        if length > MAX_VM_CMD_PACKAGED_SIZE:
            raise r.error(f"Unreasonably large packaged state: {length}")
        if depth >= MAX_PACKAGED_DEPTH:
            raise r.error("PACKAGED command nested too deeply")
        outer, end = r.limit, r.offset + length
        r.limit = end if outer is None else min(end, outer)
        self._sections(depth + 1)
        if r.offset != end:
            raise r.error(f"packaged stream ended {end - r.offset} bytes before its declared end (offset {end})")
        r.limit = outer

    # -- after EOF ----------------------------------------------------------------------------
    def _vmdesc_after_eof(self) -> None:
        r, res = self.r, self.res
        r.section = None
        if self.postcopy_run:
            return      # QEMU sends no vmdesc in postcopy, and its source now waits for SHUT
        at = r.begin()
        t = r.peek_u8()
        if t is None:
            res.warnings.append("no vmdescription after EOF")
            return
        if t != QEMU_VM_VMDESCRIPTION:
            res.warnings.append(f"Expected vmdescription section, but got {t}")
            return
        r.u8("the vmdescription marker")
        n = r.be32("the vmdescription length")
        if n > MAX_VMDESC_BYTES:
            raise r.error(f"vmdescription of {n} bytes (at most {MAX_VMDESC_BYTES})", at)
        res.vmdesc = parse_vmdesc(r.read(n, "the vmdescription JSON"), at)


class _Stop(Exception):
    """Reading cannot go on past this section (it cannot be sized)."""

    def __init__(self, error: StreamError):
        super().__init__(str(error))
        self.error = error


def load_stream(f, ram: GuestRAM | None = None, *, vmdesc: dict | None = None, vmdesc_offset: int | None = None,
                max_ram_bytes: int = DEFAULT_MAX_RAM_BYTES, capabilities: tuple[str, ...] | list[str] = (),
                decode_devices: bool = False, partial_ok: bool = False, device_tail_bytes: int = 0,
                max_ram_name: str = "max_ram_bytes", on_multifd_flush=None, postcopy: Any = None,
                machine: str | None = None, hasher: LoadHasher | None = None) -> LoadResult:
    """Read a whole migration stream from the readable QEMUFile ``f``.

    ``ram``: the destination (each declared block must exist with the same size), or
    None to create one from the stream's declarations (at most ``max_ram_bytes``,
    lazily mapped; errors call that limit ``max_ram_name``).  ``vmdesc``: the stream's
    vmdesc JSON if known in advance (see :func:`~npqfile.stream.vmdesc.find_vmdesc`),
    used to step over device sections; ``vmdesc_offset``: where it was found (named in
    errors about it).  ``capabilities``: capabilities the source had on that the stream
    itself does not announce (e.g. ``x-ignore-shared`` for streams older than QEMU
    7.2's configuration capabilities).  ``device_tail_bytes``: when a device section is
    not described (no vmdesc given: a socket or pipe), keep up to this many bytes of
    the rest of the stream until the vmdesc after EOF arrives and step over the
    sections with it (0: stop there, as for a file whose vmdesc was not found).
    ``on_multifd_flush(offset, eos=False)``: called at each MULTIFD_FLUSH record and
    (``eos=True``) each RAM EOS (a multifd destination syncs its channels there).
    ``postcopy``: an object whose ``command(cmd, payload, loader)`` acts on each command
    as a destination must (``npqfile.migration.postcopy_ram.PostcopyIncoming``); None
    only reads them.  ``machine``: the destination's machine type (None: any); a
    configuration section naming another is a StreamError there, before any RAM, as
    QEMU's ``configuration_post_load`` fails.  ``hasher``: a
    :class:`~npqfile.stream.ram_hash.LoadHasher` hashing blocks as they load.  Returns a
    :class:`LoadResult`.  Raises StreamError for a malformed stream, or for a section
    that cannot be sized unless ``partial_ok``.
    """
    loader = _Loader(f, ram, vmdesc=vmdesc, vmdesc_offset=vmdesc_offset, max_ram_bytes=max_ram_bytes,
                     capabilities=tuple(capabilities), decode_devices=decode_devices, partial_ok=partial_ok,
                     device_tail_bytes=device_tail_bytes, max_ram_name=max_ram_name,
                     postcopy=postcopy, machine=machine, hasher=hasher)
    loader.ram.on_multifd_flush = on_multifd_flush
    try:
        return loader.run()
    finally:
        # An exception's frames keep the loader alive: its views of the destination
        # must go, or the caller could not close the RAM while handling the error.
        loader.ram.release_views()
