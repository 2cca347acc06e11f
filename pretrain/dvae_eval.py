"""Quality of a dVAE tokenizer on a set of clouds: reconstruction Chamfer distances and codebook usage.

:func:`hard_code_batch_metrics` is the official validation of one batch (hard Gumbel codes at temperature 1,
then the decoder): ``PointDVAE.validation_step`` logs it, and :func:`evaluate_dvae` averages it over any
stack of clouds for ``pcpt-pretrain eval-tokenizer``, so both report the same numbers for the same clouds,
batches and noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pretrain.dvae import DiscreteVAE, DVAEOutput
from pretrain.ops import chamfer_distance
from pretrain.ops.grouping import PatchGroups
from pretrain.training import derive_seed

__all__ = [
    "code_counts",
    "code_perplexity",
    "evaluate_dvae",
    "hard_code_batch_metrics",
    "reconstruction_losses",
    "validation_noise_seed",
]


def code_perplexity(counts: Tensor) -> Tensor:
    """``exp(entropy)`` of a code histogram: 1 when one code is used, V when all V are used equally.

    Shapes:
        counts: (V,) non-negative counts. returns: () float.
    """
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum())


def code_counts(logits: Tensor, codebook_size: int) -> Tensor:
    """Histogram of the deterministic token ids (argmax of the logits). Shapes: (..., V) -> (V,) long."""
    return torch.bincount(logits.argmax(-1).flatten(), minlength=codebook_size)


def reconstruction_losses(out: DVAEOutput, groups: PatchGroups) -> tuple[Tensor, Tensor]:
    """Chamfer-L1 of the coarse and of the fine patches against the true patches, over all B·G patches."""
    target = groups.neighborhoods.flatten(0, 1).float()
    coarse = chamfer_distance(out.coarse.flatten(0, 1).float(), target, variant="l1")
    fine = chamfer_distance(out.fine.flatten(0, 1).float(), target, variant="l1")
    return coarse, fine


def validation_noise_seed(seed: int, rank: int, batch_idx: int) -> int:
    """Seed of the Gumbel noise of validation batch ``batch_idx`` (shared by training and evaluation)."""
    return derive_seed(seed, rank, -1, batch_idx)


def hard_code_batch_metrics(
    dvae: DiscreteVAE, points: Tensor, generator: torch.Generator | None
) -> tuple[dict[str, Tensor], Tensor]:
    """The official validation of one batch: hard codes at temperature 1, decoded and compared.

    Args:
        dvae: the tokenizer (its mode is left as it is; evaluate in eval mode).
        points: (B, N, 3) clouds.
        generator: source of the Gumbel noise of the hard codes.

    Returns:
        ``(metrics, counts)``: batch means ``loss_recon`` (coarse + fine patch CD-L1), ``cdl1`` and ``cdl2``
        (whole cloud: the G·K' decoded points in place against the N input points), and the (V,) histogram
        of the deterministic token ids (argmax of the logits).
    """
    groups = dvae.group(points)
    out = dvae(groups.neighborhoods, groups.centers, temperature=1.0, hard=True, generator=generator)
    loss_coarse, loss_fine = reconstruction_losses(out, groups)
    whole = (out.fine + groups.centers.unsqueeze(2)).flatten(1, 2).float()
    metrics = {
        "loss_recon": loss_coarse + loss_fine,
        "cdl1": chamfer_distance(whole, points.float(), variant="l1"),
        "cdl2": chamfer_distance(whole, points.float(), variant="l2"),
    }
    return metrics, code_counts(out.logits, dvae.spec.codebook_size)


@torch.no_grad()
def evaluate_dvae(
    dvae: DiscreteVAE,
    xyz: np.ndarray | Tensor,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Reconstruction and codebook usage of a tokenizer over clouds, in batches of ``batch_size``.

    The Gumbel noise of batch i is seeded with :func:`validation_noise_seed` ``(seed, 0, i)``, as in
    ``PointDVAE``'s validation on one device, so the two agree for the same clouds, batches and seed.

    Args:
        dvae: the tokenizer; evaluated in eval mode (its previous mode is restored).
        xyz: (S, N, 3) clouds, preprocessed as the tokenizer's data contract says.
        batch_size: clouds per batch, ``>= 1``.
        device: where to run.
        seed: base seed of the Gumbel noise.

    Returns:
        ``cdl1``, ``cdl2``, ``loss_recon`` (means over clouds), ``code_perplexity``, ``dead_codes``,
        ``codebook_size`` and ``num_clouds``.

    Raises:
        ValueError: ``xyz`` is not (S, N, 3) with S >= 1, or ``batch_size < 1``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    points = torch.as_tensor(xyz, dtype=torch.float32)
    if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] == 0:
        raise ValueError(f"xyz must have shape (S, N, 3) with S >= 1, got {tuple(points.shape)}")
    was_training = dvae.training
    dvae.to(device).eval()
    sums: dict[str, float] = {}
    counts = torch.zeros(dvae.spec.codebook_size, dtype=torch.long, device=device)
    try:
        for batch_idx, start in enumerate(range(0, points.shape[0], batch_size)):
            batch = points[start : start + batch_size].to(device)
            generator = torch.Generator(device=batch.device)
            generator.manual_seed(validation_noise_seed(seed, 0, batch_idx))
            metrics, batch_counts = hard_code_batch_metrics(dvae, batch, generator)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value) * batch.shape[0]
            counts += batch_counts
    finally:
        dvae.train(was_training)
    num = int(points.shape[0])
    return {
        **{name: total / num for name, total in sums.items()},
        "code_perplexity": float(code_perplexity(counts)),
        "dead_codes": int((counts == 0).sum()),
        "codebook_size": int(dvae.spec.codebook_size),
        "num_clouds": num,
    }
