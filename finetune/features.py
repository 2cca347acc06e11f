"""Frozen-encoder feature extraction for probes, few-shot episodes and online monitoring.

:func:`extract_features` runs an encoder in eval mode without gradients over a stack of clouds, batch by
batch, and returns the pooled global features (``encoder.pool``: concat[CLS, max] with a CLS token, else
concat[max, mean]). :func:`check_data_contract` compares the data a user points at with the preprocessing
recorded in the encoder artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datapipes.errors import UserError
from datapipes.progress import Progress
from pretrain.encoders.base import PointEncoder

__all__ = ["check_data_contract", "extract_features"]


def extract_features(
    encoder: PointEncoder,
    xyz: np.ndarray | Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Pooled features of every cloud, computed with the frozen encoder.

    The encoder is switched to eval mode (BatchNorm running statistics, no drop-path) for the duration and
    its previous mode is restored afterwards; no gradients are recorded. With the default deterministic FPS
    (``spec.fps_start`` an int) the result does not depend on ``batch_size``.

    Args:
        encoder: the encoder; moved to ``device`` (it stays there).
        xyz: (S, N, 3) clouds, numpy or torch; converted to float32.
        batch_size: clouds per forward pass, ``>= 1``.
        device: where to run the encoder.
        progress: report progress on stderr (a bar on a terminal, periodic lines otherwise).
        generator: only used by encoders with ``fps_start="random"``.

    Returns:
        (S, 2D) float32 numpy array, row i for cloud i.

    Raises:
        ValueError: ``xyz`` is not (S, N, 3) or ``batch_size < 1``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    points = torch.as_tensor(xyz, dtype=torch.float32)
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"xyz must have shape (S, N, 3), got {tuple(points.shape)}")
    num = int(points.shape[0])
    dim = int(encoder.pooled_dim)
    if num == 0:
        return np.zeros((0, dim), dtype=np.float32)
    out = np.empty((num, dim), dtype=np.float32)
    was_training = encoder.training
    encoder.to(device)
    encoder.eval()
    try:
        with torch.no_grad(), Progress(num, "features", "cloud", disable=not progress) as bar:
            for start in range(0, num, batch_size):
                batch = points[start : start + batch_size].to(device)
                pooled = encoder.pool(encoder.encode(batch, generator=generator))
                out[start : start + batch.shape[0]] = pooled.float().cpu().numpy()
                bar.update(int(batch.shape[0]))
    finally:
        encoder.train(was_training)
    return out


def check_data_contract(
    meta: Mapping[str, Any],
    num_points: int,
    normalization: str | None,
    *,
    allow_num_points_change: bool = False,
    override_hint: str = "pass --num-points {n} to evaluate on purpose",
) -> list[str]:
    """Checks that the data matches the preprocessing recorded in an encoder artifact.

    Args:
        meta: artifact metadata from ``pretrain.checkpoint.load_encoder`` (uses ``meta["data_contract"]``).
        num_points: points per cloud that will be fed to the encoder.
        normalization: normalization of the data (``"unit_sphere"`` or ``"none"``), or None when unknown
            (then only a warning is returned).
        allow_num_points_change: the user asked for a point count on purpose; a difference from the
            contract is returned as a warning instead of an error.
        override_hint: how to ask for another point count on purpose (``{n}``: the data's count), appended
            to the error.

    Returns:
        Warnings (strings) for the caller to show; empty when everything matches.

    Raises:
        UserError: the point count or the normalization differs from the contract, or the artifact has no
            readable data contract.
    """
    contract = meta.get("data_contract")
    if not isinstance(contract, Mapping):
        raise UserError("the encoder artifact has no data_contract; re-export it with pcpt-pretrain export")
    warnings: list[str] = []
    expected_points = contract.get("num_points")
    if expected_points is not None and int(expected_points) != int(num_points):
        message = (
            f"data contract mismatch: the encoder was trained on {int(expected_points)} points per cloud, "
            f"got {int(num_points)}"
        )
        if not allow_num_points_change:
            raise UserError(f"{message}; {override_hint.format(n=int(num_points))}")
        warnings.append(message)
    expected_norm = contract.get("normalization")
    if expected_norm is not None:
        if normalization is None:
            warnings.append(
                f"the data does not record its normalization; the encoder expects {expected_norm!r}"
            )
        elif str(normalization) != str(expected_norm):
            raise UserError(
                f"data contract mismatch: the encoder expects normalization {expected_norm!r}, "
                f"the data has {normalization!r}"
            )
    return warnings
