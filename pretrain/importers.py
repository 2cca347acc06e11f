"""Official Point-MAE / Point-BERT checkpoints -> pcpt encoder artifacts.

Official checkpoints are pickles: they are read with ``torch.load(weights_only=True)`` only. Each format
has a pure key-remap function in :data:`REMAPS` that maps the official names onto pcpt's by prefix edits
and returns the keys it dropped; :func:`import_official` checks the dropped keys against the expected set
of the detected layout (anything else is an error listing the keys), infers the encoder spec from tensor
shapes, loads strictly and writes the artifact.

Layouts (key names dumped from the official code):

- ``point-mae`` pre-training (``Point_MAE``): ``MAE_encoder.{encoder,pos_embed,blocks.blocks,norm}.*``;
  dropped ``mask_token``, ``decoder_pos_embed.*``, ``MAE_decoder.*``, ``increase_dim.*``.
- ``point-mae`` / ``point-bert`` finetuned classifier (``PointTransformer``): ``cls_token``, ``cls_pos``,
  ``encoder.*``, ``reduce_dim.*`` (Point-BERT), ``pos_embed.*``, ``blocks.blocks.*``, ``norm.*``;
  dropped ``cls_head_finetune.*``.
- ``point-bert`` masked point modelling (``Point_BERT``): ``transformer_q.*`` without ``cls_head`` and
  ``lm_head``; dropped ``transformer_k.*``, ``dvae.*``, ``queue``, ``queue_ptr``,
  ``transformer_q.{cls_head,lm_head}.*``.
- ``point-bert-dvae`` (a ``dvae_tokenizer`` artifact, :mod:`pretrain.dvae`): the dVAE
  (``DiscreteVAE``: ``codebook``, ``encoder.*``, ``dgcnn_1.*``, ``dgcnn_2.*``, ``decoder.*``, names kept), or
  the ``dvae.*`` part of a masked point modelling checkpoint (dropped ``transformer_q.*``,
  ``transformer_k.*``, ``queue``, ``queue_ptr``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datapipes.errors import UserError
from datapipes.shards import sha256_file
from pretrain.checkpoint import (
    load_state_strict,
    read_artifact_meta,
    read_checkpoint_file,
    save_module_artifact,
)
from pretrain.dvae import DVAE_KIND, DiscreteVAE, infer_dvae_spec
from pretrain.encoders import DataContract, PointViTSpec, build_encoder

__all__ = [
    "REMAPS",
    "Remapped",
    "extract_state_dict",
    "import_official",
    "infer_spec",
    "remap_point_bert",
    "remap_point_bert_dvae",
    "remap_point_mae",
]

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class Remapped:
    """Result of a key remap.

    Attributes:
        state: weights under pcpt names.
        dropped: official keys that were not kept.
        layout: name of the detected official layout.
        expected_dropped: patterns the dropped keys must match (a trailing ``.`` is a prefix, else exact).
        spec_hints: spec fields the layout fixes (e.g. ``cls_token``).
        kind: artifact kind the weights become (``point_encoder`` or ``dvae_tokenizer``).
    """

    state: StateDict
    dropped: list[str]
    layout: str
    expected_dropped: tuple[str, ...]
    spec_hints: dict[str, Any] = field(default_factory=dict)
    kind: str = "point_encoder"

    def unexpected_dropped(self) -> list[str]:
        """Dropped keys that match none of the layout's expected patterns (should be empty)."""
        return sorted(k for k in self.dropped if not _matches_any(k, self.expected_dropped))


def _matches_any(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in patterns)


def _rename(
    state: Mapping[str, Tensor], renames: tuple[tuple[str, str], ...], *, drop: tuple[str, ...] = ()
) -> tuple[StateDict, list[str]]:
    """Applies the first matching (old, new) rename per key; keys in ``drop`` or with no match are dropped.

    A pattern ending in ``.`` matches a prefix; otherwise it must equal the whole key.
    """
    out: StateDict = {}
    dropped: list[str] = []
    for key, value in state.items():
        if _matches_any(key, drop):
            dropped.append(key)
            continue
        for old, new in renames:
            if old.endswith(".") and key.startswith(old):
                out[new + key[len(old) :]] = value
                break
            if key == old:
                out[new] = value
                break
        else:
            dropped.append(key)
    return out, sorted(dropped)


_FINETUNED_RENAMES: tuple[tuple[str, str], ...] = (
    ("cls_token", "cls_token"),
    ("cls_pos", "cls_pos"),
    ("encoder.", "tokenizer."),
    ("reduce_dim.", "reduce_dim."),
    ("pos_embed.", "pos_embed."),
    ("blocks.blocks.", "blocks."),
    ("norm.", "norm."),
)
_FINETUNED_DROPPED = ("cls_head_finetune.",)


