"""Batched LiDAR scene augmentation (GeoMAE / mmdet3d global transforms) and the point range filter.

GeoMAE pre-trains with mmdet3d's ``GlobalRotScaleTrans`` (rotation U(±0.3925), scale U(0.95, 1.05)),
``RandomFlip3D(flip_ratio_bev_horizontal=0.5, flip_ratio_bev_vertical=0.5)`` and ``PointsRangeFilter``;
:func:`augment_scenes` applies the first two to a padded batch in one matrix product per scene and
:func:`range_filter` is the third. Random numbers are drawn on the generator's device (CPU unless a CUDA
generator is passed) and then moved to the points' device, so a seed gives the same draws on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["augment_scenes", "range_filter", "scene_transforms"]


def scene_transforms(
    draws: Tensor,
    *,
    rotation: float = 0.3925,
    scale: tuple[float, float] = (0.95, 1.05),
    flip_x: float = 0.5,
    flip_y: float = 0.5,
) -> Tensor:
    """The per-scene 3×3 linear maps of :func:`augment_scenes` from uniform draws ``u ∈ [0, 1)⁴``.

    ``M = F · s · R``: first the rotation ``R`` about z by ``θ = rotation · (2u₀ − 1)`` (counter-clockwise
    seen from +z: ``x' = x cos θ − y sin θ``, ``y' = x sin θ + y cos θ``, z unchanged), then the isotropic
    scale ``s = scale[0] + (scale[1] − scale[0]) · u₁``, then ``F = diag(±1, ±1, 1)``: x is negated where
    ``u₂ < flip_x`` and y is negated where ``u₃ < flip_y``. A point maps to ``p' = M p``.

    Args:
        draws: Uniform draws, one row per scene: (rotation, scale, flip_x, flip_y).
        rotation: Largest absolute rotation angle in radians.
        scale: ``(low, high)`` of the scale factor.
        flip_x: Probability of negating x.
        flip_y: Probability of negating y.

    Returns:
        The maps in float64 on the device of ``draws``.

    Shapes:
        draws: (B, 4) -> (B, 3, 3).
    """
    if draws.dim() != 2 or draws.shape[1] != 4:
        raise ValueError(f"draws must have shape (B, 4), got {tuple(draws.shape)}")
    u = draws.to(torch.float64)
    theta = rotation * (2.0 * u[:, 0] - 1.0)
    factor = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero, one = torch.zeros_like(theta), torch.ones_like(theta)
    rotate = torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], dim=1).view(-1, 3, 3)
    sign_x = torch.where(u[:, 2] < flip_x, -one, one)
    sign_y = torch.where(u[:, 3] < flip_y, -one, one)
    flip = torch.diag_embed(torch.stack([sign_x, sign_y, one], dim=1))
    return flip @ rotate * factor[:, None, None]


def augment_scenes(
    points: Tensor,
    valid: Tensor,
    *,
    generator: torch.Generator | None = None,
    rotation: float = 0.3925,
    scale: tuple[float, float] = (0.95, 1.05),
    flip_x: float = 0.5,
    flip_y: float = 0.5,
    draws: Tensor | None = None,
) -> Tensor:
    """GeoMAE's global scene augmentation: rotation about z, isotropic scale, BEV flips, one draw per scene.

    Per scene, in this order (mmdet3d's ``GlobalRotScaleTrans`` then ``RandomFlip3D``): rotate about the z
    axis by ``θ ~ U(−rotation, rotation)`` (counter-clockwise seen from +z), scale all three axes by
    ``s ~ U(scale)``, negate **x** with probability ``flip_x`` (mirror across the y–z plane; mmdet3d's
    "vertical" BEV flip) and negate **y** with probability ``flip_y`` (mirror across the x–z plane; mmdet3d's
    "horizontal" BEV flip). See :func:`scene_transforms` for the exact map. (The sign of mmdet3d's rotation
    depends on its version; θ is symmetric, so the augmentation has the same distribution either way.) Rows
    where ``valid`` is False are returned unchanged (NaN padding stays NaN).

    Draws: ``torch.rand(B, 4)`` in float64 from ``generator`` on its device, one row per scene, columns
    (rotation, scale, flip_x, flip_y), unless ``draws`` is given.

    Args:
        points: Metric points of B scenes, padded.
        valid: True for real points.
        generator: Source of the draws; None uses torch's default generator.
        rotation: Largest absolute rotation angle in radians (GeoMAE: 0.3925 = π/8).
        scale: ``(low, high)`` of the scale factor (GeoMAE: (0.95, 1.05)).
        flip_x: Probability of negating x.
        flip_y: Probability of negating y.
        draws: The uniform draws to use instead of drawing them.

    Returns:
        The augmented points, dtype and device of ``points``.

    Shapes:
        points: (B, N, 3), valid: (B, N) bool, draws: (B, 4) -> (B, N, 3).

    Raises:
        ValueError: On malformed shapes or draws.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (B, N, 3), got {tuple(points.shape)}")
    if valid.shape != points.shape[:2]:
        raise ValueError(f"valid must have shape {tuple(points.shape[:2])}, got {tuple(valid.shape)}")
    batch = points.shape[0]
    if draws is None:
        device = generator.device if generator is not None else torch.device("cpu")
        draws = torch.rand(batch, 4, generator=generator, device=device, dtype=torch.float64)
    if draws.shape != (batch, 4):
        raise ValueError(f"draws must have shape ({batch}, 4), got {tuple(draws.shape)}")
    maps = scene_transforms(draws, rotation=rotation, scale=scale, flip_x=flip_x, flip_y=flip_y)
    moved = points @ maps.to(device=points.device, dtype=points.dtype).transpose(1, 2)
    return torch.where(valid.to(points.device)[..., None], moved, points)


def range_filter(points: Tensor, valid: Tensor, point_range: Sequence[float]) -> Tensor:
    """Points inside the half-open box ``[min, max)`` on every axis, and valid.

    Half-open like voxelisation (``floor((p − min) / size)`` is then a valid cell index). mmdet3d's
    ``PointsRangeFilter`` uses open bounds on both sides; the two differ only for points exactly on the min
    faces. NaN points are outside.

    Args:
        points: Metric points of B scenes, padded.
        valid: True for real points.
        point_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)``.

    Returns:
        Bool mask, True where a valid point lies inside the range.

    Shapes:
        points: (B, N, 3), valid: (B, N) -> (B, N) bool.
    """
    if len(point_range) != 6:
        raise ValueError(f"point_range must have 6 values, got {len(point_range)}")
    if points.dim() != 3 or points.shape[-1] != 3 or valid.shape != points.shape[:2]:
        raise ValueError(
            f"points (B, N, 3) and valid (B, N) expected, got {tuple(points.shape)}, {tuple(valid.shape)}"
        )
    low = torch.tensor(point_range[:3], dtype=points.dtype, device=points.device)
    high = torch.tensor(point_range[3:], dtype=points.dtype, device=points.device)
    inside = ((points >= low) & (points < high)).all(dim=-1)
    return inside & valid.to(device=points.device, dtype=torch.bool)
