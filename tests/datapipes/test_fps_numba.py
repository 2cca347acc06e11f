"""The numba FPS driver: thread sharing, skip masks, the disable switch, errors from worker threads."""

from __future__ import annotations

import numpy as np
import pytest

from datapipes import fps_numba
from tests.pretrain.ops.reference import slow_fps

needs_numba = pytest.mark.skipif(not fps_numba.numba_enabled(), reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize(("batch", "threads"), [(1, 4), (3, 2), (9, 2), (9, 16)])
def test_threads_share_clouds_without_changing_indices(batch: int, threads: int) -> None:
    clouds = np.random.default_rng(batch).normal(size=(batch, 150, 3)).astype(np.float32)
    first = np.arange(batch, dtype=np.int64) * 7
    one = fps_numba.fps_indices(clouds, 25, first, threads=1)
    many = fps_numba.fps_indices(clouds, 25, first, threads=threads)
    assert np.array_equal(one, many)
    assert [row.tolist() for row in one] == [slow_fps(c, 25, int(s)) for c, s in zip(clouds, first)]


@needs_numba
def test_excluded_points_are_never_chosen_and_init_distance_is_used() -> None:
    cloud = np.array([[[0.0, 0, 0], [5, 0, 0], [1, 0, 0], [0, 2, 0]]], dtype=np.float32)
    excluded = np.array([[False, True, False, False]])
    got = fps_numba.fps_indices(cloud, 4, np.zeros(1, np.int64), excluded=excluded)
    assert got.tolist() == [[0, 3, 2, 0]]  # 1 is skipped; then only zeros and -inf remain: first 0
    # A small initial distance caps every running distance: all tie at 0.5 until updated below it.
    capped = fps_numba.fps_indices(cloud, 2, np.array([3]), init_sqdist=0.5)
    assert capped.tolist() == [[3, 0]]


@needs_numba
def test_exclude_chosen_gives_a_permutation_of_duplicates() -> None:
    cloud = np.zeros((1, 5, 3), np.float32)
    assert fps_numba.fps_indices(cloud, 5, np.array([2]), exclude_chosen=True).tolist() == [[2, 0, 1, 3, 4]]
    assert fps_numba.fps_indices(cloud, 3, np.array([2])).tolist() == [[2, 0, 0]]


def test_disable_switch_values(monkeypatch: pytest.MonkeyPatch) -> None:
    available = fps_numba._kernels() is not None
    for value, enabled in (("", available), ("0", available), ("1", False), ("true", False)):
        monkeypatch.setenv(fps_numba.DISABLE_NUMBA_ENV, value)
        assert fps_numba.numba_enabled() is enabled


def test_an_error_in_a_worker_thread_reaches_the_caller() -> None:
    seen: list[tuple[int, int]] = []

    def kernel(lo: int, hi: int) -> None:
        seen.append((lo, hi))
        if lo >= 4:
            raise ValueError("bad cloud")

    with pytest.raises(ValueError, match="bad cloud"):
        fps_numba._run(kernel, (), 8, 2)
    assert (0, 1) in seen