def remap_point_mae(state: Mapping[str, Tensor]) -> Remapped:
    """Official Point-MAE weights (pre-training or finetuned classifier) -> pcpt names.

    Args:
        state: the official state dict with any ``module.`` prefix already removed.

    Raises:
        ValueError: the keys match neither Point-MAE layout.
    """
    if any(k.startswith("MAE_encoder.") for k in state):
        renames = (
            ("MAE_encoder.encoder.", "tokenizer."),
            ("MAE_encoder.pos_embed.", "pos_embed."),
            ("MAE_encoder.blocks.blocks.", "blocks."),
            ("MAE_encoder.norm.", "norm."),
        )
        out, dropped = _rename(state, renames)
        expected = ("mask_token", "decoder_pos_embed.", "MAE_decoder.", "increase_dim.")
        return Remapped(out, dropped, "point-mae pre-training", expected, {"cls_token": False})
    if any(k.startswith("blocks.blocks.") for k in state) and "cls_token" in state:
        out, dropped = _rename(state, _FINETUNED_RENAMES)
        return Remapped(
            out, dropped, "point-mae finetuned classifier", _FINETUNED_DROPPED, {"cls_token": True}
        )
    raise ValueError(
        "not a Point-MAE checkpoint: expected 'MAE_encoder.*' (pre-training) or 'cls_token' + "
        f"'blocks.blocks.*' (finetuned) keys; first keys: {sorted(state)[:8]}"
    )


def remap_point_bert(state: Mapping[str, Tensor]) -> Remapped:
    """Official Point-BERT weights (masked point modelling or finetuned classifier) -> pcpt names.

    Args:
        state: the official state dict with any ``module.`` prefix already removed.

    Raises:
        ValueError: the keys match neither Point-BERT layout.
    """
    if any(k.startswith("transformer_q.") for k in state):
        heads = ("transformer_q.cls_head.", "transformer_q.lm_head.")
        renames = (
            ("transformer_q.cls_token", "cls_token"),
            ("transformer_q.cls_pos", "cls_pos"),
            ("transformer_q.mask_token", "mask_token"),
            ("transformer_q.encoder.", "tokenizer."),
            ("transformer_q.reduce_dim.", "reduce_dim."),
            ("transformer_q.pos_embed.", "pos_embed."),
            ("transformer_q.blocks.blocks.", "blocks."),
            ("transformer_q.norm.", "norm."),
        )
        out, dropped = _rename(state, renames, drop=heads)
        expected = ("transformer_k.", "dvae.", "queue", "queue_ptr", *heads)
        hints = {"cls_token": True, "mask_token": True}
        return Remapped(out, dropped, "point-bert masked point modelling", expected, hints)
    if any(k.startswith("blocks.blocks.") for k in state) and "cls_token" in state:
        out, dropped = _rename(state, _FINETUNED_RENAMES)
        hints = {"cls_token": True}
        return Remapped(out, dropped, "point-bert finetuned classifier", _FINETUNED_DROPPED, hints)
    raise ValueError(
        "not a Point-BERT checkpoint: expected 'transformer_q.*' (pre-training) or 'cls_token' + "
        f"'blocks.blocks.*' (finetuned) keys; first keys: {sorted(state)[:8]}"
    )


def remap_point_bert_dvae(state: Mapping[str, Tensor]) -> Remapped:
    """Official Point-BERT dVAE weights (the dVAE checkpoint, or ``dvae.*`` of an MPM one) -> pcpt names.

    pcpt's :class:`~pretrain.dvae.DiscreteVAE` uses the official names, so keys are kept as they are
    (minus the ``dvae.`` prefix of a masked point modelling checkpoint).

    Args:
        state: the official state dict with any ``module.`` prefix already removed.

    Raises:
        ValueError: neither ``codebook`` nor ``dvae.codebook`` is present.
    """
    if "codebook" in state:
        return Remapped(dict(state), [], "point-bert dvae", (), kind=DVAE_KIND)
    if "dvae.codebook" in state:
        out, dropped = _rename(state, (("dvae.", ""),))
        expected = ("transformer_q.", "transformer_k.", "queue", "queue_ptr")
        return Remapped(out, dropped, "point-bert masked point modelling (dvae)", expected, kind=DVAE_KIND)
    raise ValueError(
        "not a Point-BERT dVAE checkpoint: expected 'codebook' (dVAE) or 'dvae.codebook' (masked point "
        f"modelling) keys; first keys: {sorted(state)[:8]}"
    )


#: official format name (``pcpt-pretrain import FORMAT``) -> pure key remap.
REMAPS: dict[str, Callable[[Mapping[str, Tensor]], Remapped]] = {
    "point-mae": remap_point_mae,
    "point-bert": remap_point_bert,
    "point-bert-dvae": remap_point_bert_dvae,
}


