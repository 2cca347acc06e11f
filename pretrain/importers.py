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
- ``vipformer`` (bare state dicts ``pc_model_best.pth`` / ``img_model_best.pth``, METHODS.md §5.6): the point
  model (``group2emb.*``, ``position_emb.*``, ``input_adapter.*``, ``encoder.*``) becomes a ``point_encoder``
  artifact of family ``vipformer_point`` with ``official_centering=True``; the image model
  (``patch2emb.1.*``, ``position_emb``, ``encoder.*``) an ``image_encoder`` artifact. Dropped:
  ``latent_head.*`` (the projection head of the contrastive loss; ``finetune_head.*`` of a finetuned
  model), and ``encoder.cross_attn_1.*``, which with one cross-attention layer is the same module as
  ``encoder.cross_attn_n.*`` registered twice (checked tensor by tensor before it is dropped).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datapipes.errors import UserError
from datapipes.shards import sha256_file
from pretrain.artifacts import IMAGE_ENCODER_KIND
from pretrain.checkpoint import (
    load_state_strict,
    read_artifact_meta,
    read_checkpoint_file,
    save_module_artifact,
)
from pretrain.dvae import DVAE_KIND, DiscreteVAE, infer_dvae_spec
from pretrain.encoders import (
    DataContract,
    PointViTSpec,
    ViPFormerImageEncoder,
    ViPFormerImageSpec,
    ViPFormerPointSpec,
    build_encoder,
)

