"""Window attention over sparse BEV tokens: SST layers on FlatFormer flat groups or SST padded windows.

:class:`WindowAttentionLayer` is SST's post-norm encoder layer (Fan et al., CVPR 2022): multi-head attention
inside each group, the positional embedding added to queries and keys but not values, then an FFN; each
branch is followed by a residual and a LayerNorm. Parameter names follow SST / GeoMAE
(``win_attn.self_attn.{in_proj_weight, in_proj_bias, out_proj.*}``, ``linear1``, ``linear2``, ``norm1``,
``norm2``), so official ``backbone.encoder_blocks.{j}.encoder_list.{k}.*`` tensors map one to one to
``layers.{2j + k}.*``.

Groups come from ``pretrain.ops.windows``: FlatFormer's equal-size flat groups (little padding) or SST's
windows padded to bucket sizes. Tokens are gathered into (G, S, D), attend with a key padding mask through
``F.scaled_dot_product_attention`` and are scattered back, every token exactly once.

:class:`WindowTransformer` stacks layers. For ``partition="flat"`` layer ``i`` sorts along ``"x"`` if ``i`` is
even else ``"y"`` and shifts its windows when ``(i // 2) % 2 == 1`` (x, y, x shifted, y shifted, ...); for
``"padded"`` layer ``i`` uses shifted windows when ``i`` is odd (SST's regular / shifted pairs). The
positional embedding is :func:`sine_pos_embed_2d` of the token's position inside its (shifted) window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.ops.windows import (
    DEFAULT_BUCKETS,
    Partition,
    flat_groups,
    in_window_position,
    padding_ratio,
    window_groups,
)

__all__ = [
    "PartitionKind",
    "WindowAttention",
    "WindowAttentionLayer",
    "WindowTransformer",
    "sine_pos_embed_2d",
]

PartitionKind = Literal["flat", "padded"]


def sine_pos_embed_2d(pos: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """SST's 2-D sinusoidal embedding: half the channels for x, half for y, offsets not normalised.

    For each axis with ``L = dim / 2`` channels, channel ``j`` holds ``sin(p / t^(2 floor(j/2) / L))`` for
    even ``j`` and ``cos(...)`` of the same frequency for odd ``j``; the result is ``[embed_x, embed_y]``.

    Args:
        pos: (P, 2) positions (x, y), e.g. :func:`~pretrain.ops.windows.in_window_position`.
        dim: output width, a multiple of 4.
        temperature: frequency base.

    Returns:
        (P, dim) in ``pos``'s dtype (computed in float32).

    Raises:
        ValueError: ``pos`` is not (P, 2) or ``dim`` is not a positive multiple of 4.
    """
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"pos must be (P, 2), got {tuple(pos.shape)}")
    if dim < 4 or dim % 4:
        raise ValueError(f"dim must be a positive multiple of 4, got {dim}")
    length = dim // 2
    steps = torch.arange(length, dtype=torch.float32, device=pos.device)
    inv_freq = temperature ** (2 * torch.div(steps, 2, rounding_mode="floor") / length)
    out = []
    for axis in range(2):
        angle = pos[:, axis, None].float() / inv_freq
        out.append(torch.stack([angle[:, ::2].sin(), angle[:, 1::2].cos()], dim=-1).flatten(1))
    return torch.cat(out, dim=-1).to(pos.dtype if pos.dtype.is_floating_point else torch.float32)


class _PackedProjections(nn.Module):
    """The parameters of ``nn.MultiheadAttention`` with equal q/k/v widths, under the same names."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)


def _check_partitions(partitions: Sequence[Partition]) -> None:
    for part in partitions:
        if part.index.shape != part.valid.shape or part.index.ndim != 2:
            raise ValueError(f"partition index/valid must both be (G, S), got {part.index.shape}")


