"""Checked reads from a QEMUFile, each one counted so errors can name their byte offset.

Supports: the integer, buffer and counted-string reads that the savevm container and
the RAM section are made of, reads straight into caller memory (a RAM page view), peeks,
and an optional end limit (a PACKAGED command's embedded stream must not read past its
declared length).

Goals: QEMU's readers return garbage at end of stream and leave it to the caller to
check ``qemu_file_get_error``; every read here checks instead and raises
:class:`~npqfile.errors.StreamError` naming the offset of the record being read, the
current section and what was being read.  Nothing else escapes.

Plan: the offset is QEMUFile's logical read position (``tell()``; its ``ftell`` is the
channel position, ahead by the read-ahead buffer, as in QEMU) from where the reader
started.  ``record`` marks where the current record began; errors report that offset,
which is where a hex dump should start looking.

Names read from the wire (block names, section idstrs, machine and capability names)
are arbitrary bytes: :func:`wire_name` turns them into printable text once, when read
(what results store), and :func:`shown` bounds that text in messages, so no error
line carries control bytes or hundreds of characters of garbage.
"""

from __future__ import annotations

import errno
import re
import reprlib

from npqfile.errors import StreamError

MAX_SHOWN = 64   # characters of a wire name quoted in a message

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# One escaped character of wire_name's output, so shown() never cuts an escape in half.
_TOKEN = re.compile(r"\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[\\nrt])|.", re.DOTALL)


def wire_name(raw: bytes | str) -> str:
    """``raw`` (bytes from the stream, or text from the vmdesc JSON) as printable text.

    Printable characters stay (UTF-8 decoded); a backslash becomes ``\\\\``; ``\\n``,
    ``\\r``, ``\\t``; other control characters ``\\xNN`` / ``\\uNNNN``; bytes that are
    not UTF-8 ``\\xNN`` (always >= 0x80, so the mapping is one to one: distinct names
    stay distinct).  Returns the text, unbounded (see :func:`shown`); never raises.
    """
    text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:          # an undecodable byte (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def shown(name: str, limit: int = MAX_SHOWN) -> str:
    """The printable ``name`` (a :func:`wire_name` result) cut to ``limit`` characters
    plus ``…`` when longer, never inside an escape.  Returns the text; never raises."""
    if len(name) <= limit:
        return name
    end = 0
    for token in _TOKEN.finditer(name):
        if token.end() > limit:
            break
        end = token.end()
    return name[:end] + "…"


def label(value: object) -> str:
    """Any value from the stream or its vmdesc JSON, for a message: a string quoted as
    ``'shown(wire_name(value))'``, anything else as a bounded repr.  Never raises."""
    if isinstance(value, str):
        return f"'{shown(wire_name(value))}'"
    return shown(reprlib.repr(value))


class StreamReader:
    """Counted, checked reads from the readable QEMUFile ``f``.

    ``offset`` is the number of bytes consumed so far (stream byte offset of the next
    byte), ``section`` the idstr named in errors, ``limit`` an optional end offset.
    """

    def __init__(self, f, *, offset: int = 0):
        self.f = f
        self._base = offset - f.tell()   # stream offset of the file's position 0
        self.record = offset
        self.section: str | None = None
        self.limit: int | None = None

    @property
    def offset(self) -> int:
        """Stream byte offset of the next byte (derived from the file's read position)."""
        return self._base + self.f.tell()

    # -- errors ------------------------------------------------------------------------
    def error(self, reason: str, offset: int | None = None) -> StreamError:
        """Return (not raise) a StreamError at ``offset`` (default: the current record)."""
        section = None if self.section is None else shown(self.section)
        return StreamError(reason, self.record if offset is None else offset, section)

    def _fail(self, what: str) -> StreamError:
        ret = self.f.get_error()
        err = getattr(self.f, "error", None)
        # End of stream and a real read error (or a shutdown) are both -EIO in QEMU; only
        # the first is a truncated stream.
        if ret == 0 or getattr(self.f, "at_eof", ret == -errno.EIO):
            reason = f"truncated stream: it ends inside {what}"
        else:
            reason = f"read error inside {what}: {err or errno.errorcode.get(-ret, ret)}"
        return self.error(reason)

    def _need(self, n: int, what: str) -> None:
        if self.limit is not None and self.offset + n > self.limit:
            raise self.error(f"{what} runs past the end of the enclosing packaged stream "
                             f"(limit offset {self.limit})")

    def begin(self) -> int:
        """Mark the start of a record; errors then name this offset. Returns it."""
        self.record = self.offset
        return self.offset

    # -- reads -------------------------------------------------------------------------
    def _get(self, getter, n: int, what: str) -> int:
        self._need(n, what)
        v = getter()
        if self.f.get_error():
            raise self._fail(what)
        return v

    def u8(self, what: str = "a byte") -> int:
        return self._get(self.f.get_byte, 1, what)

    def be16(self, what: str = "a be16") -> int:
        return self._get(self.f.get_be16, 2, what)

    def be32(self, what: str = "a be32") -> int:
        return self._get(self.f.get_be32, 4, what)

    def be64(self, what: str = "a be64") -> int:
        return self._get(self.f.get_be64, 8, what)

    def read_into(self, buf, what: str = "a buffer") -> None:
        """Fill the writable buffer ``buf`` (bytearray, memoryview, numpy view) completely."""
        n = memoryview(buf).nbytes
        self._need(n, what)
        got = self.f.get_buffer(buf)
        if got != n or self.f.get_error():
            raise self._fail(what)

    def read(self, n: int, what: str = "a buffer") -> bytes:
        """Return the next ``n`` bytes. The caller bounds ``n`` (never from the wire unchecked)."""
        buf = bytearray(n)
        if n:
            self.read_into(buf, what)
        return bytes(buf)

    def cstr(self, what: str = "a counted string") -> bytes:
        """QEMU's counted string: ``u8 len`` then ``len`` bytes (no NUL)."""
        n = self.u8(what)
        return self.read(n, what)

    def name(self, what: str = "a name") -> str:
        """A counted string that names something (block, section, capability), as
        :func:`wire_name` text."""
        return wire_name(self.cstr(what))

    def skip(self, n: int, what: str = "skipped bytes") -> None:
        """Consume ``n`` bytes without keeping them (reads through a bounded scratch buffer)."""
        self._need(n, what)
        scratch = bytearray(min(n, 1 << 16))
        while n > 0:
            chunk = memoryview(scratch)[: min(n, len(scratch))]
            self.read_into(chunk, what)
            n -= len(chunk)

    def peek_u8(self, pos: int = 0) -> int | None:
        """The byte ``pos`` bytes ahead without consuming it, or None at end of stream/limit.

        A peek that meets the end of the stream sets QEMUFile's sticky EOF error, exactly
        like QEMU's ``qemu_peek_byte``; callers treat None as "no more data".
        """
        if self.limit is not None and self.offset + pos >= self.limit:
            return None
        view = self.f.peek_buffer(pos + 1, 0)
        if len(view) < pos + 1:
            return None
        return view[pos]

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes ahead without consuming them (short at end of stream)."""
        if self.limit is not None:
            n = max(0, min(n, self.limit - self.offset))
        return bytes(self.f.peek_buffer(n, 0)) if n else b""