__all__ = [
    "REMAPS",
    "Remapped",
    "extract_state_dict",
    "import_official",
    "infer_spec",
    "infer_vipformer_image_spec",
    "infer_vipformer_point_spec",
    "remap_point_bert",
    "remap_point_bert_dvae",
    "remap_point_mae",
    "remap_vipformer",
    "remap_vipformer_image",
    "remap_vipformer_point",
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
        kind: artifact kind the weights become (``point_encoder``, ``dvae_tokenizer`` or ``image_encoder``).
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


# -------------------------------------------------------------------------------------------- ViPFormer

_VIPFORMER_HEADS = ("latent_head.", "finetune_head.")
_CROSS_FIRST, _CROSS_LATER = "encoder.cross_attn_1.", "encoder.cross_attn_n."


def _vipformer_trunk_renames(
    state: Mapping[str, Tensor],
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """The official ``encoder.*`` -> ``trunk.*`` renames, and the keys to drop (the shared duplicate).

    With one cross-attention layer (or a first layer shared with the later ones) the official encoder
    registers one module as both ``cross_attn_1`` and ``cross_attn_n``: every tensor is stored twice. The
    duplicate is checked tensor by tensor and dropped. Otherwise the first layer maps to ``cross_attn`` and
    the shared later one to ``cross_attn_n``.

    Raises:
        ValueError: ``cross_attn_1`` and ``cross_attn_n`` hold different key sets, or the same keys with some
            but not all tensors equal.
    """
    first = {k[len(_CROSS_FIRST) :]: v for k, v in state.items() if k.startswith(_CROSS_FIRST)}
    later = {k[len(_CROSS_LATER) :]: v for k, v in state.items() if k.startswith(_CROSS_LATER)}
    sa = (("encoder.sa_layers.", "trunk.sa_layers."),)
    if not first:
        return ((_CROSS_LATER, "trunk.cross_attn."), *sa), ()
    if set(first) != set(later):
        raise ValueError(
            f"{_CROSS_FIRST}* and {_CROSS_LATER}* hold different keys: {sorted(set(first) ^ set(later))[:6]}"
        )
    same = [first[k].shape == later[k].shape and torch.equal(first[k], later[k]) for k in sorted(first)]
    if all(same):
        return ((_CROSS_LATER, "trunk.cross_attn."), *sa), (_CROSS_FIRST,)
    if any(same):
        raise ValueError(
            f"{_CROSS_FIRST}* and {_CROSS_LATER}* are neither one shared module (some tensors differ) nor "
            "two separate layers (some are equal)"
        )
    return ((_CROSS_FIRST, "trunk.cross_attn."), (_CROSS_LATER, "trunk.cross_attn_n."), *sa), ()


def remap_vipformer_point(state: Mapping[str, Tensor]) -> Remapped:
    """Official ViPFormer point model weights (``CrossFormer_pc_mp``, bare state dict) -> pcpt names.

    ``group2emb.`` -> ``tokenizer.``, ``position_emb.`` -> ``pos_embed.``, ``input_adapter.`` kept,
    ``encoder.`` -> ``trunk.`` (see :func:`_vipformer_trunk_renames`); ``latent_head.*`` (and the duplicate
    ``encoder.cross_attn_1.*``) are dropped. The spec hints set ``official_centering=True`` (the released
    weights were trained with the partial centring) and ``num_cross_layers=1`` when the duplicate was found.

    Args:
        state: the official state dict with any ``module.`` prefix already removed.

    Raises:
        ValueError: not a ViPFormer point model, or inconsistent cross-attention layers.
    """
    needed = ("group2emb.", "input_adapter.point_mlp.", "encoder.sa_layers.")
    if not all(any(k.startswith(p) for k in state) for p in needed) or "patch2emb.1.weight" in state:
        raise ValueError(
            "not a ViPFormer point checkpoint: expected 'group2emb.*', 'input_adapter.point_mlp.*' and "
            f"'encoder.sa_layers.*' keys; first keys: {sorted(state)[:8]}"
        )
    trunk, duplicate = _vipformer_trunk_renames(state)
    renames = (
        ("group2emb.", "tokenizer."),
        ("position_emb.", "pos_embed."),
        ("input_adapter.", "input_adapter."),
        *trunk,
    )
    out, dropped = _rename(state, renames, drop=(*duplicate, *_VIPFORMER_HEADS))
    hints: dict[str, Any] = {"official_centering": True}
    if duplicate or not any(k.startswith("trunk.cross_attn_n.") for k in out):
        hints["num_cross_layers"] = 1
    return Remapped(out, dropped, "vipformer point encoder", (*duplicate, *_VIPFORMER_HEADS), hints)


def remap_vipformer_image(state: Mapping[str, Tensor]) -> Remapped:
    """Official ViPFormer image model weights (``CrossFormer_img_mp``, bare state dict) -> pcpt names.

    ``patch2emb.1.`` -> ``patch_embed.``, ``position_emb`` -> ``pos_embed``, ``encoder.`` -> ``trunk.``;
    ``latent_head.*`` (and the duplicate ``encoder.cross_attn_1.*``) are dropped. The result is an
    ``image_encoder`` artifact.

    Args:
        state: the official state dict with any ``module.`` prefix already removed.

    Raises:
        ValueError: not a ViPFormer image model, or inconsistent cross-attention layers.
    """
    if "patch2emb.1.weight" not in state or "position_emb" not in state:
        raise ValueError(
            "not a ViPFormer image checkpoint: expected 'patch2emb.1.weight' and 'position_emb' keys; "
            f"first keys: {sorted(state)[:8]}"
        )
    trunk, duplicate = _vipformer_trunk_renames(state)
    renames = (("patch2emb.1.", "patch_embed."), ("position_emb", "pos_embed"), *trunk)
    out, dropped = _rename(state, renames, drop=(*duplicate, *_VIPFORMER_HEADS))
    hints = (
        {"num_cross_layers": 1} if duplicate or "trunk.cross_attn_n.0.module.q_norm.weight" not in out else {}
    )
    return Remapped(
        out, dropped, "vipformer image encoder", (*duplicate, *_VIPFORMER_HEADS), hints, IMAGE_ENCODER_KIND
    )


def remap_vipformer(state: Mapping[str, Tensor]) -> Remapped:
    """A ViPFormer point or image model (told apart by ``patch2emb.*``) -> pcpt names.

    Raises:
        ValueError: neither a ViPFormer point nor image model.
    """
    if "patch2emb.1.weight" in state:
        return remap_vipformer_image(state)
    if any(k.startswith("group2emb.") for k in state):
        return remap_vipformer_point(state)
    raise ValueError(
        "not a ViPFormer checkpoint: expected 'group2emb.*' (point model, pc_model_best.pth) or "
        f"'patch2emb.1.weight' (image model, img_model_best.pth) keys; first keys: {sorted(state)[:8]}"
    )


#: official format name (``pcpt-pretrain import FORMAT``) -> pure key remap.
REMAPS: dict[str, Callable[[Mapping[str, Tensor]], Remapped]] = {
    "point-mae": remap_point_mae,
    "point-bert": remap_point_bert,
    "point-bert-dvae": remap_point_bert_dvae,
    "vipformer": remap_vipformer,
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


def _layer_count(state: Mapping[str, Tensor], prefix: str) -> int:
    """1 + the largest ``i`` of keys ``<prefix><i>.*`` (0 when there are none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return 1 + max(found) if found else 0


#: attention heads of the released ViPFormer models by width (E1CL8SL-H4D256-*, E1CL8SL-H6D384-*).
VIPFORMER_HEADS_BY_WIDTH = {256: 4, 384: 6}


def _vipformer_trunk_fields(
    state: Mapping[str, Tensor], embed_dim: int, num_heads: int | None, num_cross_layers: int | None
) -> dict[str, Any]:
    """Trunk spec fields from weights in pcpt names (``trunk.*``) and the values weights do not store."""
    required = ("trunk.cross_attn.1.module.1.weight", "trunk.sa_layers.0.1.module.1.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"cannot infer the ViPFormer spec: missing tensors {missing}")
    hidden = int(state["trunk.cross_attn.1.module.1.weight"].shape[0])
    if hidden % embed_dim:
        raise ValueError(f"MLP hidden width {hidden} is not a multiple of the width {embed_dim}")
    if num_heads is None:
        if embed_dim not in VIPFORMER_HEADS_BY_WIDTH:
            raise ValueError(
                f"the number of attention heads is not stored in the weights and width {embed_dim} is not a "
                f"released configuration ({VIPFORMER_HEADS_BY_WIDTH}); pass num_heads (--num-heads)"
            )
        num_heads = VIPFORMER_HEADS_BY_WIDTH[embed_dim]
    separate = any(k.startswith("trunk.cross_attn_n.") for k in state)
    if separate and (num_cross_layers is None or num_cross_layers < 2):
        raise ValueError(
            "the checkpoint has separate first and later cross-attention layers, so more than one "
            "cross-attention layer, and their number is not stored in the weights; pass "
            "num_cross_layers >= 2 (--num-cross-layers)"
        )
    if not separate and num_cross_layers not in (None, 1):
        raise ValueError(
            f"num_cross_layers={num_cross_layers}, but the checkpoint holds one cross-attention layer (a "
            "first layer shared with later ones is not supported)"
        )
    return {
        "embed_dim": embed_dim,
        "num_cross_layers": num_cross_layers or 1,
        "num_sa_layers": _layer_count(state, "trunk.sa_layers."),
        "num_heads": num_heads,
        "mlp_ratio": hidden // embed_dim,
    }


def _cross_layers(given: int | None, hints: dict[str, Any]) -> int | None:
    """The cross-attention layer count: the caller's, else the remap's hint (removed from ``hints``)."""
    hinted = hints.pop("num_cross_layers", None)
    return given if given is not None else hinted


def infer_vipformer_point_spec(
    state: Mapping[str, Tensor],
    *,
    num_heads: int | None = None,
    num_latents: int = 128,
    group_size: int = 32,
    num_cross_layers: int | None = None,
    **hints: Any,
) -> ViPFormerPointSpec:
    """Infers a ``vipformer_point`` spec from weights in pcpt names.

    Width, self-attention depth and MLP ratio come from the tensors; heads (default: 4 at width 256, 6 at
    384, as released), latents and patch size are not stored in the weights and come from the arguments, and
    so does the number of cross-attention layers when there is more than one. FPS is pcpt's deterministic
    start 0 (officially random per call); ``hints`` (e.g. ``official_centering``) override fields.

    Raises:
        ValueError: required tensors are missing, the shapes are inconsistent, or a needed value is missing.
    """
    if "pos_embed.2.weight" not in state:
        raise ValueError("cannot infer the ViPFormer spec: missing tensor 'pos_embed.2.weight'")
    embed_dim = int(state["pos_embed.2.weight"].shape[0])
    values: dict[str, Any] = {
        "arch": "vipformer_point",
        **_vipformer_trunk_fields(state, embed_dim, num_heads, _cross_layers(num_cross_layers, hints)),
        "num_latents": num_latents,
        "group_size": group_size,
        "fps_start": 0,
        "fps_skip_near_origin": False,
    }
    values.update(hints)
    return ViPFormerPointSpec.from_dict(values)


def infer_vipformer_image_spec(
    state: Mapping[str, Tensor],
    *,
    num_heads: int | None = None,
    num_cross_layers: int | None = None,
    **hints: Any,
) -> ViPFormerImageSpec:
    """Infers a ``vipformer_image`` spec from weights in pcpt names.

    Patch size from the patch embedding (p²·3 inputs), image size from the positional parameter (square
    grid of patches), the trunk as :func:`infer_vipformer_point_spec`.

    Raises:
        ValueError: required tensors are missing or the shapes are inconsistent.
    """
    missing = [k for k in ("patch_embed.weight", "pos_embed") if k not in state]
    if missing:
        raise ValueError(f"cannot infer the ViPFormer image spec: missing tensors {missing}")
    embed_dim, patch_dim = (int(n) for n in state["patch_embed.weight"].shape)
    patch = math.isqrt(patch_dim // 3)
    pos = state["pos_embed"]
    side = math.isqrt(int(pos.shape[1])) if pos.ndim == 3 else 0
    if patch * patch * 3 != patch_dim or pos.ndim != 3 or side * side != pos.shape[1]:
        raise ValueError(
            f"patch embedding {tuple(state['patch_embed.weight'].shape)} and positional parameter "
            f"{tuple(pos.shape)} are not square RGB patches on a square grid"
        )
    values: dict[str, Any] = {
        "arch": "vipformer_image",
        **_vipformer_trunk_fields(state, embed_dim, num_heads, _cross_layers(num_cross_layers, hints)),
        "image_size": side * patch,
        "patch_size": patch,
    }
    values.update(hints)
    return ViPFormerImageSpec.from_dict(values)


def _imported_module(
    fmt: str,
    remapped: Remapped,
    *,
    num_heads: int | None,
    num_groups: int | None,
    group_size: int,
    num_points: int,
    drop_path: float,
    num_cross_layers: int | None,
) -> tuple[torch.nn.Module, DataContract]:
    """The module (freshly initialised) the remapped weights load into, and its data contract."""
    points = DataContract(num_points=num_points, normalization="unit_sphere", fps_order=False)
    hints = dict(remapped.spec_hints)
    hinted_cross = hints.pop("num_cross_layers", None)  # the caller's value wins
    cross_layers = num_cross_layers if num_cross_layers is not None else hinted_cross
    if remapped.kind == DVAE_KIND:
        dvae_spec = infer_dvae_spec(remapped.state, num_groups=num_groups or 64, group_size=group_size)
        return DiscreteVAE(dvae_spec), points
    if remapped.kind == IMAGE_ENCODER_KIND:
        image_spec = infer_vipformer_image_spec(
            remapped.state, num_heads=num_heads, num_cross_layers=cross_layers, **hints
        )
        # the contract of an image encoder: pixels of RGB images, ImageNet mean/std normalised by the caller
        pixels = DataContract(
            num_points=image_spec.image_size**2, normalization="none", channels=("r", "g", "b")
        )
        return ViPFormerImageEncoder(image_spec), pixels
    if fmt == "vipformer":
        point_spec = infer_vipformer_point_spec(
            remapped.state,
            num_heads=num_heads,
            num_latents=num_groups or 128,
            group_size=group_size,
            num_cross_layers=cross_layers,
            **hints,
        )
        return build_encoder(point_spec), points
    encoder_spec = infer_spec(
        remapped.state,
        num_heads=num_heads or 6,
        num_groups=num_groups or 64,
        group_size=group_size,
        drop_path=drop_path,
        **remapped.spec_hints,
    )
    return build_encoder(encoder_spec), points


def import_official(
    fmt: str,
    src: str | Path,
    out_dir: str | Path,
    *,
    num_heads: int | None = None,
    num_groups: int | None = None,
    group_size: int = 32,
    num_points: int = 1024,
    drop_path: float = 0.1,
    num_cross_layers: int | None = None,
) -> dict[str, Any]:
    """Converts an official checkpoint into an artifact (encoder, dVAE tokenizer or image encoder).

    Args:
        fmt: a key of :data:`REMAPS` (``point-mae``, ``point-bert``, ``point-bert-dvae``, ``vipformer``).
        src: the official ``.pth`` file.
        out_dir: artifact directory to write.
        num_heads: attention heads (not stored in the weights). Default: 6 for Point-MAE / Point-BERT; for
            ViPFormer the released value of the width (4 at 256, 6 at 384).
        num_groups: patches per cloud (ViPFormer: latents). Default: 64 (Point-MAE / Point-BERT with 1024
            points), 128 (ViPFormer).
        group_size: points per patch (32 officially).
        num_points: points per cloud recorded in the data contract.
        drop_path: stochastic-depth rate recorded in a ``point_vit`` spec (used only when training further).
        num_cross_layers: ViPFormer cross-attention layers, needed only when the checkpoint has more than one.

    Returns:
        A summary: ``artifact``, ``format``, ``layout``, ``spec``, ``num_params``, ``num_tensors``,
        ``dropped`` (count), ``source``, ``source_sha256``.

    Raises:
        UserError: unknown format, unreadable file, an unexpected key layout or leftover keys, or values the
            weights do not determine and the arguments do not give.
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
    try:
        module, data = _imported_module(
            fmt,
            remapped,
            num_heads=num_heads,
            num_groups=num_groups,
            group_size=group_size,
            num_points=num_points,
            drop_path=drop_path,
            num_cross_layers=num_cross_layers,
        )
    except ValueError as err:
        raise UserError(f"{path}: {err}") from err
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
