"""Patch grouping: FPS centres plus their k nearest points, as in Point-BERT / Point-MAE.

The "Group" module of Point-MAE (Pang et al., ECCV 2022) picks ``G`` centres by farthest point sampling and
takes the ``K`` nearest input points of each centre (KNN_CUDA, sorted by distance), expressed relative to the
centre. Because every centre is an input point, it is its own nearest neighbour: slot 0 of every patch is the
centre (or a coincident duplicate of it), so ``neighborhoods[:, :, 0]`` is exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pretrain.ops.neighbors import knn
from pretrain.ops.sampling import farthest_point_sample

__all__ = ["PatchGroups", "gather_points", "group_points"]


def gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """Indexes the point axis of a batched, channels-last tensor. Differentiable in ``x``.

    Shapes:
        x: (B, N, C).
        idx: (B, *S) long indices into N, on ``x.device``.
        returns: (B, *S, C).

    Raises:
        ValueError: If ``x`` is not 3-D or the batch sizes differ.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be a (B, N, C) tensor, got {tuple(x.shape)}")
    if idx.dim() < 1 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx must be (B, ...) with B={x.shape[0]}, got {tuple(idx.shape)}")
    flat = idx.reshape(idx.shape[0], -1)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.reshape(*idx.shape, x.shape[-1])


@dataclass(frozen=True)
class PatchGroups:
    """Point patches around FPS centres.

    Attributes:
        centers: (B, G, 3) centre coordinates.
        neighborhoods: (B, G, K, 3) the K nearest points of each centre minus the centre, nearest first.
        idx: (B, G, K) long indices of those points into N.
        center_idx: (B, G) long indices of the centres into N, in FPS selection order.
    """

    centers: Tensor
    neighborhoods: Tensor
    idx: Tensor
    center_idx: Tensor


def group_points(
    xyz: Tensor,
    num_groups: int,
    group_size: int,
    *,
    fps_start: int | Literal["random"] = 0,
    skip_near_origin: bool = False,
    generator: torch.Generator | None = None,
) -> PatchGroups:
    """Splits each cloud into ``G`` patches of ``K`` points around farthest-point-sampled centres.

    ``centers`` and ``neighborhoods`` are differentiable in ``xyz`` (gathers); the indices are not.

    Args:
        xyz: Point clouds, any float dtype and device.
        num_groups: G, patches per cloud (``1 <= G <= N``).
        group_size: K, points per patch (``1 <= K <= N``).
        fps_start: First FPS centre: an index or ``"random"`` (per cloud, from ``generator``).
        skip_near_origin: pointnet2_ops FPS parity (see :func:`farthest_point_sample`).
        generator: Random source for ``fps_start="random"``.

    Shapes:
        xyz: (B, N, 3).
        returns: PatchGroups with centers (B, G, 3), neighborhoods (B, G, K, 3), idx (B, G, K),
            center_idx (B, G).

    Raises:
        ValueError: If ``xyz`` is not (B, N, 3) or G or K is outside ``[1, N]``.
    """
    if not isinstance(xyz, Tensor) or xyz.dim() != 3 or xyz.shape[-1] != 3:
        shape = tuple(xyz.shape) if isinstance(xyz, Tensor) else type(xyz).__name__
        raise ValueError(f"xyz must be a (B, N, 3) tensor, got {shape}")
    num_points = xyz.shape[1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= num_points:
        raise ValueError(f"group_size must be an int in [1, N={num_points}], got {group_size!r}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= num_points:
        raise ValueError(f"num_groups must be an int in [1, N={num_points}], got {num_groups!r}")
    center_idx = farthest_point_sample(
        xyz, num_groups, start=fps_start, generator=generator, skip_near_origin=skip_near_origin
    )
    centers = gather_points(xyz, center_idx)
    _, idx = knn(centers.detach(), xyz.detach(), group_size)
    neighborhoods = gather_points(xyz, idx) - centers.unsqueeze(2)
    return PatchGroups(centers=centers, neighborhoods=neighborhoods, idx=idx, center_idx=center_idx)
