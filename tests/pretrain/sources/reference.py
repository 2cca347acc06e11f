"""Independent forward passes of the official source layouts, written from the raw state dicts.

Nothing here uses pcpt's blocks: BERT layers are separate q/k/v matmuls with post-LayerNorm, CLIP
resblocks use ``nn.MultiheadAttention(batch_first=True)`` loaded with the ``in_proj`` weights, ViT blocks
are pre-norm with LayerScale and an erf GELU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = Mapping[str, Tensor]


def _linear(sd: State, name: str, x: Tensor) -> Tensor:
    return x @ sd[f"{name}.weight"].float().T + sd[f"{name}.bias"].float()


def _ln(sd: State, name: str, x: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"].float(), sd[f"{name}.bias"].float(), eps)


def _erf_gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    batch, length, dim = q.shape
    dh = dim // heads

    def split(t: Tensor) -> Tensor:
        return t.reshape(batch, length, heads, dh).permute(0, 2, 1, 3)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dh)
    return (scores.softmax(dim=-1) @ split(v)).permute(0, 2, 1, 3).reshape(batch, length, dim)


def bert_layer(sd: State, i: int, x: Tensor, heads: int, eps: float = 1e-12) -> Tensor:
    """One Hugging Face ``BertLayer`` (post-norm, exact GELU)."""
    p = f"encoder.layer.{i}."
    q, k, v = (_linear(sd, f"{p}attention.self.{n}", x) for n in ("query", "key", "value"))
    ctx = _softmax_attention(q, k, v, heads)
    h = _ln(sd, f"{p}attention.output.LayerNorm", x + _linear(sd, f"{p}attention.output.dense", ctx), eps)
    inter = _erf_gelu(_linear(sd, f"{p}intermediate.dense", h))
    return _ln(sd, f"{p}output.LayerNorm", h + _linear(sd, f"{p}output.dense", inter), eps)


def clip_resblock(sd: State, i: int, x: Tensor, heads: int) -> Tensor:
    """One OpenAI CLIP ``ResidualAttentionBlock`` (pre-norm, QuickGELU), batch-first, no mask."""
    p = f"transformer.resblocks.{i}."
    dim = x.shape[-1]
    mha = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(sd[f"{p}attn.in_proj_weight"].float())
        mha.in_proj_bias.copy_(sd[f"{p}attn.in_proj_bias"].float())
        mha.out_proj.weight.copy_(sd[f"{p}attn.out_proj.weight"].float())
        mha.out_proj.bias.copy_(sd[f"{p}attn.out_proj.bias"].float())
    h = _ln(sd, f"{p}ln_1", x, 1e-5)
    x = x + mha(h, h, h, need_weights=False)[0]
    hidden = _linear(sd, f"{p}mlp.c_fc", _ln(sd, f"{p}ln_2", x, 1e-5))
    return x + _linear(sd, f"{p}mlp.c_proj", hidden * torch.sigmoid(1.702 * hidden))


def vit_block(sd: State, i: int, x: Tensor, heads: int) -> Tensor:
    """One DINOv2 / timm ViT block (pre-norm, erf GELU, LayerScale when the file has it)."""
    p = f"blocks.{i}."

    def scale(name: str, t: Tensor) -> Tensor:
        return t * sd[f"{p}{name}.gamma"].float() if f"{p}{name}.gamma" in sd else t

    q, k, v = _linear(sd, f"{p}attn.qkv", _ln(sd, f"{p}norm1", x, 1e-6)).chunk(3, dim=-1)
    x = x + scale("ls1", _linear(sd, f"{p}attn.proj", _softmax_attention(q, k, v, heads)))
    hidden = _erf_gelu(_linear(sd, f"{p}mlp.fc1", _ln(sd, f"{p}norm2", x, 1e-6)))
    return x + scale("ls2", _linear(sd, f"{p}mlp.fc2", hidden))


def _run(block: Callable[[int, Tensor], Tensor], depth: int, h: Tensor, pos: Tensor | None) -> Tensor:
    for i in range(depth):
        h = block(i, h if pos is None else h + pos)
    return h


def reference_forward(
    layout: str, sd: State, x: Tensor, pos: Tensor | None, heads: int, depth: int
) -> Tensor:
    """``norm(blocks(input_norm(x)))`` with ``pos`` added before every block, from the raw state dict."""
    with torch.no_grad():
        if layout == "bert":
            h = _ln(sd, "embeddings.LayerNorm", x, 1e-12)
            return _run(lambda i, t: bert_layer(sd, i, t, heads), depth, h, pos)
        if layout == "clip_text":
            h = _run(lambda i, t: clip_resblock(sd, i, t, heads), depth, x, pos)
            return _ln(sd, "ln_final", h, 1e-5)
        h = _run(lambda i, t: vit_block(sd, i, t, heads), depth, x, pos)
        return _ln(sd, "norm", h, 1e-6)
