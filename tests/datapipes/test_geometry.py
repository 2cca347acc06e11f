from __future__ import annotations

import numpy as np
import pytest

from datapipes import fps_numba, geometry
from datapipes.geometry import fps_order, fps_order_batch, normalize_unit_sphere


@pytest.fixture(params=["numba", "numpy"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once with the numba kernels and once with the numpy loop (``PCPT_DISABLE_NUMBA``)."""
    if request.param == "numba" and not fps_numba.numba_enabled():
        pytest.skip("numba is not installed")
    if request.param == "numpy":
        monkeypatch.setenv(fps_numba.DISABLE_NUMBA_ENV, "1")
    return str(request.param)


def fps_reference(xyz: np.ndarray, n: int, start: int = 0) -> list[int]:
    """Textbook farthest point sampling with Python loops (float32 squared distances, lowest index wins)."""
    pts = xyz.astype(np.float32)
    chosen = [start]
    best = [float("inf")] * len(pts)
    for _ in range(n - 1):
        last = pts[chosen[-1]]
        for j in range(len(pts)):
            d = float(np.float32(((pts[j] - last) ** 2).sum()))
            best[j] = min(best[j], d)
        candidates = [(best[j], -j) for j in range(len(pts)) if j not in chosen]
        chosen.append(-max(candidates)[1])
    return chosen


@pytest.mark.parametrize(("count", "n", "start"), [(40, 40, 0), (57, 20, 0), (33, 10, 7)])
def test_fps_matches_reference(count, n, start, backend):
    xyz = np.random.default_rng(count).normal(size=(count, 3)).astype(np.float32)
    assert fps_order(xyz, n=n, start=start).tolist() == fps_reference(xyz, n, start)


def test_fps_full_order_is_a_permutation_even_with_duplicates(backend):
    xyz = np.repeat(np.random.default_rng(1).normal(size=(10, 3)), 3, axis=0)
    order = fps_order(xyz)
    assert sorted(order.tolist()) == list(range(30))
    assert order.dtype == np.int64


def test_fps_prefix_spreads_points(backend):
    # corners of a cube plus many interior points: the first 8 picks are the corners
    rng = np.random.default_rng(2)
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float32)
    xyz = np.concatenate([corners, rng.uniform(-0.5, 0.5, size=(100, 3))]).astype(np.float32)
    assert sorted(fps_order(xyz, n=8).tolist()) == list(range(8))


def test_fps_batch_equals_single_clouds_across_chunks(backend):
    xyz = np.random.default_rng(3).normal(size=(70, 25, 3)).astype(np.float32)  # > one internal chunk
    batch = fps_order_batch(xyz, n=12, start=2)
    assert batch.shape == (70, 12)
    for b in range(70):
        assert batch[b].tolist() == fps_order(xyz[b], n=12, start=2).tolist()


def test_fps_duplicates_match_reference_and_never_repeat(backend):
    # Few distinct points: after them only zero distances remain, and chosen points must not come back.
    xyz = np.repeat(np.random.default_rng(5).normal(size=(6, 3)), 4, axis=0).astype(np.float32)
    xyz = xyz[np.random.default_rng(6).permutation(len(xyz))]
    assert fps_order(xyz, start=3).tolist() == fps_reference(xyz, len(xyz), 3)


def test_numba_kernels_equal_the_numpy_loop_on_many_clouds(monkeypatch):
    if not fps_numba.numba_enabled():
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(7)
    clouds = rng.normal(size=(40, 700, 3)).astype(np.float32)
    clouds[:10] = np.round(clouds[:10] * 2) / 2  # lattice clouds: exact ties and duplicates
    calls = []
    real = fps_numba.fps_indices
    monkeypatch.setattr(fps_numba, "fps_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = fps_order_batch(clouds, n=700, start=11)
    assert calls  # the kernels ran
    assert np.array_equal(fast, geometry._fps(clouds, 700, 11))
    monkeypatch.setenv(fps_numba.DISABLE_NUMBA_ENV, "1")
    assert np.array_equal(fps_order_batch(clouds[:3], n=50), geometry._fps(clouds[:3], 50, 0))
    assert len(calls) == 1  # disabled: the numpy loop


def test_fps_argument_errors():
    xyz = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="n must be"):
        fps_order(xyz, n=6)
    with pytest.raises(ValueError, match="start"):
        fps_order(xyz, start=5)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        fps_order(np.zeros((5, 2)))


def test_normalize_unit_sphere():
    rng = np.random.default_rng(4)
    xyz = rng.normal(size=(200, 3)) * [3.0, 1.0, 0.5] + [10.0, -2.0, 5.0]
    out, centre, scale = normalize_unit_sphere(xyz)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-5)
    assert np.linalg.norm(out, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out * scale + centre, xyz, atol=1e-4)


def test_normalize_degenerate_cloud_keeps_scale_one():
    out, centre, scale = normalize_unit_sphere(np.ones((4, 3)))
    assert scale == 1.0
    assert np.all(out == 0)
    assert np.all(centre == 1)
    with pytest.raises(ValueError, match="NaN"):
        normalize_unit_sphere(np.array([[0.0, 0.0, np.nan], [1.0, 0.0, 0.0]]))
