"""The device state a ``-M none`` QEMU writes besides RAM: the ``timer`` and ``globalstate`` sections.

Supports: encoding both sections as QEMU 7.2 does and describing them in the vmdesc,
with the section ids QEMU 7.2 registers them under for ``-M none`` (timer 0, ram 2,
globalstate 4), so a stream of the same RAM comes out byte for byte as QEMU's.

Goals: with these two sections and a vmdesc, QEMU loads an npqfile stream without the
``Expected vmdescription section`` warning and ends in the run state the stream names.
The descriptions double as built-in knowledge: the loader uses them to size these two
sections when a stream arrives without its trailing vmdesc (e.g. from a pipe).

Plan: ``timer`` is vmstate_timers v2 (``int64 cpu_ticks_offset``, 8 unused bytes,
``int64 cpu_clock_offset``); ``globalstate`` is vmstate_globalstate v1 (``uint32 size``
= strlen + 1, then the run state name NUL-padded to 100 bytes).
"""

from __future__ import annotations

import struct

from npqfile.stream.savevm import SaveStateEntry

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


def none_machine_devices(runstate: str = "prelaunch") -> list[tuple[SaveStateEntry, bytes, dict]]:
    """The FULL sections of a ``-M none`` stream, in QEMU's order: ``(entry, payload, vmdesc)``."""
    return [(TIMER, timer_state(), TIMER_VMDESC),
            (GLOBALSTATE, globalstate_state(runstate), GLOBALSTATE_VMDESC)]
