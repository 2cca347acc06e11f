"""Chamfer distance with the conventions of the ``chamfer_dist`` extension of Point-BERT / Point-MAE.

For each point of one set, the squared distance to its nearest point of the other set (both directions):

* ``"l2"`` (``ChamferDistanceL2``, Point-MAE's reconstruction loss): ``mean(d_ab) + mean(d_ba)``, means
  over all points of the whole batch, squared distances, no 1/2;
* ``"l1"`` (``ChamferDistanceL1``, Point-BERT's dVAE loss): ``(mean(sqrt d_ab) + mean(sqrt d_ba)) / 2``.

As in the CUDA op, the gradient flows only through the nearest pairs: the nearest neighbours are searched
without autograd (chunked, so memory stays bounded), then only the chosen pairs' distances are recomputed
differentiably. The square root of the L1 variant has gradient 0 at distance 0 (the official op gives NaN
there); its value is unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from pretrain.ops.neighbors import _check_pair, _paired_sqdist, pairwise_sqdist

__all__ = ["chamfer_distance", "nearest_sqdist"]

_CHUNK_ELEMENTS = 1 << 23
"""At most this many pairwise distances are held in memory during the nearest-neighbour search."""


def nearest_sqdist(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Squared distance from every point to its nearest point in the other set, both directions.

    The squared distances are exact (from differences, ``(dx² + dy²) + dz²``) and differentiable through
    the nearest pairs only; ties go to the lower index.

    Shapes:
        a: (B, N, C), b: (B, M, C), same dtype and device.
        returns: d_ab (B, N), idx_ab (B, N) long into M, d_ba (B, M), idx_ba (B, M) long into N.

    Raises:
        ValueError: If the shapes do not match or a set is empty.
    """
    _check_pair(a, b, names=("a", "b"))
    if a.shape[1] < 1 or b.shape[1] < 1:
        shapes = f"{tuple(a.shape)} and {tuple(b.shape)}"
        raise ValueError(f"a and b must hold at least one point each, got {shapes}")
    idx_ab, idx_ba = _nearest_indices(a, b)
    d_ab = _paired_sqdist(a, _gather(b, idx_ab))
    d_ba = _paired_sqdist(b, _gather(a, idx_ba))
    return d_ab, idx_ab, d_ba, idx_ba


def chamfer_distance(a: Tensor, b: Tensor, *, variant: Literal["l1", "l2"] = "l2") -> Tensor:
    """Chamfer distance between two batches of point sets, averaged over the whole batch.

    Args:
        a: First point sets, e.g. predicted patches.
        b: Second point sets, e.g. ground-truth patches.
        variant: ``"l2"``: ``mean(d_ab) + mean(d_ba)`` of squared distances; ``"l1"``:
            ``(mean(sqrt d_ab) + mean(sqrt d_ba)) / 2``.

    Shapes:
        a: (B, N, C), b: (B, M, C).
        returns: () scalar in the input dtype.

    Raises:
        ValueError: On an unknown variant or mismatched shapes.
    """
    if variant not in ("l1", "l2"):
        raise ValueError(f"variant must be 'l1' or 'l2', got {variant!r}")
    d_ab, _, d_ba, _ = nearest_sqdist(a, b)
    if variant == "l2":
        return d_ab.mean() + d_ba.mean()
    return (_safe_sqrt(d_ab).mean() + _safe_sqrt(d_ba).mean()) / 2


def _nearest_indices(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest-neighbour indices both ways from one chunked pass over the pairwise distances."""
    batch, num_a, _ = a.shape
    num_b = b.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * num_b))
    with torch.no_grad():
        idx_ab = []
        best_ba = a.new_full((batch, num_b), float("inf"))
        idx_ba = torch.zeros(batch, num_b, dtype=torch.long, device=a.device)
        for begin in range(0, num_a, chunk):
            sqdist = pairwise_sqdist(a[:, begin : begin + chunk].detach(), b.detach())  # (B, n, M)
            idx_ab.append(sqdist.min(dim=2).indices)
            values, rows = sqdist.min(dim=1)
            better = values < best_ba  # strict: an earlier chunk (lower index) keeps ties
            best_ba = torch.where(better, values, best_ba)
            idx_ba = torch.where(better, rows + begin, idx_ba)
        return torch.cat(idx_ab, dim=1), idx_ba


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt`` with the same values but gradient 0 (not inf/NaN) where ``x == 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))
