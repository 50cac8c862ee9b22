"""The numbers of QEMU's migration stream, under QEMU's names.

Supports: the savevm container (``migration/savevm.c``: file magic and version, section
types, the footer byte, the ``0x08`` commands with their fixed lengths; the return
path's ``MIG_RP_MSG_*`` messages, ``migration/migration.c``) and the RAM
section v4 (``migration/ram.c``: ``RAM_SAVE_FLAG_*``, XBZRLE's encoding byte, the
compressed-page bound).  Goal: one place to look a byte up; no logic lives here.
"""

from __future__ import annotations

# --- container (savevm.c) -------------------------------------------------------------
QEMU_VM_FILE_MAGIC = 0x5145564D          # "QEVM"
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002  # "SaveVM v2 format is obsolete"
QEMU_VM_FILE_VERSION = 0x00000003

QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

SECTION_TYPE_NAMES = {
    QEMU_VM_SECTION_START: "start",
    QEMU_VM_SECTION_PART: "part",
    QEMU_VM_SECTION_END: "end",
    QEMU_VM_SECTION_FULL: "full",
}

# enum qemu_vm_cmd, with the payload length QEMU's loader demands (-1: variable).
MIG_CMD_OPEN_RETURN_PATH = 1
MIG_CMD_PING = 2
MIG_CMD_POSTCOPY_ADVISE = 3
MIG_CMD_POSTCOPY_LISTEN = 4
MIG_CMD_POSTCOPY_RUN = 5
MIG_CMD_POSTCOPY_RAM_DISCARD = 6
MIG_CMD_PACKAGED = 7
MIG_CMD_ENABLE_COLO = 8
MIG_CMD_POSTCOPY_RESUME = 9
MIG_CMD_RECV_BITMAP = 10
MIG_CMD_SWITCHOVER_START = 11

MIG_CMD_ARGS: dict[int, tuple[str, int]] = {
    MIG_CMD_OPEN_RETURN_PATH: ("OPEN_RETURN_PATH", 0),
    MIG_CMD_PING: ("PING", 4),
    MIG_CMD_POSTCOPY_ADVISE: ("POSTCOPY_ADVISE", -1),   # 0 or 16
    MIG_CMD_POSTCOPY_LISTEN: ("POSTCOPY_LISTEN", 0),
    MIG_CMD_POSTCOPY_RUN: ("POSTCOPY_RUN", 0),
    MIG_CMD_POSTCOPY_RAM_DISCARD: ("POSTCOPY_RAM_DISCARD", -1),
    MIG_CMD_PACKAGED: ("PACKAGED", 4),
    MIG_CMD_ENABLE_COLO: ("ENABLE_COLO", 0),
    MIG_CMD_POSTCOPY_RESUME: ("POSTCOPY_RESUME", 0),
    MIG_CMD_RECV_BITMAP: ("RECV_BITMAP", -1),
    MIG_CMD_SWITCHOVER_START: ("SWITCHOVER_START", 0),
}
MAX_VM_CMD_PACKAGED_SIZE = 1 << 24        # savevm.c: a bigger PACKAGED blob is rejected
MAX_DISCARDS_PER_COMMAND = 12             # savevm.c: ranges in one POSTCOPY_RAM_DISCARD
POSTCOPY_DISCARD_VERSION = 0

# --- return path (migration.c): enum mig_rp_message_type ------------------------------
MIG_RP_MSG_INVALID = 0
MIG_RP_MSG_SHUT = 1
MIG_RP_MSG_PONG = 2
MIG_RP_MSG_REQ_PAGES_ID = 3
MIG_RP_MSG_REQ_PAGES = 4
MIG_RP_MSG_RECV_BITMAP = 5
MIG_RP_MSG_RESUME_ACK = 6
MIG_RP_MSG_SWITCHOVER_ACK = 7
MIG_RP_MSG_MAX = 8

# rp_cmd_args: name and payload length (-1: variable)
RP_CMD_ARGS: dict[int, tuple[str, int]] = {
    MIG_RP_MSG_SHUT: ("SHUT", 4),
    MIG_RP_MSG_PONG: ("PONG", 4),
    MIG_RP_MSG_REQ_PAGES_ID: ("REQ_PAGES_ID", -1),
    MIG_RP_MSG_REQ_PAGES: ("REQ_PAGES", 12),
    MIG_RP_MSG_RECV_BITMAP: ("RECV_BITMAP", -1),
    MIG_RP_MSG_RESUME_ACK: ("RESUME_ACK", 4),
    MIG_RP_MSG_SWITCHOVER_ACK: ("SWITCHOVER_ACK", 0),
}
RP_MAX_LEN = 512                          # source_return_path_thread's buffer: a longer message is refused

# --- RAM section (ram.c) --------------------------------------------------------------
RAM_SECTION_IDSTR = "ram"
RAM_SECTION_VERSION = 4
TARGET_PAGE_SIZE = 4096                   # x86; the flags live in the low bits of a page offset

RAM_SAVE_FLAG_FULL = 0x01                 # obsolete since 2009; an unknown flag to any loader
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80                 # RDMA only
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100       # QEMU <= 9.0
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200       # QEMU >= 8.1

ENCODING_FLAG_XBZRLE = 0x01


def compress_bound(size: int) -> int:
    """zlib's ``compressBound(size)``: the largest deflate output QEMU accepts for a page."""
    return size + (size >> 12) + (size >> 14) + (size >> 25) + 13
