"""GeoMAE geometric targets against per-point / per-pillar Python loops, and on analytic surfaces."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest
import torch

from pretrain.ops.geometric_targets import (
    PatchTargets,
    PillarTargets,
    bev_neighbors,
    normals_from_scatter,
    orient_normals,
    patch_targets,
    pillar_targets,
    scatter_normals,
)
from pretrain.ops.grouping import group_points

RANGE = (-1.0, -0.6, -1.0, 1.0, 0.9, 1.0)  # 8 x 5 pillars of 0.25 x 0.3, 2 m high
SIZE = (0.25, 0.3)
GRID = (8, 5)
EPS = 1e-9


# ----------------------------------------------------------------------------------------------------------
# Slow references
# ----------------------------------------------------------------------------------------------------------


def slow_eigen(scatter: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy eigh: (smallest eigenvalue's normal, descending curvature on the simplex, eigenvalues)."""
    w, v = np.linalg.eigh(scatter)
    normal = v[:, 0] / np.linalg.norm(v[:, 0])
    values = np.clip(w, 0.0, None)[::-1] + EPS
    return normal, values / values.sum(), w


def slow_pillar_targets(
    xyz, point_pillar, coords, *, point_range, pillar_size, low_ratio, med_ratio, viewpoint
):
    """Per-point loops in float64; also returns the ascending eigenvalues (how well-defined normals are)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    num = len(coords)
    size = np.array([pillar_size[0], pillar_size[1], point_range[5] - point_range[2]])
    corners = [
        np.array([point_range[0] + pillar_size[0] * ix, point_range[1] + pillar_size[1] * iy, point_range[2]])
        for _, ix, iy in coords
    ]
    members: list[list[np.ndarray]] = [[] for _ in range(num)]
    for point, p in zip(xyz, point_pillar):
        members[p].append(point)

    top = np.zeros((num, 3))
    top_metric = np.array(corners, dtype=np.float64).reshape(num, 3)
    for p in range(num):
        if members[p]:
            c = np.mean(members[p], axis=0)
            top_metric[p] = c
            top[p] = (c - corners[p]) / size

    def level(ratio):
        rx, ry, rz = ratio
        sub = size / np.array(ratio)
        cent = np.zeros((num, rx * ry * rz, 3))
        occ = np.zeros((num, rx * ry * rz), dtype=bool)
        metric = {}
        for p in range(num):
            groups = defaultdict(list)
            for point in members[p]:
                local = point - corners[p]
                idx = [min(max(int(np.floor(local[a] / sub[a])), 0), ratio[a] - 1) for a in range(3)]
                groups[idx[2] * ry * rx + idx[1] * rx + idx[0]].append((point, idx))
            for slot, items in groups.items():
                c = np.mean([pt for pt, _ in items], axis=0)
                cent[p, slot] = (c - (corners[p] + np.array(items[0][1]) * sub)) / sub
                occ[p, slot] = True
                metric[p, slot] = c
        return cent, occ, metric

    low, low_occ, _ = level(low_ratio)
    med, med_occ, med_metric = level(med_ratio)

    normal = np.zeros((num, 3))
    curv = np.zeros((num, 3))
    eig = np.zeros((num, 3))
    count = np.zeros(num, dtype=np.int64)
    for p in range(num):
        rows = []
        for q in range(num):
            same_batch = coords[q][0] == coords[p][0]
            if same_batch and abs(coords[q][1] - coords[p][1]) <= 1 and abs(coords[q][2] - coords[p][2]) <= 1:
                rows += [med_metric[q, s] - top_metric[p] for s in range(med.shape[1]) if med_occ[q, s]]
        x = np.array(rows).reshape(-1, 3)
        n, c, w = slow_eigen(x.T @ x)
        if np.dot(n, np.asarray(viewpoint) - top_metric[p]) < 0:
            n = -n
        normal[p], curv[p], eig[p], count[p] = n, c, w, len(rows)
    return {
        "top": top,
        "top_metric": top_metric,
        "low": low,
        "low_occ": low_occ,
        "med": med,
        "med_occ": med_occ,
        "normal": normal,
        "curvature": curv,
        "eigenvalues": eig,
        "count": count,
    }


def slow_patch_targets(neighborhoods: np.ndarray, centers: np.ndarray, sub: int):
    batch, groups, _k, _ = neighborhoods.shape
    pts = neighborhoods.astype(np.float64)
    out = {
        "centroid": np.zeros((batch, groups, 3)),
        "sub": np.zeros((batch, groups, sub**3, 3)),
        "occ": np.zeros((batch, groups, sub**3), dtype=bool),
        "normal": np.zeros((batch, groups, 3)),
        "curvature": np.zeros((batch, groups, 3)),
        "eigenvalues": np.zeros((batch, groups, 3)),
    }
    for b in range(batch):
        for g in range(groups):
            r = max(max(abs(float(v)) for v in point) for point in pts[b, g])
            r = max(r, 1e-6)
            cells = defaultdict(list)
            us = []
            for point in pts[b, g]:
                u = (point + r) / (2 * r)
                us.append(u)
                idx = [min(max(int(np.floor(u[a] * sub)), 0), sub - 1) for a in range(3)]
                cells[idx[2] * sub * sub + idx[1] * sub + idx[0]].append((u, idx))
            out["centroid"][b, g] = np.mean(us, axis=0)
            for slot, items in cells.items():
                c = np.mean([u for u, _ in items], axis=0)
                out["sub"][b, g, slot] = (c - np.array(items[0][1]) / sub) * sub
                out["occ"][b, g, slot] = True
            mean = pts[b, g].mean(axis=0)
            x = pts[b, g] - mean
            n, c, w = slow_eigen(x.T @ x)
            if np.dot(n, centers[b, g] + mean) < 0:
                n = -n
            out["normal"][b, g], out["curvature"][b, g], out["eigenvalues"][b, g] = n, c, w
    return out


# ----------------------------------------------------------------------------------------------------------
# Random pillar layouts
# ----------------------------------------------------------------------------------------------------------


def random_scene(seed: int, batch: int = 3):
    """Random pillars (edges and corners of the grid, shared (ix, iy) across batch indices, isolated ones, one
    point pillars) with random points, a few exactly on a pillar's max faces; shuffled points and pillars."""
    rng = np.random.default_rng(seed)
    nx, ny = GRID
    coords = []
    for b in range(batch):
        cells = set(rng.choice(nx * ny, size=int(rng.integers(6, 22)), replace=False).tolist())
        cells |= {0, nx * ny - 1, 3 * ny + 2}  # two corners and a shared interior cell in every batch
        coords += [(b, c // ny, c % ny) for c in sorted(cells)]
    coords_arr = np.array(coords, dtype=np.int64)[rng.permutation(len(coords))]
    points, owner = [], []
    for p, (_, ix, iy) in enumerate(coords_arr):
        corner = np.array([RANGE[0] + SIZE[0] * ix, RANGE[1] + SIZE[1] * iy, RANGE[2]])
        extent = np.array([SIZE[0], SIZE[1], RANGE[5] - RANGE[2]])
        count = int(rng.choice([1, 2, 5, 20, 40]))
        if rng.random() < 0.5:  # clustered in a sub-box
            lo = rng.random(3) * 0.7
            local = lo + rng.random((count, 3)) * 0.3
        else:
            local = rng.random((count, 3))
        pts = corner + local * extent
        if rng.random() < 0.3:
            pts = np.concatenate([pts, [corner + extent]])  # on the max corner of its pillar
        points.append(pts)
        owner += [p] * len(pts)
    xyz = np.concatenate(points).astype(np.float32)
    owner_arr = np.array(owner, dtype=np.int64)
    order = rng.permutation(len(xyz))
    return xyz[order], owner_arr[order], coords_arr


def run_pillars(xyz, owner, coords, **kwargs) -> PillarTargets:
    return pillar_targets(
        torch.from_numpy(np.asarray(xyz)),
        torch.from_numpy(np.asarray(owner)),
        torch.from_numpy(np.asarray(coords)),
        point_range=kwargs.pop("point_range", RANGE),
        pillar_size=kwargs.pop("pillar_size", SIZE),
        **kwargs,
    )


def assert_normals_match(got, want, eigenvalues, position, viewpoint, *, oriented=True, atol=1e-5):
    """Sign-free agreement where the smallest eigenvalue is well separated, then the sign where decided."""
    got = np.asarray(got, dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)
    scale = np.maximum(eigenvalues[..., 2], 1e-30)
    defined = (eigenvalues[..., 1] - eigenvalues[..., 0]) > 1e-4 * scale
    dots = (got * want).sum(-1)
    assert np.all(np.abs(dots[defined]) > 1 - atol), np.abs(dots[defined]).min()
    if oriented:
        view = ((np.asarray(viewpoint) - position) * want).sum(-1)
        decided = defined & (np.abs(view) > 1e-4)
        assert np.all(dots[decided] > 0)
    return defined


# ----------------------------------------------------------------------------------------------------------
# Pillar targets
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pillar_targets_match_loops(seed: int) -> None:
    xyz, owner, coords = random_scene(seed)
    ratios = (
        {"low_ratio": (4, 4, 8), "med_ratio": (2, 2, 4)}
        if seed % 2 == 0
        else {"low_ratio": (2, 3, 4), "med_ratio": (1, 2, 3)}
    )
    viewpoint = (0.1, -0.2, 0.3) if seed < 2 else (5.0, 5.0, 5.0)
    got = run_pillars(xyz, owner, coords, viewpoint=viewpoint, **ratios)
    want = slow_pillar_targets(
        xyz, owner, coords, point_range=RANGE, pillar_size=SIZE, viewpoint=viewpoint, **ratios
    )
    num = len(coords)
    low_slots, med_slots = np.prod(ratios["low_ratio"]), np.prod(ratios["med_ratio"])
    assert got.top_centroid.shape == (num, 3)
    assert got.top_centroid.dtype == torch.float32
    assert got.low_centroid.shape == (num, low_slots, 3)
    assert got.low_occupancy.shape == (num, low_slots)
    assert got.med_centroid.shape == (num, med_slots, 3)
    assert got.med_occupancy.shape == (num, med_slots)
    assert got.low_occupancy.dtype == torch.bool
    assert got.normal_points.dtype == torch.long
    np.testing.assert_allclose(got.top_centroid.numpy(), want["top"], atol=1e-6)
    np.testing.assert_array_equal(got.low_occupancy.numpy(), want["low_occ"])
    np.testing.assert_array_equal(got.med_occupancy.numpy(), want["med_occ"])
    np.testing.assert_allclose(got.low_centroid.numpy(), want["low"], atol=2e-6)
    np.testing.assert_allclose(got.med_centroid.numpy(), want["med"], atol=2e-6)
    for centroids in (
        got.top_centroid,
        got.low_centroid,
        got.med_centroid,
    ):  # float32 max faces round over by ~1e-7
        assert centroids.min() >= 0
        assert centroids.max() <= 1 + 1e-6
    np.testing.assert_array_equal(got.normal_points.numpy(), want["count"])
    np.testing.assert_allclose(got.curvature.numpy(), want["curvature"], atol=1e-5)
    np.testing.assert_allclose(got.curvature.sum(-1).numpy(), 1.0, atol=1e-6)
    assert np.all(np.diff(got.curvature.numpy(), axis=-1) <= 1e-7)  # descending
    defined = assert_normals_match(
        got.normal.numpy(), want["normal"], want["eigenvalues"], want["top_metric"], viewpoint
    )
    assert defined.sum() > num // 2


def test_pillar_normal_sign_none_is_the_unoriented_eigenvector() -> None:
    xyz, owner, coords = random_scene(5)
    oriented = run_pillars(xyz, owner, coords, viewpoint=(0.0, 0.0, 0.0))
    raw = run_pillars(xyz, owner, coords, normal_sign="none")
    same = (raw.normal == oriented.normal).all(-1)
    flipped = (raw.normal == -oriented.normal).all(-1)
    assert torch.all(same | flipped)
    for field in ("top_centroid", "low_centroid", "curvature", "normal_points"):
        assert torch.equal(getattr(raw, field), getattr(oriented, field))
    # "none" is the sign of eigh on the scatter matrix (rebuilt here from the loop reference).
    want = slow_pillar_targets(
        xyz,
        owner,
        coords,
        point_range=RANGE,
        pillar_size=SIZE,
        low_ratio=(4, 4, 8),
        med_ratio=(2, 2, 4),
        viewpoint=(0, 0, 0),
    )
    assert_normals_match(
        raw.normal.numpy(), want["normal"], want["eigenvalues"], want["top_metric"], (0, 0, 0), oriented=False
    )


def test_pillar_targets_are_equivariant_to_point_and_pillar_order() -> None:
    xyz, owner, coords = random_scene(7)
    base = run_pillars(xyz, owner, coords)
    rng = np.random.default_rng(0)
    point_order = rng.permutation(len(xyz))
    pillar_order = rng.permutation(len(coords))
    new_index = np.argsort(pillar_order)  # old pillar p is now row new_index[p]
    got = run_pillars(xyz[point_order], new_index[owner[point_order]], coords[pillar_order])
    for field in PillarTargets._fields:
        torch.testing.assert_close(getattr(got, field), getattr(base, field)[pillar_order], atol=1e-5, rtol=0)


def test_batch_indices_do_not_see_each_other() -> None:
    """Two scenes with the same pillar layout in one call give exactly what two separate calls give."""
    xyz_a, owner_a, coords_a = random_scene(11, batch=1)
    xyz_b, owner_b, coords_b = random_scene(12, batch=1)
    coords_b = coords_b.copy()
    coords_b[:, 0] = 1
    joint = run_pillars(
        np.concatenate([xyz_a, xyz_b]),
        np.concatenate([owner_a, owner_b + len(coords_a)]),
        np.concatenate([coords_a, coords_b]),
    )
    a = run_pillars(xyz_a, owner_a, coords_a)
    b = run_pillars(xyz_b, owner_b, coords_b)
    for field in PillarTargets._fields:
        torch.testing.assert_close(
            getattr(joint, field), torch.cat([getattr(a, field), getattr(b, field)]), atol=1e-6, rtol=0
        )


def test_hand_built_pillar_sub_voxels() -> None:
    """Three points in one pillar (1, 0) of a 1 m grid, 8 m high: known slots and normalised centroids."""
    point_range = (0.0, 0.0, 0.0, 4.0, 4.0, 8.0)
    xyz = np.array([[1.1, 0.6, 3.5], [1.6, 0.1, 0.5], [2.0, 1.0, 8.0]], dtype=np.float64)  # last: max corner
    got = run_pillars(
        xyz,
        np.zeros(3, dtype=np.int64),
        np.array([[0, 1, 0]]),
        point_range=point_range,
        pillar_size=(1.0, 1.0),
    )
    # low sub-voxels 0.25 x 0.25 x 1: indices (0, 2, 3), (2, 0, 0), clamped (3, 3, 7).
    low_slots = {
        3 * 16 + 2 * 4 + 0: [0.4, 0.4, 0.5],
        0 * 16 + 0 * 4 + 2: [0.4, 0.4, 0.5],
        127: [1.0, 1.0, 1.0],
    }
    # med sub-voxels 0.5 x 0.5 x 2: indices (0, 1, 1), (1, 0, 0), clamped (1, 1, 3).
    med_slots = {
        1 * 4 + 1 * 2 + 0: [0.2, 0.2, 0.75],
        0 * 4 + 0 * 2 + 1: [0.2, 0.2, 0.25],
        15: [1.0, 1.0, 1.0],
    }
    for slots, occupancy, centroid, count in (
        (low_slots, got.low_occupancy, got.low_centroid, 128),
        (med_slots, got.med_occupancy, got.med_centroid, 16),
    ):
        assert occupancy.shape == (1, count)
        assert sorted(torch.nonzero(occupancy[0]).flatten().tolist()) == sorted(slots)
        for slot, value in slots.items():
            np.testing.assert_allclose(centroid[0, slot].numpy(), value, atol=1e-6)
        assert centroid[0][~occupancy[0]].abs().max() == 0
    mean = xyz.mean(0)
    np.testing.assert_allclose(got.top_centroid[0].numpy(), (mean - [1, 0, 0]) / [1, 1, 8], atol=1e-6)
    assert got.normal_points.tolist() == [3]


def test_two_points_share_a_sub_voxel() -> None:
    xyz = np.array(
        [[0.05, 0.05, 0.1], [0.15, 0.15, 0.2]]
    )  # both in low slot 0 of pillar (0, 0): 0.25 x 0.25 x 0.25
    got = run_pillars(
        xyz,
        np.zeros(2, dtype=np.int64),
        np.array([[0, 0, 0]]),
        point_range=(0, 0, 0, 1, 1, 2),
        pillar_size=(1.0, 1.0),
    )
    assert got.low_occupancy[0].nonzero().flatten().tolist() == [0]
    np.testing.assert_allclose(
        got.low_centroid[0, 0].numpy(), [0.1 / 0.25, 0.1 / 0.25, 0.15 / 0.25], atol=1e-6
    )
    assert got.med_occupancy[0].nonzero().flatten().tolist() == [0]
    assert got.normal_points.tolist() == [1]


def test_isolated_single_point_pillar_and_empty_pillar() -> None:
    """One point alone: one slot, S = 0, curvature 1/3 each, a finite unit normal. A pillar without points:
    zero targets, and it adds nothing to its neighbour."""
    xyz = np.array([[0.3, 0.4, 0.5]], dtype=np.float32)
    coords = np.array([[0, 1, 1], [0, 2, 1], [1, 1, 1]])
    got = run_pillars(xyz, np.zeros(1, dtype=np.int64), coords)
    np.testing.assert_allclose(got.curvature[0].numpy(), [1 / 3] * 3, atol=1e-6)
    assert torch.isfinite(got.normal).all()
    np.testing.assert_allclose(got.normal.norm(dim=-1).numpy(), 1.0, atol=1e-6)
    assert got.normal_points.tolist() == [1, 1, 0]  # pillar 1 sees pillar 0; pillar 2 is another scene
    for row in (1, 2):
        assert not got.low_occupancy[row].any()
        assert not got.med_occupancy[row].any()
        assert got.top_centroid[row].abs().max() == 0
        assert got.med_centroid[row].abs().max() == 0


def test_plane_gives_the_analytic_normal_toward_the_viewpoint() -> None:
    a, b, c = 0.4, -0.5, 0.1
    rng = np.random.default_rng(0)
    xy = rng.uniform([RANGE[0], RANGE[1]], [RANGE[3], RANGE[4]], size=(20000, 2))
    xyz = np.concatenate([xy, (a * xy[:, 0] + b * xy[:, 1] + c)[:, None]], axis=1)
    cells = np.floor((xy - [RANGE[0], RANGE[1]]) / SIZE).astype(np.int64)
    keys, owner = np.unique(cells, axis=0, return_inverse=True)
    coords = np.concatenate([np.zeros((len(keys), 1), dtype=np.int64), keys], axis=1)
    want = np.array([-a, -b, 1.0]) / np.linalg.norm([-a, -b, 1.0])
    for viewpoint, sign in (((0.2, -0.1, 3.0), 1.0), ((0.0, 0.0, -5.0), -1.0)):
        got = run_pillars(xyz, owner.reshape(-1), coords, viewpoint=viewpoint)
        assert len(coords) == GRID[0] * GRID[1]
        np.testing.assert_allclose(
            got.normal.numpy(), np.broadcast_to(sign * want, (len(coords), 3)), atol=1e-5
        )
        assert got.curvature[:, 2].max() < 1e-6
        assert got.curvature[:, 1].min() > 0.01
    raw = run_pillars(xyz, owner.reshape(-1), coords, normal_sign="none")
    np.testing.assert_allclose(np.abs(raw.normal.numpy() @ want), 1.0, atol=1e-6)


def test_vertical_cylinder_normals_are_horizontal_and_face_the_sensor_inside() -> None:
    point_range = (-4.0, -4.0, -1.0, 4.0, 4.0, 1.0)
    rng = np.random.default_rng(1)
    theta = rng.uniform(0, 2 * np.pi, 40000)
    xyz = np.stack([3 * np.cos(theta), 3 * np.sin(theta), rng.uniform(-1, 1, theta.size)], axis=1)
    cells = np.floor((xyz[:, :2] + 4.0) / 0.25).astype(np.int64)
    keys, owner = np.unique(cells, axis=0, return_inverse=True)
    coords = np.concatenate([np.zeros((len(keys), 1), dtype=np.int64), keys], axis=1)
    got = run_pillars(xyz, owner.reshape(-1), coords, point_range=point_range, pillar_size=(0.25, 0.25))
    top = got.top_centroid.double().numpy() * [0.25, 0.25, 2.0] + np.concatenate(
        [keys * 0.25 - 4.0, -np.ones((len(keys), 1))], 1
    )
    radial = top[:, :2] / np.linalg.norm(top[:, :2], axis=1, keepdims=True)
    normal = got.normal.double().numpy()
    enough = got.normal_points.numpy() >= 6
    assert enough.mean() > 0.9
    assert np.abs(normal[enough, 2]).max() < 0.02
    assert ((normal[enough, :2] * -radial[enough]).sum(-1)).min() > 0.99  # toward the sensor at the axis


def test_bev_neighbors_match_loops() -> None:
    _, _, coords = random_scene(3)
    got = bev_neighbors(torch.from_numpy(coords)).numpy()
    assert got.shape == (len(coords), 9)
    offsets = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
    for p, (b, ix, iy) in enumerate(coords):
        for j, (dx, dy) in enumerate(offsets):
            match = [q for q, row in enumerate(coords) if tuple(row) == (b, ix + dx, iy + dy)]
            assert got[p, j] == (match[0] if match else -1)
        assert got[p, 4] == p
    assert bev_neighbors(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 9)


def test_pillar_targets_reject_bad_inputs() -> None:
    xyz = torch.zeros(2, 3)
    coords = torch.tensor([[0, 1, 1], [0, 1, 1]])
    kw: dict[str, Any] = {"point_range": RANGE, "pillar_size": SIZE}
    with pytest.raises(ValueError, match="repeated"):
        pillar_targets(xyz, torch.zeros(2, dtype=torch.long), coords, **kw)
    with pytest.raises(ValueError, match="point_pillar"):
        pillar_targets(xyz, torch.tensor([0, 1]), coords[:1], **kw)
    with pytest.raises(ValueError, match="normal_sign"):
        pillar_targets(
            xyz,
            torch.zeros(2, dtype=torch.long),
            coords[:1],
            normal_sign="up",  # type: ignore[arg-type]
            **kw,
        )
    with pytest.raises(ValueError, match="med_ratio"):
        pillar_targets(xyz, torch.zeros(2, dtype=torch.long), coords[:1], med_ratio=(2, 0, 4), **kw)
    empty = pillar_targets(
        torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), **kw
    )
    assert empty.low_centroid.shape == (0, 128, 3)
    assert empty.normal.shape == (0, 3)


# ----------------------------------------------------------------------------------------------------------
# Shared eigen helpers
# ----------------------------------------------------------------------------------------------------------


def test_scatter_normals_weights_equal_repeated_points() -> None:
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0, 1.0], dtype=torch.float64).expand(4, 6)
    origin = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    repeated = points[:, [0, 1, 1, 3, 4, 4, 4, 5]]
    n_w, c_w = scatter_normals(points, weights, origin)
    n_r, c_r = scatter_normals(repeated, None, origin)
    torch.testing.assert_close(c_w, c_r)
    torch.testing.assert_close((n_w * n_r).sum(-1).abs(), torch.ones(4, dtype=torch.float64))
    n_b, _ = scatter_normals(points, weights > 0, origin)  # bool mask: weight 1
    assert n_b.dtype == torch.float64


