"""Runs of set pages in a page mask: one helper for every "one call per run" loop.

Supports: :func:`mask_runs` -- the ``[start, stop)`` page ranges where a 1-D bool mask is
True, as QEMU's loops over ``find_next_bit`` / ``find_next_zero_bit`` (util/bitmap.c)
find them.  Users: the mapped-ram loader (one read per run of present pages), postcopy's
discard ranges (``postcopy_send_discard_bm_ram``), release-ram (one release per run) and
``analyze --extract`` (one write per run of non-zero pages).

Goals: no per-page Python work; the caller's loop is per run.  Plan: the run edges are
where the mask, padded with False at both ends, changes value.
"""

from __future__ import annotations

import numpy as np


def mask_runs(mask: np.ndarray) -> np.ndarray:
    """The runs of True in the 1-D ``mask`` (bool, or anything numpy reads as bool): an
    ``(N, 2)`` int64 array of ``[start, stop)`` index pairs, in order, disjoint and not
    adjacent (N = 0 for no True).  ValueError for a mask that is not 1-D."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 1:
        raise ValueError(f"a page mask must be 1-D, not of shape {m.shape}")
    edges = np.flatnonzero(np.diff(np.concatenate(([False], m, [False])).view(np.int8)))
    return edges.reshape(-1, 2).astype(np.int64, copy=False)
