"""Normal estimation: the scipy consistent orientation against the truth and open3d's implementation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import open3d as o3d
import pytest
from scipy.spatial import cKDTree

from datapipes.mesh import estimate_normals_curvature
from datapipes.normals import _root_signs, knn_covariances, knn_indices, orient_consistent

Shape = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _sphere(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    p = rng.normal(size=(n, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return p, p.copy()


def _torus(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    u, v = rng.uniform(0, 2 * np.pi, (2, n))
    normal = np.c_[np.cos(v) * np.cos(u), np.cos(v) * np.sin(u), np.sin(v)]
    return np.c_[np.cos(u), np.sin(u), np.zeros(n)] + 0.35 * normal, normal


def _noisy_box(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    face = rng.integers(0, 6, n)
    axis, side = face % 3, np.where(face < 3, 1.0, -1.0)
    p = rng.uniform(-1, 1, (n, 3)) * [1.0, 0.7, 0.5]
    p[np.arange(n), axis] = side * np.array([1.0, 0.7, 0.5])[axis]
    normal = np.zeros((n, 3))
    normal[np.arange(n), axis] = side
    return p + rng.normal(scale=0.003, size=p.shape), normal


def _open3d_consistent(pts: np.ndarray, k: int) -> np.ndarray:
    """The previous implementation: open3d covariances, eigh, open3d's tangent-plane MST, global flip."""
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    pcd.estimate_covariances(o3d.geometry.KDTreeSearchParamKNN(knn=k))
    pcd.normals = o3d.utility.Vector3dVector(np.linalg.eigh(np.asarray(pcd.covariances))[1][:, :, 0])
    pcd.orient_normals_consistent_tangent_plane(k)
    normal = np.asarray(pcd.normals)
    return -normal if np.einsum("ij,ij->", normal, pts - pts.mean(axis=0)) < 0 else normal


def _flipped_edges(pts: np.ndarray, normal: np.ndarray, k: int) -> float:
    """Fraction of kNN edges whose normals disagree (``n_i . n_j < 0``)."""
    idx = cKDTree(pts).query(pts, k=k)[1]
    return float(np.mean(np.einsum("nj,nkj->nk", normal, normal[idx]) < 0))


@pytest.mark.parametrize("shape", [_sphere, _torus, _noisy_box], ids=["sphere", "torus", "box"])
def test_consistent_matches_truth_and_open3d(shape: Shape) -> None:
    pts, truth = shape(np.random.default_rng(1), 3000)
    normal, curv = estimate_normals_curvature(pts, k=16, orient="consistent")
    assert (normal.dtype, normal.shape) == (np.float32, (3000, 3))
    assert (curv.dtype, curv.shape) == (np.float32, (3000,))
    assert np.mean(np.sum(normal * truth, axis=1) > 0) >= 0.99
    assert _flipped_edges(pts, normal, 16) < 0.002
    ref = _open3d_consistent(pts, 16)
    ref_right = np.sum(ref * truth, axis=1) > 0
    assert np.mean(np.sum(normal * ref, axis=1)[ref_right] > 0) >= 0.99


def test_randomly_flipped_normals_are_reoriented() -> None:
    rng = np.random.default_rng(2)
    pts, truth = _torus(rng, 2000)
    signs = rng.choice([-1.0, 1.0], size=(2000, 1))
    out = orient_consistent(pts, truth * signs, knn_indices(pts, 12))
    np.testing.assert_array_equal(np.abs(out), np.abs(truth))  # only signs change
    np.testing.assert_array_equal(out, truth)


