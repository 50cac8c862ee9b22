"""Postcopy's messages, as bytes: the return path (destination -> source) and the
postcopy commands of the main stream (source -> destination).  Pure: no I/O.

Supports, under QEMU's names (``migration/migration.c``: ``enum mig_rp_message_type``,
``rp_cmd_args``, ``migrate_send_rp_*``; ``migration/savevm.c``:
``qemu_savevm_send_postcopy_advise``, ``qemu_savevm_send_postcopy_ram_discard``):

- return-path messages: be16 type, be16 length, payload.  ``SHUT`` (be32 error flag),
  ``PONG`` (be32 ping value), ``REQ_PAGES_ID`` (be64 start, be32 length, u8 name length,
  block name: the first request for a block), ``REQ_PAGES`` (be64 start, be32 length:
  same block as the previous request), ``RECV_BITMAP``, ``RESUME_ACK``, ``SWITCHOVER_ACK``
  (recognised and refused: npqfile does not do postcopy recovery or switchover-ack).
  :class:`ReturnPathParser` takes bytes as they arrive and returns whole messages; every
  malformed message is a :class:`StreamError` with QEMU's wording and the byte offset on
  the return path (``Received invalid message 0x4e50 length 0x5156``...).
- postcopy commands: ``POSTCOPY_ADVISE`` (be64 ram_pagesize_summary, be64 target page
  size), ``POSTCOPY_RAM_DISCARD`` (u8 version 0, u8 name length, name, NUL, then at most
  12 pairs of be64 start, be64 length in bytes a message: :func:`discard_payloads`
  splits longer lists as ``postcopy_discard_send_range`` does), ``PING`` values.

Goals: one place where these bytes are made and checked, so that both sides (and the
hostile-input tests) share them.  Plan: small functions returning ``bytes``; the parser
keeps a bytearray and an offset, nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from npqfile.errors import StreamError
from npqfile.stream.reader import wire_name

# enum mig_rp_message_type
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
RP_MAX_LEN = 512                 # source_return_path_thread's buffer: a longer message is refused
MAX_DISCARDS_PER_COMMAND = 12    # savevm.c: ranges in one POSTCOPY_RAM_DISCARD
POSTCOPY_DISCARD_VERSION = 0

# PING values.  QEMU pings 1 after OPEN_RETURN_PATH, 2 before the package, 3 inside it
# (debugging aids: the destination only answers PONG).  An npqfile source pings this
# value instead of 1, so that an npqfile destination knows that the source reads
# npqfile's verification message after SHUT; a QEMU destination just answers PONG.
PING_OPEN_RETURN_PATH = 1
PING_BEFORE_PACKAGE = 2
PING_IN_PACKAGE = 3
PING_NPQFILE_SOURCE = 0x4E505146     # "NPQF"


@dataclass(frozen=True)
class RPMessage:
    """One return-path message.  ``value``: SHUT's error flag or PONG's value;
    ``block``: REQ_PAGES_ID's block name (None for REQ_PAGES); ``start``/``length``:
    the requested byte range; ``offset``: where the message began on the return path."""
    type: int
    name: str
    offset: int
    value: int | None = None
    block: str | None = None
    start: int = 0
    length: int = 0


# -- return path: encoders ---------------------------------------------------------------
def _rp(msg_type: int, payload: bytes) -> bytes:
    return struct.pack(">HH", msg_type, len(payload)) + payload


def rp_shut(error: bool) -> bytes:
    """migrate_send_rp_shut: be32 1 when the destination failed, 0 when it loaded everything."""
    return _rp(MIG_RP_MSG_SHUT, struct.pack(">I", 1 if error else 0))


def rp_pong(value: int) -> bytes:
    """migrate_send_rp_pong: the PING's value, echoed."""
    return _rp(MIG_RP_MSG_PONG, struct.pack(">I", value & 0xFFFFFFFF))


def rp_req_pages(start: int, length: int, block: str | None) -> bytes:
    """migrate_send_rp_req_pages: REQ_PAGES_ID naming ``block``, or REQ_PAGES (``block`` None:
    the block of the previous request).  ValueError for a name QEMU cannot carry."""
    head = struct.pack(">QI", start, length)
    if block is None:
        return _rp(MIG_RP_MSG_REQ_PAGES, head)
    name = block.encode()
    if not 0 < len(name) <= 255:
        raise ValueError(f"block name of {len(name)} bytes cannot be sent in REQ_PAGES_ID")
    return _rp(MIG_RP_MSG_REQ_PAGES_ID, head + bytes([len(name)]) + name)


