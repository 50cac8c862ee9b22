"""Release of guest RAM: the right primitive per backing, measured with smaps/pagemap/mincore,
through RAMBlock.release and through QEMUFile.put_buffer_async(may_free=True)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from npqfile.channels import open_channel
from npqfile.qemufile import QEMUFile
from npqfile.ram import DEFAULT_ADVICE, RAMBlock, coalesce_runs

PS = 4096
N = 256  # pages per test block (1 MiB)
BACKINGS = ["private", "shared", "memfd", "file"]


def _backing(kind: str, tmp_path) -> str:
    return f"file:{tmp_path / 'ram.img'}" if kind == "file" else kind


def _filled(kind: str, tmp_path, **kw) -> RAMBlock:
    b = RAMBlock("pc.ram", N * PS, backing=_backing(kind, tmp_path), **kw)
    b.pages.view(np.uint64)[:] = np.arange(1, N * PS // 8 + 1, dtype=np.uint64).reshape(N, -1)
    assert b.rss_bytes()["Rss"] == b.size and b.resident_pages().all()
    return b


def _stream(block: RAMBlock, release: bool) -> QEMUFile:
    """Send every page with a QEMU-like 8-byte header, as ram_save_page does."""
    f = QEMUFile(open_channel("null:", "w"))
    for i in range(block.n_pages):
        f.put_be64(i * PS | 0x08)
        f.put_buffer_async(block.page(i), may_free=release)
    assert f.fflush() == 0
    return f


def _old(block: RAMBlock) -> np.ndarray:
    return block.pages.view(np.uint64)[:, 0] == np.arange(0, N * PS // 8, PS // 8, dtype=np.uint64) + 1


@pytest.mark.parametrize("kind", BACKINGS)
def test_streaming_with_release_frees_the_backing(kind, tmp_path):
    with _filled(kind, tmp_path) as b:
        f = _stream(b, release=True)
        assert f.released_bytes == b.size == b.released_bytes
        f.close()
        rss = b.rss_bytes()
        assert rss["exact"] == 1 and rss["Rss"] == 0
        assert not b.resident_pages().any()
        assert not b.cached_pages().any() or kind == "file"  # ext4 keeps partly punched large folios
        assert not b.array.any()  # every backing's real primitive reads back zeros


@pytest.mark.parametrize("kind", BACKINGS)
def test_streaming_without_release_changes_nothing(kind, tmp_path):
    with _filled(kind, tmp_path) as b:
        _stream(b, release=False).close()
        assert b.rss_bytes()["Rss"] == b.size and b.resident_pages().all() and b.cached_pages().all()
        assert _old(b).all() and b.released_bytes == 0


@pytest.mark.parametrize("kind", ["shared", "memfd", "file"])
def test_dontneed_on_shared_mappings_unmaps_but_frees_nothing(kind, tmp_path):
    """F3/F4: RSS falls, but shmem / the page cache keeps every page and the old data."""
    with _filled(kind, tmp_path, advice="dontneed") as b:
        _stream(b, release=True).close()
        assert b.rss_bytes()["Rss"] == 0
        assert b.cached_pages().all()
        assert _old(b).all()  # a file mapping reads back the file's bytes


def test_private_free_is_lazy(tmp_path):
    with _filled("private", tmp_path) as b:
        assert b.release([(0, b.size)], advice="free") == b.size
        rss = b.rss_bytes()
        # all still resident; most pages already on the lazyfree LRU (the rest sit in per-CPU batches)
        assert rss["Rss"] == b.size and b.size // 2 <= rss["LazyFree"] <= b.size
        assert b.array.view(np.uint64)[-1] == N * PS // 8  # data kept until memory pressure


def test_kernel_refusal_is_reported_with_the_block(tmp_path):
    with _filled("shared", tmp_path) as b:
        with pytest.raises(OSError, match=r"madvise\(free\) on RAM block 'pc.ram' \(shared backing\)") as ei:
            b.release([(0, PS)], advice="free")
        assert ei.value.errno == errno.EINVAL
        assert b.released_bytes == 0 and b.resident_pages().all()
        with pytest.raises(ValueError, match="fd-backed"):
            b.release([(0, PS)], advice="punch")


class _FailingChannel:
    def writev(self, buffers, pos):
        raise OSError(errno.EPIPE, "peer went away")


def test_failed_write_releases_nothing(tmp_path):
    with _filled("private", tmp_path) as b:
        f = QEMUFile(_FailingChannel())
        for i in range(b.n_pages):
            f.put_be64(i * PS | 0x08)
            f.put_buffer_async(b.page(i), may_free=True)
        f.fflush()
        assert f.get_error() == -errno.EPIPE
        assert f.released_bytes == 0 and b.released_bytes == 0
        assert b.resident_pages().all() and _old(b).all()
        f.close()


def test_unaligned_view_releases_only_interior_pages(tmp_path):
    with _filled("private", tmp_path) as b:
        f = QEMUFile(open_channel("null:", "w"))
        f.put_buffer_async(b.array[100:4 * PS + 100], may_free=True)  # pages 1..3 whole, 0 and 4 partial
        f.put_buffer_async(b.array[10 * PS:11 * PS - 1], may_free=True)  # no whole page
        assert f.fflush() == 0
        assert np.flatnonzero(~b.resident_pages()).tolist() == [1, 2, 3]
        assert f.released_bytes == 3 * PS
        f.close()


def test_views_of_two_blocks_are_released_in_their_own_block(tmp_path):
    a = RAMBlock("a", 8 * PS)
    c = RAMBlock("c", 8 * PS, backing="memfd")
    try:
        for blk in (a, c):
            blk.array[:] = 1
        f = QEMUFile(open_channel("null:", "w"))
        f.put_buffer_async(a.array[:4 * PS], may_free=True)
        f.put_buffer_async(c.array[4 * PS:], may_free=True)
        assert f.fflush() == 0
        assert np.flatnonzero(~a.resident_pages()).tolist() == [0, 1, 2, 3]
        assert np.flatnonzero(~c.cached_pages()).tolist() == [4, 5, 6, 7]
        f.close()
    finally:
        a.close()
        c.close()


def test_release_coalesces_adjacent_ranges_into_one_call(tmp_path):
    with _filled("private", tmp_path) as b:
        calls = b.mmap.release_calls
        # 6 ranges, unsorted and overlapping: runs [0, 3 pages) and [8 pages, 9 pages)
        n = b.release([(2 * PS, PS), (0, 2048), (2048, PS), (PS + 100, 2 * PS), (8 * PS, PS), (20 * PS + 1, PS)])
        assert n == 4 * PS
        assert b.mmap.release_calls - calls == 2
        assert np.flatnonzero(~b.resident_pages()).tolist() == [0, 1, 2, 8]


def test_coalesce_runs_vectorised():
    runs = coalesce_runs(np.array([[8192, 4096], [0, 4095], [4095, 1], [4096, 4096], [20000, 10000], [30000, 0]]), 1 << 20, "r")
    assert runs.tolist() == [[0, 12288], [20480, 8192]]
    assert coalesce_runs([], 100, "r").shape == (0, 2)
    with pytest.raises(ValueError, match="outside RAM block 'r'"):
        coalesce_runs([(4096, 8192)], 8192, "r")
    with pytest.raises(ValueError, match="not an \\(offset, length\\) pair"):
        coalesce_runs([5], 8192, "r")


def test_release_pages_refuses_misaligned_or_outside_requests():
    with RAMBlock("x", 4 * PS) as b:
        with pytest.raises(ValueError, match="not aligned"):
            b.mmap.release_pages(100, PS)
        with pytest.raises(ValueError, match="outside the block"):
            b.mmap.release_pages(4 * PS, PS)


def test_advice_knob_defaults_and_override(tmp_path):
    for kind in BACKINGS:
        with RAMBlock("k", PS, backing=_backing(kind, tmp_path)) as b:
            assert b.advice == DEFAULT_ADVICE[kind]
            b.advice = "cold"
            assert b.mmap.advice == "cold"
            b.advice = None
            assert b.advice == DEFAULT_ADVICE[kind]


def test_release_zero_works_on_the_batch_span_not_the_block(monkeypatch):
    """Postcopy's per-batch release of ZERO pages looks at the batch's span only: a mask
    of the whole block per 64-page batch made a large guest's postcopy quadratic (and the
    released ranges stay the runs of the zero pages)."""
    from types import SimpleNamespace

    import numpy as np

    import npqfile.migration.ram as ram_mod
    from npqfile.migration.release_ram import release_runs as real_release_runs

    released, sizes = [], []

    class Block:
        n_pages, page_size = 1 << 24, 4096         # 64 GiB of pages, none allocated

        def release(self, ranges):
            released.extend(map(tuple, np.asarray(ranges).tolist()))
            return int(np.asarray(ranges)[:, 1].sum())

    def spy(block, mask, *args, **kw):
        sizes.append(np.asarray(mask).size)
        return real_release_runs(block, mask, *args, **kw)

    monkeypatch.setattr(ram_mod, "release_runs", spy)
    rs = SimpleNamespace(stats=SimpleNamespace(released_bytes=0))
    zero = np.array([1000, 1001, 1002, 1005, 1063], dtype=np.int64)
    ram_mod.RAMState.release_zero(rs, Block(), zero)
    assert released == [(1000 * 4096, 3 * 4096), (1005 * 4096, 4096), (1063 * 4096, 4096)]
    assert rs.stats.released_bytes == 5 * 4096
    assert max(sizes) <= 64
