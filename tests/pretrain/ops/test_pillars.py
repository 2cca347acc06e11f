from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.ops.pillars import Pillars, grid_shape, pillar_centers, pillarize

RANGE = (-3.2, -1.6, -1.0, 3.2, 1.6, 1.0)
SIZE = (0.4, 0.2)


def _reference(
    points: torch.Tensor, valid: torch.Tensor | None, point_range=RANGE, pillar_size=SIZE
) -> tuple[list[tuple[int, int, int]], dict[tuple[int, int, int], list[int]]]:
    """Python loop over points; float32 arithmetic per scalar, like the op."""
    nx, ny = grid_shape(point_range, pillar_size)
    pts = points.numpy()
    lo = np.array(point_range[:3], dtype=np.float32)
    hi = np.array(point_range[3:], dtype=np.float32)
    size = np.array(pillar_size, dtype=np.float32)
    pillars: dict[tuple[int, int, int], list[int]] = {}
    batch, num = pts.shape[:2]
    for b in range(batch):
        for n in range(num):
            p = pts[b, n]
            if valid is not None and not bool(valid[b, n]):
                continue
            if not all(math.isfinite(float(v)) for v in p):
                continue
            if not all(lo[a] <= p[a] < hi[a] for a in range(3)):
                continue
            ix = min(max(math.floor((p[0] - lo[0]) / size[0]), 0), nx - 1)
            iy = min(max(math.floor((p[1] - lo[1]) / size[1]), 0), ny - 1)
            pillars.setdefault((b, ix, iy), []).append(b * num + n)
    return sorted(pillars), pillars


def _check_against_reference(result: Pillars, points: torch.Tensor, valid: torch.Tensor | None) -> None:
    keys, members = _reference(points, valid)
    assert result.batch_size == points.shape[0]
    assert result.coords.dtype == torch.int64
    assert [tuple(c) for c in result.coords.tolist()] == keys
    assert result.counts.tolist() == [len(members[k]) for k in keys]
    kept = sorted(i for k in keys for i in members[k])
    assert result.point_index.tolist() == kept
    for row, pillar in zip(result.point_index.tolist(), result.point_pillar.tolist()):
        assert row in members[keys[pillar]]


def test_pillarize_matches_loop_reference(gen: torch.Generator) -> None:
    points = torch.rand(3, 200, 3, generator=gen) * torch.tensor([8.0, 4.0, 3.0]) - torch.tensor(
        [4.0, 2.0, 1.5]
    )
    points[1, 150:] = float("nan")  # padding rows
    valid = torch.rand(3, 200, generator=gen) > 0.2
    _check_against_reference(pillarize(points, valid, point_range=RANGE, pillar_size=SIZE), points, valid)
    _check_against_reference(pillarize(points, None, point_range=RANGE, pillar_size=SIZE), points, None)


def test_points_on_range_boundaries() -> None:
    below_x = float(np.nextafter(np.float32(3.2), np.float32(-np.inf)))
    rows = [
        [-3.2, -1.6, -1.0],  # min corner: kept, cell (0, 0)
        [3.2, 0.0, 0.0],  # x == x_max: dropped
        [0.0, 1.6, 0.0],  # y == y_max: dropped
        [0.0, 0.0, 1.0],  # z == z_max: dropped (z is filtered too)
        [0.0, 0.0, -1.0],  # z == z_min: kept
        [below_x, 0.0, 0.0],  # a rounding error below x_max: last cell
        [-3.2 + 3 * 0.4, 0.0, 0.0],  # interior cell boundary
        [-3.3, 0.0, 0.0],  # below x_min: dropped
        [0.0, 0.0, -1.01],  # below z_min: dropped
    ]
    points = torch.tensor([rows], dtype=torch.float32)
    result = pillarize(points, None, point_range=RANGE, pillar_size=SIZE)
    _check_against_reference(result, points, None)
    assert sorted(result.point_index.tolist()) == [0, 4, 5, 6]
    nx, ny = grid_shape(RANGE, SIZE)
    assert (nx, ny) == (16, 16)
    assert [0, 0, 0] in result.coords.tolist()
    assert [0, nx - 1, 8] in result.coords.tolist()


