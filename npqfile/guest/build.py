"""Build the dirtyguest image from its source (``python -m npqfile.guest.build [OUT]``).

Supports: :func:`build_image` compiles ``src/boot.S`` and ``src/guest.c`` with the host's
gcc (``-m32 -ffreestanding -nostdlib``: no 32-bit libc or libgcc needed, only gcc and
binutils) and links them with ``ld -m elf_i386`` at 1 MiB (``src/link.ld``).  The
shipped image ``dirtyguest.elf`` is this function's output; the test
``test_guest_image_rebuilds_identically`` rebuilds it and compares the bytes when gcc
is present, so the source in the repository is the image users run.

Goals: a reproducible build (no build id, fixed flags, no paths in the output); clear
errors.  Errors: ``GuestBuildError`` carrying the failing command and its output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "src"
IMAGE = HERE / "dirtyguest.elf"
CFLAGS = ("-m32", "-march=i686", "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie",
          "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-ident", "-O2",
          "-Wall", "-Wextra", "-Werror")
LDFLAGS = ("-m", "elf_i386", "-nostdlib", "--build-id=none", "-z", "noexecstack",
           "--no-warn-rwx-segments")


# the compiler that built the shipped image: a rebuild with it gives the same bytes
BUILT_WITH = "gcc (Debian 12.2.0-14+deb12u1) 12.2.0"


class GuestBuildError(RuntimeError):
    """The guest image could not be built; the message holds the command and its output."""


def compiler_version(cc: str = "gcc") -> str | None:
    """The first line of ``cc --version``, or None when there is no such compiler."""
    if shutil.which(cc) is None:
        return None
    out = subprocess.run([cc, "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else None


def _run(cmd: list[str], cwd: str) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed with status {res.returncode}: "
                              f"{(res.stderr or res.stdout).strip()}")


def build_image(out: str | os.PathLike, cc: str = "gcc", ld: str = "ld") -> Path:
    """Compile and link the guest into ``out``; returns its path.  Raises
    GuestBuildError when gcc or ld is missing or fails."""
    for tool in (cc, ld):
        if shutil.which(tool) is None:
            raise GuestBuildError(f"{tool} not found: building the guest needs gcc and binutils")
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="npqfile-guest-") as tmp:
        # compile from the source folder with relative names: no absolute path gets in
        _run([cc, *CFLAGS, "-c", "boot.S", "-o", os.path.join(tmp, "boot.o")], str(SOURCE))
        _run([cc, *CFLAGS, "-c", "guest.c", "-o", os.path.join(tmp, "guest.o")], str(SOURCE))
        _run([ld, *LDFLAGS, "-T", str(SOURCE / "link.ld"), "boot.o", "guest.o", "-o", str(out)], tmp)
    return out


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else IMAGE
    print(build_image(target))
