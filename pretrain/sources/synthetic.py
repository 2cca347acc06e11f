"""Small random source checkpoints in each official layout, for tests and tiny configs.

:func:`write_random_source` writes the keys and shapes of the real files (Hugging Face BERT with its
``config.json``, OpenAI CLIP incl. a few image-tower keys, DINOv2 ViT incl. ``cls_token`` / ``mask_token``),
so :func:`~pretrain.sources.load_source` exercises the same remap and ignore lists as on the real files.
Values come from a seeded ``torch.Generator``: the same arguments give the same file.

The CLIP and ViT files carry no head count (neither do the official ones): pass ``num_heads`` to
``load_source`` unless the width is a multiple of 64 with 64-wide heads.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from datapipes.files import atomic_write
from pretrain.sources.layouts import LAYOUTS

__all__ = ["random_source_state", "write_random_source", "write_torchscript_state"]

#: default table length (1-D layouts) or grid side (ViT).
_DEFAULT_POSITIONS = {"bert": 16, "clip_text": 16, "vit": 4}
_VOCAB = 50
_TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


class _Draw:
    """Random tensors from one generator: matrices ~ N(0, 1/fan_in), vectors ~ N(0, 0.1²)."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0) -> Tensor:
        return torch.randn(shape, generator=self.gen) * std

    def matrix(self, out: int, inp: int) -> Tensor:
        return self.normal(out, inp, std=inp**-0.5)

    def vector(self, n: int) -> Tensor:
        return self.normal(n, std=0.1)

    def norm_weight(self, n: int) -> Tensor:
        return 1.0 + self.normal(n, std=0.1)

    def linear(self, prefix: str, out: int, inp: int, names: tuple[str, str] = ("weight", "bias")) -> dict:
        return {f"{prefix}{names[0]}": self.matrix(out, inp), f"{prefix}{names[1]}": self.vector(out)}

    def layer_norm(self, prefix: str, n: int) -> dict:
        return {f"{prefix}weight": self.norm_weight(n), f"{prefix}bias": self.vector(n)}


def _bert_state(d: _Draw, dim: int, depth: int, hidden: int, positions: int) -> dict[str, Tensor]:
    state = {
        "embeddings.word_embeddings.weight": d.normal(_VOCAB, dim),
        "embeddings.position_embeddings.weight": d.normal(positions, dim),
        "embeddings.token_type_embeddings.weight": d.normal(2, dim),
        "embeddings.position_ids": torch.arange(positions)[None],
        **d.layer_norm("embeddings.LayerNorm.", dim),
    }
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            state.update(d.linear(f"{p}attention.self.{name}.", dim, dim))
        state.update(d.linear(f"{p}attention.output.dense.", dim, dim))
        state.update(d.layer_norm(f"{p}attention.output.LayerNorm.", dim))
        state.update(d.linear(f"{p}intermediate.dense.", hidden, dim))
        state.update(d.linear(f"{p}output.dense.", dim, hidden))
        state.update(d.layer_norm(f"{p}output.LayerNorm.", dim))
    state.update(d.linear("pooler.dense.", dim, dim))
    return state


def _clip_state(d: _Draw, dim: int, depth: int, hidden: int, positions: int) -> dict[str, Tensor]:
    state = {
        "positional_embedding": d.normal(positions, dim),
        "token_embedding.weight": d.normal(_VOCAB, dim),
        "text_projection": d.matrix(dim, dim),
        "logit_scale": torch.tensor(4.6052),
        **d.layer_norm("ln_final.", dim),
        "visual.class_embedding": d.vector(dim),
        "visual.conv1.weight": d.normal(dim, 3, 4, 4),
        "visual.proj": d.matrix(dim, dim),
    }
    for i in range(depth):
        p = f"transformer.resblocks.{i}."
        state.update(d.linear(f"{p}attn.", 3 * dim, dim, ("in_proj_weight", "in_proj_bias")))
        state.update(d.linear(f"{p}attn.out_proj.", dim, dim))
        state.update(d.layer_norm(f"{p}ln_1.", dim))
        state.update(d.linear(f"{p}mlp.c_fc.", hidden, dim))
        state.update(d.linear(f"{p}mlp.c_proj.", dim, hidden))
        state.update(d.layer_norm(f"{p}ln_2.", dim))
    return state


