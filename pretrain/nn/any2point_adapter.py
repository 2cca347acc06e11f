"""Any2Point's adapters of a frozen transformer block: bottleneck adapter and the any-to-3D guided adapter.

Any2Point (Tang et al., ECCV 2024; official ``models/layers/attention.py:ResidualAttentionBlock`` and the
DINOv2 / ImageBind ``Block``) fine-tunes a frozen 1D / 2D / audio transformer on point tokens. Each block
``x ← x + Attn(x)``, ``x ← x + FFN + s · Adapter(FFN)``, then the guided adapter adds
``coef · Σ_v w_v x_v`` to the patch tokens (the CLS token bypasses it). In pcpt these are two adapters of a
:class:`pretrain.nn.transformer.Block`:

- :class:`BottleneckAdapter` at site ``"mlp"`` (it reads the finished MLP branch, after drop path and
  LayerScale, and its output, already scaled by ``s``, is added next to it; official ``AdapterSuper_noout``);
- :class:`GuidedAdapter` at site ``"output"`` (its output is added to the block output), which needs a
  :class:`GuidedContext` computed once per forward from the token centres (:func:`guided_context_1d`,
  :func:`guided_context_2d`) and passed to every block (``run_blocks(..., contexts=[ctx] * depth)``).

Guided adapter, for the G patch tokens ``x`` (B, G, D) of the block output:

1. 3D prior: per voxel cluster of the token centres (:func:`pretrain.ops.voxel_cluster.voxel_cluster`),
   ``max + mean`` of the token features → ``BatchNorm1d`` over the occupied clusters of the batch → exact
   GELU (``out_transform_3d``) → broadcast back to the tokens: ``x_3d`` (B, G, D).
2. per view v (6): ``h = x + attn1[v](norm3[v](x), same cell)``, a small attention (inner width ``attn_dim``
   12, 6 heads, scale ``attn_dim^-0.5``) in which a token attends only to the tokens of its cell in view v;
   cell-wise mean (or max + mean) of ``h`` → ``BatchNorm1d`` over **all** ``B × num_cells`` cells of the
   batch, empty ones as zero rows (official ``scatter_mean(..., dim_size=B * grid_shape)``) → GELU
   (``out_transform_1d[v]``) → broadcast: ``x_v`` (B, G, D).
3. ``w_v = (cos(x_v, x_3d) + 1) / 2`` normalised over the views; residual ``coef · Σ_v w_v x_v``. ``x_3d``
   only weighs the views: the official code does not add it to the tokens.

No operation mixes samples except ``BatchNorm1d`` in training mode (batch statistics over clusters / cells of
the whole batch, as the official model); in eval mode a sample's output does not depend on its batch-mates.

Module names follow the official parameter names so that trainable parts are selected by module. Official
``adapter.ln1`` / ``adapter.ln2`` are :class:`BottleneckAdapter`'s ``down`` / ``up`` (in a block:
``adapters.mlp.down`` / ``adapters.mlp.up``); :class:`GuidedAdapter` (``adapters.output``) holds ``attn1``
(``ModuleList`` of :class:`CellAttention`, ``qkv`` / ``proj`` as official), ``norm3`` (``ModuleList`` of
``LayerNorm``), ``out_transform_3d`` and ``out_transform_1d`` (``ModuleList``; official ``out_transform_2d``
in the 2D variants). The official model owns ``attn1`` / ``norm3`` once in the encoder and shares them
between all blocks: build them with :func:`make_view_attention` and pass the same pair to every
:class:`GuidedAdapter` to reproduce that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.nn.transformer import Activation, _activation
from pretrain.ops.virtual_projection import (
    CLIP_TEXT_LENGTH,
    cells_1d,
    cells_2d,
    num_cells_1d,
    num_cells_2d,
    pixels_2d,
    project_to_views,
    raw_positions_1d,
)
from pretrain.ops.voxel_cluster import (
    gather_segments,
    same_cell_mask,
    segment_counts,
    segment_reduce,
    voxel_cluster,
)

__all__ = [
    "BottleneckAdapter",
    "CellAttention",
    "GuidedAdapter",
    "GuidedContext",
    "guided_context_1d",
    "guided_context_2d",
    "make_view_attention",
]


@dataclass(frozen=True)
class GuidedContext:
    """What every block's :class:`GuidedAdapter` needs, computed once per forward from the token centres.

    Attributes:
        voxel_ids: (B, G) int64 voxel cluster of each patch token, dense per sample (``voxel_cluster``).
        view_cells: (B, V, G) int64 cell of each patch token in each view, in ``[0, num_cells)``.
        has_cls: token 0 of the block input is a CLS token, which bypasses the guided branches (its
            residual is zero); the G patch tokens follow it.
        num_cells: cells per view (official ``grid_shape``; ``num_cells_1d`` / ``num_cells_2d``). It only
            matters in training mode, where the per-view ``BatchNorm1d`` sees every cell of the batch,
            empty ones as zero rows; None: ``view_cells.max() + 1``.
    """

    voxel_ids: Tensor
    view_cells: Tensor
    has_cls: bool
    num_cells: int | None = None

    def __post_init__(self) -> None:
        if self.voxel_ids.ndim != 2 or self.view_cells.ndim != 3:
            raise ValueError(
                f"voxel_ids must be (B, G) and view_cells (B, V, G), got {tuple(self.voxel_ids.shape)} "
                f"and {tuple(self.view_cells.shape)}"
            )
        b, _, g = self.view_cells.shape
        if self.voxel_ids.shape != (b, g):
            raise ValueError(
                f"voxel_ids {tuple(self.voxel_ids.shape)} does not match view_cells (B={b}, G={g})"
            )
        if self.voxel_ids.dtype != torch.long or self.view_cells.dtype != torch.long:
            raise ValueError("voxel_ids and view_cells must be int64")
        if (
            self.num_cells is not None
            and self.view_cells.numel()
            and int(self.view_cells.max()) >= self.num_cells
        ):
            raise ValueError(f"view_cells must be < num_cells={self.num_cells}")


def guided_context_1d(
    centers: Tensor,
    *,
    voxel_size: float,
    direction: Sequence[float],
    translation: float = -1.6,
    cell: float = 2.0,
    length: int = CLIP_TEXT_LENGTH,
    has_cls: bool = True,
) -> GuidedContext:
    """The guided context of the 1D (language) variant: voxel clusters and cells of the raw 1D positions.

    Args:
        centers: (B, G, 3) token centres.
        voxel_size: ``--coef_3dgird`` (0.08 CLIP ScanObjectNN, 0.16 others).
        direction: ``--pos_cor`` ((−1, 0, 1) ScanObjectNN, (1, −1, 0) ModelNet).
        translation: ``TRANS`` (−1.6).
        cell: ``--coef_1dgird`` (2).
        length: 1D table length (77).
        has_cls: the block input starts with a CLS token.

    Returns:
        A :class:`GuidedContext` with ``ceil(length / cell)`` cells per view.
    """
    raw = raw_positions_1d(project_to_views(centers, translation), direction, length)
    return GuidedContext(
        voxel_ids=voxel_cluster(centers, voxel_size),
        view_cells=cells_1d(raw, cell),
        has_cls=has_cls,
        num_cells=num_cells_1d(cell, length),
    )


def guided_context_2d(
    centers: Tensor,
    *,
    voxel_size: float,
    canvas: tuple[int, int],
    cell: int,
    translation: float,
    has_cls: bool = True,
) -> GuidedContext:
    """The guided context of the 2D (image, audio) variants: voxel clusters and pixel cells of each view.

    Args:
        centers: (B, G, 3) token centres.
        voxel_size: ``--coef_3dgird`` (0.16).
        canvas: ``(H, W)`` virtual canvas ((518, 518) DINOv2, (304, 192) ImageBind audio).
        cell: ``--coef_2dgird`` in pixels (26 DINOv2, 16 ImageBind).
        translation: ``--trans`` (−1.8 DINOv2 ScanObjectNN, −1.4 others).
        has_cls: the block input starts with a CLS token.

    Returns:
        A :class:`GuidedContext` with ``ceil(W / cell) · ceil(H / cell)`` cells per view.
    """
    pixels = pixels_2d(project_to_views(centers, translation), canvas)
    return GuidedContext(
        voxel_ids=voxel_cluster(centers, voxel_size),
        view_cells=cells_2d(pixels, cell, canvas),
        has_cls=has_cls,
        num_cells=num_cells_2d(cell, canvas),
    )


class BottleneckAdapter(nn.Module):
    """``scale · up(drop(act(down(x))))``: Any2Point's FFN adapter (official ``AdapterSuper_noout``).

    Initialised as the official adapter: xavier-uniform weights, biases ~ N(0, ``bias_std``). (The official
    encoder then re-initialises every ``nn.Linear`` of the model, adapters included, with xavier-uniform
    weights and zero biases before loading the frozen source weights; ``bias_std=0`` reproduces that.)

    Args:
        dim: token width.
        bottleneck: hidden width (16 CLIP, 8 DINOv2 / ImageBind, 12 ImageBind ScanObjectNN script).
        scale: output scale ``s`` (``--scale_factor``: 0.3, or 1.0).
        dropout: dropout after the activation (official 0.1).
        activation: ``quick_gelu`` as official, or another :data:`pretrain.nn.transformer.Activation`.
        bias_std: standard deviation of the initial biases.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        scale: float,
        dropout: float = 0.1,
        activation: Activation = "quick_gelu",
        *,
        bias_std: float = 1e-6,
    ) -> None:
        super().__init__()
        if dim < 1 or bottleneck < 1:
            raise ValueError(f"dim and bottleneck must be >= 1, got {dim} and {bottleneck}")
        self.scale = float(scale)
        self.down = nn.Linear(dim, bottleneck)
        self.act = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        for layer in (self.down, self.up):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=bias_std)

    def forward(self, x: Tensor, context: object = None) -> Tensor:
        """Shapes: x (B, T, D) -> (B, T, D); ``context`` is ignored (the adapter interface passes it)."""
        out: Tensor = self.up(self.dropout(self.act(self.down(x))))
        return self.scale * out

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class CellAttention(nn.Module):
    """The per-view local attention (official ``Attention1``): tokens attend only inside their cell.

    ``qkv``: Linear(D, 3 · attn_dim), ``num_heads`` heads of width ``attn_dim / num_heads``, scores scaled
    by ``attn_dim^-0.5`` (the official scale uses the inner width, not the head width), ``proj``:
    Linear(attn_dim, D). Masked pairs get −inf (official: −1e5 added, the same probabilities in float32:
    every token attends at least to itself). Xavier-uniform weights and zero biases (the official model's
    effective initialisation).

    Args:
        dim: token width D.
        attn_dim: inner width (``--attn1d_dim`` / ``--attn2d_dim``, 12).
        num_heads: heads (official 6); must divide ``attn_dim``.
        qkv_bias: bias on ``qkv`` (the official configs set ``qkv_bias: True``).
        proj_drop: dropout on the output (official ``drop_rate`` 0).
    """

    def __init__(
        self,
        dim: int,
        attn_dim: int = 12,
        num_heads: int = 6,
        *,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if attn_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide attn_dim={attn_dim}")
        self.num_heads, self.attn_dim = num_heads, attn_dim
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        for layer in (self.qkv, self.proj):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Shapes: x (N, G, D), mask bool (N, G, G) True = may attend -> (N, G, D)."""
        n, g, _ = x.shape
        qkv = self.qkv(x).reshape(n, g, 3, self.num_heads, self.attn_dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, G, dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), scale=self.attn_dim**-0.5)
        result: Tensor = self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, g, self.attn_dim)))
        return result


def make_view_attention(
    dim: int, num_views: int = 6, attn_dim: int = 12, num_heads: int = 6, *, qkv_bias: bool = True
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """One :class:`CellAttention` and one ``LayerNorm`` per view: ``(attn1, norm3)``.

    Pass the same pair to the :class:`GuidedAdapter` of every block to share them between blocks, as the
    official encoder does.
    """
    attn1 = nn.ModuleList(
        [CellAttention(dim, attn_dim, num_heads, qkv_bias=qkv_bias) for _ in range(num_views)]
    )
    norm3 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_views)])
    return attn1, norm3


def _bn_gelu(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(dim), nn.GELU())


class GuidedAdapter(nn.Module):
    """Any2Point's any-to-3D guided adapter, used as a :class:`~pretrain.nn.transformer.Block` output adapter.

    See the module docstring for the computation. Returns ``coef · Σ_v w_v x_v`` for the patch tokens and 0
    for the CLS token.

    Args:
        dim: token width D.
        num_views: views V (6).
        attn_dim: inner width of the per-view attention (12).
        attn_heads: heads of the per-view attention (6).
        qkv_bias: bias on the per-view attention's ``qkv``.
        coef: ``coef_pro`` (0.3 CLIP ScanObjectNN, 0.5 CLIP ModelNet / ImageBind ScanObjectNN, 0.7 DINOv2
            ScanObjectNN, 0.1 others).
        reduce_1d: per-cell pooling of the view branch: ``"mean"`` (official default) or ``"maxmean"``
            (``--maxmean_1d`` / ``--maxmean_2d``: max + mean).
        attn1: a shared ``ModuleList`` of V :class:`CellAttention` (see :func:`make_view_attention`), or None
            to own fresh ones.
        norm3: the matching shared ``ModuleList`` of V ``LayerNorm``, or None.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_views: int = 6,
        attn_dim: int = 12,
        attn_heads: int = 6,
        qkv_bias: bool = True,
        coef: float = 0.1,
        reduce_1d: Literal["mean", "maxmean"] = "mean",
        attn1: nn.ModuleList | None = None,
        norm3: nn.ModuleList | None = None,
    ) -> None:
        super().__init__()
        if reduce_1d not in ("mean", "maxmean"):
            raise ValueError(f"reduce_1d must be 'mean' or 'maxmean', got {reduce_1d!r}")
        if (attn1 is None) != (norm3 is None):
            raise ValueError("pass both attn1 and norm3 (shared view attention) or neither")
        if attn1 is None or norm3 is None:
            attn1, norm3 = make_view_attention(dim, num_views, attn_dim, attn_heads, qkv_bias=qkv_bias)
        if len(attn1) != num_views or len(norm3) != num_views:
            raise ValueError(f"attn1 and norm3 must hold num_views={num_views} modules")
        self.num_views, self.coef, self.reduce_1d = num_views, float(coef), reduce_1d
        self.attn1 = attn1
        self.norm3 = norm3
        self.out_transform_3d = _bn_gelu(dim)
        self.out_transform_1d = nn.ModuleList([_bn_gelu(dim) for _ in range(num_views)])

    def voxel_branch(self, tokens: Tensor, voxel_ids: Tensor) -> Tensor:
        """The 3D-prior feature ``x_3d``: per-cluster max + mean → BN (occupied clusters) + GELU → broadcast.

        In training mode the batch must hold at least two occupied clusters in all (``BatchNorm1d``), as in
        the official model.

        Args:
            tokens: (B, G, D) patch tokens.
            voxel_ids: (B, G) int64 cluster ids, per sample.

        Returns:
            (B, G, D).
        """
        pooled = segment_reduce(tokens, voxel_ids, "maxmean")  # (B, S, D)
        occupied = segment_counts(voxel_ids, pooled.shape[1]) > 0
        dense = torch.zeros_like(pooled)
        dense[occupied] = self.out_transform_3d(pooled[occupied])
        return gather_segments(dense, voxel_ids)

    def view_branch(self, tokens: Tensor, view_cells: Tensor, num_cells: int | None = None) -> Tensor:
        """The per-view features ``x_v``: cell attention, cell pooling → BN (all cells) + GELU → broadcast.

        Args:
            tokens: (B, G, D) patch tokens.
            view_cells: (B, V, G) int64 cell of each token in each view.
            num_cells: cells per view (None: ``view_cells.max() + 1``).

        Returns:
            (B, V, G, D).
        """
        batch, _, dim = tokens.shape
        if view_cells.shape[1] != self.num_views:
            raise ValueError(f"view_cells has {view_cells.shape[1]} views, the adapter {self.num_views}")
        cells_per_view = int(view_cells.max()) + 1 if num_cells is None else int(num_cells)
        outputs = []
        for v in range(self.num_views):
            cells = view_cells[:, v]
            h = tokens + self.attn1[v](self.norm3[v](tokens), same_cell_mask(cells))
            pooled = segment_reduce(h, cells, self.reduce_1d, cells_per_view)  # (B, S, D)
            out = self.out_transform_1d[v](pooled.reshape(batch * cells_per_view, dim))
            outputs.append(gather_segments(out.view(batch, cells_per_view, dim), cells))
        return torch.stack(outputs, dim=1)

    def forward(self, x: Tensor, context: GuidedContext) -> Tensor:
        """Shapes: x (B, T, D) with T = G (+ 1 CLS first when ``context.has_cls``) -> residual (B, T, D)."""
        if not isinstance(context, GuidedContext):
            raise TypeError(f"GuidedAdapter needs a GuidedContext, got {type(context).__name__}")
        tokens = x[:, 1:] if context.has_cls else x
        if tokens.shape[:2] != context.voxel_ids.shape:
            raise ValueError(
                f"patch tokens {tuple(tokens.shape[:2])} do not match the context's (B, G) "
                f"{tuple(context.voxel_ids.shape)} (has_cls={context.has_cls})"
            )
        x_3d = self.voxel_branch(tokens, context.voxel_ids)  # (B, G, D)
        x_v = self.view_branch(tokens, context.view_cells, context.num_cells)  # (B, V, G, D)
        weights = (F.cosine_similarity(x_v, x_3d.unsqueeze(1), dim=-1) + 1) / 2  # (B, V, G)
        weights = weights / weights.sum(dim=1, keepdim=True)
        residual = self.coef * (weights.unsqueeze(-1) * x_v).sum(dim=1)
        if context.has_cls:
            residual = torch.cat(
                [residual.new_zeros(residual.shape[0], 1, residual.shape[2]), residual], dim=1
            )
        return residual

    def extra_repr(self) -> str:
        return f"num_views={self.num_views}, coef={self.coef}, reduce_1d={self.reduce_1d!r}"
