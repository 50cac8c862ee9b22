"""The sizes and rates users type: ``512M``, ``1G``, ``100MB/s``, ``1Gbit/s``, ``100Mbps``.

Supports: ``parse_size`` (QEMU's ``-m`` convention: a bare number is bytes, K/M/G/T
are binary, ``KB``/``MB``/``GB`` decimal), ``parse_rate`` (bytes per second; ``bit``,
``bps`` and a lowercase ``b`` are bits), ``format_bytes`` for tables.
Goals: accept what QEMU and network people write; reject anything else with a
``ValueError`` naming the text.  Plan: one regular expression, two unit tables.
"""

from __future__ import annotations

import re

_BINARY = {"": 1, "B": 1, "K": 1 << 10, "KI": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MI": 1 << 20,
           "MIB": 1 << 20, "G": 1 << 30, "GI": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40}
_DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Return the byte count of ``text`` (``"512M"`` -> 536870912). Raises ValueError."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    m = _NUMBER.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 512M, 1G, 4096)")
    value, unit = float(m.group(1)), m.group(2).upper()
    mult = _BINARY.get(unit) or _DECIMAL.get(unit)
    if mult is None:
        raise ValueError(f"unknown size unit {m.group(2)!r} in {text!r}")
    return int(value * mult)


def parse_rate(text: str | int | float) -> float:
    """Return bytes per second for ``text``; ``0`` means unlimited.

    Bytes: ``100MB/s`` (decimal), ``100MiB/s`` or ``100M`` (binary, as QEMU's sizes).
    Bits: ``1Gbit/s``, ``100Mbps``, ``100Mb/s`` -- a lowercase ``b`` is a bit, as in
    networking.  Raises ValueError naming the text."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"rate must not be negative: {text}")
        return float(text)
    t = text.strip()
    for suffix in ("/s", "ps"):
        if t.lower().endswith(suffix):
            t = t[: -len(suffix)]
            break
    bits = None
    if t.lower().endswith(("bits", "bit")):
        bits = t[: -4] if t.lower().endswith("bits") else t[: -3]
    elif t.endswith("b"):
        bits = t[:-1]
    if bits is not None:
        m = _NUMBER.match(bits)
        mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(m.group(2).upper()) if m else None
        if mult is None:
            raise ValueError(f"not a rate: {text!r} (try 100MB/s, 1Gbit/s, 100Mbps, 0 for unlimited)")
        return float(m.group(1)) * mult / 8
    try:
        return float(parse_size(t))
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (try 100MB/s, 1Gbit/s, 100Mbps, 0 for unlimited)") from None


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: binary units for tables."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