def test_covariances_curvature_and_unsigned_normals_equal_open3d() -> None:
    pts, _ = _torus(np.random.default_rng(3), 2000)
    pts += np.random.default_rng(4).normal(scale=0.01, size=pts.shape)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    pcd.estimate_covariances(o3d.geometry.KDTreeSearchParamKNN(knn=16))
    ref_cov = np.asarray(pcd.covariances)
    np.testing.assert_allclose(knn_covariances(pts, knn_indices(pts, 16)), ref_cov, rtol=0, atol=1e-12)
    ref_val, ref_vec = np.linalg.eigh(ref_cov)
    ref_curv = ref_val[:, 0] / ref_val.sum(axis=1)
    for orient in ("consistent", "none"):  # the scipy and the open3d covariance paths
        normal, curv = estimate_normals_curvature(pts, k=16, orient=orient)  # type: ignore[arg-type]
        np.testing.assert_allclose(np.abs(np.sum(normal * ref_vec[:, :, 0], axis=1)), 1.0, atol=1e-5)
        np.testing.assert_allclose(curv, ref_curv, rtol=1e-4, atol=1e-7)
        assert np.all(ref_curv > 1e-4)  # curvature is not trivially 0 here


def test_root_signs_equal_path_products() -> None:
    rng = np.random.default_rng(5)
    n = 500
    parent = np.array([0] + [int(rng.integers(0, i)) for i in range(1, n)])
    parent[250] = 250  # a second tree
    local = rng.choice(np.array([-1, 1], dtype=np.int8), size=n)
    local[[0, 250]] = 1
    expected = np.empty(n, dtype=np.int8)
    for v in range(n):
        s, u = 1, v
        while parent[u] != u:
            s, u = s * local[u], parent[u]
        expected[v] = s
    np.testing.assert_array_equal(_root_signs(local, parent), expected)
    chain = np.maximum(np.arange(n) - 1, 0)  # depth n - 1
    np.testing.assert_array_equal(_root_signs(local, chain), np.cumprod(np.r_[1, local[1:]]))


def test_disconnected_components_each_point_outward() -> None:
    rng = np.random.default_rng(6)
    a, na = _sphere(rng, 800)
    b, nb = _torus(rng, 1500)
    pts, truth = np.r_[a + np.array([10.0, 0, 0]), 0.5 * b - np.array([10.0, 3.0, 0])], np.r_[na, nb]
    normal, _ = estimate_normals_curvature(pts, k=12)
    assert np.mean(np.sum(normal * truth, axis=1) > 0) >= 0.99
    # Many tiny separate clusters (each its own component).
    tiny = np.repeat(rng.uniform(-50, 50, (40, 3)), 5, axis=0) + rng.normal(scale=0.01, size=(200, 3))
    normal, curv = estimate_normals_curvature(tiny, k=4)
    assert np.all(np.isfinite(normal))
    assert np.all(np.isfinite(curv))
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1e-5)


def test_degenerate_inputs() -> None:
    rng = np.random.default_rng(7)
    line = np.c_[np.linspace(0, 1, 100), np.zeros(100), np.zeros(100)]
    normal, curv = estimate_normals_curvature(line, k=8)
    np.testing.assert_allclose(normal[:, 0], 0.0, atol=1e-6)  # perpendicular to the line
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(curv, 0.0, atol=1e-6)
    sphere, truth = _sphere(rng, 1000)
    doubled = np.r_[sphere, sphere, np.zeros((30, 3)) + sphere[0]]  # duplicates, one point 32 times
    normal, curv = estimate_normals_curvature(doubled, k=16)
    assert np.all(np.isfinite(normal))
    assert np.all(np.isfinite(curv))
    assert np.mean(np.sum(normal[:2000] * np.r_[truth, truth], axis=1) > 0) >= 0.99
    same = np.zeros((50, 3))
    normal, curv = estimate_normals_curvature(same, k=8)
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(curv, 0.0)
    few = sphere[:10]  # N <= k: outward
    normal, _ = estimate_normals_curvature(few, k=16)
    assert np.all(np.sum(normal * (few - few.mean(axis=0)), axis=1) >= 0)
    with pytest.raises(ValueError, match="k must be >= 3"):
        estimate_normals_curvature(sphere, k=2)
    with pytest.raises(ValueError, match="at least 3 points"):
        estimate_normals_curvature(sphere[:2])