# -- return path: parser ------------------------------------------------------------------
class ReturnPathParser:
    """Feed bytes with :meth:`feed`; returns the whole messages they complete.

    Checks as ``source_return_path_thread`` does: the type must be a known one, the
    length the one ``rp_cmd_args`` fixes (or within 512 bytes), REQ_PAGES_ID's name
    length must match.  RECV_BITMAP, RESUME_ACK and SWITCHOVER_ACK are refused (postcopy
    recovery and switchover-ack are not implemented).  Raises StreamError naming the
    message and its offset on the return path; the parser is then unusable."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.offset = 0          # return-path offset of _buf[0]
        self.messages = 0

    def feed(self, data: bytes) -> list[RPMessage]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            msg_type, n = struct.unpack_from(">HH", self._buf)
            at = self.offset
            name, want = RP_CMD_ARGS.get(msg_type, (None, None))
            if name is None:
                raise StreamError(f"return path: Received invalid message {msg_type:#06x} length {n:#06x}", at, None)
            if n > RP_MAX_LEN:
                raise StreamError(f"return path: Received '{name}' message ({msg_type:#06x}) with bad length {n}",
                                  at, None)
            if want >= 0 and n != want:
                raise StreamError(f"return path: Received '{name}' message ({msg_type:#06x}) with incorrect length "
                                  f"{n} expecting {want}", at, None)
            if len(self._buf) < 4 + n:
                break
            payload = bytes(self._buf[4:4 + n])
            del self._buf[:4 + n]
            self.offset += 4 + n
            self.messages += 1
            out.append(self._decode(msg_type, name, payload, at))
        return out

    @staticmethod
    def _decode(msg_type: int, name: str, p: bytes, at: int) -> RPMessage:
        if msg_type in (MIG_RP_MSG_SHUT, MIG_RP_MSG_PONG):
            return RPMessage(msg_type, name, at, value=struct.unpack(">I", p)[0])
        if msg_type == MIG_RP_MSG_REQ_PAGES:
            start, length = struct.unpack(">QI", p)
            return RPMessage(msg_type, name, at, start=start, length=length)
        if msg_type == MIG_RP_MSG_REQ_PAGES_ID:
            expected = 13 + (p[12] if len(p) >= 13 else 0)
            if len(p) != expected:
                raise StreamError(f"return path: Req_Page_id with length {len(p)} expecting {expected}", at, None)
            start, length = struct.unpack_from(">QI", p)
            block = wire_name(p[13:])
            return RPMessage(msg_type, name, at, block=block, start=start, length=length)
        raise StreamError(f"return path: {name} received, but postcopy recovery and switchover-ack "
                          f"are not supported", at, None)


# -- main stream: postcopy command payloads ------------------------------------------------
def advise_payload(pagesize_summary: int, target_page_size: int) -> bytes:
    """qemu_savevm_send_postcopy_advise with postcopy-ram on: be64 summary, be64 target page size."""
    return struct.pack(">QQ", pagesize_summary, target_page_size)


def discard_payloads(block: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """POSTCOPY_RAM_DISCARD payloads for ``ranges`` of (start, length) bytes in ``block``,
    at most MAX_DISCARDS_PER_COMMAND ranges each.  ValueError for a bad block name."""
    name = block.encode()
    if not 0 < len(name) <= 255:
        raise ValueError(f"block name of {len(name)} bytes cannot be sent in POSTCOPY_RAM_DISCARD")
    head = bytes([POSTCOPY_DISCARD_VERSION, len(name)]) + name + b"\0"
    out = []
    for i in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
        chunk = ranges[i:i + MAX_DISCARDS_PER_COMMAND]
        out.append(head + b"".join(struct.pack(">QQ", int(s), int(n)) for s, n in chunk))
    return out


def parse_discard(data: bytes) -> tuple[str, list[tuple[int, int]]]:
    """loadvm_postcopy_ram_handle_discard's parsing: returns (block name, [(start, length)]).
    Raises ValueError with QEMU's reason for a malformed payload."""
    if len(data) < 3:
        raise ValueError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({len(data)})")
    if data[0] != POSTCOPY_DISCARD_VERSION:
        raise ValueError(f"CMD_POSTCOPY_RAM_DISCARD invalid version ({data[0]})")
    nlen = data[1]
    if len(data) < 3 + nlen or data[2 + nlen] != 0:
        raise ValueError("CMD_POSTCOPY_RAM_DISCARD missing nil")
    rest = data[3 + nlen:]
    if len(rest) % 16:
        raise ValueError(f"CMD_POSTCOPY_RAM_DISCARD invalid length remaining {len(rest)}")
    return wire_name(data[2:2 + nlen]), [struct.unpack_from(">QQ", rest, i) for i in range(0, len(rest), 16)]