def extract_state_dict(obj: object) -> StateDict:
    """Finds the weights in an official checkpoint and strips the DataParallel ``module.`` prefix.

    Accepts ``{"base_model": state, ...}`` (the official container), ``{"model": state, ...}`` or a bare
    state dict. A leading ``module.`` is removed from every key, as the official loaders do.

    Raises:
        ValueError: no state dict found (the message lists the top-level keys).
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a dict checkpoint, got {type(obj).__name__}")
    state: object = obj
    for key in ("base_model", "model"):
        if isinstance(obj.get(key), Mapping):
            state = obj[key]
            break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"no state dict found: expected a 'base_model' or 'model' entry or a bare state dict; "
            f"top-level keys: {sorted(map(str, obj))[:12]}"
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def infer_spec(
    state: Mapping[str, Tensor],
    *,
    num_heads: int = 6,
    num_groups: int = 64,
    group_size: int = 32,
    drop_path: float = 0.1,
    **hints: Any,
) -> PointViTSpec:
    """Infers a ``point_vit`` spec from weights in pcpt names.

    Width, depth, MLP ratio, tokenizer width (and so ``reduce_dim``), CLS and mask tokens come from the
    tensors; heads, grouping and drop-path are not stored in weights and come from the arguments. FPS
    settings are the official ones (start 0, near-origin skip).

    Raises:
        ValueError: required tensors are missing or the shapes are inconsistent.
    """
    required = ("norm.weight", "tokenizer.second_conv.3.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"cannot infer the encoder spec: missing tensors {missing}")
    embed_dim = int(state["norm.weight"].shape[0])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    tokenizer_dim = int(state["tokenizer.second_conv.3.weight"].shape[0])
    if tokenizer_dim != embed_dim and "reduce_dim.weight" not in state:
        raise ValueError(
            f"tokenizer width {tokenizer_dim} differs from the transformer width {embed_dim} "
            "but there is no reduce_dim layer"
        )
    values: dict[str, Any] = {
        "arch": "point_vit",
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": hidden / embed_dim,
        "num_groups": num_groups,
        "group_size": group_size,
        "tokenizer_dim": tokenizer_dim,
        "drop_path": drop_path,
        "cls_token": "cls_token" in state,
        "mask_token": "mask_token" in state,
        "fps_start": 0,
        "fps_skip_near_origin": True,
    }
    values.update(hints)
    return PointViTSpec.from_dict(values)


def import_official(
    fmt: str,
    src: str | Path,
    out_dir: str | Path,
    *,
    num_heads: int = 6,
    num_groups: int = 64,
    group_size: int = 32,
    num_points: int = 1024,
    drop_path: float = 0.1,
) -> dict[str, Any]:
    """Converts an official checkpoint into an encoder artifact (a tokenizer for ``point-bert-dvae``).

    Args:
        fmt: a key of :data:`REMAPS` (``point-mae``, ``point-bert``, ``point-bert-dvae``).
        src: the official ``.pth`` file.
        out_dir: artifact directory to write.
        num_heads: attention heads (not stored in the weights; 6 officially).
        num_groups: patches per cloud (64 for 1024 points officially).
        group_size: points per patch (32 officially).
        num_points: points per cloud recorded in the data contract.
        drop_path: stochastic-depth rate recorded in the spec (used only when training further).

    Returns:
        A summary: ``artifact``, ``format``, ``layout``, ``spec``, ``num_params``, ``num_tensors``,
        ``dropped`` (count), ``source``, ``source_sha256``.

    Raises:
        UserError: unknown format, unreadable file, an unexpected key layout or leftover keys.
        RuntimeError: weights that do not fit the inferred spec (names the keys).
    """
    if fmt not in REMAPS:
        raise UserError(f"unknown checkpoint format {fmt!r}; known: {', '.join(sorted(REMAPS))}")
    path, obj = read_checkpoint_file(src)
    try:
        state = extract_state_dict(obj)
        remapped = REMAPS[fmt](state)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from err
    unknown = remapped.unexpected_dropped()
    if unknown:
        raise UserError(
            f"{path}: {len(unknown)} keys are neither encoder weights nor expected extras of a "
            f"{remapped.layout} checkpoint: {unknown}"
        )
    module: torch.nn.Module
    if remapped.kind == DVAE_KIND:
        try:
            dvae_spec = infer_dvae_spec(remapped.state, num_groups=num_groups, group_size=group_size)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from err
        module = DiscreteVAE(dvae_spec)
        data = DataContract(num_points=num_points, normalization="unit_sphere", fps_order=False)
    else:
        try:
            encoder_spec = infer_spec(
                remapped.state,
                num_heads=num_heads,
                num_groups=num_groups,
                group_size=group_size,
                drop_path=drop_path,
                **remapped.spec_hints,
            )
            data = DataContract(num_points=num_points, normalization="unit_sphere", fps_order=False)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from err
        module = build_encoder(encoder_spec)
    load_state_strict(module, remapped.state, source=path)
    sha = sha256_file(path)
    epoch = obj.get("epoch") if isinstance(obj, Mapping) else None
    provenance = {
        "method": f"{fmt} (official)",
        "step": None,
        "epoch": epoch if isinstance(epoch, int) else None,
        "source": str(path),
        "source_sha256": sha,
        "source_layout": remapped.layout,
    }
    out = save_module_artifact(out_dir, module, data=data, provenance=provenance)
    meta = read_artifact_meta(out)
    return {
        "artifact": str(out),
        "format": fmt,
        "kind": meta["kind"],
        "layout": remapped.layout,
        "spec": meta["spec"],
        "num_params": meta["num_params"],
        "num_tensors": len(remapped.state),
        "dropped": len(remapped.dropped),
        "source": str(path),
        "source_sha256": sha,
    }
