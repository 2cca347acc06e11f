"""Masked-autoencoder reconstructions for ``pcpt-finetune visualize reconstruction`` (no drawing here).

An encoder artifact holds the encoder only; the decoder that predicts the masked patches lives in the
Lightning checkpoint of the pre-training run (``<run dir>/checkpoints/last.ckpt``). :func:`load_masked_model`
rebuilds encoder and decoder from what that checkpoint stores: the encoder from ``checkpoint["pcpt"]`` (spec,
data contract), the decoder and heads from the ``state_dict`` shapes and the method's saved hyperparameters
(mask ratio and type, decoder heads, GeoMAE's sub-cells); every weight is loaded strictly. The rebuild uses
``pretrain.encoders``, ``pretrain.nn`` and ``pretrain.ops`` only (finetune does not import the pre-training
methods), so :func:`reconstruct` repeats the methods' forward pass: tokenise, mask, encode the visible
patches, decode the masked ones.

* Point-MAE: the decoder predicts ``group_size`` centre-relative points per masked patch; they are placed at
  the patch centres (:func:`place_patches`).
* GeoMAE: the decoder predicts geometric targets, not points. Each masked patch's cell is a cube around its
  centre whose half-size is the largest centre-relative coordinate of the TRUE patch (the targets are
  normalised by it); the predicted sub-cell centroids of the sub-cells predicted occupied are mapped back to
  coordinates (:func:`sub_cell_points`). With a Chamfer head (``chamfer_weight > 0``) its predicted points are
  used instead, as for Point-MAE.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from datapipes.errors import UserError
from pretrain.nn.mae_decoder import MAEDecoder, MaskedTokenDecoder

__all__ = [
    "RECONSTRUCTION_METHODS",
    "MaskedModel",
    "Reconstruction",
    "load_masked_model",
    "place_patches",
    "reconstruct",
    "sample_panels",
    "sub_cell_points",
]

#: pre-training methods whose checkpoints can be rebuilt for reconstruction.
RECONSTRUCTION_METHODS = ("PointMAE", "GeoMAE")


@dataclass
class MaskedModel:
    """Encoder + decoder of a masked pre-training run, rebuilt from its Lightning checkpoint.

    Attributes:
        method: ``"PointMAE"`` or ``"GeoMAE"``.
        encoder: the ``point_vit`` encoder.
        decoder: ``MAEDecoder`` (Point-MAE: predicts points) or ``MaskedTokenDecoder`` (GeoMAE: features).
        heads: GeoMAE's linear heads by target name (empty for Point-MAE).
        mask_ratio: fraction of patches masked.
        mask_type: ``"rand"`` or ``"block"``.
        sub_cells: GeoMAE's sub-cells per axis (0 for Point-MAE).
        data_contract: the data the run trained on (``num_points``, ``normalization``, ...).
        step: the checkpoint's global step.
        source: the checkpoint file.
    """

    method: str
    encoder: Any
    decoder: MaskedTokenDecoder
    heads: nn.ModuleDict
    mask_ratio: float
    mask_type: str
    sub_cells: int
    data_contract: dict[str, Any]
    step: int
    source: Path


@dataclass
class Reconstruction:
    """Reconstructions of a batch of clouds; numpy arrays.

    Attributes:
        clouds: (B, N, 3) the input clouds (ground truth).
        centers: (B, G, 3) patch centres.
        neighborhoods: (B, G, K, 3) centre-relative points of every patch.
        mask: (B, G) bool, True where the patch was masked (hidden from the encoder).
        predicted: (B, M, P, 3) predicted points of the masked patches, in cloud coordinates, in the order
            of the masked patches (``centers[b][mask[b]]``); P = K for predicted points, ``sub³`` for GeoMAE
            sub-cell centroids.
        valid: (B, M, P) bool, which predicted points are shown (GeoMAE: the sub-cells predicted occupied).
    """

    clouds: np.ndarray
    centers: np.ndarray
    neighborhoods: np.ndarray
    mask: np.ndarray
    predicted: np.ndarray
    valid: np.ndarray


def load_masked_model(path: str | Path) -> MaskedModel:
    """Rebuilds a Point-MAE or GeoMAE encoder and decoder from a pcpt Lightning checkpoint.

    Args:
        path: the ``.ckpt`` of the pre-training run (an artifact folder is refused with a hint).

    Raises:
        UserError: an encoder artifact (no decoder), an unreadable file, a checkpoint of another method or
            without pcpt metadata, or weights that do not fit (the keys are named).
    """
    from pretrain.checkpoint import CKPT_META_KEY, read_artifact_meta, read_checkpoint_file

    src = Path(path)
    if src.is_dir():
        meta = read_artifact_meta(src) if (src / "encoder.json").is_file() else {}
        provenance = meta.get("provenance") or {}
        method = provenance.get("method") or "pre-training"
        config = str(provenance.get("config_sha256") or "")[:12]
        hint = f" (its checkpoint's pcpt metadata has config_sha256 {config}...)" if config else ""
        raise UserError(
            f"{src}: an encoder artifact holds the encoder only, not the {method} decoder that predicts "
            "masked patches; pass the Lightning checkpoint of the pre-training run instead, e.g. "
            f"<run dir>/checkpoints/last.ckpt{hint}"
        )
    src, ckpt = read_checkpoint_file(src)
    info = ckpt.get(CKPT_META_KEY) if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or not isinstance(state, dict):
        raise UserError(f"{src}: not a pcpt pre-training checkpoint (no {CKPT_META_KEY!r} metadata)")
    method = str(info.get("method"))
    if method not in RECONSTRUCTION_METHODS:
        raise UserError(
            f"{src}: a checkpoint of method {method!r}; reconstructions need one of "
            f"{list(RECONSTRUCTION_METHODS)}"
        )
    hparams = ckpt.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping):
        raise UserError(f"{src}: checkpoint hyper_parameters are not a mapping")
    encoder = _load_encoder(src, info, state)
    spec = encoder.spec
    depth = _count_blocks(state, "decoder.blocks.")
    if depth < 1:
        raise UserError(f"{src}: no decoder weights ('decoder.blocks.*') in the checkpoint")
    num_heads = int(hparams.get("decoder_num_heads") or spec.num_heads)
    heads = nn.ModuleDict()
    sub_cells = 0
    decoder: MaskedTokenDecoder
    if method == "PointMAE":
        decoder = MAEDecoder(
            spec.embed_dim,
            depth=depth,
            num_heads=num_heads,
            group_size=spec.group_size,
            drop_path=0.0,
            mlp_ratio=spec.mlp_ratio,
        )
    else:
        decoder = MaskedTokenDecoder(
            spec.embed_dim, depth=depth, num_heads=num_heads, drop_path=0.0, mlp_ratio=spec.mlp_ratio
        )
        sub_cells = int(hparams.get("sub_cells", 4))
        for name in sorted({k.split(".")[1] for k in state if k.startswith("heads.")}):
            weight = state[f"heads.{name}.weight"]
            heads[name] = nn.Linear(int(weight.shape[1]), int(weight.shape[0]))
        if "chamfer" not in heads and not {"sub_centroid", "occupancy"} <= set(heads):
            raise UserError(f"{src}: GeoMAE checkpoint without sub-cell or Chamfer heads")
    _load_prefix(decoder, state, "decoder.", src)
    if len(heads):
        _load_prefix(heads, state, "heads.", src)
    return MaskedModel(
        method=method,
        encoder=encoder,
        decoder=decoder,
        heads=heads,
        mask_ratio=float(hparams.get("mask_ratio", 0.6)),
        mask_type=str(hparams.get("mask_type", "rand")),
        sub_cells=sub_cells,
        data_contract=dict(info.get("data_contract") or {}),
        step=int(ckpt.get("global_step") or 0),
        source=src,
    )


def _load_encoder(src: Path, info: Mapping[str, Any], state: Mapping[str, Tensor]) -> Any:
    from pretrain.encoders import PointViT, build_encoder, spec_from_dict

    try:
        spec = spec_from_dict(info["spec"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{src}: invalid pcpt metadata: {err}") from err
    encoder = build_encoder(spec)
    if not isinstance(encoder, PointViT):
        raise UserError(f"{src}: the encoder is {spec.arch!r}; reconstructions need a point_vit encoder")
    _load_prefix(encoder, state, str(info.get("prefix", "encoder.")), src)
    return encoder


def _count_blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    indices = {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
    return len(indices)


def _load_prefix(module: nn.Module, state: Mapping[str, Tensor], prefix: str, src: Path) -> None:
    from pretrain.checkpoint import load_state_strict

    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    load_state_strict(module, part, source=f"{src} ({prefix.rstrip('.')})")


def place_patches(centers: np.ndarray, relative: np.ndarray) -> np.ndarray:
    """Centre-relative patch points moved to their centres.

    Args:
        centers: (M, 3) patch centres.
        relative: (M, K, 3) centre-relative points.

    Returns:
        (M, K, 3) points in cloud coordinates, ``centers[:, None] + relative``.
    """
    return np.asarray(centers)[:, None, :] + np.asarray(relative)


def sub_cell_points(centers: np.ndarray, half: np.ndarray, sub_centroid: np.ndarray, sub: int) -> np.ndarray:
    """GeoMAE sub-cell centroids (normalised to their sub-cell) mapped back to cloud coordinates.

    The inverse of ``pretrain.ops.geometric_targets.patch_targets``: a patch's cell is the cube of half-size
    ``r`` centred at its centre, ``u = (p + r) / (2r)`` ∈ [0, 1]³, sub-cell ``(ix, iy, iz)`` of slot
    ``iz·sub² + iy·sub + ix`` holds ``u·sub − index``.

    Args:
        centers: (M, 3) patch centres.
        half: (M,) cell half-sizes ``r``.
        sub_centroid: (M, sub³, 3) centroids normalised to their sub-cell.
        sub: sub-cells per axis.

    Returns:
        (M, sub³, 3) points in cloud coordinates.
    """
    slot = np.arange(sub**3)
    index = np.stack([slot % sub, slot // sub % sub, slot // (sub * sub)], axis=1).astype(np.float64)
    u = (index[None] + np.asarray(sub_centroid, dtype=np.float64)) / sub  # (M, S, 3) in [0, 1]
    r = np.asarray(half, dtype=np.float64)[:, None, None]
    return (np.asarray(centers, dtype=np.float64)[:, None, :] + (2.0 * u - 1.0) * r).astype(np.float32)


def reconstruct(model: MaskedModel, clouds: np.ndarray, *, seed: int = 0) -> Reconstruction:
    """Masks and reconstructs clouds with a rebuilt model (eval mode, no gradients).

    Args:
        model: from :func:`load_masked_model`.
        clouds: (B, N, 3) float clouds, preprocessed as the run's data contract says.
        seed: seeds the mask (and FPS when the spec starts FPS at random).

    Returns:
        The :class:`Reconstruction` of every cloud.
    """
    from pretrain.ops import block_group_mask, random_group_mask

    encoder, decoder = model.encoder, model.decoder
    generator = torch.Generator().manual_seed(seed)
    xyz = torch.as_tensor(np.asarray(clouds, dtype=np.float32))
    for module in (encoder, decoder, model.heads):
        module.eval()
    with torch.no_grad():
        groups, tokens = encoder.tokenize(xyz, generator=generator)
        batch, num_groups, _ = groups.centers.shape
        if model.mask_type == "block":
            mask = block_group_mask(groups.centers, model.mask_ratio, generator=generator)
        else:
            mask = random_group_mask(batch, num_groups, model.mask_ratio, generator=generator)
        visible = encoder(tokens, groups.centers, keep=~mask).tokens
        masked_centers = groups.centers[mask].reshape(batch, -1, 3)
        visible_centers = groups.centers[~mask].reshape(batch, -1, 3)
        group_size = groups.neighborhoods.shape[2]
        if model.method == "PointMAE":
            relative = decoder(visible, visible_centers, masked_centers)  # (B, M, K, 3)
            predicted = masked_centers[:, :, None] + relative
            valid = torch.ones(predicted.shape[:3], dtype=torch.bool)
        else:
            features = decoder.decode(visible, visible_centers, masked_centers)  # (B, M, D)
            num_masked = features.shape[1]
            if "chamfer" in model.heads:
                relative = model.heads["chamfer"](features).reshape(batch, num_masked, group_size, 3)
                predicted = masked_centers[:, :, None] + relative
                valid = torch.ones(predicted.shape[:3], dtype=torch.bool)
            else:
                slots = model.sub_cells**3
                sub_centroid = model.heads["sub_centroid"](features).reshape(batch, num_masked, slots, 3)
                logits = model.heads["occupancy"](features).reshape(batch, num_masked, slots, 2)
                true_points = groups.neighborhoods[mask].reshape(batch, num_masked, group_size, 3)
                half = true_points.abs().amax(dim=(2, 3)).clamp_min(1e-6)  # (B, M)
                predicted = torch.stack(
                    [
                        torch.from_numpy(
                            sub_cell_points(
                                masked_centers[b].numpy(),
                                half[b].numpy(),
                                sub_centroid[b].numpy(),
                                model.sub_cells,
                            )
                        )
                        for b in range(batch)
                    ]
                )
                valid = logits[..., 1] > logits[..., 0]
    return Reconstruction(
        clouds=xyz.numpy(),
        centers=groups.centers.numpy(),
        neighborhoods=groups.neighborhoods.numpy(),
        mask=mask.numpy(),
        predicted=predicted.float().numpy(),
        valid=valid.numpy(),
    )


def sample_panels(rec: Reconstruction, index: int) -> dict[str, np.ndarray]:
    """The point sets drawn for one cloud.

    Returns:
        ``visible`` (V·K, 3): the points of the visible patches (the masked input); ``predicted`` (P', 3):
        the shown predicted points of the masked patches; ``reconstruction``: visible then predicted;
        ``masked_truth`` (M·K, 3): the true points of the masked patches; ``ground_truth`` (N, 3): the cloud.
    """
    mask = rec.mask[index]
    visible = place_patches(rec.centers[index][~mask], rec.neighborhoods[index][~mask]).reshape(-1, 3)
    truth = place_patches(rec.centers[index][mask], rec.neighborhoods[index][mask]).reshape(-1, 3)
    predicted = rec.predicted[index][rec.valid[index]].reshape(-1, 3)
    return {
        "visible": visible,
        "predicted": predicted,
        "reconstruction": np.concatenate([visible, predicted], axis=0),
        "masked_truth": truth,
        "ground_truth": rec.clouds[index],
    }
