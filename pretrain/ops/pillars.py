"""Dynamic pillarisation of LiDAR scans: every non-empty BEV cell of a grid becomes one pillar, no point cap.

A pillar ("top voxel" in GeoMAE) spans the whole z range of ``point_range``; points are assigned to the cell
``floor((p - min) / size)`` of the grid ``[x_min, x_max) × [y_min, y_max)`` and points outside
``[min, max)`` on any of x, y, z are dropped (mmdet3d dynamic voxelisation, ``DynamicScatter``). Unlike hard
voxelisation there is no cap on the points per pillar and no cap on the pillars per scan.

Pillar coordinates are ``(batch, ix, iy)`` int64 with ``ix`` along x and ``iy`` along y, sorted
lexicographically. (mmdet3d writes ``(batch, z, y, x)``; pcpt keeps x before y everywhere.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Pillars", "grid_shape", "pillar_centers", "pillarize"]


class Pillars(NamedTuple):
    """The non-empty pillars of a batch of scans and the points they hold.

    Attributes:
        coords: (P, 3) int64 ``(batch, ix, iy)``, unique, sorted lexicographically.
        point_index: (M,) int64 flat row ``b * N + n`` of each kept point (inside the range and valid), in
            increasing order, so ``points.reshape(B * N, -1)[point_index]`` gathers the kept points.
        point_pillar: (M,) int64 pillar (row of ``coords``) of each kept point.
        counts: (P,) int64 points per pillar (all >= 1).
        batch_size: B, the number of scans (some may have no pillar).
    """

    coords: Tensor
    point_index: Tensor
    point_pillar: Tensor
    counts: Tensor
    batch_size: int


def _check_geometry(point_range: Sequence[float], pillar_size: Sequence[float]) -> None:
    if len(point_range) != 6:
        raise ValueError(f"point_range must be (x_min, y_min, z_min, x_max, y_max, z_max), got {point_range}")
    if len(pillar_size) != 2:
        raise ValueError(f"pillar_size must be (size_x, size_y), got {pillar_size}")
    if not all(point_range[i] < point_range[i + 3] for i in range(3)):
        raise ValueError(f"point_range must have min < max on every axis, got {point_range}")
    if not all(s > 0 for s in pillar_size):
        raise ValueError(f"pillar_size must be positive, got {pillar_size}")


def grid_shape(point_range: Sequence[float], pillar_size: Sequence[float]) -> tuple[int, int]:
    """The BEV grid ``(nx, ny)``: ``round((max - min) / size)`` per axis.

    Args:
        point_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` in metres.
        pillar_size: ``(size_x, size_y)`` in metres.

    Raises:
        ValueError: a malformed range or size, or a size that does not divide the range into whole cells
            (within 1e-4 of a cell).
    """
    _check_geometry(point_range, pillar_size)
    shape = []
    for axis in range(2):
        cells = (point_range[axis + 3] - point_range[axis]) / pillar_size[axis]
        if abs(cells - round(cells)) > 1e-4:
            raise ValueError(
                f"pillar_size {pillar_size[axis]} does not divide the {'xy'[axis]} range "
                f"[{point_range[axis]}, {point_range[axis + 3]}) into whole cells ({cells:.6f})"
            )
        shape.append(round(cells))
    return shape[0], shape[1]


def pillarize(
    points: Tensor,
    valid: Tensor | None,
    *,
    point_range: Sequence[float],
    pillar_size: Sequence[float],
) -> Pillars:
    """Assigns the points of a batch of scans to pillars (dynamic voxelisation, no point cap).

    A point is kept when it is valid, finite and ``min <= p < max`` on x, y and z. Its cell is
    ``floor((p - min) / size)`` computed in the points' dtype and clamped to the grid (a point a rounding
    error below ``max`` stays in the last cell).

    Args:
        points: (B, N, 3) metric xyz; padding rows may be NaN.
        valid: (B, N) bool, or None for "every finite row".
        point_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` in metres.
        pillar_size: ``(size_x, size_y)`` in metres.

    Returns:
        :class:`Pillars` (P pillars, M kept points) on ``points.device``.

    Raises:
        ValueError: wrong shapes, or a malformed range or pillar size.
    """
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be (B, N, 3), got {tuple(points.shape)}")
    batch, num = points.shape[:2]
    if valid is not None and valid.shape != (batch, num):
        raise ValueError(f"valid must be (B, N) = {(batch, num)}, got {tuple(valid.shape)}")
    nx, ny = grid_shape(point_range, pillar_size)
    lo = torch.tensor(point_range[:3], dtype=points.dtype, device=points.device)
    hi = torch.tensor(point_range[3:], dtype=points.dtype, device=points.device)
    keep = torch.isfinite(points).all(-1) & (points >= lo).all(-1) & (points < hi).all(-1)
    if valid is not None:
        keep &= valid.to(device=points.device, dtype=torch.bool)
    point_index = keep.reshape(-1).nonzero().squeeze(1)
    xy = points.reshape(-1, 3)[point_index, :2]
    size = torch.tensor(pillar_size, dtype=points.dtype, device=points.device)
    cell = torch.floor((xy - lo[:2]) / size).long()
    ix = cell[:, 0].clamp_(0, nx - 1)
    iy = cell[:, 1].clamp_(0, ny - 1)
    key = (point_index // num) * (nx * ny) + ix * ny + iy
    unique, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    coords = torch.stack([unique // (nx * ny), (unique // ny) % nx, unique % ny], dim=1)
    return Pillars(
        coords=coords, point_index=point_index, point_pillar=inverse, counts=counts, batch_size=batch
    )


def pillar_centers(
    coords: Tensor,
    point_range: Sequence[float],
    pillar_size: Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Metric xy centres of pillars: ``min + (i + 0.5) * size``.

    Args:
        coords: (P, 3) int ``(batch, ix, iy)``.
        point_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)``.
        pillar_size: ``(size_x, size_y)``.
        dtype: float dtype of the result.

    Returns:
        (P, 2) xy centres on ``coords.device``.
    """
    _check_geometry(point_range, pillar_size)
    lo = torch.tensor(point_range[:2], dtype=dtype, device=coords.device)
    size = torch.tensor(pillar_size, dtype=dtype, device=coords.device)
    return lo + (coords[:, 1:3].to(dtype) + 0.5) * size
