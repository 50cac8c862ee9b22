"""A hypothesis state machine over QEMUFile: random puts (bytes, be16/32/64, buffers,
async views of an mmap with and without may_free, batched records), flushes and
injected write errors; a model predicts the wire and the released pages, and at the end
everything is read back through a second QEMUFile over a channel with random short
reads.

The model observes flush points (the channel's writev calls) rather than predicting
them -- the exact flush points are checked against the seed itself in
test_seed_differential.py -- and predicts what each flush carries: the bytes of each
put, and for async views the memory as it is at flush time, with may_free pages
released (zero, private mapping) after a successful write only.
"""

from __future__ import annotations

import errno
import mmap

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from npqfile.channels import MemoryChannel
from npqfile.qemufile import QEMUFile

PAGE = mmap.PAGESIZE
NPAGES = 24


class FlakyChannel(MemoryChannel):
    def __init__(self):
        super().__init__()
        self.fail_next = False

    def writev(self, buffers, pos):
        if self.fail_next:
            self.writes.append(0)
            raise OSError(errno.EPIPE, "injected")
        return super().writev(buffers, pos)


class QEMUFileMachine(RuleBasedStateMachine):
    @initialize(io_buf_size=st.sampled_from([64, 300, 32768]), max_iov=st.sampled_from([2, 5, 64]),
                seed=st.integers(0, 2**32 - 1))
    def setup(self, io_buf_size, max_iov, seed):
        self.mm = mmap.mmap(-1, NPAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.ram = np.frombuffer(self.mm, dtype=np.uint8)
        self.ram[:] = np.random.default_rng(seed).integers(1, 256, self.ram.size, dtype=np.uint8)
        self.model_ram = self.ram.copy()
        self.ch = FlakyChannel()
        self.f = QEMUFile(self.ch, io_buf_size=io_buf_size, max_iov=max_iov)
        self.expected = bytearray()
        self.pending: list[tuple] = []  # ("b", bytes) | ("m", start, length, may_free)
        self.reads: list[tuple] = []  # how to read the stream back: (kind, value)
        self.failed = False

    # -- model --------------------------------------------------------------------------

    def _after(self, writes_before: int) -> None:
        """Account for the writev calls made since ``writes_before``: each carries the
        oldest pending pieces (a staged-bytes piece may be split across calls; an
        async view never is), then releases its may_free views."""
        for n in self.ch.writes[writes_before:]:
            if self.ch.fail_next:
                self.failed = True
                self.pending.clear()
                return
            frees: list[list[int]] = []
            while n:
                piece = self.pending.pop(0)
                if piece[0] == "b":
                    take = piece[1][:n]
                    self.expected += take
                    n -= len(take)
                    if len(take) < len(piece[1]):
                        self.pending.insert(0, ("b", piece[1][len(take):]))
                    continue
                _, start, length, may_free = piece
                assert length <= n, "an async view was split across writes"
                self.expected += self.model_ram[start:start + length].tobytes()
                n -= length
                if may_free:
                    if frees and frees[-1][1] == start:
                        frees[-1][1] = start + length
                    else:
                        frees.append([start, start + length])
            # zero-length pieces flushed with this call carry nothing
            while self.pending and self.pending[0][0] == "m" and self.pending[0][2] == 0:
                self.pending.pop(0)
            for lo, hi in frees:
                lo, hi = -(-lo // PAGE) * PAGE, hi // PAGE * PAGE
                if hi > lo:
                    self.model_ram[lo:hi] = 0

    def _put(self, op, pieces, reads) -> None:
        before = len(self.ch.writes)
        if self.failed:  # after the first error a put is a no-op: no I/O, nothing queued
            op()
            assert len(self.ch.writes) == before and self.f._queued == 0
            return
        self.pending.extend(pieces)
        op()
        self.reads.extend(reads)
        self._after(before)

    # -- rules --------------------------------------------------------------------------

    @rule(v=st.integers(0, 255))
    def put_byte(self, v):
        self._put(lambda: self.f.put_byte(v), [("b", bytes([v]))], [("byte", v)])

    @rule(width=st.sampled_from([2, 4, 8]), v=st.integers(0, 2**64 - 1))
    def put_be(self, width, v):
        v &= (1 << 8 * width) - 1
        put = {2: self.f.put_be16, 4: self.f.put_be32, 8: self.f.put_be64}[width]
        self._put(lambda: put(v), [("b", v.to_bytes(width, "big"))], [(f"be{width}", v)])

    @rule(data=st.binary(max_size=700) | st.integers(0, 70000).map(lambda n: bytes([n % 251]) * n))
    def put_buffer(self, data):
        self._put(lambda: self.f.put_buffer(data), [("b", data)], [("buf", data)])

    @rule(start=st.integers(0, NPAGES * PAGE - 1), length=st.integers(0, 3 * PAGE),
          may_free=st.booleans(), as_numpy=st.booleans())
    def put_buffer_async(self, start, length, may_free, as_numpy):
        length = min(length, NPAGES * PAGE - start)
        view = self.ram[start:start + length] if as_numpy else memoryview(self.mm)[start:start + length]
        expect = self.model_ram[start:start + length].tobytes()
        self._put(lambda: self.f.put_buffer_async(view, may_free),
                  [("m", start, length, may_free)], [("buf", expect)])

    @rule(first=st.integers(0, NPAGES - 1), count=st.integers(1, 12), may_free=st.booleans())
    def put_records(self, first, count, may_free):
        idx = [(first + 3 * k) % NPAGES for k in range(count)]
        heads = (np.array(idx, dtype=np.uint64) * PAGE | 0x28).astype(">u8")
        pages = [self.ram[i * PAGE:(i + 1) * PAGE] for i in idx]
        pieces, reads = [], []
        for i, h in zip(idx, heads.tolist()):
            pieces += [("b", h.to_bytes(8, "big")), ("m", i * PAGE, PAGE, may_free)]
            reads += [("be8", h), ("buf", None)]  # page content checked against the wire
        self._put(lambda: self.f.put_records(heads.tobytes(), 8, pages, may_free), pieces, reads)

    @rule()
    def fflush(self):
        before = len(self.ch.writes)
        assert self.f.fflush() == (-errno.EPIPE if self.failed else 0)
        self._after(before)

    @precondition(lambda self: not self.failed)
    @rule()
    def inject_write_error(self):
        self.ch.fail_next = True
        before = len(self.ch.writes)
        if self.f.fflush() == 0:  # nothing was queued: no write happened
            assert len(self.ch.writes) == before
            self.ch.fail_next = False
            return
        assert self.f.get_error() == -errno.EPIPE
        self._after(before)

    # -- checks -------------------------------------------------------------------------

    @invariant()
    def bounded_state(self):
        assert len(self.f._iov) <= self.f._max_iov
        assert 0 <= self.f._buf_index <= self.f._io_buf_size
        assert self.ch.getvalue() == bytes(self.expected)
        np.testing.assert_array_equal(self.ram, self.model_ram)
        assert sum(p[2] if p[0] == "m" else len(p[1]) for p in self.pending) == self.f._queued

    def teardown(self):
        before = len(self.ch.writes)
        ret = self.f.close()
        self._after(before)
        assert ret == (-errno.EPIPE if self.failed else 0)
        wire = self.ch.getvalue()
        assert wire == bytes(self.expected)
        np.testing.assert_array_equal(self.ram, self.model_ram)
        if self.failed:
            return
        rng = np.random.default_rng(len(wire))
        r = QEMUFile(MemoryChannel.reader(wire, chunk=lambda k: int(rng.integers(1, 9000))))
        for kind, v in self.reads:
            if kind == "byte":
                assert r.get_byte() == v
            elif kind.startswith("be"):
                assert {"be2": r.get_be16, "be4": r.get_be32, "be8": r.get_be64}[kind]() == v
            elif v is None:
                assert r.get_buffer(bytearray(PAGE)) == PAGE
            else:
                out = bytearray(len(v))
                assert r.get_buffer(out) == len(v) and out == v
        assert r.get_error() == 0 and r.tell() == len(wire)
        r.get_byte()
        assert r.get_error() == -errno.EIO


QEMUFileMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
TestQEMUFileMachine = QEMUFileMachine.TestCase
