"""Compile the npqfile seed (QEMU's 2.10/2.12-era migration/qemu-file.c) into a test library.

Supports two variants of the same seed file, both linked with our stand-in headers
(``include/``) and ``harness.c`` and loaded by ``seed_driver.py`` with ctypes:

* ``"seed"``: the seed exactly as it is;
* ``"fixed"``: the seed with the upstream fixes that change *where* flushes happen and
  *whether* I/O happens, applied as a small text patch at build time (the seed is never
  copied into the repository).  Reference: /work/shared/reference/qemu-migration-notes.md §2:

  - §2.1 (QEMU 4.2): ``add_to_iovec`` returns whether it flushed and ``add_buf_to_iovec``
    advances ``buf_index`` only when it did not;
  - §2.2 (QEMU 6.1): the "iovec array full" guard runs before appending;
  - §2.3 (QEMU 5.0/8.1): no I/O after an error (``qemu_fflush`` and ``qemu_fill_buffer``
    return early).

Goal: the differential test compares npqfile with the real seed for bytes and results, and
with the fixed variant for writev call boundaries.  Plan: each patch is an exact text
replacement that must match exactly once, so a different seed fails loudly instead of
silently building something else.

Usable by hand: ``python3 tests/seed/seed_build.py OUT_DIR [SEED]`` builds both variants.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VARIANTS = ("seed", "fixed")

# (name, exact text in the dedented seed, replacement), applied in order for "fixed".
FIXES: tuple[tuple[str, str, str], ...] = (
    ("2.1 add_to_iovec returns int", "static void add_to_iovec(", "static int add_to_iovec("),
    (
        "2.2 add_to_iovec: guard before appending",
        """\
    } else {
        if (may_free) {
""",
        """\
    } else {
        if (f->iovcnt >= MAX_IOV_SIZE) {
            assert(qemu_file_get_error(f) || !qemu_file_is_writable(f));
            return 1;
        }
        if (may_free) {
""",
    ),
    (
        "2.1 add_to_iovec returns whether it flushed; add_buf_to_iovec",
        """\
    if (f->iovcnt >= MAX_IOV_SIZE) {
        qemu_fflush(f);
    }
}
""",
        """\
    if (f->iovcnt >= MAX_IOV_SIZE) {
        qemu_fflush(f);
        return 1;
    }
    return 0;
}

static void add_buf_to_iovec(QEMUFile *f, size_t len)
{
    if (!add_to_iovec(f, f->buf + f->buf_index, len, false)) {
        f->buf_index += len;
        if (f->buf_index == IO_BUF_SIZE) {
            qemu_fflush(f);
        }
    }
}
""",
    ),
    (
        "2.1 qemu_put_buffer",
        """\
        add_to_iovec(f, f->buf + f->buf_index, l, false);
        f->buf_index += l;
        if (f->buf_index == IO_BUF_SIZE) {
            qemu_fflush(f);
        }
        if (qemu_file_get_error(f)) {
""",
        """\
        add_buf_to_iovec(f, l);
        if (qemu_file_get_error(f)) {
""",
    ),
    (
        "2.1 qemu_put_byte",
        """\
    add_to_iovec(f, f->buf + f->buf_index, 1, false);
    f->buf_index++;
    if (f->buf_index == IO_BUF_SIZE) {
        qemu_fflush(f);
    }
}
""",
        """\
    add_buf_to_iovec(f, 1);
}
""",
    ),
    (
        "2.3 qemu_fflush: no I/O after an error",
        """\
    if (!qemu_file_is_writable(f)) {
        return;
    }

    if (f->iovcnt > 0) {
""",
        """\
    if (!qemu_file_is_writable(f)) {
        return;
    }
    if (f->last_error) {
        return;
    }

    if (f->iovcnt > 0) {
""",
    ),
    (
        "2.3 qemu_fill_buffer: no I/O after an error",
        """\
    f->buf_index = 0;
    f->buf_size = pending;

""",
        """\
    f->buf_index = 0;
    f->buf_size = pending;
    if (qemu_file_get_error(f)) {
        return 0;
    }

""",
    ),
)


def default_seed_path() -> Path:
    """The seed to compile: $NPQFILE_SEED, else shared/seed/qemu-file.c beside the repo."""
    env = os.environ.get("NPQFILE_SEED")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "seed" / "qemu-file.c"


def patched_source(text: str) -> str:
    """Return the seed text with FIXES applied; ValueError naming a patch that does not match once.

    The text is dedented first: the shared copy of the seed indents every line by one space.
    """
    text = textwrap.dedent(text)
    for name, old, new in FIXES:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"seed patch {name!r} matched {count} times (expected exactly 1)")
        text = text.replace(old, new)
    return text


def build(out_dir: Path, variant: str, seed: Path | None = None, cc: str = "gcc") -> Path:
    """Compile one variant into out_dir and return the path of the shared library.

    Raises FileNotFoundError if the seed is missing, ValueError for an unknown variant or a
    patch that does not apply, and RuntimeError with the compiler's output if gcc fails.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown seed variant {variant!r}; expected one of {VARIANTS}")
    seed = Path(seed) if seed is not None else default_seed_path()
    text = seed.read_text()
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / f"qemu-file-{variant}.c"
    source.write_text(patched_source(text) if variant == "fixed" else text)
    lib = out_dir / f"libnpqseed-{variant}.so"
    cmd = [
        cc, "-shared", "-fPIC", "-O1", "-g", "-Wall", "-Wno-unused-function", "-Werror=implicit-function-declaration",
        "-I", str(HERE / "include"), "-o", str(lib), str(source), str(HERE / "harness.c"), "-lz",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the {variant} seed failed:\n{' '.join(cmd)}\n{proc.stderr}")
    return lib


def missing_tools() -> list[str]:
    """Names of the build prerequisites that are absent (empty when a build can run)."""
    missing = []
    if shutil.which("gcc") is None:
        missing.append("gcc")
    else:
        probe = subprocess.run(["gcc", "-E", "-x", "c", "-"], input="#include <zlib.h>\n",
                               capture_output=True, text=True)
        if probe.returncode != 0:
            missing.append("zlib.h (Debian package zlib1g-dev)")
    if not default_seed_path().is_file():
        missing.append(f"seed {default_seed_path()} (set NPQFILE_SEED)")
    return missing


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: seed_build.py OUT_DIR [SEED]")
    seed_arg = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    for v in VARIANTS:
        print(build(Path(sys.argv[1]), v, seed_arg))
