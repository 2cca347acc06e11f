"""Per-cloud features from an encoder artifact (``pcpt-finetune embed``).

For each cloud the encoder runs in eval mode without masking and returns the patch tokens after the final
norm, the patch centres and the pooled global feature (``PointEncoder.pool``: concat[CLS, max] when the
encoder has a CLS token, else concat[max, mean]; width 2D). A Point-BERT dVAE tokenizer artifact gives the
discrete token id of every patch instead.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch

from datapipes.errors import UserError
from pretrain.dvae import DiscreteVAE
from pretrain.encoders import PointEncoder
from pretrain.features import map_clouds

__all__ = [
    "FEATURE_NAMES",
    "check_features_destination",
    "embed_clouds",
    "load_clouds",
    "write_features",
]


def load_clouds(path: str | Path, *, min_points: int = 1) -> np.ndarray:
    """Reads point clouds from a ``.npy`` file (memory-mapped, no pickle).

    Args:
        path: ``.npy`` file with a float array (B, N, 3) or one cloud (N, 3).
        min_points: smallest acceptable N.

    Returns:
        A float array (B, N, 3) (a memory map when possible; one cloud gets B = 1).

    Raises:
        UserError: missing or unreadable file, non-float dtype, wrong shape, too few points.
    """
    src = Path(path)
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    _check_npy_header(src)
    try:
        clouds = np.load(src, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"{src}: not a readable .npy array: {err}") from err
    if not isinstance(clouds, np.ndarray):
        raise UserError(f"{src}: expected a .npy array, got {type(clouds).__name__} (an .npz archive?)")
    if not np.issubdtype(clouds.dtype, np.floating):
        raise UserError(f"{src}: expected float32 points, got dtype {clouds.dtype}")
    if clouds.ndim == 2:
        clouds = clouds[None]
    if clouds.ndim != 3 or clouds.shape[-1] != 3:
        raise UserError(f"{src}: expected shape (B, N, 3) or (N, 3), got {tuple(np.shape(clouds))}")
    if clouds.shape[0] == 0:
        raise UserError(f"{src}: contains no clouds")
    if clouds.shape[1] < min_points:
        raise UserError(
            f"{src}: clouds have {clouds.shape[1]} points; the encoder needs at least {min_points}"
        )
    return clouds


def _check_npy_header(src: Path) -> None:
    """Rejects files that are not plain ``.npy`` arrays before numpy tries to read them."""
    try:
        with open(src, "rb") as fh:
            head = fh.read(6)
            if head.startswith(b"PK"):
                raise UserError(f"{src}: is a zip/.npz archive; expected a .npy array")
            if head != b"\x93NUMPY":
                raise UserError(f"{src}: not a .npy file")
            fh.seek(0)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                _, _, dtype = np.lib.format.read_array_header_2_0(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"{src}: not a readable .npy array: {err}") from err
    if dtype.hasobject:
        raise UserError(
            f"{src}: holds Python objects (pickled data), which pcpt never loads; expected float32"
        )


def embed_clouds(
    model: PointEncoder | DiscreteVAE,
    clouds: np.ndarray,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    normalize: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Per-cloud features of an encoder, or token ids of a dVAE tokenizer, in batches (frozen, eval mode).

    An encoder runs without masking; a tokenizer gives the argmax of its logits (no Gumbel noise). The
    batches go through ``pretrain.features.map_clouds``.

    Args:
        model: the encoder or tokenizer (moved to ``device``; its mode is restored).
        clouds: float array (B, N, 3).
        batch_size: clouds per forward pass.
        device: where to run.
        normalize: unit-sphere normalise each cloud first.
        seed: seeds FPS when the spec's ``fps_start`` is ``"random"``.
        progress: show progress when there is more than one batch.

    Returns:
        Encoder: ``tokens`` float32 (B, G, D), ``centers`` float32 (B, G, 3), ``pooled`` float32 (B, 2D).
        Tokenizer: ``token_ids`` int64 (B, G) in ``[0, codebook_size)`` and ``centers`` float32 (B, G, 3).

    Raises:
        UserError: non-finite coordinates or outputs (the message names the first bad cloud).
    """
    if isinstance(model, DiscreteVAE):
        tokenizer = model

        def step(xyz: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
            groups, ids = tokenizer.discrete_tokens(xyz, generator=generator)
            return {"token_ids": ids, "centers": groups.centers}

    else:
        encoder = model

        def step(xyz: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
            out = encoder.encode(xyz, generator=generator)
            return {"tokens": out.tokens, "centers": out.centers, "pooled": encoder.pool(out)}

    return map_clouds(
        model,
        step,
        clouds,
        batch_size=batch_size,
        device=device,
        normalize=normalize,
        generator=torch.Generator().manual_seed(seed),
        desc="tokenize" if isinstance(model, DiscreteVAE) else "embed",
        progress=progress,
    )


#: the arrays a features file written by :func:`write_features` can hold.
FEATURE_NAMES = frozenset({"tokens", "centers", "pooled", "token_ids", "features", "cells"})


def check_features_destination(path: str | Path) -> None:
    """Refuses an output path that would replace something pcpt did not write.

    A new path, or an existing ``.npz`` holding only pcpt feature arrays (:data:`FEATURE_NAMES`), is
    accepted.

    Raises:
        UserError: the path is a directory, or an existing file that is not a pcpt features file.
    """
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --out takes a file name such as features.npz")
    if not out.exists():
        return
    try:
        with np.load(out, allow_pickle=False) as archive:
            names = set(archive.files)
    except (OSError, ValueError, EOFError, AttributeError):
        names = set()
    if not names or not names <= FEATURE_NAMES:
        raise UserError(
            f"{out}: exists and is not a features file written by pcpt-finetune embed; choose another "
            "--out or delete it"
        )


def write_features(path: str | Path, features: dict[str, np.ndarray]) -> Path:
    """Writes ``features`` to an ``.npz`` atomically (temporary file, then rename); returns the path.

    Raises:
        UserError: see :func:`check_features_destination`.
    """
    out = Path(path)
    check_features_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, allow_pickle=False, **features)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
