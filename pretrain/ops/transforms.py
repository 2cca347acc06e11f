"""Batched point cloud transforms in torch: unit-sphere normalisation and Point-MAE train-time augmentation.

These are the batch-on-the-device counterparts of the per-sample numpy transforms in
``datapipes.transforms`` (``NormalizeUnitSphere``, ``TakePoints(mode="random")``, ``ScaleAndTranslate``)
and follow the same formulas, so a cloud gets the same result from either for the same random draws.
Random numbers are drawn on the generator's device (CPU unless a CUDA generator is passed) and then moved
to the points' device, so a seed gives the same draws on CPU and CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalize_unit_sphere", "random_point_subset", "scale_and_translate"]


def normalize_unit_sphere(xyz: Tensor) -> Tensor:
    """Centres each cloud on its centroid and scales it so that its farthest point has norm 1.

    A cloud of identical points is only centred (scale 1), as in ``datapipes.geometry.normalize_unit_sphere``.

    Shapes:
        xyz: (B, N, 3) -> (B, N, 3), same dtype.
    """
    centred = xyz - xyz.mean(dim=1, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=1)
    radius = torch.where(radius > 1e-12, radius, torch.ones_like(radius))
    return centred / radius[:, None, None]


def random_point_subset(
    points: Tensor, num_points: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Picks ``num_points`` of the N points at random without replacement, the same ones in every cloud.

    The indices are the first ``num_points`` of a random permutation of ``range(N)`` (Point-MAE's
    finetuning draws one permutation per batch). Applied to the first ``pool`` points of clouds stored in
    farthest-point order, this is "FPS to ``pool``, then a random ``num_points``".

    Shapes:
        points: (B, N, C) -> (B, num_points, C).

    Raises:
        ValueError: if ``num_points`` is not in [1, N].
    """
    total = points.shape[1]
    if not 0 < num_points <= total:
        raise ValueError(f"num_points must be in [1, {total}], got {num_points}")
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(total, generator=generator, device=device)[:num_points]
    return points[:, order.to(points.device)]


def scale_and_translate(
    points: Tensor,
    *,
    scale_low: float = 2.0 / 3.0,
    scale_high: float = 1.5,
    translate: float = 0.2,
    generator: torch.Generator | None = None,
    draws: Tensor | None = None,
) -> Tensor:
    """Point-MAE's ``PointcloudScaleAndTranslate``: x' = x ⊙ s + t, one s and t per cloud.

    With uniform draws u ∈ [0, 1)^6 per cloud: s = scale_low + (scale_high - scale_low) · u[:3] and
    t = translate · (2 · u[3:] - 1), the layout of ``datapipes.transforms.ScaleAndTranslate``'s
    ``rng.random(6)``.

    Args:
        points: clouds to transform.
        scale_low: smallest scale factor per axis.
        scale_high: largest scale factor per axis.
        translate: largest absolute shift per axis.
        generator: source of the draws when ``draws`` is None: the B·3 scale draws first, then the B·3
            shift draws.
        draws: the uniform draws to use instead of drawing them; computed in their dtype.

    Shapes:
        points: (B, N, 3) -> (B, N, 3); draws: (B, 6).
    """
    batch = points.shape[0]
    if draws is None:
        device = generator.device if generator is not None else torch.device("cpu")
        uniform = torch.rand(2, batch, 3, generator=generator, device=device)
        draws = torch.cat([uniform[0], uniform[1]], dim=1)
    if draws.shape != (batch, 6):
        raise ValueError(f"draws must have shape ({batch}, 6), got {tuple(draws.shape)}")
    scale = scale_low + (scale_high - scale_low) * draws[:, None, :3]
    shift = translate * (2.0 * draws[:, None, 3:] - 1.0)
    return points * scale.to(points) + shift.to(points)
