"""Sizes and rates as users type them."""

from __future__ import annotations

import pytest

from npqfile.units import format_bytes, parse_rate, parse_size


@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("512M", 512 << 20), ("1G", 1 << 30), ("1.5G", 3 << 29), ("64KiB", 64 << 10),
    ("1GB", 10**9), ("2k", 2048),
])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text, value", [
    ("100MB/s", 100e6), ("100MiB/s", 100 * 2**20), ("100M", 100 * 2**20), ("1Gbit/s", 125e6),
    ("100Mbps", 12.5e6), ("100Mb/s", 12.5e6), ("0", 0.0), ("12500000", 12.5e6), ("8kbit/s", 1000.0),
])
def test_rates_bytes_and_bits(text, value):
    assert parse_rate(text) == value


@pytest.mark.parametrize("bad", ["fast", "1.5Q", "-1", "", "M"])
def test_bad_sizes_and_rates_name_the_text(bad):
    with pytest.raises(ValueError, match="size|rate") as e:
        parse_size(bad)
    assert repr(bad) in str(e.value) or bad in str(e.value)
    with pytest.raises(ValueError):
        parse_rate(bad if bad else "x")


def test_format_bytes():
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(10) == "10 B" and format_bytes(3 << 30) == "3.0 GiB"
