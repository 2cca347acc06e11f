"""Voxel clustering of token centres and segment reductions broadcast back to tokens, batched, pure torch.

Any2Point's 3D-prior branch (official ``PointViT.forward`` + ``ResidualAttentionBlock``) groups the token
centres of each cloud into voxels with torch_geometric's ``voxel_grid`` and pools token features per voxel
with torch_scatter. Here:

- :func:`voxel_cluster`: ``floor((p − origin) / size)`` per axis, then ``torch.unique`` over
  ``(batch, ix, iy, iz)`` rows; ids are dense ``0 .. K_b − 1`` **per sample**, ordered lexicographically by
  ``(ix, iy, iz)``. Origin convention: the official code subtracts each cloud's own per-axis minimum
  (``segment_csr(..., reduce="min")``) and calls ``voxel_grid(pos, size, batch, start=0)``, so the grid of a
  cloud is anchored at that cloud's min corner; torch_cluster's ``grid`` truncates ``(pos − start) / size``
  to int64, which equals ``floor`` for these non-negative offsets. That is pcpt's default (``origin="min"``).
  Plain ``voxel_grid`` without ``start`` anchors the grid at the minimum over the *whole batch* (a sample's
  clusters would depend on its batch-mates); pcpt does not offer that. ``origin="zero"`` anchors the grid
  at the coordinate origin (``floor(p / size)``), batch-independent as well.
- :func:`segment_reduce`: per-sample dense ``(B, S, C)`` max / mean / max+mean over each segment
  (``Tensor.scatter_reduce`` with ``include_self=False``); empty segments are 0, as torch_scatter's
  ``scatter_max`` / ``scatter_mean`` / ``segment_csr`` leave them.
- :func:`segment_reduce_broadcast`: the reduction gathered back to every token.
- :func:`same_cell_mask`: the attention mask "same cell" of the per-view local attention.

Max gradients: ``scatter_reduce("amax")`` splits the gradient evenly between tied maxima, whereas
torch_scatter sends it to one arg-max; values are identical.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Reduce",
    "gather_segments",
    "same_cell_mask",
    "segment_counts",
    "segment_reduce",
    "segment_reduce_broadcast",
    "voxel_cluster",
]

#: segment reductions: ``"maxmean"`` is the sum max + mean used by Any2Point's adapter branches.
Reduce = Literal["max", "mean", "maxmean"]


def voxel_cluster(points: Tensor, voxel_size: float, *, origin: Literal["min", "zero"] = "min") -> Tensor:
    """Voxel ids of points, dense per sample.

    Args:
        points: (B, G, 3) coordinates (token centres).
        voxel_size: voxel edge length (``--coef_3dgird``: 0.08 CLIP ScanObjectNN, 0.16 others).
        origin: ``"min"`` (official): each cloud's grid starts at its own per-axis minimum;
            ``"zero"``: the grid starts at the coordinate origin.

    Returns:
        (B, G) int64 ids in ``0 .. K_b − 1`` for sample b (K_b its number of occupied voxels), numbered in
        lexicographic order of the voxel coordinates ``(ix, iy, iz)``.
    """
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be (B, G, 3), got {tuple(points.shape)}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    if origin not in ("min", "zero"):
        raise ValueError(f"origin must be 'min' or 'zero', got {origin!r}")
    batch, groups, _ = points.shape
    if batch == 0 or groups == 0:
        return torch.zeros(batch, groups, dtype=torch.long, device=points.device)
    offset = points - points.amin(dim=1, keepdim=True) if origin == "min" else points
    coords = torch.div(offset, voxel_size).floor().long()  # (B, G, 3)
    sample = torch.arange(batch, device=points.device).view(batch, 1, 1).expand(batch, groups, 1)
    keys = torch.cat([sample, coords], dim=-1).reshape(batch * groups, 4)
    unique, inverse = torch.unique(keys, dim=0, sorted=True, return_inverse=True)
    per_sample = torch.bincount(unique[:, 0], minlength=batch)  # K_b
    first = torch.cumsum(per_sample, dim=0) - per_sample  # global id of each sample's first voxel
    return inverse.view(batch, groups) - first.view(batch, 1)


def _check_ids(features: Tensor, ids: Tensor) -> None:
    if features.ndim != 3:
        raise ValueError(f"features must be (B, G, C), got {tuple(features.shape)}")
    if ids.shape != features.shape[:2]:
        raise ValueError(f"ids must be (B, G) = {tuple(features.shape[:2])}, got {tuple(ids.shape)}")
    if ids.dtype != torch.long:
        raise ValueError(f"ids must be int64, got {ids.dtype}")


def _num_segments(ids: Tensor, num_segments: int | None) -> int:
    if num_segments is not None:
        return int(num_segments)
    return int(ids.max().item()) + 1 if ids.numel() else 0


def segment_counts(ids: Tensor, num_segments: int | None = None) -> Tensor:
    """Tokens per segment and sample.

    Args:
        ids: (B, G) int64 segment of each token (e.g. :func:`voxel_cluster`), in ``[0, S)``.
        num_segments: S; default ``ids.max() + 1``.

    Returns:
        (B, S) int64 counts.
    """
    batch = ids.shape[0]
    segments = _num_segments(ids, num_segments)
    flat = (ids + torch.arange(batch, device=ids.device).view(batch, 1) * segments).reshape(-1)
    return torch.bincount(flat, minlength=batch * segments).view(batch, segments)


def segment_reduce(features: Tensor, ids: Tensor, reduce: Reduce, num_segments: int | None = None) -> Tensor:
    """Per-sample reduction of token features over segments, in a dense layout.

    Args:
        features: (B, G, C) token features.
        ids: (B, G) int64 segment of each token, in ``[0, S)``; segments never span two samples.
        reduce: ``"max"``, ``"mean"`` or ``"maxmean"`` (max + mean).
        num_segments: S; default ``ids.max() + 1`` (over the batch).

    Returns:
        (B, S, C): row ``[b, s]`` reduces the tokens of sample b in segment s; 0 for an empty segment.
    """
    _check_ids(features, ids)
    if reduce not in ("max", "mean", "maxmean"):
        raise ValueError(f"reduce must be 'max', 'mean' or 'maxmean', got {reduce!r}")
    batch, _, channels = features.shape
    segments = _num_segments(ids, num_segments)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= segments):
        raise ValueError(f"ids must lie in [0, {segments})")
    flat_ids = (ids + torch.arange(batch, device=ids.device).view(batch, 1) * segments).reshape(-1)
    index = flat_ids.view(-1, 1).expand(-1, channels)
    src = features.reshape(-1, channels)
    out = torch.zeros(batch * segments, channels, dtype=features.dtype, device=features.device)
    result = torch.zeros_like(out)
    if reduce in ("max", "maxmean"):
        result = result + out.scatter_reduce(0, index, src, reduce="amax", include_self=False)
    if reduce in ("mean", "maxmean"):
        result = result + out.scatter_reduce(0, index, src, reduce="mean", include_self=False)
    return result.view(batch, segments, channels)


def gather_segments(values: Tensor, ids: Tensor) -> Tensor:
    """Gives every token its segment's row: ``out[b, g] = values[b, ids[b, g]]``.

    Args:
        values: (B, S, C) per-segment values (e.g. :func:`segment_reduce`).
        ids: (B, G) int64 segment of each token.

    Returns:
        (B, G, C).
    """
    return torch.gather(values, 1, ids.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def segment_reduce_broadcast(features: Tensor, ids: Tensor, reduce: Reduce) -> Tensor:
    """Reduces features over each token's segment and gives every token its segment's value.

    Args:
        features: (B, G, C) token features.
        ids: (B, G) int64 segment ids (per sample; e.g. :func:`voxel_cluster`).
        reduce: ``"max"``, ``"mean"`` or ``"maxmean"``.

    Returns:
        (B, G, C).
    """
    return gather_segments(segment_reduce(features, ids, reduce), ids)


def same_cell_mask(cells: Tensor) -> Tensor:
    """Which token pairs share a cell: the mask of the per-cell local attention.

    Args:
        cells: (N, G) int64 cell of each token (N = batch, or batch × views).

    Returns:
        (N, G, G) bool, ``[n, i, j]`` True iff tokens i and j of row n are in the same cell (may attend).
    """
    if cells.ndim != 2:
        raise ValueError(f"cells must be (N, G), got {tuple(cells.shape)}")
    return cells.unsqueeze(2) == cells.unsqueeze(1)
