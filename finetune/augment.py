"""Batched train-time sampling and augmentation for finetuning (torch, on the batch's device).

Point-MAE / Point-BERT finetuning: from a cloud stored in farthest-point order take the first ``pool``
points (= FPS to ``pool``), choose ``num_points`` of them at random without replacement (the same indices for
the whole batch), then scale each sample anisotropically by s ~ U(2/3, 3/2)^3 and translate by
t ~ U(-0.2, 0.2)^3. All draws come from an explicit generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_point_subset", "scale_and_translate"]


def random_point_subset(
    points: Tensor, num_points: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Picks ``num_points`` of the N points at random without replacement, same indices for every sample.

    Shapes:
        points: (B, N, C) -> (B, num_points, C).

    Raises:
        ValueError: if ``num_points`` is not in [1, N].
    """
    total = points.shape[1]
    if not 0 < num_points <= total:
        raise ValueError(f"num_points must be in [1, {total}], got {num_points}")
    order = torch.randperm(total, generator=generator)[:num_points].to(points.device)
    return points[:, order]


def scale_and_translate(
    points: Tensor,
    *,
    scale_low: float = 2.0 / 3.0,
    scale_high: float = 1.5,
    translate: float = 0.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Point-MAE's ``PointcloudScaleAndTranslate``: x' = x ⊙ s + t per sample.

    Shapes:
        points: (B, N, 3) -> (B, N, 3); s, t are (B, 1, 3) draws from U(scale_low, scale_high) and
        U(-translate, translate).
    """
    batch = points.shape[0]
    scale = torch.empty(batch, 1, 3).uniform_(scale_low, scale_high, generator=generator)
    shift = torch.empty(batch, 1, 3).uniform_(-translate, translate, generator=generator)
    return points * scale.to(points) + shift.to(points)
