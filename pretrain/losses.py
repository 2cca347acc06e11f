"""Loss functions of the pre-training methods, pure and batched (no ``torch.distributed`` inside).

Point-BERT (Yu et al., CVPR 2022):

* :func:`dvae_kl_uniform`: the dVAE's codebook-usage prior, ``KL(u ‖ q̄)`` with ``q̄`` the softmax averaged
  over the patches of a cloud and ``u`` uniform, divided by the batch size, exactly as the official
  ``F.kl_div(log q̄, log u, log_target=True, reduction="batchmean")`` (the argument order makes it
  ``KL(u ‖ q̄)``, not ``KL(q̄ ‖ u)``).
* :func:`masked_token_ce`: cross-entropy of the token predictions at the masked patches only.
* :func:`mixup_contrastive_loss`: the point-patch mixing contrast of Point-BERT's MPM stage: the query of a
  mixed cloud against the in-batch keys and a queue, with soft targets ``ρ`` (own key) and ``1 - ρ`` (the
  key of the mixing partner, the batch mirrored).
* :func:`moco_loss`: the plain MoCo term (off in the released configuration).

GeoMAE (Tian et al., CVPR 2023), the terms of ``forward_loss`` with ``mse_loss=True``:

* :func:`masked_mse`: squared error averaged over the coordinates, then over the valid targets (centroids,
  normals, curvature).
* :func:`occupancy_bce`: mmdet's ``CrossEntropyLoss(use_sigmoid=True)`` on two logits per slot against the
  one-hot occupancy, i.e. element-wise binary cross-entropy averaged over every slot and both logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dvae_kl_uniform",
    "masked_mse",
    "masked_token_ce",
    "mixup_contrastive_loss",
    "moco_loss",
    "occupancy_bce",
]


def dvae_kl_uniform(logits: Tensor) -> Tensor:
    """``KL(u ‖ q̄)`` per cloud, averaged over the batch.

    ``q̄ = mean_g softmax(logits[b, g])`` (no Gumbel noise) and ``u = 1/V``:
    ``KL = Σ_v u (log u − log q̄_v) = −log V − mean_v log q̄_v``. ``log q̄`` is computed with logsumexp, so
    tiny probabilities do not underflow to ``log 0``; the value equals the official expression wherever
    that one is finite.

    Shapes:
        logits: (B, G, V). returns: () scalar.

    Raises:
        ValueError: ``logits`` is not 3-D.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (B, G, V), got {tuple(logits.shape)}")
    _, num_groups, vocab = logits.shape
    log_q = torch.logsumexp(F.log_softmax(logits.float(), dim=-1), dim=1) - math.log(num_groups)  # (B, V)
    per_cloud = -math.log(vocab) - log_q.mean(dim=-1)
    return per_cloud.mean()


