"""Key remaps from official source-model layouts onto a stack of pcpt :class:`~pretrain.nn.Block`.

Each layout is a pure function ``state dict (official names) -> Remapped`` (pcpt names plus a
:class:`SourceSpec`). A remap first normalises the names (wrapper prefixes), then lists the official keys it
needs for the detected depth; a missing needed key, or a key that is neither needed nor matched by the
layout's explicit ignore list, is an error that names the first offending keys. Shapes and widths are read
from the tensors, never assumed.

pcpt names produced: ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}``,
``blocks.N.{ls1,ls2}.gamma`` (ViT with LayerScale), ``input_norm.{weight,bias}`` (BERT),
``norm.{weight,bias}`` (CLIP text, ViT), ``pos_table`` and ``cls_pos`` (ViT).

Layouts:

- ``bert`` (Hugging Face ``BertModel``, e.g. all-MiniLM-L6-v2): post-norm, qkv bias, ``hidden_act`` and
  ``layer_norm_eps`` from ``config.json`` (defaults exact GELU, 1e-12). Per layer N of
  ``encoder.layer.N.``: ``attention.self.{query,key,value}`` -> ``attn.qkv`` (concatenated in that order),
  ``attention.output.dense`` -> ``attn.proj``, ``attention.output.LayerNorm`` -> ``norm1``,
  ``intermediate.dense`` -> ``mlp.fc1``, ``output.dense`` -> ``mlp.fc2``, ``output.LayerNorm`` -> ``norm2``;
  ``embeddings.LayerNorm`` -> ``input_norm``, ``embeddings.position_embeddings.weight`` (L, D) ->
  ``pos_table``. Prefixes ``0.auto_model.`` / ``auto_model.`` (sentence-transformers) and ``bert.`` are
  stripped. Ignored: word and token-type embeddings, ``embeddings.position_ids``, ``pooler.*``, ``cls.*``
  (pre-training heads).
- ``clip_text`` (OpenAI CLIP): pre-norm, qkv bias, QuickGELU, eps 1e-5. Per layer N of
  ``transformer.resblocks.N.``: ``ln_1`` -> ``norm1``, ``attn.in_proj_{weight,bias}`` -> ``attn.qkv`` (already
  q, k, v stacked), ``attn.out_proj`` -> ``attn.proj``, ``ln_2`` -> ``norm2``, ``mlp.c_fc`` -> ``mlp.fc1``,
  ``mlp.c_proj`` -> ``mlp.fc2``; ``ln_final`` -> ``norm``, ``positional_embedding`` (77, D) -> ``pos_table``.
  Ignored: ``visual.*`` (the image tower), ``token_embedding.weight``, ``text_projection``, ``logit_scale``
  and the ``input_resolution`` / ``context_length`` / ``vocab_size`` entries of the TorchScript archives.
- ``vit`` (DINOv2 / timm ViT): pre-norm, exact GELU, eps 1e-6; names ``blocks.N.*`` and ``norm.*`` are
  pcpt's already, ``ls1.gamma`` / ``ls2.gamma`` turn LayerScale on, ``attn.qkv.bias`` qkv bias.
  ``pos_embed`` (1, [1 +] H*W, D), H = W: the CLS entry (when there is one) -> ``cls_pos`` (D,), the rest ->
  ``pos_table`` (H, W, D); ``patch_embed.proj.weight`` (D, C, p, p) gives the patch size. DINOv2's chunked
  names ``blocks.C.N.*`` become ``blocks.N.*``. Ignored: ``cls_token``, ``mask_token``, ``register_tokens``,
  ``patch_embed.proj.bias``, ``head.*``.

Every layout strips a leading ``module.`` (DistributedDataParallel); the caller unwraps dict wrappers.
Heads: ``bert`` takes ``num_attention_heads`` from its config or the argument (an error without either);
the other layouts take the argument, else ``D // 64`` (OpenAI CLIP, DINOv2 and ViT use 64-wide heads).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from datapipes.errors import UserError
from pretrain.nn.transformer import Activation, BlockOptions

__all__ = [
    "IGNORED",
    "LAYOUTS",
    "REMAPS",
    "Remapped",
    "SourceError",
    "SourceLayout",
    "SourceSpec",
    "remap",
    "remap_bert",
    "remap_clip_text",
    "remap_vit",
]

SourceLayout = Literal["bert", "clip_text", "vit"]
#: the layouts :func:`remap` knows.
LAYOUTS: tuple[str, ...] = ("bert", "clip_text", "vit")
#: how many offending keys an error message lists.
_SHOWN = 5
#: official keys each layout reads nothing from (full-match regular expressions on normalised names).
IGNORED: dict[str, tuple[str, ...]] = {
    "bert": (
        r"embeddings\.word_embeddings\.weight",
        r"embeddings\.token_type_embeddings\.weight",
        r"embeddings\.position_ids",
        r"pooler\.dense\.(weight|bias)",
        r"cls\..+",
    ),
    "clip_text": (
        r"visual\..+",
        r"token_embedding\.weight",
        r"text_projection",
        r"logit_scale",
        r"input_resolution",
        r"context_length",
        r"vocab_size",
    ),
    "vit": (
        r"cls_token",
        r"mask_token",
        r"register_tokens",
        r"patch_embed\.proj\.bias",
        r"head\.(weight|bias)",
    ),
}
_PREFIXES: dict[str, tuple[str, ...]] = {
    "bert": ("module.", "0.auto_model.", "auto_model.", "bert."),
    "clip_text": ("module.",),
    "vit": ("module.",),
}
#: Hugging Face ``hidden_act`` -> pcpt activation.
_HF_ACTIVATIONS: dict[str, Activation] = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}
_WEIGHT_BIAS = ("weight", "bias")
#: pcpt name -> the official keys it is built from (several: concatenated along dim 0).
Plan = dict[str, tuple[str, ...]]


class SourceError(UserError, ValueError):
    """A source checkpoint that does not fit its layout (missing or unknown keys, bad shapes, bad config)."""


@dataclass(frozen=True)
class SourceSpec:
    """The structure of a frozen source transformer, read from its checkpoint.

    Attributes:
        layout: ``"bert"``, ``"clip_text"`` or ``"vit"``.
        embed_dim: width D.
        depth: number of blocks.
        num_heads: attention heads.
        options: the blocks' :class:`~pretrain.nn.BlockOptions`.
        pos_shape: ``(L, D)`` for 1-D tables, ``(H, W, D)`` for a ViT patch grid.
        has_cls_pos: a CLS positional embedding (D,) exists (ViT with a CLS entry in ``pos_embed``).
        patch_size: ViT patch size, None for 1-D layouts.
        input_norm: a LayerNorm on the input tokens (BERT's ``embeddings.LayerNorm``).
        final_norm: a LayerNorm after the last block (CLIP ``ln_final``, ViT ``norm``).
    """

    layout: str
    embed_dim: int
    depth: int
    num_heads: int
    options: BlockOptions
    pos_shape: tuple[int, ...]
    has_cls_pos: bool
    patch_size: int | None
    input_norm: bool
    final_norm: bool


@dataclass(frozen=True)
class Remapped:
    """A remapped checkpoint.

    Attributes:
        spec: the structure.
        state: pcpt names -> tensors (float32), loadable strictly into a ``SourceTransformer(spec)``.
        used: normalised official keys the state was built from, sorted.
        ignored: normalised official keys matched by the layout's ignore list, sorted.
    """

    spec: SourceSpec
    state: dict[str, Tensor]
    used: tuple[str, ...]
    ignored: tuple[str, ...]


def _first(keys: Iterable[str]) -> str:
    """The first :data:`_SHOWN` keys, sorted, with a count of the rest."""
    ordered = sorted(keys)
    shown = ", ".join(ordered[:_SHOWN])
    more = len(ordered) - _SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")


def _normalise(state: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Strips the first matching prefix of every key; checks that every value is a tensor.

    Raises:
        SourceError: a non-tensor value, or two keys that become the same name.
    """
    bad = [str(key) for key, value in state.items() if not isinstance(value, Tensor)]
    if bad:
        raise SourceError(f"entries that are not tensors: {_first(bad)}")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = next((key[len(p) :] for p in prefixes if key.startswith(p)), key)
        if name in out:
            raise SourceError(f"two keys are both {name!r} once the prefixes {prefixes} are stripped")
        out[name] = value
    return out


def _depth(keys: Iterable[str], block_prefix: str) -> int:
    """Number of blocks: 1 + the largest N of keys ``<block_prefix>N.*``.

    Raises:
        SourceError: no block keys.
    """
    pattern = re.compile(re.escape(block_prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for key in keys if (m := pattern.match(key))]
    if not indices:
        raise SourceError(f"no transformer blocks (no keys {block_prefix}N.*)")
    return max(indices) + 1


def _check_keys(
    state: Mapping[str, Tensor], needed: Iterable[str], layout: str
) -> tuple[list[str], list[str]]:
    """Splits the keys into used and ignored.

    Returns:
        (used keys, ignored keys), sorted.

    Raises:
        SourceError: a needed key is missing, or a key is neither needed nor ignored.
    """
    needed = set(needed)
    patterns = [re.compile(p) for p in IGNORED[layout]]
    missing = needed - set(state)
    ignored = [k for k in state if k not in needed and any(p.fullmatch(k) for p in patterns)]
    unknown = set(state) - needed - set(ignored)
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unknown:
        problems.append(f"unknown keys: {_first(unknown)}")
    if problems:
        raise SourceError("; ".join(problems))
    return sorted(needed), sorted(ignored)


def _float(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def _rename(state: Mapping[str, Tensor], plan: Plan) -> dict[str, Tensor]:
    """Builds each pcpt tensor from its official tensors, concatenated along dim 0 (fused qkv)."""
    out: dict[str, Tensor] = {}
    for target, sources in plan.items():
        parts = [_float(state[s]) for s in sources]
        out[target] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def _needed(plan: Plan, extra: Iterable[str] = ()) -> list[str]:
    return [s for sources in plan.values() for s in sources] + list(extra)


def _vector_dim(state: Mapping[str, Tensor], key: str) -> int:
    """D of a 1-D parameter (a LayerNorm weight)."""
    t = state[key]
    if t.ndim != 1:
        raise SourceError(f"{key} has shape {tuple(t.shape)}, expected (D,)")
    return int(t.shape[0])


def _mlp_ratio(state: Mapping[str, Tensor], fc1_weight: str, dim: int) -> float:
    """The MLP ratio of ``fc1`` (hidden, D), checked to rebuild ``hidden`` exactly."""
    t = state[fc1_weight]
    if t.ndim != 2 or int(t.shape[1]) != dim:
        raise SourceError(f"{fc1_weight} has shape {tuple(t.shape)}, expected (hidden, {dim})")
    hidden = int(t.shape[0])
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise SourceError(f"MLP width {hidden} is not representable as a ratio of width {dim}")
    return ratio


def _heads(num_heads: int | None, dim: int, layout: str) -> int:
    """``num_heads`` or ``dim // 64``; checked to divide ``dim``."""
    if num_heads is None:
        if dim % 64:
            raise SourceError(
                f"width {dim} is not a multiple of 64, so the head count of a {layout} source cannot be "
                "inferred: pass num_heads"
            )
        num_heads = dim // 64
    if num_heads <= 0 or dim % num_heads:
        raise SourceError(f"num_heads={num_heads} must be positive and divide the width {dim}")
    return num_heads


def _table_1d(state: Mapping[str, Tensor], key: str, dim: int) -> Tensor:
    t = state[key]
    if t.ndim != 2 or int(t.shape[1]) != dim:
        raise SourceError(f"{key} has shape {tuple(t.shape)}, expected (L, {dim})")
    return _float(t)


# --------------------------------------------------------------------------------------------- bert


def _bert_layer_plan(i: int) -> Plan:
    src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
    plan: Plan = {}
    for wb in _WEIGHT_BIAS:
        plan[f"{dst}attn.qkv.{wb}"] = tuple(
            f"{src}attention.self.{n}.{wb}" for n in ("query", "key", "value")
        )
        for pcpt, bert in (
            ("attn.proj", "attention.output.dense"),
            ("norm1", "attention.output.LayerNorm"),
            ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"),
            ("norm2", "output.LayerNorm"),
        ):
            plan[f"{dst}{pcpt}.{wb}"] = (f"{src}{bert}.{wb}",)
    return plan


def _bert_config(
    config: Mapping[str, Any] | None, dim: int, depth: int, num_heads: int | None
) -> tuple[int, Activation, float]:
    """(num_heads, activation, eps) from ``config.json`` and the argument.

    Raises:
        SourceError: no head count, a config that disagrees with the weights or the argument, or an
            unsupported ``hidden_act`` / ``position_embedding_type``.
    """
    config = config or {}
    heads = config.get("num_attention_heads")
    if heads is not None and num_heads is not None and int(heads) != num_heads:
        raise SourceError(f"num_heads={num_heads} disagrees with config.json num_attention_heads={heads}")
    heads = num_heads if heads is None else int(heads)
    if heads is None:
        raise SourceError(
            "a bert source needs its head count: put its config.json next to it or pass num_heads"
        )
    for field, value in (("hidden_size", dim), ("num_hidden_layers", depth)):
        if field in config and int(config[field]) != value:
            raise SourceError(f"config.json {field}={config[field]} but the weights have {value}")
    kind = config.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise SourceError(f"position_embedding_type={kind!r} is not supported (only 'absolute')")
    act = config.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise SourceError(f"hidden_act={act!r} is not supported (one of {sorted(_HF_ACTIVATIONS)})")
    return _heads(heads, dim, "bert"), _HF_ACTIVATIONS[act], float(config.get("layer_norm_eps", 1e-12))


def remap_bert(
    state: Mapping[str, Any], *, num_heads: int | None = None, config: Mapping[str, Any] | None = None
) -> Remapped:
    """Hugging Face BERT encoder -> pcpt post-norm blocks (see the module docstring for the names).

    Args:
        state: the state dict, official names (optionally prefixed).
        num_heads: head count when ``config`` has none (must agree with it otherwise).
        config: the model's ``config.json`` (``num_attention_heads``, ``hidden_act``, ``layer_norm_eps``).

    Returns:
        The remap; ``pos_table`` is ``position_embeddings`` (max_positions, D).

    Raises:
        SourceError: missing or unknown keys, bad shapes, a missing head count or a bad config.
    """
    state = _normalise(state, _PREFIXES["bert"])
    depth = _depth(state, "encoder.layer.")
    plan: Plan = {
        "input_norm.weight": ("embeddings.LayerNorm.weight",),
        "input_norm.bias": ("embeddings.LayerNorm.bias",),
    }
    for i in range(depth):
        plan.update(_bert_layer_plan(i))
    pos_key = "embeddings.position_embeddings.weight"
    used, ignored = _check_keys(state, _needed(plan, [pos_key]), "bert")
    dim = _vector_dim(state, "embeddings.LayerNorm.weight")
    heads, act, eps = _bert_config(config, dim, depth, num_heads)
    options = BlockOptions(
        mlp_ratio=_mlp_ratio(state, "encoder.layer.0.intermediate.dense.weight", dim),
        qkv_bias=True,
        norm_first=False,
        activation=act,
        norm_eps=eps,
    )
    out = _rename(state, plan)
    out["pos_table"] = _table_1d(state, pos_key, dim)
    spec = SourceSpec(
        layout="bert",
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        options=options,
        pos_shape=tuple(out["pos_table"].shape),
        has_cls_pos=False,
        patch_size=None,
        input_norm=True,
        final_norm=False,
    )
    return Remapped(spec, out, tuple(used), tuple(ignored))


# ---------------------------------------------------------------------------------------- clip_text


def _clip_layer_plan(i: int) -> Plan:
    src, dst = f"transformer.resblocks.{i}.", f"blocks.{i}."
    plan: Plan = {
        f"{dst}attn.qkv.weight": (f"{src}attn.in_proj_weight",),
        f"{dst}attn.qkv.bias": (f"{src}attn.in_proj_bias",),
    }
    for wb in _WEIGHT_BIAS:
        for pcpt, clip in (
            ("norm1", "ln_1"),
            ("attn.proj", "attn.out_proj"),
            ("norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            plan[f"{dst}{pcpt}.{wb}"] = (f"{src}{clip}.{wb}",)
    return plan


def remap_clip_text(
    state: Mapping[str, Any], *, num_heads: int | None = None, config: Mapping[str, Any] | None = None
) -> Remapped:
    """OpenAI CLIP text transformer -> pcpt pre-norm QuickGELU blocks (module docstring has the names).

    Args:
        state: the full CLIP state dict (the image tower is ignored).
        num_heads: head count (default width // 64, as in every OpenAI CLIP text tower).
        config: unused (CLIP checkpoints carry no config); accepted for a uniform signature.

    Returns:
        The remap; ``pos_table`` is ``positional_embedding`` (context_length, D).

    Raises:
        SourceError: missing or unknown keys, bad shapes, a head count that does not divide the width.
    """
    del config
    state = _normalise(state, _PREFIXES["clip_text"])
    depth = _depth(state, "transformer.resblocks.")
    plan: Plan = {"norm.weight": ("ln_final.weight",), "norm.bias": ("ln_final.bias",)}
    for i in range(depth):
        plan.update(_clip_layer_plan(i))
    used, ignored = _check_keys(state, _needed(plan, ["positional_embedding"]), "clip_text")
    dim = _vector_dim(state, "ln_final.weight")
    options = BlockOptions(
        mlp_ratio=_mlp_ratio(state, "transformer.resblocks.0.mlp.c_fc.weight", dim),
        qkv_bias=True,
        norm_first=True,
        activation="quick_gelu",
        norm_eps=1e-5,
    )
    out = _rename(state, plan)
    out["pos_table"] = _table_1d(state, "positional_embedding", dim)
    heads = _heads(num_heads, dim, "clip_text")
    spec = SourceSpec(
        layout="clip_text",
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        options=options,
        pos_shape=tuple(out["pos_table"].shape),
        has_cls_pos=False,
        patch_size=None,
        input_norm=False,
        final_norm=True,
    )
    return Remapped(spec, out, tuple(used), tuple(ignored))


# ---------------------------------------------------------------------------------------------- vit

_VIT_CHUNKED = re.compile(r"blocks\.\d+\.(\d+\..+)")


def _unchunk(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """DINOv2 ``blocks.C.N.*`` (block chunks; N is the global index) -> ``blocks.N.*``."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _VIT_CHUNKED.fullmatch(key)
        name = f"blocks.{m.group(1)}" if m else key
        if name in out:
            raise SourceError(f"two keys are both {name!r} once DINOv2 block chunks are flattened")
        out[name] = value
    return out


def _vit_layer_plan(i: int, *, qkv_bias: bool, layer_scale: bool) -> Plan:
    names = [
        f"{m}.{wb}" for m in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for wb in _WEIGHT_BIAS
    ]
    names += ["attn.qkv.weight"] + (["attn.qkv.bias"] if qkv_bias else [])
    names += ["ls1.gamma", "ls2.gamma"] if layer_scale else []
    return {f"blocks.{i}.{n}": (f"blocks.{i}.{n}",) for n in names}


def _split_pos_embed(pos_embed: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
    """``pos_embed`` (1, [1 +] H*W, D) -> (grid (H, W, D), CLS entry (D,) or None); H = W."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or int(pos_embed.shape[2]) != dim:
        raise SourceError(f"pos_embed has shape {tuple(pos_embed.shape)}, expected (1, [1 +] H*W, {dim})")
    length = int(pos_embed.shape[1])
    side = math.isqrt(length)
    extra = length - side * side
    if extra not in (0, 1) or side == 0:
        raise SourceError(
            f"pos_embed has {length} entries: neither a square grid nor a CLS entry + a square grid"
        )
    table = _float(pos_embed[0])
    return table[extra:].reshape(side, side, dim), (table[0] if extra else None)


def _patch_size(state: Mapping[str, Tensor], dim: int) -> int:
    w = state["patch_embed.proj.weight"]
    if w.ndim != 4 or int(w.shape[0]) != dim or w.shape[2] != w.shape[3]:
        raise SourceError(f"patch_embed.proj.weight has shape {tuple(w.shape)}, expected ({dim}, C, p, p)")
    return int(w.shape[2])


def remap_vit(
    state: Mapping[str, Any], *, num_heads: int | None = None, config: Mapping[str, Any] | None = None
) -> Remapped:
    """DINOv2 / timm ViT -> pcpt pre-norm blocks (module docstring has the names).

    Args:
        state: the ViT state dict.
        num_heads: head count (default width // 64, as in DINOv2 and the timm ViTs).
        config: unused; accepted for a uniform signature.

    Returns:
        The remap; ``pos_table`` is the patch grid (H, W, D), ``cls_pos`` the CLS entry (D,) if any.

    Raises:
        SourceError: missing or unknown keys, blocks that disagree on LayerScale or qkv bias, bad shapes.
    """
    del config
    state = _unchunk(_normalise(state, _PREFIXES["vit"]))
    depth = _depth(state, "blocks.")
    qkv_bias = "blocks.0.attn.qkv.bias" in state
    layer_scale = "blocks.0.ls1.gamma" in state
    plan: Plan = {"norm.weight": ("norm.weight",), "norm.bias": ("norm.bias",)}
    for i in range(depth):
        plan.update(_vit_layer_plan(i, qkv_bias=qkv_bias, layer_scale=layer_scale))
    used, ignored = _check_keys(state, _needed(plan, ["pos_embed", "patch_embed.proj.weight"]), "vit")
    dim = _vector_dim(state, "norm.weight")
    options = BlockOptions(
        mlp_ratio=_mlp_ratio(state, "blocks.0.mlp.fc1.weight", dim),
        qkv_bias=qkv_bias,
        norm_first=True,
        layer_scale=1.0 if layer_scale else None,
        activation="gelu",
        norm_eps=1e-6,
    )
    out = _rename(state, plan)
    grid, cls_pos = _split_pos_embed(state["pos_embed"], dim)
    out["pos_table"] = grid
    if cls_pos is not None:
        out["cls_pos"] = cls_pos
    heads = _heads(num_heads, dim, "vit")
    spec = SourceSpec(
        layout="vit",
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        options=options,
        pos_shape=tuple(grid.shape),
        has_cls_pos=cls_pos is not None,
        patch_size=_patch_size(state, dim),
        input_norm=False,
        final_norm=True,
    )
    return Remapped(spec, out, tuple(used), tuple(ignored))


#: layout name -> remap function.
REMAPS: dict[str, Callable[..., Remapped]] = {
    "bert": remap_bert,
    "clip_text": remap_clip_text,
    "vit": remap_vit,
}


def remap(
    layout: str,
    state: Mapping[str, Any],
    *,
    num_heads: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> Remapped:
    """Remaps ``state`` with the named layout's function (see :data:`REMAPS`).

    Raises:
        SourceError: an unknown layout, or the layout's own errors.
    """
    if layout not in REMAPS:
        raise SourceError(f"unknown source layout {layout!r} (one of {', '.join(LAYOUTS)})")
    return REMAPS[layout](state, num_heads=num_heads, config=config)
