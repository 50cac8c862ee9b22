"""JSON Schemas of every JSON output, shipped with the package.

Supports: :data:`SCHEMAS` (``migrate``, ``incoming``, ``analyze``, ``reclaim``,
``sweep``, ``events``: ``npqfile migrate --json``, ``incoming --json``, ``analyze
--json``, ``reclaim --json``, ``migrate --sweep --json`` and one ``--events`` line),
:func:`schema` (the parsed JSON Schema, draft 2020-12) and :func:`validate` (checks a
document with the ``jsonschema`` package, which is not a runtime dependency).

The naming scheme the schemas enforce: QEMU's ``query-migrate`` names where QEMU has
one (``total-time``, ``downtime``, ``ram`` with ``transferred`` / ``normal`` /
``duplicate`` / ``dirty-sync-count``, ``xbzrle-cache``, parameter names such as
``max-bandwidth`` and ``downtime-limit``), and lowercase-hyphenated names for
everything else (``propertyNames`` ``^[a-z0-9]+(-[a-z0-9]+)*$`` on every object whose
keys are names; maps keyed by data -- block names in ``hashes``, device field names --
are exempt).  Times are milliseconds and byte counts bytes, as in QEMU, unless the name
says otherwise.

Goals: scripts and notebooks can rely on one shape per command; the tests validate real
outputs against these files.  Plan: plain JSON files next to this module (package data).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SCHEMAS = ("migrate", "incoming", "analyze", "reclaim", "sweep", "events")
NAME_PATTERN = "^[a-z0-9]+(-[a-z0-9]+)*$"


def schema(name: str) -> dict[str, Any]:
    """The JSON Schema of output ``name`` (one of :data:`SCHEMAS`).  ValueError for
    another name."""
    if name not in SCHEMAS:
        raise ValueError(f"no JSON schema {name!r} (choose {', '.join(SCHEMAS)})")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8"))


def validate(doc: Any, name: str) -> None:
    """Check ``doc`` against schema ``name``; returns None when it conforms.  Raises
    ``jsonschema.ValidationError`` (naming the path of the first bad value) when it does
    not, ImportError (saying how to install it) without the ``jsonschema`` package."""
    try:
        import jsonschema
    except ImportError:
        raise ImportError("validating needs the jsonschema package: pip install jsonschema") from None
    jsonschema.Draft202012Validator(schema(name)).validate(doc)
