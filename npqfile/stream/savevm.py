"""The savevm container writer: QEMU's ``QEVM`` file around the sections.

Supports: the file header (magic, version 3), the configuration section (machine name
and, when capabilities that change the wire format are on, the
``configuration/capabilities`` subsection as QEMU 7.2+ writes it), section headers for
START/PART/END/FULL, footers (``0x7e`` + section id), commands (``0x08``), EOF and the
trailing vmdesc.  The ``send_configuration`` / ``send_section_footer`` / ``send_vmdesc``
switches match QEMU's ``migration.send-configuration`` / ``send-section-footer``
globals and the machine's ``suppress_vmdesc``.  ``qemu_version`` (see
:mod:`npqfile.stream.versions`) adds what newer QEMUs write: the configuration's
description at the head of the vmdesc and ``MIG_CMD_SWITCHOVER_START``
(:meth:`SaveVMWriter.switchover_start`).

Goals: the migration engine opens and closes sections itself (a START section for the
RAM setup, PART sections per iteration, the END section at completion), so this module
only writes framing and knows nothing of RAM.  Bytes match QEMU's (``savevm.c``:
``save_section_header``, ``save_section_footer``, ``qemu_savevm_command_send``,
``qemu_savevm_state_header``).

Plan: :class:`SaveStateEntry` is QEMU's per-handler registration (idstr, instance id,
version, section id); :class:`SaveVMWriter` writes through the QEMUFile's public put
API; ``section(se, type)`` is a context manager writing header then footer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from npqfile.stream.constants import (
    MIG_CMD_ARGS, MIG_CMD_SWITCHOVER_START, QEMU_VM_COMMAND, QEMU_VM_CONFIGURATION, QEMU_VM_EOF, QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START, QEMU_VM_SUBSECTION, QEMU_VM_VMDESCRIPTION,
    TARGET_PAGE_SIZE,
)
from npqfile.stream.versions import QemuStreamVersion, stream_version
from npqfile.stream.vmdesc import encode_vmdesc

# Capabilities QEMU lists in configuration/capabilities ("validatable"): they change
# the stream layout, so the destination must agree on them.
VALIDATED_CAPABILITIES = ("x-ignore-shared", "mapped-ram")


@dataclass(frozen=True)
class SaveStateEntry:
    """One registered state handler: QEMU's ``SaveStateEntry`` as far as the wire sees it."""
    idstr: str
    instance_id: int
    version_id: int
    section_id: int


def _check_cstr(text: bytes, what: str) -> bytes:
    if not 0 < len(text) <= 255:
        raise ValueError(f"{what} must be 1..255 bytes, got {len(text)}: {text[:40]!r}")
    return text


