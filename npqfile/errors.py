"""The two exception types npqfile lets escape to callers.

``FileError`` is QEMUFile's sticky error as an object: QEMU keeps an errno plus an
``Error *`` with a message (``last_error`` / ``last_error_obj``); we keep both in one
``OSError`` subclass so ``err.errno`` and ``str(err)`` say what happened and where.

``StreamError`` is a malformed migration stream: it names the byte offset, the section
and the reason, so a user can find the bad record with a hex dump.
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
