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
  splits longer lists as ``postcopy_discard_send_range`` does; :func:`parse_discard` is
  the one parser of it, for the savevm loader and the postcopy destination alike, with
  :meth:`Discard.check` for ``ram_discard_range``'s bounds: errors are
  :class:`DiscardError` naming the payload byte), ``PING`` values.  The numbers
  (``MIG_RP_MSG_*``, ``RP_CMD_ARGS``...) live in ``npqfile.stream.constants`` beside the
  ``MIG_CMD_*`` ones and are re-exported here.

Goals: one place where these bytes are made and checked, so that both sides (and the
hostile-input tests) share them.  Plan: small functions returning ``bytes``; the
return-path parser keeps a bytearray and an offset, nothing else; a discard payload's
ranges are read and checked as one numpy array (a 64 KiB payload holds 4,000 ranges).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from npqfile.errors import StreamError
# The numbers live with the other MIG_* constants; re-exported here for this module's users.
from npqfile.stream.constants import (  # noqa: F401
    MAX_DISCARDS_PER_COMMAND, MIG_RP_MSG_INVALID, MIG_RP_MSG_MAX, MIG_RP_MSG_PONG, MIG_RP_MSG_RECV_BITMAP,
    MIG_RP_MSG_REQ_PAGES, MIG_RP_MSG_REQ_PAGES_ID, MIG_RP_MSG_RESUME_ACK, MIG_RP_MSG_SHUT,
    MIG_RP_MSG_SWITCHOVER_ACK, POSTCOPY_DISCARD_VERSION, RP_CMD_ARGS, RP_MAX_LEN,
)
from npqfile.stream.reader import shown, wire_name

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


def discard_payloads(block: str, ranges: Any) -> list[bytes]:
    """POSTCOPY_RAM_DISCARD payloads for ``ranges`` of (start, length) bytes in ``block``
    (pairs or an (N, 2) integer array), at most MAX_DISCARDS_PER_COMMAND ranges each, as
    ``postcopy_discard_send_range`` splits them.  Returns [] for no ranges.  ValueError
    for a bad block name or a range QEMU's be64 fields cannot carry."""
    name = block.encode()
    if not 0 < len(name) <= 255:
        raise ValueError(f"block name of {len(name)} bytes cannot be sent in POSTCOPY_RAM_DISCARD")
    pairs = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    if (pairs < 0).any():
        raise ValueError(f"a negative discard range for block '{shown(block)}'")
    body = pairs.astype(">u8").tobytes()          # be64 start, be64 length, pair after pair
    head = bytes([POSTCOPY_DISCARD_VERSION, len(name)]) + name + b"\0"
    step = 16 * MAX_DISCARDS_PER_COMMAND
    return [head + body[i:i + step] for i in range(0, len(body), step)]


class DiscardError(ValueError):
    """A POSTCOPY_RAM_DISCARD payload QEMU would refuse; ``offset``: the payload byte
    where it goes wrong (the caller adds where the payload starts in the stream)."""

    def __init__(self, reason: str, offset: int):
        super().__init__(f"{reason} (payload byte {offset})")
        self.offset = offset


class Discard(NamedTuple):
    """A parsed POSTCOPY_RAM_DISCARD: ``block`` (printable name), ``ranges`` as
    [(start, length)] in bytes, ``array`` the same as an (N, 2) uint64 array, ``offset``
    the payload byte of the first range."""
    block: str
    ranges: list[tuple[int, int]]
    array: np.ndarray
    offset: int

    def check(self, size: int, page_size: int) -> None:
        """ram_discard_range's bounds for a block of ``size`` bytes: every range whole
        ``page_size`` pages inside it (no wrap-around: ``length`` is compared with what
        is left after ``start``).  Returns None; DiscardError naming the first bad range
        and its payload byte."""
        if not self.array.size:
            return
        start, length = self.array[:, 0], self.array[:, 1]
        ps, end = np.uint64(page_size), np.uint64(size)
        bad = np.flatnonzero((start % ps != 0) | (length % ps != 0) | (start > end) | (length > end - start))
        if bad.size:
            i = int(bad[0])
            raise DiscardError(f"ram_discard_range: range {int(start[i]):#x}+{int(length[i]):#x} is not whole "
                               f"pages inside block '{shown(self.block)}' ({size:#x} bytes)", self.offset + 16 * i)

    def pages(self, page_size: int) -> int:
        """Pages the ranges cover (after :meth:`check`: whole pages, no overflow)."""
        return int((self.array[:, 1] // np.uint64(page_size)).sum()) if self.array.size else 0


def parse_discard(data: bytes) -> Discard:
    """loadvm_postcopy_ram_handle_discard's parsing: the one parser of this payload (the
    savevm loader and the postcopy destination both call it).  Returns a :class:`Discard`
    (``[0]`` the block name, ``[1]`` the (start, length) pairs).  Raises DiscardError (a
    ValueError) with QEMU's reason and the payload byte for a malformed payload; the
    ranges' bounds are checked against the block by :meth:`Discard.check`."""
    if len(data) < 3:
        raise DiscardError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({len(data)})", 0)
    if data[0] != POSTCOPY_DISCARD_VERSION:
        raise DiscardError(f"CMD_POSTCOPY_RAM_DISCARD invalid version ({data[0]})", 0)
    nlen = data[1]
    if len(data) < 3 + nlen or data[2 + nlen] != 0:
        raise DiscardError("CMD_POSTCOPY_RAM_DISCARD missing nil", min(2 + nlen, len(data)))
    at = 3 + nlen
    rest = len(data) - at
    if rest % 16:
        raise DiscardError(f"CMD_POSTCOPY_RAM_DISCARD invalid length remaining {rest}", at)
    array = np.frombuffer(data, dtype=">u8", offset=at).reshape(-1, 2).astype(np.uint64)
    ranges = list(zip(array[:, 0].tolist(), array[:, 1].tolist()))
    return Discard(wire_name(data[2:at - 1]), ranges, array, at)
