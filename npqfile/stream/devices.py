"""The device state a ``-M none`` QEMU writes besides RAM: the ``timer`` and ``globalstate`` sections.

Supports: encoding both sections as QEMU 7.2 or QEMU 10.0 does and describing them in
the vmdesc, with the section ids each registers them under for ``-M none`` (7.2: timer
0, ram 2, globalstate 4; 10.0: timer 0, ram 1, globalstate 3; see
:mod:`npqfile.stream.versions`), so a stream of the same RAM comes out byte for byte as
that QEMU's.  ``machine_devices(version)`` / ``ram_entry(version)`` pick the layout;
the module-level ``RAM``, ``TIMER``, ``GLOBALSTATE`` and ``none_machine_devices()`` are
QEMU 7.2's.

Goals: with these two sections and a vmdesc, QEMU loads an npqfile stream without the
``Expected vmdescription section`` warning and ends in the run state the stream names.
The descriptions double as built-in knowledge: the loader uses them to size these two
sections when a stream arrives without its trailing vmdesc (e.g. from a pipe).

Plan: ``timer`` is vmstate_timers v2 (``int64 cpu_ticks_offset``, 8 unused bytes,
``int64 cpu_clock_offset``); ``globalstate`` is vmstate_globalstate v1 (``uint32 size``
= strlen + 1, then the run state name NUL-padded to 100 bytes; from QEMU 8.2 the same
104 bytes are ``runstate[32]``, ``bool has_vm_was_suspended`` (1), ``bool
vm_was_suspended`` and 66 unused bytes).
"""

from __future__ import annotations

import struct

from npqfile.stream.savevm import SaveStateEntry
from npqfile.stream.versions import QemuStreamVersion, stream_version

TIMER = SaveStateEntry("timer", 0, 2, 0)
RAM = SaveStateEntry("ram", 0, 4, 2)
GLOBALSTATE = SaveStateEntry("globalstate", 0, 1, 4)

GLOBALSTATE_RUNSTATE_SIZE = 100
# RunState names QEMU's globalstate post_load accepts (qapi RunState).
RUNSTATES = ("debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
             "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
             "guest-panicked", "colo")

TIMER_VMDESC = {
    "name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
    "fields": [
        {"name": "cpu_ticks_offset", "type": "int64", "size": 8},
        {"name": "unused", "type": "unused_buffer", "size": 8},
        {"name": "cpu_clock_offset", "type": "int64", "size": 8},
    ],
}
GLOBALSTATE_VMDESC = {
    "name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1,
    "fields": [
        {"name": "size", "type": "uint32", "size": 4},
        {"name": "runstate", "type": "buffer", "size": GLOBALSTATE_RUNSTATE_SIZE},
    ],
}
GLOBALSTATE_SUSPENDED_VMDESC = {
    "name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1,
    "fields": [
        {"name": "size", "type": "uint32", "size": 4},
        {"name": "runstate", "type": "buffer", "size": 32},
        {"name": "has_vm_was_suspended", "type": "uint8", "size": 1},
        {"name": "vm_was_suspended", "type": "uint8", "size": 1},
        {"name": "unused", "type": "buffer", "size": 66},
    ],
}
# (idstr, version) -> description, for streams that arrive without a vmdesc.
BUILTIN_VMDESC = {("timer", 2): TIMER_VMDESC, ("globalstate", 1): GLOBALSTATE_VMDESC}


def timer_state(cpu_ticks_offset: int = 0, cpu_clock_offset: int = 0) -> bytes:
    """The 24-byte ``timer`` payload (a never-started guest has both offsets 0)."""
    return struct.pack(">q8xq", cpu_ticks_offset, cpu_clock_offset)


def globalstate_state(runstate: str = "prelaunch") -> bytes:
    """The 104-byte ``globalstate`` payload. ValueError for a name QEMU would refuse."""
    if runstate not in RUNSTATES:
        raise ValueError(f"unknown run state {runstate!r} (one of {', '.join(RUNSTATES)})")
    name = runstate.encode()
    return struct.pack(">I", len(name) + 1) + name.ljust(GLOBALSTATE_RUNSTATE_SIZE, b"\0")


def globalstate_suspended_state(runstate: str = "prelaunch", vm_was_suspended: bool = False) -> bytes:
    """The 104-byte ``globalstate`` payload of QEMU 8.2+: runstate[32], has_vm_was_suspended,
    vm_was_suspended, 66 unused bytes.  ValueError for a name QEMU would refuse."""
    old = globalstate_state(runstate)
    return old[:36] + bytes([1, int(vm_was_suspended)]) + bytes(66)


def none_machine_devices(runstate: str = "prelaunch") -> list[tuple[SaveStateEntry, bytes, dict]]:
    """The FULL sections of a QEMU 7.2 ``-M none`` stream, in QEMU's order: ``(entry, payload, vmdesc)``."""
    return [(TIMER, timer_state(), TIMER_VMDESC),
            (GLOBALSTATE, globalstate_state(runstate), GLOBALSTATE_VMDESC)]


def ram_entry(version: QemuStreamVersion | str | None = None) -> SaveStateEntry:
    """The ``ram`` SaveStateEntry (idstr, instance 0, version 4) with ``version``'s section id."""
    v = stream_version(version)
    return SaveStateEntry("ram", 0, 4, v.ram_section_id)


def machine_devices(version: QemuStreamVersion | str | None = None,
                    runstate: str = "prelaunch") -> list[tuple[SaveStateEntry, bytes, dict]]:
    """The FULL sections of a ``-M none`` stream of QEMU ``version`` (default 7.2), in QEMU's
    order: ``(entry, payload, vmdesc)``.  ValueError for an unknown version or run state."""
    v = stream_version(version)
    timer = SaveStateEntry("timer", 0, 2, v.timer_section_id)
    gs = SaveStateEntry("globalstate", 0, 1, v.globalstate_section_id)
    if v.globalstate_suspended:
        return [(timer, timer_state(), TIMER_VMDESC),
                (gs, globalstate_suspended_state(runstate), GLOBALSTATE_SUSPENDED_VMDESC)]
    return [(timer, timer_state(), TIMER_VMDESC), (gs, globalstate_state(runstate), GLOBALSTATE_VMDESC)]