class SaveVMWriter:
    """Writes the container of a migration stream to the writable QEMUFile ``f``.

    ``machine`` is the machine-type name the destination checks (``none``,
    ``pc-i440fx-7.2``...); ``capabilities`` the validated capabilities that are on.
    Methods return nothing; I/O errors stay sticky in ``f`` (check ``f.get_error()``).
    """

    def __init__(self, f, *, machine: str = "none", send_configuration: bool = True,
                 send_section_footer: bool = True, send_vmdesc: bool = True,
                 capabilities: Iterable[str] = (), qemu_version: QemuStreamVersion | str | None = None):
        self.f = f
        self.version = stream_version(qemu_version)
        self.machine = machine.encode()
        self.send_configuration = send_configuration
        self.send_section_footer = send_section_footer
        self.send_vmdesc = send_vmdesc
        wanted = set(capabilities)
        # QEMU lists them in MigrationCapability order
        self.capabilities = [c for c in VALIDATED_CAPABILITIES if c in wanted]
        for cap in self.capabilities:
            _check_cstr(cap.encode(), "capability name")

    def write_header(self) -> None:
        """``QEVM``, version 3, then the configuration section unless switched off."""
        f = self.f
        f.put_be32(QEMU_VM_FILE_MAGIC)
        f.put_be32(QEMU_VM_FILE_VERSION)
        if not self.send_configuration:
            return
        f.put_byte(QEMU_VM_CONFIGURATION)
        f.put_be32(len(self.machine))
        f.put_buffer(self.machine)
        if self.capabilities:
            # vmstate_capabilites: subsection "configuration/capabilities" v1,
            # be32 count, then one counted string per capability.
            f.put_byte(QEMU_VM_SUBSECTION)
            f.put_counted_string(b"configuration/capabilities")
            f.put_be32(1)
            f.put_be32(len(self.capabilities))
            for cap in self.capabilities:
                f.put_counted_string(cap.encode())

    def section_header(self, se: SaveStateEntry, section_type: int) -> None:
        """Write a section header: START/FULL carry idstr, instance and version; PART/END only the id."""
        f = self.f
        f.put_byte(section_type)
        f.put_be32(se.section_id)
        if section_type in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            f.put_counted_string(_check_cstr(se.idstr.encode(), "section idstr"))
            f.put_be32(se.instance_id)
            f.put_be32(se.version_id)
        elif section_type not in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            raise ValueError(f"not a section type: {section_type:#x}")

    def section_footer(self, se: SaveStateEntry) -> None:
        """``0x7e`` + be32 section id, if footers are on."""
        if self.send_section_footer:
            self.f.put_byte(QEMU_VM_SECTION_FOOTER)
            self.f.put_be32(se.section_id)

    @contextlib.contextmanager
    def section(self, se: SaveStateEntry, section_type: int) -> Iterator[None]:
        """``with w.section(se, QEMU_VM_SECTION_PART): ...payload...`` writes header and footer."""
        self.section_header(se, section_type)
        yield
        self.section_footer(se)

    def write_full_section(self, se: SaveStateEntry, payload: bytes) -> None:
        """A FULL section whose payload is already encoded (device state)."""
        with self.section(se, QEMU_VM_SECTION_FULL):
            self.f.put_buffer(payload)

    def write_command(self, cmd: int, payload: bytes = b"") -> None:
        """``0x08``, be16 cmd, be16 len, payload. ValueError if QEMU would reject the length."""
        name, want = MIG_CMD_ARGS.get(cmd, (None, None))
        if name is None:
            raise ValueError(f"unknown migration command {cmd}")
        if want >= 0 and len(payload) != want:
            raise ValueError(f"{name} takes {want} bytes, got {len(payload)}")
        if len(payload) > 0xFFFF:
            raise ValueError(f"{name} payload too long ({len(payload)} bytes)")
        f = self.f
        f.put_byte(QEMU_VM_COMMAND)
        f.put_be16(cmd)
        f.put_be16(len(payload))
        if payload:
            f.put_buffer(payload)

    def switchover_start(self) -> None:
        """``MIG_CMD_SWITCHOVER_START`` when this QEMU version sends it (10.0: just before
        the RAM END section); nothing for 7.2, which does not know the command."""
        if self.version.switchover_start:
            self.write_command(MIG_CMD_SWITCHOVER_START)

    def configuration_vmdesc(self) -> dict | None:
        """The ``configuration`` entry newer QEMUs put first in the vmdesc (None when this
        version does not, or no configuration section is sent).  An array of capabilities
        is described by its first element plus ``array_len``, as vmstate.c does."""
        if not (self.version.vmdesc_configuration and self.send_configuration):
            return None
        desc: dict = {"vmsd_name": "configuration", "version": 1,
                      "fields": [{"name": "len", "type": "uint32", "size": 4},
                                 {"name": "name", "type": "buffer", "size": len(self.machine)}]}
        if self.capabilities:
            caps: dict = {"name": "capabilities"}
            if len(self.capabilities) > 1:
                caps["array_len"] = len(self.capabilities)
            caps.update(type="capability", size=len(self.capabilities[0]) + 1)
            desc["subsections"] = [{"vmsd_name": "configuration/capabilities", "version": 1,
                                    "fields": [{"name": "caps_count", "type": "uint32", "size": 4}, caps]}]
        return desc

    def write_eof(self) -> None:
        self.f.put_byte(QEMU_VM_EOF)

    def write_vmdesc(self, devices: list[dict], page_size: int = TARGET_PAGE_SIZE) -> None:
        """``0x06`` + be32 length + JSON, unless vmdesc is suppressed."""
        if not self.send_vmdesc:
            return
        data = encode_vmdesc(devices, page_size, self.configuration_vmdesc())
        self.f.put_byte(QEMU_VM_VMDESCRIPTION)
        self.f.put_be32(len(data))
        self.f.put_buffer(data)
