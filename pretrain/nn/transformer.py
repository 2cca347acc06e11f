"""Transformer blocks with timm-0.4.5 parameter names, configurable the ways pcpt's encoders differ.

Names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; ``ls1.gamma`` /
``ls2.gamma`` with LayerScale) match the official Point-BERT / Point-MAE checkpoints. :class:`BlockOptions`
holds what varies between families: pre- or post-norm, qkv bias, attention and residual-branch dropouts,
LayerScale, the MLP activation and the LayerNorm epsilon. The defaults are the official Point-BERT / Point-MAE
block (pre-norm, no qkv bias, no dropout, exact GELU, eps 1e-5). Attention runs through
``F.scaled_dot_product_attention``.

Blocks take per-block context: a :class:`Block` may carry adapters (modules added to its MLP branch or its
output, e.g. parameter-efficient finetuning of a frozen block) that receive the context, and a
:class:`CrossAttentionBlock` attends from its tokens to a context sequence (Perceiver-style encoders).
:func:`run_blocks` is the loop every encoder and decoder uses: positional embedding added before every
block (Point-BERT / Point-MAE) or once at the input, intermediate outputs captured on request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ADAPTER_SITES",
    "Attention",
    "Block",
    "BlockOptions",
    "CrossAttention",
    "CrossAttentionBlock",
    "DropPath",
    "LayerScale",
    "Mlp",
    "drop_path_rates",
    "run_blocks",
]

Activation = Literal["gelu", "gelu_tanh", "quick_gelu", "relu"]
#: where a :class:`Block` adds an adapter's output: to its MLP branch, or to its output.
ADAPTER_SITES = ("mlp", "output")


@dataclass(frozen=True)
class BlockOptions:
    """How a transformer block is built (spec fields of every transformer encoder family).

    Attributes:
        mlp_ratio: MLP hidden width as a multiple of the block width.
        qkv_bias: bias on the qkv projection (False in Point-BERT / Point-MAE, True in BERT / ViT).
        norm_first: pre-norm (``x + f(LN(x))``, ViT) or post-norm (``LN(x + f(x))``, BERT, SST).
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout on each residual branch's output before it is added (attention and MLP).
        layer_scale: initial value of LayerScale (a learned per-channel scale on each branch), or None.
        activation: MLP activation (``gelu`` exact, ``gelu_tanh``, ``quick_gelu`` as in CLIP, ``relu``).
        norm_eps: LayerNorm epsilon.
    """

    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    norm_first: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    layer_scale: float | None = None
    activation: Activation = "gelu"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("attn_drop", "proj_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.activation not in ("gelu", "gelu_tanh", "quick_gelu", "relu"):
            raise ValueError(
                f"activation must be gelu, gelu_tanh, quick_gelu or relu, got {self.activation!r}"
            )
        if self.layer_scale is not None and not self.layer_scale > 0:
            raise ValueError(f"layer_scale must be > 0 or None, got {self.layer_scale}")


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic-depth rate per block: ``linspace(0, drop_path, depth)`` (timm / official)."""
    return [float(r) for r in torch.linspace(0.0, drop_path, depth)]


class DropPath(nn.Module):
    """Stochastic depth: zeroes the whole residual branch of a sample with probability ``p`` in training.

    Kept samples are scaled by ``1 / (1 - p)``. Like ``nn.Dropout`` it draws from the default generator of
    the tensor's device, which pcpt's training modules re-seed from the step before every training step.

    Args:
        p: drop probability in [0, 1).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (B, ...) -> (B, ...)."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """A learned per-channel scale ``gamma`` of a residual branch (CaiT / DINOv2), initialised to ``init``."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (..., dim) -> (..., dim)."""
        return x * self.gamma


class _QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: Activation) -> nn.Module:
    if name == "quick_gelu":
        return _QuickGELU()
    if name == "relu":
        return nn.ReLU()
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