def masked_token_ce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy of predicted token ids at the masked patches, averaged over all masked patches.

    Args:
        logits: (B, G, V) predictions.
        targets: (B, G) long token ids.
        mask: (B, G) bool, True = the patch is scored.

    Returns:
        () scalar; 0 (still connected to ``logits``) when nothing is masked.

    Raises:
        ValueError: mismatched shapes or a non-bool mask.
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(
            f"need logits (B, G, V), targets (B, G) and mask (B, G); got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), targets[mask])


def _contrast_logits(q: Tensor, k_batch: Tensor, queue: Tensor, temperature: float) -> Tensor:
    if q.ndim != 2 or k_batch.ndim != 2 or q.shape[1] != k_batch.shape[1]:
        raise ValueError(
            f"q (B, C) and k (B', C) must share C, got {tuple(q.shape)} and {tuple(k_batch.shape)}"
        )
    if queue.ndim != 2 or queue.shape[0] != q.shape[1]:
        raise ValueError(f"queue must have shape (C={q.shape[1]}, K), got {tuple(queue.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.cat([q @ k_batch.T, q @ queue.to(q.dtype)], dim=1) / temperature


def mixup_contrastive_loss(
    q: Tensor, k_batch: Tensor, queue: Tensor, ratio: Tensor, temperature: float
) -> Tensor:
    """Point-patch mixing contrastive loss (Point-BERT ``cutmix_loss``).

    ``logits = [q·k_batchᵀ, q·queue] / T`` and
    ``loss = mean_i [ρ_i · CE(logits_i, i) + (1 − ρ_i) · CE(logits_i, B − 1 − i)]``: the mixed cloud ``i``
    was built from cloud ``i`` (fraction ``ρ_i`` of its patches, in expectation) and the mirrored cloud
    ``B − 1 − i``.

    Args:
        q: (B, C) L2-normalised queries of the mixed clouds.
        k_batch: (B, C) L2-normalised keys of the unmixed clouds of the same (local) batch.
        queue: (C, K) L2-normalised keys of earlier batches (the official buffer layout).
        ratio: (B,) mixing ratios ``ρ`` (the sampled ones, used as soft labels).
        temperature: softmax temperature T (0.07).

    Returns:
        () scalar.

    Raises:
        ValueError: mismatched shapes or a non-positive temperature.
    """
    if k_batch.shape[0] != q.shape[0] or ratio.shape != (q.shape[0],):
        raise ValueError(
            f"q, k_batch and ratio must share the batch size, got {tuple(q.shape)}, {tuple(k_batch.shape)}, "
            f"{tuple(ratio.shape)}"
        )
    logits = _contrast_logits(q, k_batch, queue, temperature).float()
    own = torch.arange(q.shape[0], device=q.device)
    ce_own = F.cross_entropy(logits, own, reduction="none")
    ce_partner = F.cross_entropy(logits, own.flip(0), reduction="none")
    ratio = ratio.to(logits.dtype)
    return (ratio * ce_own + (1.0 - ratio) * ce_partner).mean()


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo InfoNCE: positive ``q_i·k_i`` against the queue negatives, ``CE([q·k, q·queue] / T, 0)``.

    Shapes:
        q: (B, C), k: (B, C) L2-normalised; queue: (C, K). returns: () scalar.
    """
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"q and k must both be (B, C), got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.ndim != 2 or queue.shape[0] != q.shape[1]:
        raise ValueError(f"queue must have shape (C={q.shape[1]}, K), got {tuple(queue.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ queue.to(q.dtype)], dim=1).float() / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def masked_mse(prediction: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Squared error averaged over the last dimension, then over the valid targets.

    Args:
        prediction: (..., C) predictions.
        target: (..., C) targets, same shape.
        valid: optional bool (...) selecting the scored targets (e.g. occupied sub-voxels); None scores all.

    Returns:
        () scalar; 0 (still connected to ``prediction``) when no target is valid.

    Raises:
        ValueError: mismatched shapes or a non-bool ``valid``.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target must have the same shape, got {tuple(prediction.shape)} and "
            f"{tuple(target.shape)}"
        )
    per_target = (prediction.float() - target.float()).square().mean(dim=-1)
    if valid is None:
        return per_target.mean() if per_target.numel() else prediction.sum() * 0.0
    if valid.dtype != torch.bool or valid.shape != per_target.shape:
        raise ValueError(
            f"valid must be a bool tensor of shape {tuple(per_target.shape)}, got {valid.dtype} "
            f"{tuple(valid.shape)}"
        )
    if not bool(valid.any()):
        return prediction.sum() * 0.0
    return per_target[valid].mean()


def occupancy_bce(logits: Tensor, occupied: Tensor) -> Tensor:
    """Binary cross-entropy of two logits per slot against the one-hot occupancy, averaged over everything.

    ``mean over slots and both logits of BCE(logit_0, 1 - occ) and BCE(logit_1, occ)``: what mmdet's
    ``CrossEntropyLoss(use_sigmoid=True)`` computes on GeoMAE's 2-logit occupancy heads.

    Args:
        logits: (..., 2) logits (empty, occupied).
        occupied: bool (...) occupancy targets.

    Returns:
        () scalar; 0 (still connected to ``logits``) for no slots.

    Raises:
        ValueError: mismatched shapes or a non-bool ``occupied``.
    """
    if logits.shape[-1:] != (2,) or occupied.shape != logits.shape[:-1] or occupied.dtype != torch.bool:
        raise ValueError(
            f"need logits (..., 2) and bool occupied (...); got {tuple(logits.shape)} and {occupied.dtype} "
            f"{tuple(occupied.shape)}"
        )
    if not occupied.numel():
        return logits.sum() * 0.0
    one_hot = F.one_hot(occupied.long(), 2).to(torch.float32)
    return F.binary_cross_entropy_with_logits(logits.float(), one_hot)
