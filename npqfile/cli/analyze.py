"""``npqfile analyze STREAM``: what a migration stream holds (the peer of QEMU's analyze-migration.py).

Supports: a text report (header, configuration, sections with offsets and sizes,
commands, RAM blocks, page counts per kind and per part), ``--json`` (the same, plus
each block's ``sha256`` and, with ``--fields``, decoded device state), ``--extract DIR``
(one sparse file per RAM block, named safely).  Reads what analyze-migration.py
rejects: XBZRLE and compressed pages, postcopy commands, x-ignore-shared, streams
without footers, configuration or (up to the first unsizable section) vmdesc.

Goals: a bad stream gives exit status 1 and ``error: REASON at offset N (section S)``
on stderr; a stream cut short by a section that cannot be sized prints what was read,
then that error line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys

import numpy as np

from npqfile.stream.loader import LoadResult
from npqfile.stream.ram_loader import DEFAULT_MAX_RAM_BYTES
from npqfile.stream.snapshot import load_file
from npqfile.units import format_bytes, parse_size

NAME = "analyze"
HELP = "show the sections and RAM of a migration stream (like QEMU's analyze-migration.py)"
ORDER = 30
EXTRACT_CHUNK_PAGES = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stream", help="stream file (as written by migrate exec:cat > FILE or npqfile)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--fields", action="store_true", help="with --json: decode device fields via the vmdesc")
    p.add_argument("--extract", metavar="DIR", help="write each RAM block to DIR/<safe name>")
    p.add_argument("--capability", action="append", default=[], metavar="CAP",
                   help="a capability the source had that the stream does not announce (x-ignore-shared)")
    p.add_argument("--max-ram", default=str(DEFAULT_MAX_RAM_BYTES), metavar="SIZE",
                   help="refuse streams declaring more RAM than this (virtual; default 64G)")


def safe_name(name: str) -> str:
    """A block idstr as one file name: ``/rom@etc/acpi/tables`` -> ``rom@etc_acpi_tables``."""
    safe = re.sub(r"[^A-Za-z0-9._@+-]", "_", name.strip("/")).lstrip(".")
    return safe or "block"


def _sha256(block) -> str:
    return hashlib.sha256(block.array).hexdigest()


def extract(result: LoadResult, directory: str) -> list[str]:
    """Write each RAM block to ``directory`` as a sparse file; returns the paths. OSError on failure."""
    os.makedirs(directory, exist_ok=True)
    paths, used = [], set()
    for block in result.ram.blocks if result.ram else []:
        name = safe_name(block.name)
        while name in used:
            name += "_"
        used.add(name)
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            ps = block.page_size
            for start in range(0, block.n_pages, EXTRACT_CHUNK_PAGES):
                pages = block.pages[start:start + EXTRACT_CHUNK_PAGES]
                nonzero = np.bitwise_or.reduce(pages.view(np.uint64), axis=1) != 0
                # runs of non-zero pages are written; zero pages stay holes
                edges = np.flatnonzero(np.diff(np.concatenate(([0], nonzero.view(np.int8), [0]))))
                for a, b in zip(edges[::2].tolist(), edges[1::2].tolist()):
                    os.pwrite(fd, pages[a:b], (start + a) * ps)
            os.ftruncate(fd, block.size)
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def to_json(result: LoadResult, path: str) -> dict:
    """The report as a JSON-ready dict."""
    ram = result.ram
    return {
        "stream": path,
        "size": os.path.getsize(path),
        "complete": result.complete,
        "stopped": result.stopped,
        "machine": result.machine,
        "capabilities": result.capabilities,
        "target_page_bits": result.target_page_bits,
        "sections": [{k: v for k, v in vars(s).items() if k != "fields" or v is not None}
                     for s in result.sections],
        "commands": result.commands,
        "ram": {
            "blocks": [{"name": b.name, "size": b.size, "sha256": _sha256(b)} for b in (ram.blocks if ram else [])],
            "stats": result.stats.as_dict(),
        },
        "vmdesc": result.vmdesc is not None,
        "warnings": result.warnings,
    }


def _print_text(result: LoadResult, path: str, out) -> None:
    st = result.stats
    print(f"stream   {path} ({os.path.getsize(path)} bytes)", file=out)
    print(f"machine  {result.machine if result.machine is not None else '(no configuration section)'}", file=out)
    if result.capabilities:
        print(f"caps     {', '.join(result.capabilities)}", file=out)
    for c in result.commands:
        extra = ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("cmd", "offset", "len"))
        print(f"command  {c['cmd']:<20} at {c['offset']:>10}  len {c['len']}{'  ' + extra if extra else ''}", file=out)
    print(f"{'offset':>10}  {'type':<5} {'id':>4}  {'idstr':<28} {'inst':>4} {'ver':>3} {'bytes':>12}  footer", file=out)
    for s in result.sections:
        print(f"{s.offset:>10}  {s.type:<5} {s.section_id:>4}  {s.idstr:<28} {s.instance_id:>4} "
              f"{s.version_id:>3} {s.size:>12}  {'yes' if s.footer else 'no'}", file=out)
    if result.ram:
        print("RAM blocks:", file=out)
        for b in result.ram.blocks:
            print(f"  {b.name:<28} {b.size:>12} ({format_bytes(b.size)})  sha256 {_sha256(b)}", file=out)
    print(f"pages    normal {st.normal_pages}, zero {st.zero_pages}, xbzrle {st.xbzrle_pages}, "
          f"compressed {st.compressed_pages} (total {st.pages}; {st.pages_bytes} RAM bytes)", file=out)
    for i, p in enumerate(st.parts):
        print(f"  part {i:<4} {p['type']:<5} at {p['offset']:>10}: normal {p['normal']}, zero {p['zero']}, "
              f"xbzrle {p['xbzrle']}, compressed {p['compressed']} ({p['bytes']} bytes)", file=out)
    print(f"vmdesc   {'yes' if result.vmdesc is not None else 'no'}", file=out)
    for w in result.warnings:
        print(f"note     {w}", file=out)


def run(args: argparse.Namespace) -> int:
    result = load_file(args.stream, max_ram_bytes=parse_size(args.max_ram), capabilities=args.capability,
                       decode_devices=args.fields, partial_ok=True)
    try:
        if args.json:
            json.dump(to_json(result, args.stream), sys.stdout, indent=2)
            print()
        else:
            _print_text(result, args.stream, sys.stdout)
        if args.extract:
            for p in extract(result, args.extract):
                print(f"wrote {p}", file=sys.stderr)
    finally:
        if result.ram is not None:
            result.ram.close()
    if not result.complete:
        sys.stdout.flush()
        print(f"error: {result.stopped}", file=sys.stderr)
        return 1
    return 0
