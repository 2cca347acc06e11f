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


def _cloud(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) float64 clouds: smooth, clustered, tie-heavy (grid, repeated, underflowing, overflowing)."""
    if kind == "uniform":
        return rng.random((n, 3))
    if kind == "surface":
        v = rng.normal(size=(n, 3)) * np.array([1.0, 0.5, 0.2])
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    if kind == "clusters":
        centres = rng.normal(size=(5, 3)) * 10
        return centres[rng.integers(0, 5, n)] + rng.normal(size=(n, 3)) * 0.01
    if kind == "grid":  # many equal distances: ties between points of different blocks
        side = int(np.ceil(n ** (1 / 3)))
        g = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
        return g[rng.permutation(len(g))[:n]].astype(np.float64)
    if kind == "repeated":  # a few distinct points, each many times
        return rng.normal(size=(7, 3))[rng.integers(0, 7, n)]
    if kind == "flat":  # a plane: one axis constant
        return np.concatenate([rng.random((n, 2)), np.full((n, 1), 0.25)], axis=1)
    if kind == "tiny":  # squares underflow to zero: ties everywhere
        return rng.normal(size=(n, 3)) * 1e-30
    if kind == "huge":  # squares overflow to inf in float32
        return rng.normal(size=(n, 3)) * 1e25
    raise ValueError(kind)


KINDS = ["uniform", "surface", "clusters", "grid", "repeated", "flat", "tiny", "huge"]


@needs_numba
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_skipping_gives_the_plain_kernels_indices(kind: str, dtype: type) -> None:
    rng = np.random.default_rng(KINDS.index(kind))
    for n, samples in ((1000, 1000), (1337, 400), (2048, 2048), (700, 3000)):
        clouds = np.stack([_cloud(kind, n, rng) for _ in range(2)]).astype(dtype)
        first = rng.integers(0, n, 2)
        for exclude in (True, False):
            if exclude and samples > n:
                continue
            plain = fps_numba.fps_indices(clouds, samples, first, exclude_chosen=exclude, prune=False)
            pruned = fps_numba.fps_indices(clouds, samples, first, exclude_chosen=exclude, prune=True)
            assert np.array_equal(plain, pruned), (n, samples, exclude)
            if exclude and samples == n:  # a full ordering is a permutation
                assert all(sorted(row) == list(range(n)) for row in pruned.tolist())


@needs_numba
@pytest.mark.parametrize("kind", ["surface", "grid", "repeated"])
def test_block_skipping_matches_the_slow_reference(kind: str) -> None:
    rng = np.random.default_rng(5)
    cloud = _cloud(kind, 150, rng).astype(np.float32)
    got = fps_numba.fps_indices(cloud[None], 60, np.array([17]), prune=True)
    assert got[0].tolist() == slow_fps(cloud, 60, 17)


@needs_numba
def test_block_skipping_keeps_excluded_points_and_initial_distance() -> None:
    rng = np.random.default_rng(11)
    for kind in ("surface", "grid"):
        clouds = np.stack([_cloud(kind, 1500, rng) for _ in range(2)]).astype(np.float32)
        excluded = rng.random((2, 1500)) < 0.3
        first = np.array([3, 1400])
        for init in (np.inf, 0.5, 0.0):
            kwargs = {"init_sqdist": init, "excluded": excluded}
            plain = fps_numba.fps_indices(clouds, 900, first, prune=False, **kwargs)
            pruned = fps_numba.fps_indices(clouds, 900, first, prune=True, **kwargs)
            assert np.array_equal(plain, pruned), (kind, init)
            assert not excluded[np.arange(2)[:, None], pruned[:, 1:]].any() or init == 0.0
    # Every candidate excluded: the plain kernel's answer (index 0) after the start.
    everything = np.ones((1, 1500), bool)
    got = fps_numba.fps_indices(clouds[:1], 5, np.array([9]), excluded=everything, prune=True)
    assert got.tolist() == [[9, 0, 0, 0, 0]]


@needs_numba
def test_default_dispatch_uses_block_skipping_for_long_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from datapipes import _fps_kernels

    calls: list[int] = []
    real = _fps_kernels.fps_clouds_pruned
    monkeypatch.setattr(_fps_kernels, "fps_clouds_pruned", lambda *a: calls.append(1) or real(*a))
    cloud = _cloud("surface", 4096, np.random.default_rng(2)).astype(np.float32)[None]
    long_run = fps_numba.fps_indices(cloud, 1024, np.zeros(1, np.int64), exclude_chosen=True)
    assert calls == [1]
    assert np.array_equal(long_run, fps_numba.fps_indices(cloud, 1024, np.zeros(1, np.int64), prune=False))
    fps_numba.fps_indices(cloud, 16, np.zeros(1, np.int64))
    fps_numba.fps_indices(cloud[:, :512], 512, np.zeros(1, np.int64))
    assert calls == [1]  # short runs and small clouds keep the plain kernel
    assert fps_numba.use_pruning(8192, 8192, 3)
    assert not fps_numba.use_pruning(8192, 8192, 6)
    with pytest.raises(ValueError, match="3-channel"):
        fps_numba.fps_indices(np.zeros((1, 10, 6), np.float32), 4, np.zeros(1, np.int64), prune=True)


@needs_numba
@pytest.mark.parametrize("skip_near_origin", [False, True])
def test_block_skipping_gives_the_torch_loops_indices(
    skip_near_origin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    from pretrain.ops.sampling import farthest_point_sample

    rng = np.random.default_rng(7)
    clouds = np.stack([_cloud("surface", 2048, rng) * 0.5, _cloud("grid", 2048, rng) / 13 - 0.5])
    clouds[:, :40] *= 1e-3  # a few points near the origin, which the parity mode skips
    xyz = torch.from_numpy(clouds.astype(np.float32))
    assert fps_numba.use_pruning(2048, 600, 3)
    compiled = farthest_point_sample(xyz, 600, start=5, skip_near_origin=skip_near_origin)
    monkeypatch.setenv(fps_numba.DISABLE_NUMBA_ENV, "1")
    loops = farthest_point_sample(xyz, 600, start=5, skip_near_origin=skip_near_origin)
    assert torch.equal(compiled, loops)
