"""The two exception types npqfile adds; with OSError and ValueError they are all a
caller (and the CLI, which prints them as one ``error:`` line) has to handle.

Supports: ``FileError``, QEMUFile's sticky error as an object -- QEMU keeps an errno
plus an ``Error *`` with a message (``last_error`` / ``last_error_obj``); we keep both in
one ``OSError`` subclass so ``err.errno`` and ``str(err)`` say what happened and where.
``StreamError``, a malformed migration stream, naming the byte offset, the section and
the reason, so a user can find the bad record with a hex dump.

Goals: an error always says what and where; nothing else escapes on bad input.
Plan: two small classes, no hierarchy beyond the stdlib's.
"""

from __future__ import annotations


class FileError(OSError):
    """The first error a QEMUFile met. ``errno`` is positive; ``get_error()`` returns -errno."""


class StreamError(Exception):
    """A migration stream that cannot be loaded.

    ``offset`` is the stream byte offset of the offending record (or None when unknown),
    ``section`` the section idstr (or None outside a section), ``reason`` the plain text.
    ``str(err)`` is ``"REASON at offset N (section S)"``, the CLI's one-line message.
    """

    def __init__(self, reason: str, offset: int | None = None, section: str | None = None):
        self.reason = reason
        self.offset = offset
        self.section = section
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.reason
        if self.offset is not None:
            text += f" at offset {self.offset}"
        if self.section is not None:
            text += f" (section {self.section})"
        return text
