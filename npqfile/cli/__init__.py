"""The ``npqfile`` command: one subcommand per module in this package.

Each subcommand module defines ``NAME`` (the subcommand), ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``.  Modules are discovered, so adding
a command is adding a file.  Errors a user can cause (a bad stream, a bad URI, a bad
size, an I/O failure) end as one line ``error: ...`` on stderr and exit status 1, never
a traceback; ``NPQFILE_DEBUG=1`` shows the traceback for developers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

# Before anything imports numpy: OpenBLAS (numpy's BLAS) starts a worker per core at
# import, which spins for its work (measured: 0.17 s of CPU per command on this 2-core
# machine, taken from the migration or the exec: consumer beside it).  npqfile does no
# linear algebra.  Set for the command line only, never by the library.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from npqfile import __version__  # noqa: E402
from npqfile.errors import FileError, StreamError  # noqa: E402

DESCRIPTION = ("npqfile: QEMU's migration stream (QEMUFile and the RAM section) in Python over "
               "mmap'd guest RAM: run pre-copy migrations, analyse and write QEMU 7.2 streams, "
               "and measure memory reclaim.")
EPILOG = "Run 'npqfile COMMAND --help' for a command's options."


def _commands(only: str | None = None) -> list:
    """The subcommand modules, in ``ORDER``.  With ``only`` (the command on the command line)
    just the module of that name is imported when there is one: the others' imports (numpy,
    matplotlib, rich...) would cost a user's every command a few hundred milliseconds."""
    names = [info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    if only in names:
        mod = importlib.import_module(f"{__name__}.{only}")
        if getattr(mod, "NAME", None) == only and hasattr(mod, "run"):
            return [mod]
    mods = []
    for name in names:
        mod = importlib.import_module(f"{__name__}.{name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    return sorted(mods, key=lambda m: getattr(m, "ORDER", 50))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``npqfile`` parser; with ``command``, only that subcommand's module is loaded."""
    parser = argparse.ArgumentParser(prog="npqfile", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for mod in _commands(command):
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (StreamError, FileError, OSError, ValueError) as exc:
        if os.environ.get("NPQFILE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