def test_normals_from_scatter_follows_the_svd_convention() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 7, 3, generator=gen, dtype=torch.float64) * torch.tensor(
        [3.0, 1.0, 0.1], dtype=torch.float64
    )
    scatter = x.transpose(1, 2) @ x
    normal, curvature = normals_from_scatter(scatter)
    _u, s, v = torch.svd(scatter)  # the official decomposition
    torch.testing.assert_close((normal * v[..., -1]).sum(-1).abs(), torch.ones(10, dtype=torch.float64))
    torch.testing.assert_close(curvature, (s + EPS) / (s + EPS).sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="3, 3"):
        normals_from_scatter(torch.zeros(2, 3))


def test_orient_normals() -> None:
    normal = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    position = torch.zeros(3, 3)
    toward = orient_normals(normal, position, (0.0, 0.0, 2.0))
    assert toward.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]  # orthogonal: unchanged
    away = orient_normals(normal, position, (0.0, 0.0, 2.0), toward=False)
    assert away.tolist() == [[0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------------------------------------
# Patch targets
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", [1, 2, 4])
def test_patch_targets_match_loops(sub: int) -> None:
    rng = np.random.default_rng(sub)
    neighborhoods = (rng.normal(size=(2, 5, 16, 3)) * rng.uniform(0.01, 0.2, size=(2, 5, 1, 3))).astype(
        np.float32
    )
    neighborhoods[0, 0, 1:] = neighborhoods[0, 0, :1]  # duplicates only
    neighborhoods[1, 1] = 0.0  # a degenerate patch: r clamps to 1e-6
    centers = rng.normal(size=(2, 5, 3)).astype(np.float32)
    got = patch_targets(torch.from_numpy(neighborhoods), torch.from_numpy(centers), sub=sub)
    want = slow_patch_targets(neighborhoods, centers, sub)
    assert isinstance(got, PatchTargets)
    assert got.sub_centroid.shape == (2, 5, sub**3, 3)
    assert got.sub_occupancy.dtype == torch.bool
    np.testing.assert_allclose(got.centroid.numpy(), want["centroid"], atol=1e-6)
    np.testing.assert_array_equal(got.sub_occupancy.numpy(), want["occ"])
    np.testing.assert_allclose(got.sub_centroid.numpy(), want["sub"], atol=2e-6)
    assert got.sub_centroid.min() >= 0
    assert got.sub_centroid.max() <= 1
    np.testing.assert_allclose(got.curvature.numpy(), want["curvature"], atol=1e-5)
    position = centers + neighborhoods.astype(np.float64).mean(2)
    assert_normals_match(
        got.normal.numpy(), want["normal"], want["eigenvalues"], position, np.zeros(3), atol=1e-5
    )
    np.testing.assert_allclose(got.centroid[1, 1].numpy(), [0.5, 0.5, 0.5])  # all at the centre: u = r / 2r


def test_hand_built_patch_cells() -> None:
    """Two points, r = 1: u = (p + 1) / 2; with sub = 2 they fall in slots 0 and 7."""
    neighborhoods = torch.tensor([[[[-1.0, -0.5, -0.8], [1.0, 0.6, 0.2]]]])
    got = patch_targets(neighborhoods, torch.zeros(1, 1, 3), sub=2)
    np.testing.assert_allclose(got.centroid[0, 0].numpy(), [0.5, 0.525, 0.35], atol=1e-6)
    assert got.sub_occupancy[0, 0].nonzero().flatten().tolist() == [0, 7]
    np.testing.assert_allclose(got.sub_centroid[0, 0, 0].numpy(), [0.0, 0.5, 0.2], atol=1e-6)  # u·2 − 0
    np.testing.assert_allclose(got.sub_centroid[0, 0, 7].numpy(), [1.0, 0.6, 0.2], atol=1e-6)  # u·2 − 1


def sphere_points(n: int, seed: int) -> np.ndarray:
    pts = np.random.default_rng(seed).normal(size=(n, 3))
    return pts / np.linalg.norm(pts, axis=1, keepdims=True)


def test_plane_patch_has_the_analytic_normal_facing_away_from_the_origin() -> None:
    a, b, c = 0.4, -0.5, 2.0  # the origin lies below the plane
    rng = np.random.default_rng(2)
    xy = rng.uniform(-0.1, 0.1, size=(3, 32, 2)) + rng.uniform(-1, 1, size=(3, 1, 2))
    pts = np.concatenate([xy, (a * xy[..., 0] + b * xy[..., 1] + c)[..., None]], -1)
    centers = pts[:, 0]
    got = patch_targets(torch.from_numpy(pts - centers[:, None])[None], torch.from_numpy(centers)[None])
    want = np.array([-a, -b, 1.0]) / np.linalg.norm([-a, -b, 1.0])
    np.testing.assert_allclose(got.normal[0].numpy(), np.broadcast_to(want, (3, 3)), atol=1e-5)
    assert got.curvature[..., 2].max() < 1e-7
    raw = patch_targets(
        torch.from_numpy(pts - centers[:, None])[None], torch.from_numpy(centers)[None], normal_sign="none"
    )
    np.testing.assert_allclose(np.abs(raw.normal[0].numpy() @ want), 1.0, atol=1e-6)


def test_sphere_patches_point_outward_with_small_positive_curvature() -> None:
    xyz = torch.from_numpy(np.stack([sphere_points(4096, 0), sphere_points(4096, 1) * 0.5])).float()
    groups = group_points(xyz, 32, 32)
    got = patch_targets(groups.neighborhoods, groups.centers)
    position = (groups.centers + groups.neighborhoods.mean(2)).double()
    radial = position / position.norm(dim=-1, keepdim=True)
    assert (got.normal.double() * radial).sum(-1).min() > 0.99
    assert got.curvature[..., 2].min() > 1e-4  # curved: more than a plane's ~1e-9
    assert got.curvature[..., 2].max() < 0.05


def test_cylinder_patches_are_radial_and_orthogonal_to_the_axis() -> None:
    # A 128 x 32 lattice on the unit cylinder around the z axis (shuffled): kNN patches are nearly
    # symmetric, so the normals tilt off the axis by a few degrees at most (random samples tilt them more).
    theta, z = np.meshgrid(
        np.arange(128) * 2 * np.pi / 128 + 0.013, (np.arange(32) + 0.5) / 16 - 1, indexing="ij"
    )
    xyz = np.stack([np.cos(theta), np.sin(theta), z], -1).reshape(-1, 3)
    xyz = xyz[np.random.default_rng(3).permutation(len(xyz))]
    groups = group_points(torch.from_numpy(xyz[None]).float(), 32, 32)
    got = patch_targets(groups.neighborhoods, groups.centers)
    normal = got.normal[0].double()
    position = (groups.centers + groups.neighborhoods.mean(2))[0].double()
    radial = position[:, :2] / position[:, :2].norm(dim=-1, keepdim=True)
    assert normal[:, 2].abs().max() < 0.05
    assert (normal[:, :2] * radial).sum(-1).min() > 0.995
    assert got.curvature[0, :, 2].min() > 1e-4


def test_patch_targets_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="neighborhoods"):
        patch_targets(torch.zeros(2, 3, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="centers"):
        patch_targets(torch.zeros(1, 2, 4, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="sub"):
        patch_targets(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 3), sub=0)
    with pytest.raises(ValueError, match="normal_sign"):
        patch_targets(
            torch.zeros(1, 2, 4, 3),
            torch.zeros(1, 2, 3),
            normal_sign="in",  # type: ignore[arg-type]
        )


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    xyz, owner, coords = random_scene(4)
    cpu = run_pillars(xyz, owner, coords)
    gpu = pillar_targets(
        torch.from_numpy(xyz).cuda(),
        torch.from_numpy(owner).cuda(),
        torch.from_numpy(coords).cuda(),
        point_range=RANGE,
        pillar_size=SIZE,
    )
    for field in PillarTargets._fields:
        value = getattr(gpu, field)
        assert value.device.type == "cuda"
        if field == "normal":  # eigenvector signs may differ before orientation only where it is undecided
            torch.testing.assert_close(
                (value.cpu() * cpu.normal).sum(-1).abs(), torch.ones(len(coords)), atol=1e-4, rtol=0
            )
        else:
            torch.testing.assert_close(value.cpu(), getattr(cpu, field), atol=1e-5, rtol=0)
    neighborhoods = torch.randn(2, 8, 16, 3) * 0.1
    centers = torch.randn(2, 8, 3)
    cpu_p = patch_targets(neighborhoods, centers)
    gpu_p = patch_targets(neighborhoods.cuda(), centers.cuda())
    torch.testing.assert_close(gpu_p.centroid.cpu(), cpu_p.centroid)
    torch.testing.assert_close(gpu_p.sub_centroid.cpu(), cpu_p.sub_centroid)
    torch.testing.assert_close(gpu_p.curvature.cpu(), cpu_p.curvature)
    torch.testing.assert_close(gpu_p.normal.cpu(), cpu_p.normal, atol=1e-4, rtol=0)
