"""SimCLR's NT-Xent loss (ViPFormer's IMID and CMID terms) with negatives gathered across ranks.

ViPFormer (Sun et al., ICRA 2023) trains with lightly 1.1.21's ``NTXentLoss(temperature=0.1)`` and no memory
bank: the 2B projected vectors of a batch of B pairs are L2-normalised, every vector takes its pair as the
positive and the other 2B − 2 vectors as negatives, and the cross-entropy is averaged over all 2B anchors.
:func:`nt_xent` computes exactly that.

**Gathering across ranks.** The official code computes the loss on the per-GPU batch only (lightly's default),
so the negatives of a run on W GPUs come from B rows, not W·B. ``nt_xent(..., gather=True)`` (the default)
gathers the normalised vectors of all ranks with :func:`gather_with_grad` and scores this rank's 2B anchors
against all 2·W·B vectors; ``gather=False`` is the official per-GPU behaviour. With equal per-rank batches:

* the mean over ranks of the per-rank losses equals the single-process loss on the concatenated batch, and
  each rank's loss is the mean of that loss's terms for its own anchors;
* gradients: let ``L`` be the single-process loss on the W·B rows and ``L_r`` rank r's loss, so that
  ``Σ_r L_r = W·L``. The backward of :func:`gather_with_grad` sums, over all ranks, the gradients that
  reach each gathered row and hands every rank the sum for its own rows, so the gradient arriving at rank
  r's rows is ``∂(Σ_r' L_r')/∂x_r = W·∂L/∂x_r`` and rank r's parameter gradient is its share of
  ``W·∂L/∂θ``. DDP averages the parameter gradients over the W ranks, so the averaged gradient is exactly
  ``∂L/∂θ``: the single-process gradient of the full batch, with no rescaling needed.

With unequal per-rank batches the gather still works (the row counts are exchanged first), each rank still
averages over its own anchors, and the identities above hold with the per-rank means weighted by batch size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gather_with_grad", "nt_xent"]


def _world() -> tuple[int, int]:
    """``(world size, rank)`` of the default process group; ``(1, 0)`` when none is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; the backward sums the row gradients of all ranks, keeps its own."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: tuple[int, ...], rank: int) -> Tensor:  # type: ignore[override]
        ctx.rows = (sum(sizes[:rank]), sizes[rank])
        longest = max(sizes)
        padded = x.contiguous()
        if x.shape[0] < longest:
            padded = torch.cat([padded, padded.new_zeros((longest - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start, count = ctx.rows
        return total[start : start + count], None, None


def _gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """:func:`gather_with_grad` and the index of this rank's first row in the result."""
    world, rank = _world()
    if world == 1:
        return x, 0
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = tuple(int(c.item()) for c in counts)
    gathered = _GatherRows.apply(x, sizes, rank)
    return gathered, sum(sizes[:rank])


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenates the rows of ``x`` from every rank in rank order, differentiably.

    The forward is an ``all_gather`` (ranks may hold different numbers of rows; the counts are exchanged
    first). The backward all-reduces (sums) the gradient of the gathered tensor over the ranks and returns
    this rank's rows of the sum, so a loss computed from the gathered rows on every rank sends each rank
    the gradient of the *sum of all ranks' losses* with respect to its own rows. Without an initialised
    default process group, or with a world size of 1, it returns ``x`` itself.

    Every rank must call it (it is a collective), in the same order, with the same trailing shape and dtype.

    Args:
        x: this rank's rows.

    Returns:
        All ranks' rows concatenated, rank 0 first.

    Shapes:
        x: (B_r, ...) -> (Σ_r B_r, ...).
    """
    return _gather_rows(x)[0]


def nt_xent(a: Tensor, b: Tensor, *, temperature: float = 0.1, gather: bool = True) -> Tensor:
    """SimCLR's normalised-temperature cross-entropy of B positive pairs (lightly's ``NTXentLoss``).

    With ``z = normalize([a; b])`` (2B unit rows) and ``s_ij = z_i·z_j / temperature``, anchor i (one of the
    2B rows of this rank) has its pair p(i) (row i of ``b`` for row i of ``a`` and vice versa) as positive and
    every other row except itself as negative:

        ℓ_i = −s_{i,p(i)} + log Σ_{j ≠ i} exp(s_ij),      loss = mean_i ℓ_i,

    the mean over both directions (``a → b`` and ``b → a``). The log-sum-exp is computed stably, in float32
    (or float64 for float64 inputs) whatever the input precision.

    With ``gather=True`` and an initialised process group of more than one rank, the candidates j are the
    2·Σ_r B_r rows of all ranks (gathered with :func:`gather_with_grad`) while the anchors are this rank's
    2B rows: the mean over ranks equals the single-process loss of the concatenated batch and DDP's averaged
    gradients equal its single-process gradients (see the module docstring). ``gather=False``, or a single
    process, uses this rank's batch only: the official ViPFormer / lightly 1.1.21 behaviour.

    Args:
        a: one view's projections, paired row by row with ``b``.
        b: the other view's projections.
        temperature: the softmax temperature (ViPFormer: 0.1).
        gather: take negatives from every rank (a collective: every rank must call it).

    Returns:
        () scalar, float32 (float64 for float64 inputs).

    Shapes:
        a: (B, D), b: (B, D) -> ().

    Raises:
        ValueError: mismatched or non-2-D shapes, an empty batch, or a non-positive temperature.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (B, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 1:
        raise ValueError("nt_xent needs at least one pair")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=a.device.type, enabled=False):  # AMP would run the matmul in fp16
        return _nt_xent(a.to(dtype), b.to(dtype), temperature=temperature, gather=gather)


def _nt_xent(a: Tensor, b: Tensor, *, temperature: float, gather: bool) -> Tensor:
    batch, dim = a.shape
    local = torch.cat([F.normalize(a, dim=1), F.normalize(b, dim=1)])  # (2B, D)
    if gather:
        pairs, offset = _gather_rows(torch.cat([local[:batch], local[batch:]], dim=1))  # (M, 2D)
        keys = torch.cat([pairs[:, :dim], pairs[:, dim:]])  # (2M, D)
    else:
        keys, offset = local, 0
    total = keys.shape[0] // 2
    logits = local @ keys.T / temperature  # (2B, 2M)
    own = torch.arange(batch, device=a.device) + offset
    self_cols = torch.cat([own, own + total])
    pos_cols = torch.cat([own + total, own])
    rows = torch.arange(2 * batch, device=a.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, self_cols] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    terms = torch.logsumexp(logits, dim=1) - logits[rows, pos_cols]
    return terms.mean()
