"""When the source may release the guest RAM it migrated: the release-ram rule, in one place.

Supports: :func:`may_release` (the rule: may the source's copy of migrated pages be
released at this point of the migration, and why), :func:`check_release_ram` (refuse
``release-ram`` up front where the rule can never allow it), :func:`release_after_verdict`
(pre-copy: release all guest RAM once the destination's verdict says it holds RAM equal
to the source's at switchover, else release nothing and say why), :func:`release_runs`
(release runs of pages of one block, one call per run: the primitive the rule's users
share) and :class:`ReleaseRecord` (when and why: the ``release-ram`` object of the
statistics, whose byte counts are the statistics' own release counters).

Goals: release-ram must never lose the only copy of guest RAM.  A page a local socket
accepted is not a page the destination holds, and a page the destination holds is lost
with it if it dies before the guest runs there.  QEMU's ``release-ram`` capability
releases each page once sent only in postcopy (``ram_release_page`` checks
``migration_in_postcopy()``), when the destination already runs the guest and the
source's copy can never be needed again.  In pre-copy the source's RAM stays the only
running copy until the migration has completed; npqfile releases it then, and only
after the destination's verdict (an npqfile destination's verification message, or the
in-process destination's completed load) confirmed equal RAM.  Where no verdict can
come (``file:``, ``exec:``, ``fd:``, ``null:``, a QEMU peer, ``--no-verify``)
``release-ram`` is refused before anything is sent.  After a failed or cancelled
migration nothing has been released.

Plan: the rule is a pure function of the phase and the verdict; the engine (``PRECOPY``:
its saver releases nothing while the guest runs here), postcopy (``POSTCOPY``: each
page once sent) and the session (``AFTER_VERDICT``) call it instead of deciding
themselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from npqfile.migration.stats import MigrationStats, freed_bytes
from npqfile.ram import GuestRAM
from npqfile.ram.runs import mask_runs

# The phases at which someone may ask whether sent pages may be released.
PRECOPY = "precopy"            # pages sent while the source still runs the guest
AFTER_VERDICT = "after-verdict"    # pre-copy completed and the destination's verdict is in
POSTCOPY = "postcopy"          # the destination runs the guest (QEMU's release point)


def may_release(phase: str, verification: dict | None = None) -> tuple[bool, str]:
    """The release-ram rule.  Returns (allowed, reason): ``PRECOPY`` never (the source
    holds the only running copy); ``POSTCOPY`` always (the destination runs the guest:
    QEMU releases each page once sent); ``AFTER_VERDICT`` only when ``verification``
    says the destination holds RAM equal to the source's (``ok`` True).  ValueError for
    an unknown phase."""
    if phase == PRECOPY:
        return False, "pre-copy: the source still holds the only running copy of the guest"
    if phase == POSTCOPY:
        return True, "postcopy: the destination runs the guest, pages are released once sent"
    if phase != AFTER_VERDICT:
        raise ValueError(f"unknown release-ram phase {phase!r}")
    ver = verification or {}
    if ver.get("ok") is True:
        return True, f"the destination's verdict: RAM equal ({ver.get('method')})"
    if ver.get("ok") is False:
        why = ver.get("error") or "RAM differs"
        return False, f"the destination's verdict is not equal RAM ({why}): the source keeps its RAM"
    return False, "no verdict from the destination: the source keeps its RAM"


def check_release_ram(release_ram: bool, *, verdict_possible: bool, why_not: str) -> None:
    """Refuse release-ram where no verdict can ever allow it (pre-copy to a destination
    that cannot confirm what it holds).  Returns None; ValueError saying why."""
    if release_ram and not verdict_possible:
        raise ValueError(f"--release-ram needs the destination's verdict before the source may release its "
                         f"RAM, and {why_not}; without it a failure after the release would lose the guest")


@dataclass
class ReleaseRecord:
    """What release-ram decided in one migration: when and why (the ``release-ram``
    object of the statistics).  How much was released is not kept here: the statistics'
    counters (``released_bytes``, ``release_freed_bytes``, ``release_unmeasured_bytes``)
    are the one account of it, and release-ram is the only thing that adds to them, so
    :meth:`as_dict` reads them from there."""
    enabled: bool = False
    when: str | None = None        # the phase it happened in (None: nothing was released)
    time: float | None = None      # seconds since the migration started
    reason: str = "release-ram is off"

    def as_dict(self, st: MigrationStats) -> dict[str, Any]:
        """The ``release-ram`` object, its byte counts from ``st`` (under the names of the
        statistics' released-bytes / release-advised-bytes)."""
        return {"enabled": self.enabled, "released-bytes": st.release_freed_bytes,
                "release-advised-bytes": st.released_bytes, "when": self.when,
                "time-ms": None if self.time is None else round(self.time * 1000, 3), "reason": self.reason}


def release_runs(block: Any, mask: np.ndarray, first: int = 0) -> int:
    """Release the pages ``first + i`` of ``block`` where ``mask[i]`` is True, one release
    per run of adjacent pages (the block's own primitive: it frees every backing).
    Returns the bytes released."""
    runs = mask_runs(mask)
    if not runs.size:
        return 0
    runs[:, 1] -= runs[:, 0]                    # [first, stop) pages -> (first, count)
    runs[:, 0] += first
    return int(block.release(runs * block.page_size))


def release_after_verdict(ram: GuestRAM, record: ReleaseRecord, st: MigrationStats, t0: float) -> bool:
    """Pre-copy's release point: if the migration (``st.status``) completed and the
    destination's verdict (``st.verification``) allows it (:func:`may_release`), release
    every page of ``ram`` (the guest is stopped and the destination holds all of it),
    add the bytes to ``st``'s release counters and record when; otherwise release
    nothing and record why.  ``t0``: the migration's start (time.monotonic()).  Returns
    True when it released."""
    if not record.enabled:
        return False
    if st.status != "completed":
        record.reason = f"a {st.status} migration releases nothing: the source keeps its RAM"
        return False
    allowed, record.reason = may_release(AFTER_VERDICT, st.verification)
    if not allowed:
        return False
    freed0, unmeasured0 = freed_bytes(ram)
    for b in ram.blocks:
        st.released_bytes += release_runs(b, np.ones(b.n_pages, dtype=bool))
    freed, unmeasured = freed_bytes(ram)
    st.release_freed_bytes += freed - freed0
    st.release_unmeasured_bytes += unmeasured - unmeasured0
    record.when, record.time = AFTER_VERDICT, time.monotonic() - t0
    return True