class WindowAttention(nn.Module):
    """Multi-head self-attention inside the groups of partitions; pos added to q and k, not v.

    Args:
        dim: width; ``num_heads`` must divide it.
        num_heads: heads.
        attn_drop: dropout on the attention probabilities (training only).
    """

    def __init__(self, dim: int, num_heads: int, *, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.self_attn = _PackedProjections(dim)

    def forward(self, x: Tensor, pos: Tensor, partitions: Sequence[Partition]) -> Tensor:
        """Attends within groups.

        Args:
            x: (P, D) tokens.
            pos: (P, D) positional embedding (added to queries and keys).
            partitions: groups covering every token exactly once (valid slots).

        Returns:
            (P, D) attention output (after ``out_proj``).
        """
        _check_partitions(partitions)
        num, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        weight, bias = self.self_attn.in_proj_weight, self.self_attn.in_proj_bias
        qk = F.linear(x + pos, weight[: 2 * dim], bias[: 2 * dim])  # projected once per token, not per slot
        v = F.linear(x, weight[2 * dim :], bias[2 * dim :])
        qkv = torch.cat([qk, v], dim=-1)
        drop = self.attn_drop if self.training else 0.0
        targets, values = [], []
        for part in partitions:
            if part.index.numel() == 0:
                continue
            groups, size = part.index.shape
            # (G, S, 3, H, dh) -> 3 x (G, H, S, dh)
            q, k, val = (
                qkv[part.index].view(groups, size, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            )
            # no mask when nothing is padded (lets CUDA pick a flash kernel)
            mask = None if bool(part.valid.all()) else part.valid[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, val, attn_mask=mask, dropout_p=drop)
            out = out.transpose(1, 2).reshape(groups, size, dim)
            targets.append(part.index[part.valid])
            values.append(out[part.valid])
        if targets:
            attended = torch.cat(values)  # the projections' dtype (bf16 under autocast)
            merged = attended.new_zeros(num, dim).index_copy(0, torch.cat(targets), attended)
        else:
            merged = qkv.new_zeros(num, dim)
        result: Tensor = self.self_attn.out_proj(merged)
        return result


class WindowAttentionLayer(nn.Module):
    """SST's post-norm encoder layer: ``LN(x + Attn(x, pos))``, then ``LN(x + FFN(x))``.

    Args:
        dim: width D.
        num_heads: attention heads (divide D).
        ffn_dim: FFN hidden width.
        dropout: dropout on attention probabilities, inside the FFN and on both residual branches.
        activation: FFN activation.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        dropout: float = 0.0,
        activation: Literal["gelu", "relu"] = "gelu",
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.win_attn = WindowAttention(dim, num_heads, attn_drop=dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.GELU() if activation == "gelu" else nn.ReLU()

    def forward(self, x: Tensor, pos: Tensor, partitions: Sequence[Partition]) -> Tensor:
        """Shapes: x (P, D), pos (P, D) -> (P, D); ``partitions`` cover every token once."""
        x = self.norm1(x + self.dropout1(self.win_attn(x, pos, partitions)))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(x))))
        out: Tensor = self.norm2(x + self.dropout2(ffn))
        return out


class WindowTransformer(nn.Module):
    """A stack of :class:`WindowAttentionLayer` over flat groups (FlatFormer) or padded windows (SST).

    Args:
        dim: width D (a multiple of 4 for the sine embedding).
        depth: number of layers (SST blocks × 2).
        num_heads: attention heads.
        ffn_dim: FFN hidden width.
        window: ``(wx, wy)`` window in grid cells.
        partition: ``"flat"`` (equal-size groups, axis and shift alternating) or ``"padded"`` (SST windows).
        group_size: slots per flat group.
        buckets: bucket sizes of the padded windows.
        dropout: see :class:`WindowAttentionLayer`.
        activation: FFN activation.
        temperature: sine embedding temperature.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        ffn_dim: int,
        window: tuple[int, int],
        partition: PartitionKind = "flat",
        group_size: int = 144,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        *,
        dropout: float = 0.0,
        activation: Literal["gelu", "relu"] = "gelu",
        temperature: float = 10000.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if dim % 4:
            raise ValueError(f"dim must be a multiple of 4 (2-D sine embedding), got {dim}")
        if partition not in ("flat", "padded"):
            raise ValueError(f"partition must be 'flat' or 'padded', got {partition!r}")
        self.dim, self.window, self.partition = dim, (int(window[0]), int(window[1])), partition
        self.group_size, self.buckets, self.temperature = group_size, tuple(buckets), temperature
        self.layers = nn.ModuleList(
            WindowAttentionLayer(dim, num_heads, ffn_dim, dropout=dropout, activation=activation)
            for _ in range(depth)
        )
        for p in self.parameters():  # SST's _reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def layer_config(self, i: int) -> tuple[Literal["x", "y"], bool]:
        """``(axis, shift)`` of layer ``i`` (axis is only used by flat groups)."""
        if self.partition == "flat":
            return ("x" if i % 2 == 0 else "y"), (i // 2) % 2 == 1
        return "x", i % 2 == 1

    @torch.no_grad()
    def partitions(self, coords: Tensor) -> list[list[Partition]]:
        """The groups of every layer (shared between layers with the same configuration).

        Args:
            coords: (P, 3) int ``(batch, ix, iy)``.

        Returns:
            One list of partitions per layer.
        """
        cache: dict[tuple[str, bool], list[Partition]] = {}
        out = []
        for i in range(len(self.layers)):
            axis, shift = self.layer_config(i)
            if (axis, shift) not in cache:
                if self.partition == "flat":
                    cache[axis, shift] = [
                        flat_groups(
                            coords, window=self.window, group_size=self.group_size, axis=axis, shift=shift
                        )
                    ]
                else:
                    cache[axis, shift] = window_groups(
                        coords, window=self.window, shift=shift, buckets=self.buckets
                    )
            out.append(cache[axis, shift])
        return out

    def padding_overhead(self, coords: Tensor) -> float:
        """Mean over layers of padded slots / tokens for this token set (benchmarks)."""
        per_layer = [padding_ratio(parts) for parts in self.partitions(coords)]
        return sum(per_layer) / len(per_layer)

    def forward(self, x: Tensor, coords: Tensor) -> Tensor:
        """Runs every layer.

        Args:
            x: (P, D) tokens.
            coords: (P, 3) int ``(batch, ix, iy)`` of the tokens (unique rows).

        Returns:
            (P, D).
        """
        if x.ndim != 2 or coords.shape != (x.shape[0], 3):
            raise ValueError(
                f"x must be (P, D) and coords (P, 3), got {tuple(x.shape)}, {tuple(coords.shape)}"
            )
        if x.shape[0] == 0:
            return x
        pos: dict[bool, Tensor] = {}
        for i, (layer, parts) in enumerate(zip(self.layers, self.partitions(coords))):
            shift = self.layer_config(i)[1]
            if shift not in pos:
                where = in_window_position(coords, window=self.window, shift=shift)
                pos[shift] = sine_pos_embed_2d(where, self.dim, self.temperature).to(x.dtype)
            x = layer(x, pos[shift], parts)
        return x

    def extra_repr(self) -> str:
        groups = f"group_size={self.group_size}" if self.partition == "flat" else f"buckets={self.buckets}"
        return f"window={self.window}, partition={self.partition!r}, {groups}"
