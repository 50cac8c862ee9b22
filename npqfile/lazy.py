"""Lazy re-exports for packages (PEP 562): a name is imported on first use.

Supports: ``lazy_exports(package, {name: module})``, which returns the package's module
``__getattr__``.  Goals: ``from npqfile.migration import run_migration`` keeps working while
``import npqfile.migration.options`` (which ``npqfile save`` needs) does not import the
engine, the loader and the sweep with it -- each command pays only for what it runs.
Plan: look the name up, import ``package.module``, cache the value in the package.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package``: ``exports`` maps each public name to the
    submodule (relative name) that defines it.  Unknown names raise AttributeError."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
