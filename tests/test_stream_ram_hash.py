"""LoadHasher (npqfile/stream/ram_hash.py): the hand-over between its hashing thread and
the loader.  Its tests with real streams are in tests/test_perf_levers.py."""

from __future__ import annotations

import hashlib
import queue
import threading

import numpy as np

from npqfile.stream.ram_hash import LoadHasher


def _ram_of(data: np.ndarray):
    """A stand-in GuestRAM of one block "ram" holding ``data``."""
    class Ram:
        blocks = [type("B", (), {"name": "ram", "size": data.nbytes,
                                 "sha256": lambda self: hashlib.sha256(data.tobytes()).hexdigest()})()]
    return Ram()


class _HandOff:
    """The hasher's queue, but ``put`` of a range returns only once the thread has taken
    it: what a thread idle in ``get`` may do before the putter runs on, made certain."""

    def __init__(self):
        self.q = queue.Queue()

    def put(self, item):
        self.q.put(item)
        if item is not None:
            self.q.join()

    def get(self):
        item = self.q.get()
        self.q.task_done()
        return item

    def get_nowait(self):
        item = self.q.get_nowait()
        self.q.task_done()
        return item


def test_what_was_never_queued_is_hashed_by_the_caller_not_the_yielding_thread():
    """At the end the loader hashes the rest of each block itself: the thread (nice 10, a
    tenth of a busy core) must not be handed a range the verdict then waits for -- in a
    stream of pages interleaved with ZERO records no run is queued while loading, so that
    rest is the whole block.  Old code queued it, and an idle thread took it."""
    data = np.random.default_rng(13).integers(0, 256, 64 * 4096, dtype=np.uint8)
    hasher = LoadHasher()
    hasher._queue = _HandOff()
    bh = hasher.track("ram", memoryview(data))
    real, by = bh.sha, []
    took_first = threading.Event()

    class Recorded:
        def update(self, buf):
            by.append(threading.current_thread().name)
            real.update(buf)
            took_first.set()

        def hexdigest(self):
            return real.hexdigest()
    bh.sha = Recorded()
    hasher.advance(bh, 4096)                 # one page queued while loading: the thread hashes it
    assert took_first.wait(60)
    assert hasher.digests(_ram_of(data)) == {"ram": hashlib.sha256(data.tobytes()).hexdigest()}
    assert by == ["load-hasher", threading.current_thread().name]


def test_a_range_the_hashing_thread_fails_on_is_never_left_out_of_a_digest():
    """Should the thread's update ever raise, the block is hashed again from scratch: the
    digest never silently lacks a range (the old thread died, the rest went on without it)."""
    data = np.random.default_rng(12).integers(0, 256, 8 * 4096, dtype=np.uint8)
    hasher = LoadHasher()
    bh = hasher.track("ram", memoryview(data))
    real = bh.sha
    failed = threading.Event()

    class FailsOnce:
        def update(self, buf):
            if threading.current_thread().name == "load-hasher" and not failed.is_set():
                failed.set()
                raise MemoryError("simulated")
            real.update(buf)

        def hexdigest(self):
            return real.hexdigest()
    bh.sha = FailsOnce()
    for end in range(4096, data.nbytes + 1, 4096):
        hasher.advance(bh, end)
    assert failed.wait(60)                # the thread met the failure before the takeover
    assert hasher.digests(_ram_of(data)) == {"ram": hashlib.sha256(data.tobytes()).hexdigest()}



def test_the_hashing_thread_never_runs_above_the_process_s_priority(monkeypatch):
    """nice 10 lowers the thread's priority; a process already nicer (``nice -n 15``) keeps
    its own for the thread -- never raised above it (root may raise priorities)."""
    import os

    set_to = []
    for current, want in ((0, 10), (15, 15)):
        monkeypatch.setattr(os, "getpriority", lambda which, who, c=current: c)
        monkeypatch.setattr(os, "setpriority", lambda which, who, value: set_to.append(value))
        data = np.arange(1 << 16, dtype=np.uint8)
        h = LoadHasher()
        bh = h.track("ram", memoryview(data))
        h.advance(bh, data.nbytes)
        assert h.digests(_ram_of(data)) == {"ram": hashlib.sha256(data.tobytes()).hexdigest()}
        assert set_to[-1] == want
