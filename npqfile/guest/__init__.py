"""dirtyguest: a bare x86 guest for real QEMU that dirties RAM like npqfile's workloads.

Supports: ``IMAGE`` (the shipped multiboot ELF, built from ``src/`` by ``build``),
``guest_parameters`` / ``GuestParams`` (the parameter block passed as its multiboot
module), ``read_status`` / ``GuestStatus`` (its counters, read from guest RAM), and
``build_image`` (rebuild with gcc).  Run it with ``qemu-system-x86_64 -M pc -kernel IMAGE
-initrd PARAMS.bin`` (TCG is enough); ``npqfile.migration.qemu_engine`` does.

Goals: the real-QEMU engine migrates a guest whose writes follow the same models as the
simulator's, and measures the rate it achieved rather than assuming it.
Plan: one concept per module: ``params`` (both shared blocks), ``build`` (the compiler).
"""

from __future__ import annotations

from npqfile.guest.build import IMAGE, GuestBuildError, build_image
from npqfile.guest.params import (
    STATUS_ADDR,
    GuestParams,
    GuestStatus,
    guest_parameters,
    read_status,
    region_pages,
)

__all__ = ["IMAGE", "STATUS_ADDR", "GuestBuildError", "GuestParams", "GuestStatus", "build_image",
           "guest_parameters", "read_status", "region_pages"]
