"""The engine as a composition: RAMState (npqfile/migration/ram.py, QEMU's ram.c) is the
public object the mechanisms use, and no mechanism reaches into the engine's privates."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from npqfile.channels import MemoryChannel
from npqfile.migration.engine import MigrationEngine, MigrationParams
from npqfile.migration.ram import RAMState
from npqfile.migration.session import fill_guest
from npqfile.migration.workloads import Workload
from npqfile.qemufile import QEMUFile
from npqfile.ram import GuestRAM

MIB = 1 << 20
MIGRATION = Path(__file__).resolve().parent.parent / "npqfile" / "migration"


def _is_engine(node: ast.AST) -> bool:
    """``engine``, ``e``, ``self.e`` or ``self.engine``: the names the mechanisms give it."""
    if isinstance(node, ast.Name):
        return node.id in ("engine", "e", "eng")
    return isinstance(node, ast.Attribute) and node.attr in ("e", "engine")


def test_no_mechanism_reaches_into_the_engines_private_members():
    found = []
    for path in sorted(MIGRATION.glob("*.py")):
        if path.name == "engine.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and _is_engine(node.value)):
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not found, "private engine members used outside engine.py:\n" + "\n".join(found)


def test_ram_state_is_the_runs_public_ram_side():
    with GuestRAM() as ram:
        ram.add_block("ram", 4 * MIB)
        ram.add_block("vga", 1 * MIB)
        fill_guest(ram, "mixed", 3)
        f = QEMUFile(MemoryChannel())
        engine = MigrationEngine(ram, f, Workload(), MigrationParams())
        assert engine.rs is None and engine.query_migrate() == {"status": "setup"}
        st = engine.run()
        f.fflush()
        rs = engine.rs
        assert isinstance(rs, RAMState) and st.status == "completed"
        assert rs.stats is st and rs.f is f and rs.writer is engine.writer
        # everything was sent: an empty bitmap, no dirty page, the counters are the stats'
        assert rs.dirty == 0 and not any(bm.any() for bm in rs.bitmap.values())
        assert set(rs.bitmap) == {"ram", "vga"}
        assert rs.transferred() == st.ram_queued == st.ram_transferred == rs.written(st.stream_bytes)
        assert rs.iteration is None and st.iterations[-1].final
        assert engine.query_migrate()["ram"]["remaining"] == 0


def test_ram_state_save_pages_clears_the_bitmap_and_counts_down():
    # the hook postcopy serves page requests with: the pages leave the bitmap and ``dirty``
    with GuestRAM() as ram:
        ram.add_block("ram", 1 * MIB)
        fill_guest(ram, "random", 1)
        f = QEMUFile(MemoryChannel())
        engine = MigrationEngine(ram, f, Workload(), MigrationParams())
        engine.run()
        rs = engine.rs
        block = ram.block("ram")
        rs.bitmap["ram"][[3, 4, 9]] = True
        rs.dirty = 3
        before = rs.saver.stats.pages
        assert rs.save_pages(block, np.array([3, 9])) == 2
        assert rs.dirty == 1 and np.flatnonzero(rs.bitmap["ram"]).tolist() == [4]
        assert rs.saver.stats.pages == before + 2
        f.close()