def _vit_state(
    d: _Draw, dim: int, depth: int, hidden: int, side: int, patch_size: int, layer_scale: bool
) -> dict[str, Tensor]:
    state = {
        "cls_token": d.normal(1, 1, dim, std=0.02),
        "mask_token": d.normal(1, dim, std=0.02),
        "pos_embed": d.normal(1, 1 + side * side, dim),
        "patch_embed.proj.weight": d.normal(dim, 3, patch_size, patch_size, std=0.05),
        "patch_embed.proj.bias": d.vector(dim),
        **d.layer_norm("norm.", dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        state.update(d.layer_norm(f"{p}norm1.", dim))
        state.update(d.linear(f"{p}attn.qkv.", 3 * dim, dim))
        state.update(d.linear(f"{p}attn.proj.", dim, dim))
        state.update(d.layer_norm(f"{p}norm2.", dim))
        state.update(d.linear(f"{p}mlp.fc1.", hidden, dim))
        state.update(d.linear(f"{p}mlp.fc2.", dim, hidden))
        if layer_scale:
            state[f"{p}ls1.gamma"] = 0.5 + torch.rand(dim, generator=d.gen)
            state[f"{p}ls2.gamma"] = 0.5 + torch.rand(dim, generator=d.gen)
    return state


def random_source_state(
    layout: str,
    *,
    embed_dim: int = 32,
    depth: int = 2,
    positions: int | None = None,
    mlp_ratio: float = 4,
    seed: int = 0,
    patch_size: int = 4,
    layer_scale: bool = True,
) -> dict[str, Tensor]:
    """A random state dict with the official key names and shapes of ``layout``.

    Args:
        layout: ``"bert"``, ``"clip_text"`` or ``"vit"``.
        embed_dim: width D.
        depth: number of blocks.
        positions: table length L (1-D layouts; default 16) or grid side S (ViT: ``pos_embed`` has
            1 + S² entries; default 4).
        mlp_ratio: MLP hidden width / D.
        seed: generator seed.
        patch_size: ViT patch size p (``patch_embed.proj.weight`` is (D, 3, p, p)).
        layer_scale: ViT ``ls1.gamma`` / ``ls2.gamma`` (DINOv2 has them, timm ViTs do not).

    Returns:
        Key -> float32 tensor (``embeddings.position_ids`` int64).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown source layout {layout!r} (one of {', '.join(LAYOUTS)})")
    n = _DEFAULT_POSITIONS[layout] if positions is None else positions
    d, hidden = _Draw(seed), int(embed_dim * mlp_ratio)
    if layout == "bert":
        return _bert_state(d, embed_dim, depth, hidden, n)
    if layout == "clip_text":
        return _clip_state(d, embed_dim, depth, hidden, n)
    return _vit_state(d, embed_dim, depth, hidden, n, patch_size, layer_scale)


def _bert_config(state: dict[str, Tensor], num_heads: int, depth: int) -> dict:
    """A Hugging Face ``config.json`` for a BERT state dict."""
    positions, dim = state["embeddings.position_embeddings.weight"].shape
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "hidden_size": int(dim),
        "intermediate_size": int(state["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": int(positions),
        "num_attention_heads": num_heads,
        "num_hidden_layers": depth,
        "position_embedding_type": "absolute",
        "type_vocab_size": 2,
        "vocab_size": _VOCAB,
    }


class _Node(nn.Module):
    """A scriptable container (TorchScript needs a forward on every submodule)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def write_torchscript_state(path: str | Path, state: dict[str, Tensor]) -> Path:
    """Writes ``state`` as a TorchScript archive whose ``state_dict()`` is ``state`` (OpenAI CLIP format).

    Floating tensors become parameters, the others buffers, in a module tree that follows the dotted names.

    Returns:
        The path.
    """
    root = _Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node: nn.Module = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, _Node())
            node = getattr(node, part)
        if value.is_floating_point():
            node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            node.register_buffer(leaf, value.clone())
    out = Path(path)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(root), buffer)
    with atomic_write(out) as f:
        f.write(buffer.getvalue())
    return out


def write_random_source(
    path: str | Path,
    layout: str,
    *,
    embed_dim: int = 32,
    depth: int = 2,
    num_heads: int = 4,
    positions: int | None = None,
    mlp_ratio: float = 4,
    seed: int = 0,
    patch_size: int = 4,
    layer_scale: bool = True,
    dtype: torch.dtype = torch.float32,
    config: bool = True,
    torchscript: bool = False,
) -> Path:
    """Writes a random source checkpoint in the official layout (see :func:`random_source_state`).

    The format follows the suffix: ``.safetensors`` (as Hugging Face ships BERT), anything else
    ``torch.save`` of the plain state dict (DINOv2 ``.pth``, a CLIP state dict) or, with ``torchscript``,
    a TorchScript archive like OpenAI's CLIP ``.pt`` files (which also hold ``input_resolution``,
    ``context_length`` and ``vocab_size``).

    Args:
        path: the file to write.
        layout: ``"bert"``, ``"clip_text"`` or ``"vit"``.
        embed_dim: width D.
        depth: number of blocks.
        num_heads: heads, written to the BERT ``config.json`` (other layouts do not record them).
        positions: see :func:`random_source_state`.
        mlp_ratio: MLP hidden width / D.
        seed: generator seed.
        patch_size: ViT patch size.
        layer_scale: ViT LayerScale keys.
        dtype: floating tensors are stored in this dtype (OpenAI CLIP ships float16).
        config: for ``bert``, also write ``config.json`` next to the file (replacing one that is there).
        torchscript: write a TorchScript archive (``clip_text`` only).

    Returns:
        The path.
    """
    if embed_dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
    if torchscript and layout != "clip_text":
        raise ValueError("torchscript archives are the OpenAI CLIP format: layout must be 'clip_text'")
    state = random_source_state(
        layout,
        embed_dim=embed_dim,
        depth=depth,
        positions=positions,
        mlp_ratio=mlp_ratio,
        seed=seed,
        patch_size=patch_size,
        layer_scale=layer_scale,
    )
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if torchscript:
        extras = dict(zip(_TORCHSCRIPT_EXTRAS, (224, state["positional_embedding"].shape[0], _VOCAB)))
        return write_torchscript_state(out, {**state, **{k: torch.tensor(v) for k, v in extras.items()}})
    with atomic_write(out) as f:
        if out.suffix == ".safetensors":
            f.write(save_safetensors(state, metadata={"format": "pt"}))
        else:
            torch.save(state, f)
    if layout == "bert" and config:
        (out.parent / "config.json").write_text(json.dumps(_bert_config(state, num_heads, depth), indent=2))
    return out
