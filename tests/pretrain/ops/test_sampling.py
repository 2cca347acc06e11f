"""Farthest point sampling against slow references: a per-point loop and a pointnet2 kernel simulation.

The reference tests run on both CPU backends (numba kernels and the torch loop, chosen with
``PCPT_DISABLE_NUMBA``), so each backend is checked against the references, not only against the other.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datapipes import fps_numba
from pretrain.ops import sampling
from pretrain.ops.sampling import (
    farthest_point_sample,
    fps_backend,
    pointnet2_priority_order,
    pointnet2_thread_count,
)
from tests.pretrain.ops.reference import (
    kernel_threads,
    lattice_cloud,
    simulate_pointnet2_fps,
    slow_fps,
    sphere_cloud,
)

needs_numba = pytest.mark.skipif(not fps_numba.numba_enabled(), reason="numba is not installed")


@pytest.fixture(params=["numba", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per CPU backend; asserts that the dispatch really picks it."""
    if request.param == "numba":
        if not fps_numba.numba_enabled():
            pytest.skip("numba is not installed")
    else:
        monkeypatch.setenv(fps_numba.DISABLE_NUMBA_ENV, "1")
    assert fps_backend(torch.zeros(1, 2, 3)) == request.param
    return str(request.param)


def random_clouds(seed: int, batch: int, n: int, channels: int = 3) -> np.ndarray:
    """Gaussian clouds with exact duplicates and a coarse copy (many exact ties), float32."""
    rng = np.random.default_rng(seed)
    pts = rng.standard_normal((batch, n, channels)).astype(np.float32)
    pts[:, n // 2 : n // 2 + n // 8] = pts[:, : n // 8]  # duplicates
    pts[:, -n // 4 :] = np.round(pts[:, -n // 4 :] * 2) / 2  # lattice points: equal distances
    return pts


# ------------------------------------------------------------------------------------ default mode


@pytest.mark.parametrize(
    ("n", "m", "start"), [(1, 1, 0), (2, 2, 1), (37, 11, 5), (200, 40, 0), (513, 17, 300)]
)
def test_default_mode_matches_slow_reference(n: int, m: int, start: int, backend: str) -> None:
    clouds = np.stack([sphere_cloud(seed, n) for seed in range(3)])
    got = farthest_point_sample(torch.from_numpy(clouds), m, start=start)
    assert got.shape == (3, m)
    assert got.dtype == torch.long
    for b in range(3):
        assert got[b].tolist() == slow_fps(clouds[b], m, start)


def test_default_mode_ties_pick_the_first_maximum(backend: str) -> None:
    clouds = np.stack([lattice_cloud(seed, 120) for seed in range(3)])
    got = farthest_point_sample(torch.from_numpy(clouds), 60)
    for b in range(3):
        assert got[b].tolist() == slow_fps(clouds[b], 60)


def test_more_samples_than_distinct_points_repeats_like_the_reference(backend: str) -> None:
    cloud = np.array([[0.0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=np.float32)
    got = farthest_point_sample(torch.from_numpy(cloud)[None], 4)
    assert got[0].tolist() == slow_fps(cloud, 4) == [0, 1, 0, 0]


def test_float64_is_computed_in_float64(backend: str) -> None:
    # Two candidates whose squared distances differ only beyond float32 precision.
    cloud = np.array([[0.0, 0, 0], [1.0, 0, 0], [1.0 + 1e-12, 0, 0], [0.5, 0, 0]])
    got = farthest_point_sample(torch.from_numpy(cloud)[None], 2)
    assert got.tolist() == [[0, 2]] == [slow_fps(cloud, 2)]
    got32 = farthest_point_sample(torch.from_numpy(cloud).float()[None], 2)
    assert got32.tolist() == [[0, 1]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_is_computed_in_float32(dtype: torch.dtype, backend: str) -> None:
    xyz = torch.from_numpy(sphere_cloud(0, 64)).to(dtype)[None]
    assert torch.equal(farthest_point_sample(xyz, 16), farthest_point_sample(xyz.float(), 16))


@pytest.mark.parametrize("channels", [1, 2, 5])
def test_any_channel_count_in_default_mode(channels: int, backend: str) -> None:
    pts = np.random.default_rng(channels).standard_normal((50, channels)).astype(np.float32)
    got = farthest_point_sample(torch.from_numpy(pts)[None], 12)
    assert got[0].tolist() == slow_fps(pts, 12)


def test_random_start_uses_the_generator_per_cloud(backend: str) -> None:
    clouds = np.stack([sphere_cloud(seed, 40) for seed in range(4)])
    xyz = torch.from_numpy(clouds)
    got = farthest_point_sample(xyz, 8, start="random", generator=torch.Generator().manual_seed(3))
    starts = torch.randint(40, (4,), generator=torch.Generator().manual_seed(3)).tolist()
    for b in range(4):
        assert got[b].tolist() == slow_fps(clouds[b], 8, starts[b])
    again = farthest_point_sample(xyz, 8, start="random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, again)


def test_result_is_an_ordinary_index_tensor_usable_by_autograd(backend: str) -> None:
    xyz = torch.randn(2, 30, 3, requires_grad=True)
    idx = farthest_point_sample(xyz, 5)
    assert not idx.is_inference()
    assert not idx.requires_grad
    picked = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
    picked.sum().backward()
    assert xyz.grad is not None
    assert xyz.grad.sum().item() == pytest.approx(30.0)


def test_empty_batch(backend: str) -> None:
    assert farthest_point_sample(torch.zeros(0, 5, 3), 2).shape == (0, 2)


# ------------------------------------------------------------------------------------- parity mode


def test_thread_count_matches_the_kernel_formula() -> None:
    for n in range(1, 5000):
        assert pointnet2_thread_count(n) == kernel_threads(n)


def test_priority_order_is_bit_reversed_thread_then_round() -> None:
    assert pointnet2_priority_order(8).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]  # T = 8
    assert pointnet2_priority_order(6).tolist() == [0, 4, 2, 1, 5, 3]  # T = 4: threads 0, 2, 1, 3
    for n in (1, 7, 100, 512, 1500):
        assert sorted(pointnet2_priority_order(n).tolist()) == list(range(n))


def test_kernel_tie_break_is_not_lowest_thread_first(backend: str) -> None:
    # N = 4 -> 4 threads. After index 0, points 1 (thread 1) and 2 (thread 2) tie at squared distance 8.
    # The reduction merges (0, 2) and (1, 3), then (0, 1): thread 2's value sits in slot 0 and wins the tie.
    cloud = np.array([[2.0, 0, 0], [0, 2, 0], [0, -2, 0], [2, 0.5, 0]], dtype=np.float32)
    assert simulate_pointnet2_fps(cloud, 2) == [0, 2]
    got = farthest_point_sample(torch.from_numpy(cloud)[None], 2, skip_near_origin=True)
    assert got.tolist() == [[0, 2]]
    assert farthest_point_sample(torch.from_numpy(cloud)[None], 2).tolist() == [[0, 1]]  # default: first


@pytest.mark.parametrize(
    ("cloud", "m"),
    [
        (lattice_cloud(0, 6), 6),  # T = 4
        (lattice_cloud(1, 12), 12),  # T = 8, more samples than distinct points
        (lattice_cloud(2, 40), 25),  # T = 32, ties everywhere, origin + near-origin + duplicates
        (lattice_cloud(3, 300), 40),  # T = 256
        (sphere_cloud(4, 100, near_origin=10), 30),
        (sphere_cloud(5, 530, near_origin=30), 12),  # T = 512, two rounds for some threads
        (np.array([[1.0, 1, 1]], dtype=np.float32), 1),
    ],
)
def test_parity_mode_matches_kernel_simulation(cloud: np.ndarray, m: int, backend: str) -> None:
    got = farthest_point_sample(torch.from_numpy(cloud)[None], m, skip_near_origin=True)
    assert got[0].tolist() == simulate_pointnet2_fps(cloud, m)


def test_parity_mode_never_picks_near_origin_points_after_the_first(backend: str) -> None:
    cloud = sphere_cloud(6, 64, near_origin=16)
    cloud[0] = 0.0  # the first pick is unconditional, even at the origin
    got = farthest_point_sample(torch.from_numpy(cloud)[None], 48, skip_near_origin=True)[0]
    near = set(np.flatnonzero((cloud.astype(np.float64) ** 2).sum(1) <= 1e-3).tolist())
    assert got[0] == 0
    assert not near & set(got[1:].tolist())
    assert got.tolist() == simulate_pointnet2_fps(cloud, 48)


def test_parity_mode_threshold_compares_float32_magnitude_with_double_1e3(backend: str) -> None:
    # float32(1e-3) > 1e-3 (double): a point whose float32 squared norm is exactly float32(1e-3) is kept.
    x, y = np.float32(0.001), np.float32(0.03160696)
    assert (x * x + y * y) + np.float32(0) == np.float32(1e-3)
    assert float(np.float32(1e-3)) > 1e-3
    cloud = np.array([[1.0, 0, 0], [x, y, 0], [0.5, 0, 0]], dtype=np.float32)
    assert simulate_pointnet2_fps(cloud, 2) == [0, 1]
    got = farthest_point_sample(torch.from_numpy(cloud)[None], 2, skip_near_origin=True)
    assert got.tolist() == [[0, 1]]


def test_parity_mode_all_points_skipped_picks_index_zero(backend: str) -> None:
    cloud = (np.random.default_rng(0).standard_normal((20, 3)) * 0.001).astype(np.float32)
    got = farthest_point_sample(torch.from_numpy(cloud)[None], 5, skip_near_origin=True)
    assert got.tolist() == [[0] * 5] == [simulate_pointnet2_fps(cloud, 5)]


def test_parity_mode_batched_and_float64_input(backend: str) -> None:
    clouds = np.stack([lattice_cloud(seed, 64) for seed in range(3)])
    got = farthest_point_sample(torch.from_numpy(clouds).double(), 20, skip_near_origin=True)
    assert [row.tolist() for row in got] == [simulate_pointnet2_fps(c, 20) for c in clouds]


# ------------------------------------------------------------------------- numba backend, dispatch


def fused_sqdists(points: np.ndarray, center: np.ndarray) -> list[np.ndarray]:
    """Squared distances as a compiler contracting multiply-adds into FMAs would compute them (float32)."""

    def f32(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32)

    dx, dy, dz = (f32(points[:, k] - center[k]).astype(np.float64) for k in range(3))
    return [
        f32(dz * dz + f32(dx * dx + f32(dy * dy))),  # fma(dz, dz, fma(dx, dx, dy*dy))
        f32(dz * dz + f32(dy * dy + f32(dx * dx))),  # fma(dz, dz, fma(dy, dy, dx*dx))
        f32(dz * dz + f32(f32(dx * dx) + f32(dy * dy))),  # outer sum fused only
        f32(f32(dx * dx + f32(dy * dy)) + f32(dz * dz)),  # inner sum fused only
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_distances_are_not_fused_multiply_adds(seed: int, backend: str) -> None:
    # Points on a unit sphere around the start point: their squared distances differ in the last bits, so
    # each FMA contraction of the distance formula moves the farthest point somewhere else.
    center = np.array([0.1, -0.2, 0.3], dtype=np.float32)
    unit = np.random.default_rng(seed).standard_normal((64, 3))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    cloud = np.concatenate([center[None], (center + unit).astype(np.float32)])
    expected = slow_fps(cloud, 2)[1]
    assert any(int(np.argmax(d)) != expected for d in fused_sqdists(cloud, center))  # the data can tell
    assert farthest_point_sample(torch.from_numpy(cloud)[None], 2)[0].tolist() == [0, expected]


@needs_numba
@pytest.mark.parametrize(("batch", "threads"), [(1, 1), (1, 2), (5, 2), (7, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_matches_slow_reference_with_ties_batches_and_threads(
    batch: int, threads: int, dtype: torch.dtype
) -> None:
    clouds = random_clouds(batch * 10 + threads, batch, 160).astype(
        np.float64 if dtype == torch.float64 else np.float32
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the numba backend shares the clouds among this many threads
    try:
        got = farthest_point_sample(
            torch.from_numpy(clouds), 50, start="random", generator=torch.Generator().manual_seed(batch)
        )
    finally:
        torch.set_num_threads(before)
    starts = torch.randint(160, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    assert [row.tolist() for row in got] == [slow_fps(c, 50, s) for c, s in zip(clouds, starts)]


@needs_numba
@pytest.mark.parametrize("skip_near_origin", [False, True])
def test_numba_and_torch_backends_give_identical_indices_on_many_clouds(
    skip_near_origin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2100 points: the numba kernels use 256-point blocks, the torch loop 64-point blocks.
    clouds = torch.from_numpy(random_clouds(0, 24, 2100))
    clouds[:, :40] *= 0.01  # near-origin points for the parity mode
    clouds[3] = torch.round(clouds[3])  # a cloud of few distinct points: ties and repeats everywhere
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = farthest_point_sample(
            clouds,
            300,
            start="random",
            generator=torch.Generator().manual_seed(5),
            skip_near_origin=skip_near_origin,
        )
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv(fps_numba.DISABLE_NUMBA_ENV, "1")
    slow = farthest_point_sample(
        clouds,
        300,
        start="random",
        generator=torch.Generator().manual_seed(5),
        skip_near_origin=skip_near_origin,
    )
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("skip_near_origin", [False, True])
def test_torch_loop_single_argmax_variant_matches_the_two_level_search(skip_near_origin: bool) -> None:
    # The single-argmax loop is what CUDA tensors run; here it runs on CPU against the CPU loop.
    clouds = torch.from_numpy(
        np.concatenate([random_clouds(1, 3, 200), np.stack([lattice_cloud(s, 200) for s in range(3)])])
    )
    first = torch.tensor([0, 7, 199, 3, 150, 1])
    excluded = None
    init = math.inf
    if skip_near_origin:
        excluded = (clouds * clouds).sum(-1) <= 1e-3
        init = 1e10
    two_level = sampling._fps_loop(
        clouds, 60, first, excluded=excluded, init_sqdist=init, two_level_argmax=True
    )
    single = sampling._fps_loop(
        clouds, 60, first, excluded=excluded, init_sqdist=init, two_level_argmax=False
    )
    assert torch.equal(two_level, single)
    if not skip_near_origin:
        for b in range(len(clouds)):
            assert single[b].tolist() == slow_fps(clouds[b].numpy(), 60, int(first[b]))


def test_dispatch_picks_torch_off_cpu_when_disabled_or_for_non_finite_points(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert fps_backend(torch.zeros(2, 8, 3, device="meta")) == "torch"
    if fps_numba.numba_enabled():
        assert fps_backend(torch.zeros(2, 8, 3)) == "numba"
        assert fps_backend(torch.tensor([[[0.0, 0, 0], [math.nan, 0, 0]]])) == "torch"
        assert fps_backend(torch.tensor([[[0.0, 0, 0], [math.inf, 0, 0]]])) == "torch"
    for value in ("1", "yes"):
        monkeypatch.setenv(fps_numba.DISABLE_NUMBA_ENV, value)
        assert fps_backend(torch.zeros(2, 8, 3)) == "torch"
    monkeypatch.setenv(fps_numba.DISABLE_NUMBA_ENV, "0")
    assert fps_backend(torch.zeros(2, 8, 3)) == ("numba" if fps_numba._kernels() is not None else "torch")


def test_dispatch_decides_which_code_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = fps_numba.fps_indices

    def spy(points: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        calls.append(points.shape)
        return real(points, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fps_numba, "fps_indices", spy)
    xyz = torch.from_numpy(random_clouds(2, 2, 50))
    monkeypatch.setenv(fps_numba.DISABLE_NUMBA_ENV, "1")
    by_torch = farthest_point_sample(xyz, 10, skip_near_origin=True)
    assert calls == []
    monkeypatch.delenv(fps_numba.DISABLE_NUMBA_ENV)
    if not fps_numba.numba_enabled():
        pytest.skip("numba is not installed")
    assert torch.equal(farthest_point_sample(xyz, 10, skip_near_origin=True), by_torch)
    assert calls == [(2, 50, 3)]
    nan_cloud = xyz.clone()
    nan_cloud[0, 5] = math.nan
    farthest_point_sample(nan_cloud, 10)  # non-finite: the torch loop, which defines NaN handling
    assert calls == [(2, 50, 3)]


def test_numba_missing_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fps_numba, "_kernels", lambda: None)
    assert not fps_numba.numba_enabled()
    xyz = torch.from_numpy(random_clouds(3, 2, 40))
    assert fps_backend(xyz) == "torch"
    got = farthest_point_sample(xyz, 9)
    assert [row.tolist() for row in got] == [slow_fps(c, 9) for c in xyz.numpy()]
    with pytest.raises(RuntimeError, match="numba"):
        fps_numba.fps_indices(xyz.numpy(), 3, np.zeros(2, np.int64))


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 11}, "num_samples"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 2.0}, "num_samples"),
        ({"num_samples": 2, "start": 10}, "start"),
        ({"num_samples": 2, "start": -1}, "start"),
        ({"num_samples": 2, "start": "first"}, "start"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        farthest_point_sample(torch.zeros(2, 10, 3), **kwargs)


def test_bad_points_raise_value_error() -> None:
    with pytest.raises(ValueError, match="xyz"):
        farthest_point_sample(torch.zeros(10, 3), 2)
    with pytest.raises(ValueError, match="floating"):
        farthest_point_sample(torch.zeros(1, 10, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="skip_near_origin"):
        farthest_point_sample(torch.zeros(1, 10, 2), 2, skip_near_origin=True)


# --------------------------------------------------------------------------------------------- gpu


@pytest.mark.gpu
@pytest.mark.parametrize("skip_near_origin", [False, True])
def test_cuda_matches_cpu(skip_near_origin: bool) -> None:
    clouds = torch.from_numpy(np.stack([sphere_cloud(seed, 2000, near_origin=50) for seed in range(4)]))
    for start in (0, "random"):
        cpu = farthest_point_sample(
            clouds,
            128,
            start=start,
            generator=torch.Generator().manual_seed(1),
            skip_near_origin=skip_near_origin,
        )
        gpu = farthest_point_sample(
            clouds.cuda(),
            128,
            start=start,
            generator=torch.Generator().manual_seed(1),
            skip_near_origin=skip_near_origin,
        )
        assert gpu.device.type == "cuda"
        assert torch.equal(cpu, gpu.cpu())
