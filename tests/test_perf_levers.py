"""The speed levers of issue 12 that change behaviour a test can see (timings are never tested):
``image:`` RAM blocks map a raw image without copying it and never change it; a command loads
only its own subcommand module."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from npqfile.ram import RAMBlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_image_backing_maps_the_file_and_never_writes_it(tmp_path):
    img = tmp_path / "ram.img"
    data = np.random.default_rng(3).integers(0, 256, 64 * 4096, dtype=np.uint8)
    img.write_bytes(data.tobytes())
    os.chmod(img, 0o444)                  # read-only is enough: the file is opened O_RDONLY
    block = RAMBlock("ram", data.nbytes, backing=f"image:{img}")
    try:
        assert block.kind == "image" and np.array_equal(block.array, data)
        block.array[:4096] = 0xAB         # a private copy-on-write page
        assert block.array[0] == 0xAB
    finally:
        del data
        block.close()
    assert img.read_bytes()[:4096] != bytes([0xAB]) * 4096   # the file kept its bytes


def test_image_backing_errors_name_the_block(tmp_path):
    with pytest.raises(OSError, match="image .* of RAM block 'ram'"):
        RAMBlock("ram", 4096, backing=f"image:{tmp_path / 'missing.img'}")
    short = tmp_path / "short.img"
    short.write_bytes(bytes(4096))
    with pytest.raises(ValueError, match="shorter than 8192"):
        RAMBlock("ram", 8192, backing=f"image:{short}")


def test_a_command_imports_only_its_own_module():
    """``npqfile save`` must not pay for migrate's imports (engine, sweep, plotting)."""
    code = ("import sys, npqfile.cli as c\n"
            "try:\n    c.main(['save', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('npqfile.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['npqfile.cli.save']"
