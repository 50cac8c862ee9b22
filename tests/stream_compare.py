"""Comparing npqfile's stream with one real QEMU wrote, on what is deterministic (no tests here).

QEMU ends a RAM PART section after 50 ms (``ram_save_iterate``) and sends what is left
in the END section, so on a busy machine the same RAM comes out split into several
sections: the page records are the same bytes (a later section's first record carries
CONTINUE, since QEMU's last_sent_block persists), but section boundaries (EOS, footer,
PART header) move.  :func:`assert_same_stream` therefore demands byte equality only
when QEMU's RAM came in the one-PART form npqfile writes, and otherwise equality of
(a) the RAM records with the section boundaries taken out and (b) every byte outside
the RAM sections (header, configuration, commands, device sections, EOF, vmdesc).
"""

from __future__ import annotations

from npqfile.stream import load_file


def split_stream(path) -> tuple[bytes, bytes, list[str]]:
    """``(RAM records without EOS, everything outside RAM sections, RAM section types)``."""
    data = open(path, "rb").read()
    res = load_file(path)
    assert res.complete, res.stopped
    records, outside, kinds = [], [], []
    pos = 0
    for s in res.sections:
        if s.type in ("start", "full"):
            head = 1 + 4 + 1 + len(s.idstr.encode()) + 4 + 4
        else:
            head = 1 + 4
        end = s.offset + head + s.size + (5 if s.footer else 0)
        if s.idstr == "ram" and s.instance_id == 0:
            outside.append(data[pos:s.offset])
            payload = data[s.offset + head:s.offset + head + s.size]
            assert payload.endswith(b"\0" * 7 + b"\x10"), "a RAM section payload ends with EOS"
            records.append(payload[:-8])
            kinds.append(s.type)
            pos = end
    outside.append(data[pos:])
    return b"".join(records), b"".join(outside), kinds


def one_part(path) -> bool:
    """True when the stream's RAM is START, one PART, and an END with no records (EOS only)."""
    parts = load_file(path).stats.parts
    return [p["type"] for p in parts] == ["start", "part", "end"] and parts[-1]["bytes"] == 8


def assert_same_stream(ours, qemus) -> str:
    """Assert that the stream files ``ours`` and ``qemus`` are the same stream (see the
    module docstring); returns "bytes" or "records" to say which comparison applied."""
    a, b = open(ours, "rb").read(), open(qemus, "rb").read()
    if one_part(qemus):
        assert a == b, _first_difference(a, b)
        return "bytes"
    rec_a, out_a, _ = split_stream(ours)
    rec_b, out_b, kinds = split_stream(qemus)
    assert rec_a == rec_b, f"RAM records differ ({kinds}): {_first_difference(rec_a, rec_b)}"
    assert out_a == out_b, f"bytes outside RAM differ: {_first_difference(out_a, out_b)}"
    return "records"


def _first_difference(a: bytes, b: bytes) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"lengths {len(a)} / {len(b)}, first difference at byte {n}: {a[n:n + 16]!r} != {b[n:n + 16]!r}"