def test_nan_rows_and_invalid_rows_are_dropped() -> None:
    points = torch.zeros(2, 4, 3)
    points[0, 1] = float("nan")
    points[0, 2, 2] = float("inf")
    valid = torch.tensor([[True, True, True, False], [True, False, True, True]])
    result = pillarize(points, valid, point_range=RANGE, pillar_size=SIZE)
    assert result.point_index.tolist() == [0, 4, 6, 7]
    assert result.counts.tolist() == [1, 3]
    all_nan = pillarize(torch.full((2, 5, 3), float("nan")), None, point_range=RANGE, pillar_size=SIZE)
    assert all_nan.coords.shape == (0, 3)
    assert all_nan.point_index.numel() == all_nan.point_pillar.numel() == all_nan.counts.numel() == 0
    assert all_nan.batch_size == 2
    no_points = pillarize(torch.zeros(2, 0, 3), None, point_range=RANGE, pillar_size=SIZE)
    assert no_points.coords.shape == (0, 3)
    assert no_points.batch_size == 2


def test_very_different_scans_in_one_batch(gen: torch.Generator) -> None:
    points = torch.full((2, 5000, 3), float("nan"))
    points[0, :5] = torch.tensor(
        [[0.01, 0.01, 0.0], [0.02, 0.03, 0.1], [1.0, 1.0, 0.0], [-3.0, 1.5, 0.5], [9, 9, 0]]
    )
    points[1] = torch.rand(5000, 3, generator=gen) * torch.tensor([6.4, 3.2, 2.0]) - torch.tensor(
        [3.2, 1.6, 1.0]
    )
    result = pillarize(points, None, point_range=RANGE, pillar_size=SIZE)
    _check_against_reference(result, points, None)
    per_scan = torch.bincount(result.coords[:, 0], minlength=2).tolist()
    assert per_scan[0] == 3  # two points share a pillar, one is out of range
    assert per_scan[1] > 200
    assert (
        int(result.counts.sum())
        == result.point_index.numel()
        == 4 + 5000 - int((points[1, :, 2] >= 1.0).sum() + (points[1, :, 1] >= 1.6).sum())
    )


def test_point_pillar_and_counts_are_consistent(gen: torch.Generator) -> None:
    points = torch.randn(2, 300, 3, generator=gen)
    result = pillarize(points, None, point_range=RANGE, pillar_size=SIZE)
    counts = torch.bincount(result.point_pillar, minlength=result.coords.shape[0])
    assert torch.equal(counts, result.counts)
    batch_of_point = result.point_index // points.shape[1]
    assert torch.equal(result.coords[result.point_pillar, 0], batch_of_point)


def test_pillar_centers_are_inside_their_cells(gen: torch.Generator) -> None:
    points = torch.rand(2, 100, 3, generator=gen) * 3 - 1.5
    result = pillarize(points, None, point_range=RANGE, pillar_size=SIZE)
    centers = pillar_centers(result.coords, RANGE, SIZE)
    assert centers.shape == (result.coords.shape[0], 2)
    as_points = torch.cat([centers, torch.zeros(len(centers), 1)], 1)[None]
    again = pillarize(as_points, None, point_range=RANGE, pillar_size=SIZE)
    assert again.point_index.tolist() == list(range(len(centers)))
    assert torch.equal(again.coords[again.point_pillar, 1:], result.coords[:, 1:])
    torch.testing.assert_close(
        pillar_centers(torch.tensor([[0, 0, 0]]), RANGE, SIZE), torch.tensor([[-3.0, -1.5]])
    )


def test_official_grid_and_bad_geometry() -> None:
    assert grid_shape((-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), (0.256, 0.256)) == (400, 400)
    assert grid_shape((-50.0, -50.0, -5.0, 50.0, 50.0, 3.0), (0.25, 0.25)) == (400, 400)
    with pytest.raises(ValueError, match="whole cells"):
        grid_shape((-1.0, -1.0, -1.0, 1.0, 1.0, 1.0), (0.3, 0.5))
    with pytest.raises(ValueError, match="min < max"):
        grid_shape((1.0, -1.0, -1.0, -1.0, 1.0, 1.0), (0.5, 0.5))
    with pytest.raises(ValueError, match="positive"):
        grid_shape((-1.0, -1.0, -1.0, 1.0, 1.0, 1.0), (0.5, 0.0))
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        pillarize(torch.zeros(4, 3), None, point_range=RANGE, pillar_size=SIZE)
    with pytest.raises(ValueError, match="valid"):
        pillarize(
            torch.zeros(1, 4, 3), torch.ones(1, 3, dtype=torch.bool), point_range=RANGE, pillar_size=SIZE
        )
