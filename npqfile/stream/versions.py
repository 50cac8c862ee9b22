"""Which QEMU a stream speaks: the wire differences between QEMU 7.2 and QEMU 10.0, in one place.

Supports: :data:`QEMU_STREAM_VERSIONS` (``"7.2"``, ``"10.0"``), :func:`stream_version`
(look one up by name, ValueError listing the known ones), :data:`DEFAULT_STREAM_VERSION`
and :func:`features_seen` (what a loaded stream shows of the newer protocol, for
``analyze --json``).

Goals: every writer (``save_snapshot``, the migration engine, ``npqfile save`` /
``migrate --qemu-version``) and every check "may I send this to that QEMU?" asks this
module instead of testing version numbers itself, so adding a QEMU version is one
table row.  The multifd channels and any other 8.x+ feature read their availability
from the same :class:`QemuStreamVersion` (``multifd``, ``multifd_flush``,
``zero_page_detection``, ``mapped_ram``, ``compress_pages``).

Plan: a frozen dataclass per version, holding facts measured against the real
binaries (a ``-M none`` stream of QEMU 7.2.x and 10.0.2 captured with ``exec:cat``):

* section ids: 7.2 registers ``timer`` 0, ``block`` 1 (block migration, removed in
  9.1), ``ram`` 2, ``globalstate`` 4; 10.0 has ``timer`` 0, ``ram`` 1, ``globalstate`` 3;
* 10.0 sends ``MIG_CMD_SWITCHOVER_START`` (0x08 cmd 11, no payload) just before the
  RAM END section (``send-switchover-start``, on for 10.0 machine types);
* 10.0's ``globalstate`` is ``size``, ``runstate[32]``, ``has_vm_was_suspended``,
  ``vm_was_suspended``, 66 unused bytes (the same 104 bytes as 7.2's ``runstate[100]``);
* 10.0's vmdesc opens with a ``configuration`` description (and its capabilities
  subsection when one is on);
* ``COMPRESS_PAGE`` (0x100) records were removed in 9.1; ``MULTIFD_FLUSH`` (0x200)
  exists from 8.1; mapped-ram and ``zero-page-detection`` from 9.0.

Why 7.2 is the default: QEMU 10.0 loads a 7.2-style stream (measured), but QEMU 7.2
refuses a 10.0-style one (it does not know command 11), so 7.2's layout is the one
stream both load.  ``--qemu-version 10.0`` asks for QEMU 10.0's bytes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QemuStreamVersion:
    """The wire facts of one QEMU version's migration stream (``name`` as "10.0")."""
    name: str
    ram_section_id: int
    timer_section_id: int
    globalstate_section_id: int
    switchover_start: bool          # MIG_CMD_SWITCHOVER_START before the RAM END section
    vmdesc_configuration: bool      # vmdesc opens with {"configuration": ...}
    globalstate_suspended: bool     # globalstate's runstate[32] + vm_was_suspended layout
    compress_pages: bool            # RAM_SAVE_FLAG_COMPRESS_PAGE exists (removed in 9.1)
    multifd: bool                   # multifd channels (MultiFDPacket_t v1 with zero_pages: 9.0+)
    multifd_flush: bool             # RAM_SAVE_FLAG_MULTIFD_FLUSH on the main channel (8.1+)
    zero_page_detection: bool       # the zero-page-detection parameter (9.0+)
    mapped_ram: bool                # the mapped-ram capability and file layout (9.0+)

    def check_compress_pages(self) -> None:
        """ValueError when this QEMU cannot load COMPRESS_PAGE records."""
        if not self.compress_pages:
            raise ValueError(f"QEMU {self.name} cannot load compressed pages: QEMU 9.1 removed "
                             f"RAM_SAVE_FLAG_COMPRESS_PAGE (0x100) and the compress capability; "
                             f"drop the page compression, or write for --qemu-version 7.2")

    def check_mapped_ram(self) -> None:
        """ValueError when this QEMU has no mapped-ram capability."""
        if not self.mapped_ram:
            raise ValueError(f"QEMU {self.name} has no mapped-ram capability (QEMU 9.0+); "
                             f"use --qemu-version 10.0")


QEMU_7_2 = QemuStreamVersion(
    name="7.2", ram_section_id=2, timer_section_id=0, globalstate_section_id=4,
    switchover_start=False, vmdesc_configuration=False, globalstate_suspended=False,
    compress_pages=True, multifd=False, multifd_flush=False, zero_page_detection=False, mapped_ram=False)

QEMU_10_0 = QemuStreamVersion(
    name="10.0", ram_section_id=1, timer_section_id=0, globalstate_section_id=3,
    switchover_start=True, vmdesc_configuration=True, globalstate_suspended=True,
    compress_pages=False, multifd=True, multifd_flush=True, zero_page_detection=True, mapped_ram=True)

QEMU_STREAM_VERSIONS: dict[str, QemuStreamVersion] = {v.name: v for v in (QEMU_7_2, QEMU_10_0)}
DEFAULT_STREAM_VERSION = QEMU_7_2


def stream_version(name: str | QemuStreamVersion | None) -> QemuStreamVersion:
    """The version called ``name`` ("7.2", "10.0"; None: the default).  A
    QemuStreamVersion is returned as is.  ValueError naming the known versions."""
    if name is None:
        return DEFAULT_STREAM_VERSION
    if isinstance(name, QemuStreamVersion):
        return name
    try:
        return QEMU_STREAM_VERSIONS[name]
    except KeyError:
        raise ValueError(f"unknown QEMU stream version {name!r} (one of: "
                         f"{', '.join(QEMU_STREAM_VERSIONS)})") from None


def features_seen(result) -> dict:
    """What a loaded stream (a LoadResult) shows of the protocol after QEMU 7.2, as a
    JSON-ready dict: ``multifd-flush`` (count of RAM_SAVE_FLAG_MULTIFD_FLUSH),
    ``mapped-ram``, ``capabilities`` (the configuration's), ``switchover-start``,
    ``vmdesc-configuration``, ``compressed-pages``, ``ram-section-id`` and ``layout``: the
    version whose section ids and device layout the stream matches (None if neither).
    Never raises."""
    vmdesc = result.vmdesc or {}
    ram_ids = {s.section_id for s in result.sections if s.idstr == "ram" and s.instance_id == 0}
    switchover = any(c.get("cmd") == "SWITCHOVER_START" for c in result.commands)
    layout = None
    for v in QEMU_STREAM_VERSIONS.values():
        if ram_ids == {v.ram_section_id} and switchover == v.switchover_start:
            layout = v.name
    return {
        "multifd-flush": result.stats.multifd_flushes,
        "mapped-ram": "mapped-ram" in result.capabilities,
        "capabilities": list(result.capabilities),
        "switchover-start": switchover,
        "vmdesc-configuration": isinstance(vmdesc, dict) and "configuration" in vmdesc,
        "compressed-pages": result.stats.compressed_pages,
        "ram-section-id": min(ram_ids) if ram_ids else None,
        "layout": layout,
    }
