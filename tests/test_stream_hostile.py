"""Hostile and faulty input for the stream readers (issue 8, item 4): every case ends in
a clear StreamError naming what and where, with work and memory bounded by what the
stream declares and carries, never a traceback, a misleading message or a blow-up."""

from __future__ import annotations

import errno
import json
import struct

import numpy as np
import pytest

from npqfile.errors import StreamError
from npqfile.qemufile import QEMUFile
from npqfile.stream import load_stream
from test_stream_support import (
    PAGE, cstr, footer_bytes, header, load_bytes, make_ram, minimal_stream, page_record, part, pattern_pages,
    ram_start, snapshot_bytes,
)


class FailingReader:
    """Serves ``data`` then raises ``exc`` (a real read error) instead of end of stream."""

    def __init__(self, data: bytes, exc: OSError):
        self.data, self.exc, self.pos = data, exc, 0

    def readinto(self, buf, pos):
        if self.pos >= len(self.data):
            raise self.exc
        n = min(len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def test_a_read_error_or_shutdown_is_not_called_a_truncated_stream():
    data = snapshot_bytes(make_ram({"ram": pattern_pages(8)}))
    cut = len(data) // 2
    with pytest.raises(StreamError) as e:
        load_stream(QEMUFile(FailingReader(data[:cut], OSError(errno.EIO, "Input/output error"))))
    assert "read error" in str(e.value) and "Input/output error" in str(e.value)
    assert "truncated" not in str(e.value)

    f = QEMUFile(FailingReader(data[:cut], OSError(errno.EIO, "never reached")))
    f.get_buffer(bytearray(cut))      # consume what is there, then shut the file down
    f.shutdown()
    from npqfile.stream.reader import StreamReader
    with pytest.raises(StreamError) as e:
        StreamReader(f).be64("a RAM record header")
    assert "stream shut down" in str(e.value) and "truncated" not in str(e.value)

    with pytest.raises(StreamError, match="truncated stream"):   # a real end of stream still is
        load_bytes(data[:cut])
