"""Per-pillar features of one LiDAR scan from a ``scene_encoder`` artifact (``pcpt-finetune embed``).

A scan is read from a ``.npy`` array ``(N, 3 + C)`` (x, y, z in metres, then the encoder's point channels in
the order of its spec's ``point_channels``) or from a ``.las`` / ``.laz`` file (read as ``pcpt-data convert
las`` reads it: channels ``intensity`` and, when the point format has GPS time, ``time``). The encoder runs
in eval mode without masking on every non-empty pillar inside its point range and returns, per pillar, the
feature after the final norm, the grid cell and the metric centre.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datapipes.errors import UserError
from pretrain.scene_encoder import PillarSceneEncoder

__all__ = ["SCENE_FEATURE_NAMES", "embed_scan", "load_scan"]

#: the arrays a scene features file holds.
SCENE_FEATURE_NAMES = frozenset({"features", "cells", "centers"})


def load_scan(path: str | Path, channels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads one scan with the point channels an encoder needs.

    Args:
        path: ``.npy`` (N, 3 + C) float array, or a ``.las`` / ``.laz`` file.
        channels: the encoder's ``point_channels`` (C names).

    Returns:
        (xyz (N, 3) float32, feats (N, C) float32 or None when C = 0).

    Raises:
        UserError: missing or unreadable file, wrong shape or dtype, non-finite values, or a LAS file
            without a channel the encoder needs (the message names the file and the channel).
    """
    src = Path(path)
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    if src.suffix.lower() in (".las", ".laz"):
        from datapipes.converters.las import read_scan

        xyz, feat, names = read_scan(src)
        missing = [name for name in channels if name not in names]
        if missing:
            raise UserError(
                f"{src}: the encoder reads point channels {list(channels)}, the file has {list(names)} "
                f"(missing {missing})"
            )
        feats = feat[:, [names.index(name) for name in channels]] if channels else None
        return xyz, feats
    if src.suffix.lower() != ".npy":
        raise UserError(f"{src}: expected a .npy array or a .las/.laz file")
    try:
        array = np.load(src, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"{src}: not a readable .npy array: {err}") from err
    width = 3 + len(channels)
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != width:
        raise UserError(
            f"{src}: expected shape (N, {width}) = x, y, z{''.join(', ' + c for c in channels)}; got "
            f"{tuple(np.shape(array))}"
        )
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise UserError(f"{src}: expected finite float values, got dtype {array.dtype} with NaN/inf or so")
    array = array.astype(np.float32)
    return array[:, :3], (array[:, 3:] if channels else None)


def embed_scan(
    encoder: PillarSceneEncoder,
    xyz: np.ndarray,
    feats: np.ndarray | None,
    *,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """Per-pillar features of one scan (eval mode, no gradient; the encoder's mode is restored).

    Args:
        encoder: the scene encoder (moved to ``device``).
        xyz: (N, 3) metric points.
        feats: (N, C) point channels in the encoder's ``point_channels`` order, or None when C = 0.
        device: where to run.

    Returns:
        ``features`` float32 (P, D), ``cells`` int64 (P, 2) grid indices (ix, iy), ``centers`` float32 (P, 2)
        metric xy centres of the P non-empty pillars inside the encoder's point range.

    Raises:
        UserError: no point of the scan lies inside the encoder's point range.
    """
    was_training = encoder.training
    encoder.to(device).eval()
    try:
        points = torch.as_tensor(xyz, dtype=torch.float32, device=device)[None]
        channels = None if feats is None else torch.as_tensor(feats, dtype=torch.float32, device=device)[None]
        with torch.no_grad():
            out = encoder.encode(points, None, channels)
    finally:
        encoder.train(was_training)
    if out.features.shape[0] == 0:
        raise UserError(
            f"no point of the scan lies inside the encoder's point_range {encoder.spec.point_range}"
        )
    return {
        "features": out.features.float().cpu().numpy(),
        "cells": out.coords[:, 1:].cpu().numpy(),
        "centers": out.centers.float().cpu().numpy(),
    }