class Mlp(nn.Module):
    """fc1 → activation → fc2.

    Args:
        dim: input and output width.
        hidden: hidden width.
        activation: see :class:`BlockOptions`.
    """

    def __init__(self, dim: int, hidden: int, activation: Activation = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _activation(activation)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (B, L, dim) -> (B, L, dim)."""
        out: Tensor = self.fc2(self.act(self.fc1(x)))
        return out


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, L, H * dh) -> (B, H, L, dh)."""
    batch, length, dim = x.shape
    return x.view(batch, length, num_heads, dim // num_heads).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; scale head_dim^-0.5.

    Args:
        dim: width; must be divisible by ``num_heads``.
        num_heads: number of heads.
        qkv_bias: bias on the qkv projection (False in the official Point-BERT / Point-MAE models).
        attn_drop: dropout on the attention probabilities (training only).
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Shapes: x (B, L, dim), attn_mask bool (B or 1, 1 or H, L, L), True = may attend -> (B, L, dim)."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, dh)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        proj: Tensor = self.proj(out.transpose(1, 2).reshape(batch, length, dim))
        return proj

    def forward_tail(self, x: Tensor, count: int) -> Tensor:
        """``forward(x)[:, -count:]``, computing queries and the output projection for those tokens only.

        Shapes: x (B, L, dim) -> (B, count, dim). Keys and values still come from all L tokens.
        """
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        bias = self.qkv.bias
        q = F.linear(x[:, -count:], self.qkv.weight[:dim], None if bias is None else bias[:dim])
        kv = F.linear(x, self.qkv.weight[dim:], None if bias is None else bias[dim:])
        k, v = kv.reshape(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = q.reshape(batch, count, heads, head_dim).transpose(1, 2)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        proj: Tensor = self.proj(out.transpose(1, 2).reshape(batch, count, dim))
        return proj


class CrossAttention(nn.Module):
    """Multi-head attention from queries to a context sequence (keys and values), bias-free q/k/v.

    Args:
        dim: query width and output width.
        num_heads: heads; must divide ``dim``.
        context_dim: width of the context tokens (default ``dim``).
        qkv_bias: bias on the q, k and v projections.
        attn_drop: dropout on the attention probabilities (training only).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """Shapes: x (B, L, dim), context (B, M, C), context_mask bool (B, M) True = valid -> (B, L, dim)."""
        k, v = self.kv(context).chunk(2, dim=-1)
        mask = None if context_mask is None else context_mask[:, None, None, :]
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(
            _heads(self.q(x), self.num_heads),
            _heads(k, self.num_heads),
            _heads(v, self.num_heads),
            attn_mask=mask,
            dropout_p=drop,
        )
        batch, _, length, _ = out.shape
        proj: Tensor = self.proj(out.transpose(1, 2).reshape(batch, length, -1))
        return proj


class Block(nn.Module):
    """Transformer block: self-attention then MLP, each a residual branch, pre- or post-norm.

    Pre-norm: ``x + DropPath(LS(Drop(Attn(LN(x)))))``, then the same with the MLP. Post-norm:
    ``LN(x + DropPath(LS(Drop(Attn(x)))))``, then the same with the MLP.

    Adapters (see :meth:`attach_adapter`) receive ``(tensor, context)`` and return a residual: an ``"mlp"``
    adapter gets the finished MLP branch ``b = DropPath(LS(Drop(MLP(.))))`` and the block adds ``b + A(b)``
    (Any2Point's ``x + x_ffn + s·Adapter(x_ffn)``, with LayerScale and drop path inside ``x_ffn`` as in its
    DINOv2 blocks); an ``"output"`` adapter's output is added to the block output.

    Args:
        dim: width.
        num_heads: attention heads.
        options: see :class:`BlockOptions`.
        drop_path: stochastic-depth probability of this block.
        mlp_ratio: overrides ``options.mlp_ratio`` (kept for call sites that only set the ratio).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        options: BlockOptions | None = None,
        drop_path: float = 0.0,
        mlp_ratio: float | None = None,
    ) -> None:
        super().__init__()
        options = options or BlockOptions()
        ratio = options.mlp_ratio if mlp_ratio is None else mlp_ratio
        self.norm_first = options.norm_first
        self.norm1 = nn.LayerNorm(dim, eps=options.norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=options.qkv_bias, attn_drop=options.attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=options.norm_eps)
        self.mlp = Mlp(dim, int(dim * ratio), options.activation)
        self.drop_path = DropPath(drop_path)
        self.dropout = nn.Dropout(options.proj_drop) if options.proj_drop > 0 else nn.Identity()
        self.ls1: nn.Module = nn.Identity()
        self.ls2: nn.Module = nn.Identity()
        if options.layer_scale is not None:
            self.ls1, self.ls2 = LayerScale(dim, options.layer_scale), LayerScale(dim, options.layer_scale)
        self.adapters = nn.ModuleDict()

    def attach_adapter(self, site: str, adapter: nn.Module) -> None:
        """Adds ``adapter`` at ``site`` (``"mlp"`` or ``"output"``), as ``adapters.<site>``.

        Raises:
            ValueError: an unknown site, or a site that already has an adapter.
        """
        if site not in ADAPTER_SITES:
            raise ValueError(f"adapter site must be one of {ADAPTER_SITES}, got {site!r}")
        if site in self.adapters:
            raise ValueError(f"this block already has an adapter at {site!r}")
        self.adapters[site] = adapter

    def _branch(self, out: Tensor, scale: nn.Module) -> Tensor:
        result: Tensor = self.drop_path(scale(self.dropout(out)))
        return result

    def forward_tail(self, x: Tensor, count: int) -> Tensor:
        """``forward(x)[:, -count:]``: the last ``count`` tokens' outputs, attending to all tokens.

        A pre-norm block without adapters computes the queries, the output projection and the MLP for those
        tokens only (the Point-MAE decoder keeps only the masked tokens of its last block: 60 % of its rows);
        other blocks run in full and are sliced. Shapes: x (B, L, dim) -> (B, count, dim).
        """
        if not self.norm_first or len(self.adapters):
            return self(x)[:, -count:]
        y = x[:, -count:] + self._branch(self.attn.forward_tail(self.norm1(x), count), self.ls1)
        return y + self._branch(self.mlp(self.norm2(y)), self.ls2)

    def forward(self, x: Tensor, *, context: Any = None, attn_mask: Tensor | None = None) -> Tensor:
        """Shapes: x (B, L, dim) -> (B, L, dim); ``context`` goes to the adapters only."""
        if self.norm_first:
            x = x + self._branch(self.attn(self.norm1(x), attn_mask), self.ls1)
            out = self.mlp(self.norm2(x))
        else:
            x = self.norm1(x + self._branch(self.attn(x, attn_mask), self.ls1))
            out = self.mlp(x)
        branch = self._branch(out, self.ls2)
        if "mlp" in self.adapters:  # on the finished MLP branch; its output is added as is (Any2Point)
            branch = branch + self.adapters["mlp"](branch, context)
        x = x + branch
        if not self.norm_first:
            x = self.norm2(x)
        if "output" in self.adapters:
            x = x + self.adapters["output"](x, context)
        return x


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention from tokens to a context, then an MLP (the first layer of a Perceiver).

    ``x + Drop(CrossAttn(LN_q(x), LN_kv(context)))``, then ``x + Drop(MLP(LN(x)))``.

    Args:
        dim: token width.
        num_heads: heads.
        context_dim: context width (default ``dim``).
        options: see :class:`BlockOptions` (pre-norm only).
        drop_path: stochastic-depth probability of this block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_dim: int | None = None,
        options: BlockOptions | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        options = options or BlockOptions()
        if not options.norm_first:
            raise ValueError("CrossAttentionBlock is pre-norm only (options.norm_first=True)")
        self.norm_q = nn.LayerNorm(dim, eps=options.norm_eps)
        self.norm_kv = nn.LayerNorm(context_dim or dim, eps=options.norm_eps)
        self.attn = CrossAttention(
            dim, num_heads, context_dim=context_dim, qkv_bias=options.qkv_bias, attn_drop=options.attn_drop
        )
        self.norm2 = nn.LayerNorm(dim, eps=options.norm_eps)
        self.mlp = Mlp(dim, int(dim * options.mlp_ratio), options.activation)
        self.drop_path = DropPath(drop_path)
        self.dropout = nn.Dropout(options.proj_drop) if options.proj_drop > 0 else nn.Identity()

    def forward(self, x: Tensor, *, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """Shapes: x (B, L, dim), context (B, M, C), context_mask bool (B, M) -> (B, L, dim)."""
        x = x + self.drop_path(self.dropout(self.attn(self.norm_q(x), self.norm_kv(context), context_mask)))
        out: Tensor = x + self.drop_path(self.dropout(self.mlp(self.norm2(x))))
        return out


def run_blocks(
    blocks: Iterable[nn.Module],
    x: Tensor,
    pos: Tensor | None,
    *,
    pos_every_block: bool = True,
    contexts: Sequence[Any] | None = None,
    capture: Sequence[int] = (),
    skip: int = 0,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Runs a trunk of blocks: the loop shared by every pcpt encoder and decoder.

    Args:
        blocks: the blocks, called as ``block(x, context=...)`` when ``contexts`` is given, else ``block(x)``.
        x: (B, L, D) tokens.
        pos: (B, L, D) positional embedding, or None.
        pos_every_block: add ``pos`` before every block (Point-BERT / Point-MAE) instead of once at the input.
        contexts: one context per block (adapters' inputs), or None.
        capture: block indices (already non-negative) whose outputs are returned.
        skip: leading tokens (a CLS token) left out of the captured outputs.

    Returns:
        ``(output (B, L, D), {block index: captured (B, L - skip, D)})``.
    """
    blocks = list(blocks)
    if contexts is not None and len(contexts) != len(blocks):
        raise ValueError(f"contexts has {len(contexts)} entries for {len(blocks)} blocks")
    if pos is not None and not pos_every_block:
        x = x + pos
    captured: dict[int, Tensor] = {}
    wanted = set(capture)
    for i, block in enumerate(blocks):
        inp = x + pos if pos is not None and pos_every_block else x
        x = block(inp) if contexts is None else block(inp, context=contexts[i])
        if i in wanted:
            captured[i] = x[:, skip:]
    return x, captured
