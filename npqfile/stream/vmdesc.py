"""The vmdesc JSON that ends a QEMU stream: writing it, finding it, and walking device state with it.

Supports: encoding the ``QEMU_VM_VMDESCRIPTION`` payload exactly as QEMU's JSON writer
lays it out (``{"page_size": 4096, "devices": [...]}``, ``", "`` and ``": "``
separators); finding it at the end of a stream file; and walking a device section's
bytes from its description, the way ``scripts/analyze-migration.py`` does: the field
types ``bool``, ``int8..64``, ``uint8..64`` (and their ``equal`` / ``le`` variants),
``float64``, ``timer``, ``buffer``, ``unused_buffer``, ``bitmap``, ``struct``
(recursive), ``capability``, ``nullptr`` and any unknown type by its ``size``; arrays
given by ``array_len``; subsections (``u8 0x05``, counted name, ``be32 version``).

Goals: device sections carry no length on the wire, so this description is the only way
to step over them without knowing every device in QEMU.  The walker never trusts the
JSON blindly: a size that is not a non-negative integer, a missing subsection marker, or
a ``nullptr`` that is not ``'0'`` is a StreamError at the byte offset, never a KeyError.

Plan: :func:`walk_vmsd` consumes the bytes of one section through a
:class:`~npqfile.stream.reader.StreamReader` and returns the decoded values (small
integers as ints, other fields as hex or a byte count) so ``npqfile analyze`` can show
them.  :func:`find_vmdesc` scans the tail of a file with numpy for a ``0x06`` whose
``be32`` length reaches exactly the end of the file, and checks the JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from npqfile.errors import StreamError
from npqfile.stream.constants import QEMU_VM_EOF, QEMU_VM_SUBSECTION, QEMU_VM_VMDESCRIPTION, TARGET_PAGE_SIZE
from npqfile.stream.reader import StreamReader, label, wire_name

VMDESC_TAIL_BYTES = 16 << 20   # analyze-migration.py looks at the last 10 MiB; be a bit more generous
MAX_DECODED_FIELD = 256        # larger buffers are reported by size, not dumped
MAX_NESTING = 64               # struct/subsection depth; deeper JSON is malformed, not a stack overflow
MAX_FIELD_VISITS = 1 << 22     # fields walked in one section (array_len included)
FREE_FIELD_VISITS = 1 << 16    # per stream: field visits not paid for by the bytes they consume
MIN_PAGE_SIZE = 1 << 10
MAX_PAGE_SIZE = 1 << 30

_SIGNED = {"int8", "int16", "int32", "int64", "int32 equal", "int64 equal", "uint8 equal", "uint16 equal"}
_UNSIGNED = {"uint8", "uint16", "uint32", "uint64", "uint32 equal"}


def encode_vmdesc(devices: list[dict], page_size: int, configuration: dict | None = None) -> bytes:
    """Return the JSON bytes QEMU writes after ``QEMU_VM_VMDESCRIPTION`` + ``be32 len``.

    QEMU 7.2 writes ``page_size`` then ``devices``; newer QEMUs put a ``configuration``
    description first, which is written only when given.
    """
    doc: dict[str, Any] = {}
    if configuration is not None:
        doc["configuration"] = configuration
    doc["page_size"] = page_size
    doc["devices"] = devices
    return json.dumps(doc).encode()


def parse_vmdesc(data: bytes, offset: int | None = None) -> dict:
    """Decode vmdesc JSON bytes into a dict; StreamError (at ``offset``) if it is not a JSON object."""
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StreamError(f"vmdescription is not valid JSON: {exc}", offset, None) from None
    except RecursionError:
        # json's parser recurses per nesting level; Python's recursion limit is its depth
        # cap (QEMU's vmdescs nest a few levels; walks are capped at MAX_NESTING anyway)
        raise StreamError("vmdescription JSON nests too deeply (more than Python's recursion limit)",
                          offset, None) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("devices", []), list):
        raise StreamError("vmdescription JSON is not an object with a 'devices' list", offset, None)
    return doc


def check_page_size(doc: dict | None, offset: int | None = None) -> int:
    """The vmdesc's ``page_size`` (TARGET_PAGE_SIZE when there is no vmdesc or it has
    none).  Raises StreamError at ``offset`` (the vmdesc's) unless it is a power of two
    from 1 KiB to 1 GiB: QEMU's target pages are 1-64 KiB and its largest host pages
    (1 GiB huge pages) bound anything a stream can mean; a larger value would only make
    each page record allocate and touch more."""
    page_size = doc.get("page_size", TARGET_PAGE_SIZE) if doc else TARGET_PAGE_SIZE
    if (not isinstance(page_size, int) or isinstance(page_size, bool) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE
            or page_size & (page_size - 1)):
        raise StreamError(f"vmdesc page_size {label(page_size)} is not a power of two from "
                          f"{MIN_PAGE_SIZE} to {MAX_PAGE_SIZE} (1 GiB)", offset, None)
    return page_size


def find_vmdesc(path: str | os.PathLike) -> tuple[dict, int] | None:
    """Find the trailing vmdesc of the stream file ``path``.

    Returns ``(json_dict, offset_of_the_0x06_byte)`` or None when the file has no
    vmdesc (postcopy streams, ``suppress_vmdesc`` machines, truncated files).
    Raises OSError if the file cannot be read.
    """
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        start = max(0, size - VMDESC_TAIL_BYTES)
        fh.seek(start)
        tail = np.frombuffer(fh.read(), dtype=np.uint8)
    if tail.size < 6:
        return None
    cand = np.flatnonzero(tail[:-5] == QEMU_VM_VMDESCRIPTION)
    if cand.size == 0:
        return None
    lens = ((tail[cand + 1].astype(np.int64) << 24) | (tail[cand + 2].astype(np.int64) << 16)
            | (tail[cand + 3].astype(np.int64) << 8) | tail[cand + 4].astype(np.int64))
    hits = cand[lens == tail.size - cand - 5]
    for p in hits:               # earliest first: the longest candidate JSON
        if p > 0 and tail[p - 1] != QEMU_VM_EOF:
            continue
        try:
            doc = parse_vmdesc(tail[p + 5:].tobytes())
        except StreamError:
            continue
        return doc, start + int(p)
    return None


def device_index(doc: dict | None) -> dict[tuple[str, int], dict]:
    """Map ``(name, instance_id)`` to the device entry of a vmdesc dict (empty for None).

    Raises StreamError when ``doc`` is not a vmdesc (no ``devices`` list).
    """
    index: dict[tuple[str, int], dict] = {}
    if doc is None:
        return index
    devices = doc.get("devices", []) if isinstance(doc, dict) else None
    if not isinstance(devices, list):
        raise StreamError("vmdesc has no 'devices' list", None, None)
    for dev in devices:
        if isinstance(dev, dict) and isinstance(dev.get("name"), str) and isinstance(dev.get("instance_id"), int):
            index[(dev["name"], dev["instance_id"])] = dev
    return index


def _size(r: StreamReader, field: dict) -> int:
    size = field.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise r.error(f"vmdesc field {label(field.get('name'))} has no valid size ({label(size)})", r.offset)
    return size


class WalkBudget:
    """Field visits allowed over all the walks of one stream: FREE_FIELD_VISITS plus one
    per byte the walks consumed, so the work is bounded per input byte (a vmdesc of
    millions of zero-size fields, repeated over many sections, cannot spin for minutes)."""

    def __init__(self) -> None:
        self.visits = 0
        self.walked = 0          # bytes consumed by finished walks


class _Walker:
    """One section walk: the reader, a per-section budget of field visits (a hostile
    ``array_len`` must not turn into a billion iterations or a huge list) and the
    stream's :class:`WalkBudget`."""

    def __init__(self, r: StreamReader, budget: WalkBudget):
        self.r = r
        self.budget = MAX_FIELD_VISITS
        self.stream = budget
        self.start = r.offset
        self.allowance = FREE_FIELD_VISITS + budget.walked

    def _paid(self) -> None:
        """Called when the stream's visits pass the allowance last computed: recompute it
        with the bytes consumed so far; StreamError when the visits really exceed it."""
        self.allowance = FREE_FIELD_VISITS + self.stream.walked + (self.r.offset - self.start)
        if self.stream.visits > self.allowance:
            raise self.r.error(f"vmdesc walks made {self.stream.visits} field visits for "
                               f"{self.allowance - FREE_FIELD_VISITS} bytes of device state (at most "
                               f"{FREE_FIELD_VISITS} more visits than bytes)", self.r.offset)

    def fields(self, fields: Any):
        """Yield each field entry, ``array_len`` times over, as analyze-migration.py unfolds them."""
        r = self.r
        if not isinstance(fields, list):
            raise r.error("vmdesc 'fields' is not a list", r.offset)
        for field in fields:
            if not isinstance(field, dict):
                raise r.error(f"vmdesc field entry is not an object: {label(field)}", r.offset)
            n = field.get("array_len", 1)
            if not isinstance(n, int) or n < 0:
                raise r.error(f"vmdesc field {label(field.get('name'))} has a bad array_len {label(n)}", r.offset)
            self.budget -= n
            if self.budget < 0:
                raise r.error(f"vmdesc describes more than {MAX_FIELD_VISITS} fields in one section", r.offset)
            stream = self.stream
            for _ in range(n):
                stream.visits += 1
                if stream.visits > self.allowance:
                    self._paid()
                yield field

    def field(self, field: dict, depth: int) -> Any:
        r = self.r
        ftype = field.get("type", "unknown")
        if not isinstance(ftype, str):
            ftype = "unknown"
        what = f"field {label(field.get('name'))}"
        if ftype == "struct":
            sub = field.get("struct")
            if not isinstance(sub, dict):
                raise r.error(f"vmdesc struct {label(field.get('name'))} has no description", r.offset)
            return self.vmsd(sub, depth + 1)
        if ftype == "capability":
            return r.name(what)
        size = _size(r, field)
        if ftype == "nullptr":
            at = r.offset
            data = r.read(size, what) if size <= MAX_DECODED_FIELD else b""
            if data != b"0":
                raise r.error(f"nullptr {what} of {size} bytes is not b'0'", at)
            return None
        if size > MAX_DECODED_FIELD:
            r.skip(size, what)
            return f"<{size} bytes>"
        data = r.read(size, what)
        if ftype == "bool" and size == 1:
            return data[0] != 0
        if ftype in _SIGNED:
            return int.from_bytes(data, "big", signed=True)
        if ftype in _UNSIGNED:
            return int.from_bytes(data, "big")
        if ftype == "int32 le":
            return int.from_bytes(data, "little", signed=True)
        return data.hex()

    def vmsd(self, desc: Any, depth: int) -> dict[str, Any]:
        r = self.r
        if depth > MAX_NESTING:
            raise r.error(f"vmdesc nests deeper than {MAX_NESTING} levels", r.offset)
        if not isinstance(desc, dict):
            raise r.error("vmdesc entry is not an object", r.offset)
        values: dict[str, Any] = {}
        for field in self.fields(desc.get("fields", [])):
            value = self.field(field, depth)
            name = wire_name(str(field.get("name", "?")))
            # Arrays arrive unfolded and QEMU splits arrays around NULL pointers into
            # several entries of one name: repeated names collect into a list.
            if name not in values:
                values[name] = value
            elif isinstance(values[name], list):
                values[name].append(value)
            else:
                values[name] = [values[name], value]
        subsections = desc.get("subsections", [])
        if not isinstance(subsections, list):
            raise r.error("vmdesc 'subsections' is not a list", r.offset)
        for sub in subsections:
            at = r.offset
            if r.u8("a subsection marker") != QEMU_VM_SUBSECTION:
                name = sub.get("vmsd_name") if isinstance(sub, dict) else sub
                raise r.error(f"subsection {label(name)} not found (no 0x05 marker)", at)
            name = r.name("a subsection name")
            version = r.be32("a subsection version")
            values[name] = {"version": version, **self.vmsd(sub, depth + 1)}
        return values


def walk_vmsd(r: StreamReader, desc: dict, budget: WalkBudget | None = None) -> dict[str, Any]:
    """Consume one vmsd's bytes (fields, then subsections) as ``desc`` describes them.

    ``budget``: the stream's :class:`WalkBudget`, shared by all its sections (None: a
    fresh one).  Returns ``{field name: value}`` (repeated names become lists,
    subsections nest by name).  Raises StreamError on truncation, a malformed
    description, a missing subsection marker or an exhausted budget.
    """
    budget = WalkBudget() if budget is None else budget
    walker = _Walker(r, budget)
    values = walker.vmsd(desc, 0)
    budget.walked += r.offset - walker.start
    return values
