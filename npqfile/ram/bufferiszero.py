"""Which guest pages are all zero: QEMU's ``buffer_is_zero`` (util/bufferiszero.c) over
numpy, for many pages at once.

Supports: :func:`buffer_is_zero` -- pages of a ``(n_pages, page_size)`` uint8 array
(``RAMBlock.pages``), all of them or those an index array names, to a bool array.  The
one zero scan of the source's main channel (``RAMSaver._zero_mask``), the multifd
sender (``multifd_send_zero_page_detect``), the multifd receiver
(``multifd_recv_zero_page_process``) and ``analyze --extract``.

Goals: read as little RAM as QEMU does and copy none that need not be.  Like
``buffer_is_zero``, a page whose first word is not zero is not read further (random RAM
then costs one cache line a page); pages given as a run of consecutive indices are
scanned through a view; of scattered ones only the first words are gathered, then the
whole pages of the candidates.  Plan: one pass over every page's first 8 bytes, then an
OR-reduction of the candidates only; numpy releases the GIL for both.
"""

from __future__ import annotations

import numpy as np


def buffer_is_zero(pages: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Bool array, one entry per page of ``pages[idx]`` (every page when ``idx`` is
    None): True where the page is all zero bytes.  ``pages``: a C-contiguous 2-D uint8
    array, one page a row; ``idx``: page indices in ``pages`` (a run of consecutive ones
    is read through a view, any other order gathered: first words, then candidates).  An empty ``idx``
    gives an empty array.  Raises IndexError for an index outside ``pages`` (numpy's)."""
    if idx is None:
        sel = pages
    else:
        idx = np.asarray(idx)
        if not idx.size:
            return np.zeros(0, dtype=bool)
        first, last = int(idx[0]), int(idx[-1])
        if (last - first + 1 == idx.size and 0 <= first and last < pages.shape[0]
                and (idx.size < 3 or np.all(np.diff(idx) == 1))):
            sel = pages[first:last + 1]          # a view: no copy
        else:
            return _scattered_is_zero(pages, idx)
    n = sel.shape[0]
    if not n:
        return np.zeros(0, dtype=bool)
    words = sel.reshape(n, -1)
    if words.shape[1] % 8 == 0:
        words = words.view(np.uint64)            # 8 bytes a compare, as buffer_is_zero's word loop
    # stop at a page's first non-zero word: only pages whose first word is zero are read on
    zero = words[:, 0] == 0
    maybe = np.flatnonzero(zero)
    if maybe.size == n:
        return np.bitwise_or.reduce(words, axis=1) == 0
    if maybe.size:
        zero[maybe] = np.bitwise_or.reduce(words[maybe], axis=1) == 0
    return zero


def _scattered_is_zero(pages: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``buffer_is_zero`` of the pages ``idx`` names in any order: gather their first 8
    bytes, then only the pages those say may be zero (a gather of every whole page would
    copy all of a dirty set's RAM to read one word a page)."""
    head = pages[idx, :8]                         # IndexError for an index outside pages
    zero = ~head.any(axis=1)
    maybe = np.flatnonzero(zero)
    if maybe.size:
        zero[maybe] = ~pages[idx[maybe]].any(axis=1)
    return zero
