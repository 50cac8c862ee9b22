"""Per-block sha256 of loaded RAM, computed while the stream is still arriving.

Supports: ``LoadHasher``, which the RAM loader feeds with the ranges of each block it has
finished writing in address order; a thread hashes them (hashlib releases the GIL for
large updates, so this runs on the other core while the loader waits on its channel);
``digests(ram)`` returns each block's sha256 hex digest -- always the digest of the
block's final bytes, exactly ``RAMBlock.sha256()``.  The thread runs at nice 10: it takes
mostly spare CPU, and whatever it has not hashed when the stream ends the loader hashes then.

Goals: ``npqfile incoming`` reports (and a tcp:/unix: migration verifies with) the hash
of every block; hashing 1 GiB after loading costs about as much as loading it.  A
single-pass stream (``npqfile save``, QEMU's first RAM iteration, a paused guest's
migration) writes each page once, in ascending address order, so the hash can trail the
loader.  Any other stream must still get the right digest.

Plan: per block a running ``hashlib.sha256`` and ``next``, the end of what has been
queued for hashing.  The loader queues ``[next, end)`` after writing a run of pages that
ends at ``end`` (the bytes in between that it did not write stay as they are unless a
later record writes them).  Any write below ``next`` -- a page sent again, a stream out
of order -- makes the block ``stale``: its queued hash is dropped and ``digests`` hashes
the block again from scratch after loading.  The loader is the only writer and queues a
range only after writing it, so a range queued and not stale is final when it is hashed.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from typing import Any

__all__ = ["BlockHash", "LoadHasher"]

HASHER_NICE = 10    # the hashing thread's nice value (its own; the loader keeps the process's)


class BlockHash:
    """One block's running hash: ``next`` is where the next queued range starts;
    ``stale`` says a write landed below it (the block is hashed again at the end)."""
    __slots__ = ("name", "view", "size", "next", "stale", "sha")

    def __init__(self, name: str, view: memoryview):
        self.name = name
        self.view = view
        self.size = view.nbytes
        self.next = 0
        self.stale = False
        self.sha = hashlib.sha256()


class LoadHasher:
    """Hashes loaded RAM blocks in a background thread as the loader completes them."""

    def __init__(self) -> None:
        self.blocks: dict[str, BlockHash] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._takeover = False          # set by _stop: the thread hands back what it takes
        self._handed_back: list = []

    def track(self, name: str, view: memoryview) -> BlockHash:
        """Start the running hash of block ``name`` whose bytes are ``view``; returns it."""
        bh = self.blocks.get(name)
        if bh is None:
            bh = self.blocks[name] = BlockHash(name, view)
        return bh

    def advance(self, bh: BlockHash, end: int) -> None:
        """The loader wrote ``bh``'s pages up to ``end`` in order: queue ``[next, end)``."""
        if bh.stale or end <= bh.next:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="load-hasher", daemon=True)
            self._thread.start()
        self._queue.put((bh, bh.next, min(end, bh.size)))
        bh.next = end

    def _run(self) -> None:
        # Yield: nice 10 for this thread only (a tenth of a busy core's share).  With a spare
        # core the hash keeps up with the loader; on a busy one (source, destination and
        # hash on 2 cores) it no longer slows the migration, and ``_stop`` takes the rest
        # over.  Not SCHED_IDLE: a thread that gets no CPU at all on a loaded machine could
        # hold the verdict up for the one range it is hashing.
        # Never above the process's own priority: under `nice -n 15` (or as root, who may
        # raise it) the thread must not take CPU from the loader.
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, max(HASHER_NICE, os.getpriority(os.PRIO_PROCESS, tid)))
        except (AttributeError, OSError):
            pass
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._takeover:       # the loader hashes this range and the rest itself
                self._handed_back.append(item)
                return
            bh, start, end = item
            if not bh.stale:
                try:
                    bh.sha.update(bh.view[start:end])
                except Exception:     # noqa: BLE001 -- never a digest with a range missing:
                    bh.stale = True   # the block is hashed again from scratch (or fails) in digests

    def _stop(self) -> None:
        """Stop the thread and hash here, at this thread's priority, whatever it has not
        taken yet: a thread kept short of CPU must not make the verdict wait.  The thread
        finishes the range it is hashing and hands back the next one it takes, so every
        range is hashed once and in order."""
        if self._thread is None:
            return
        self._takeover = True
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        pending = self._handed_back
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._handed_back = []
        self._takeover = False
        for item in pending:
            if item is None:
                continue
            bh, start, end = item
            if not bh.stale:
                bh.sha.update(bh.view[start:end])

    def digests(self, ram: Any) -> dict[str, str]:
        """The sha256 hex digest of every block of ``ram`` by name, from the running hash
        where the block loaded in order, from scratch otherwise; then closes."""
        try:
            # Stop the thread first, then hash what was never queued here: queued, the rest
            # (the whole block when no run was ever queued, as in a stream of pages
            # interleaved with ZERO records) could go to the nice-10 thread while the
            # verdict waits for it.
            self._stop()
            for block in ram.blocks:
                bh = self.blocks.get(block.name)
                if bh is not None and bh.size == block.size and not bh.stale and bh.next < bh.size:
                    bh.sha.update(bh.view[bh.next:bh.size])
                    bh.next = bh.size
            out = {}
            for block in ram.blocks:
                bh = self.blocks.get(block.name)
                good = bh is not None and not bh.stale and bh.size == block.size and bh.next == bh.size
                out[block.name] = bh.sha.hexdigest() if good else block.sha256()
            return out
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (work still queued is dropped) and drop every view of the RAM,
        so the blocks can be closed.  ``digests`` is not usable afterwards."""
        for bh in self.blocks.values():
            bh.stale = True
        self._stop()
        for bh in self.blocks.values():
            bh.view = None
