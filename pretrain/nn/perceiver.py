"""The Perceiver-style trunk of ViPFormer (Sun et al., ICRA 2023), with the official parameter names.

ViPFormer's point and image encoders share one trunk (``Encoder`` of the official code): a pre-LN
cross-attention layer whose queries are the latents (point-patch embeddings, or image-patch embeddings) and
whose keys/values are a memory sequence (the per-point tokens, or the image patches again), followed by
``num_sa_layers`` self-attention layers over the latents. Every layer is two residual branches (attention,
then MLP). Exactly as the official forward pass:

* the positional embedding is added to the running latent state before **every** layer (so it accumulates:
  the residual of a layer starts from ``x + pos``); the memory carries no positional term;
* a branch is ``x + Dropout(f(x))``; the dropout probability is ``cross_attn_drop`` (0.1) for the
  cross-attention branch and ``mlp_drop`` (0.5) for the self-attention branches and every MLP branch;
  attention probabilities use dropout ``attn_drop`` (0.1); there is no drop-path (``max_dpr = 0``);
* cross-attention normalises queries and keys/values with separate LayerNorms; q/k/v projections have no
  bias, the output projection has one; scale head_dim^-0.5;
* MLP: LayerNorm, Linear D→r·D, exact GELU, Linear r·D→D;
* no LayerNorm after the last layer.

With more than one cross-attention layer, the official schedule is kept: the first cross-attention layer
(``cross_attn``), then before self-attention layer ``i`` (for ``i + 1 < num_cross_layers``) the shared later
cross-attention layer (``cross_attn_n``), each preceded by the positional term.

Parameter names of a :class:`PerceiverTrunk` (official ``encoder.`` prefix -> the trunk's attribute name):
``cross_attn.0.module.{q_norm,kv_norm}.*``, ``cross_attn.0.module.attention.{q,k,v}_proj.weight``,
``cross_attn.0.module.attention.o_proj.{weight,bias}``, ``cross_attn.1.module.{0,1,3}.*``; the same under
``cross_attn_n.`` when ``num_cross_layers > 1``; ``sa_layers.{i}.0.module.norm.*``,
``sa_layers.{i}.0.module.attention.{q,k,v,o}_proj.*``, ``sa_layers.{i}.1.module.{0,1,3}.*``. Official
``encoder.cross_attn_n.*`` of a one-cross-layer checkpoint maps to ``cross_attn.*`` (its duplicate
``encoder.cross_attn_1.*`` is the same module registered twice).

Also here: the per-point input adapter (``point_mlp``) and the projection head (``latent_head``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CrossAttentionLayer",
    "LatentCrossAttention",
    "LatentSelfAttention",
    "MultiHeadAttention",
    "PerceiverMlp",
    "PerceiverTrunk",
    "PointInputAdapter",
    "ProjectionHead",
    "Residual",
    "SelfAttentionLayer",
]


def _check_drop(name: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, L, H * dh) -> (B, H, L, dh)."""
    batch, length, dim = x.shape
    return x.view(batch, length, num_heads, dim // num_heads).transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections and a biased output projection.

    ``softmax(q kᵀ · head_dim^-0.5)`` with dropout on the probabilities (training only), times ``v``, heads
    concatenated, then ``o_proj``. Computed with ``F.scaled_dot_product_attention``.

    Args:
        dim: query width, projection width and output width; divisible by ``num_heads``.
        num_heads: heads.
        kv_dim: width of the key/value input (default ``dim``).
        attn_drop: dropout on the attention probabilities.
    """

    def __init__(
        self, dim: int, num_heads: int, *, kv_dim: int | None = None, attn_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        _check_drop("attn_drop", attn_drop)
        kv = kv_dim or dim
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(kv, dim, bias=False)
        self.v_proj = nn.Linear(kv, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        """Attends from queries to keys/values.

        Args:
            x_q: (B, L, dim) queries.
            x_kv: (B, M, kv_dim) keys/values.

        Returns:
            (B, L, dim).
        """
        heads = self.num_heads
        out = F.scaled_dot_product_attention(
            _split_heads(self.q_proj(x_q), heads),
            _split_heads(self.k_proj(x_kv), heads),
            _split_heads(self.v_proj(x_kv), heads),
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        batch, _, length, _ = out.shape
        proj: Tensor = self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        return proj


class LatentCrossAttention(nn.Module):
    """Cross-attention with separate pre-LayerNorms: ``attention(q_norm(x), kv_norm(context))``.

    Args:
        dim: query (latent) width.
        num_heads: heads.
        kv_dim: context width (default ``dim``).
        attn_drop: dropout on the attention probabilities.
    """

    def __init__(
        self, dim: int, num_heads: int, *, kv_dim: int | None = None, attn_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(dim)
        self.kv_norm = nn.LayerNorm(kv_dim or dim)
        self.attention = MultiHeadAttention(dim, num_heads, kv_dim=kv_dim, attn_drop=attn_drop)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Shapes: x (B, L, dim), context (B, M, kv_dim) -> (B, L, dim)."""
        out: Tensor = self.attention(self.q_norm(x), self.kv_norm(context))
        return out


class LatentSelfAttention(nn.Module):
    """Self-attention with a pre-LayerNorm: ``attention(norm(x), norm(x))``.

    Args:
        dim: width.
        num_heads: heads.
        attn_drop: dropout on the attention probabilities.
    """

    def __init__(self, dim: int, num_heads: int, *, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, num_heads, attn_drop=attn_drop)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (B, L, dim) -> (B, L, dim)."""
        normed = self.norm(x)
        out: Tensor = self.attention(normed, normed)
        return out


class PerceiverMlp(nn.Sequential):
    """LayerNorm, Linear(dim→ratio·dim), exact GELU, Linear(ratio·dim→dim); names ``0``, ``1``, ``3``.

    Args:
        dim: width.
        ratio: integer widening factor of the hidden layer.
    """

    def __init__(self, dim: int, ratio: int) -> None:
        if ratio < 1:
            raise ValueError(f"the MLP widening factor must be >= 1, got {ratio}")
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Shapes: x (B, L, dim) -> (B, L, dim)."""
        out: Tensor = super().forward(x)
        return out


class Residual(nn.Module):
    """``x + Dropout(module(x, *rest))``: the residual wrapper of every ViPFormer branch.

    The wrapped branch is the ``module`` attribute (official key infix ``.module.``).

    Args:
        module: the branch; called with the residual input first.
        dropout: dropout probability on the branch output before it is added.
    """

    def __init__(self, module: nn.Module, dropout: float) -> None:
        super().__init__()
        _check_drop("dropout", dropout)
        self.module = module
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, *rest: Tensor) -> Tensor:
        """Shapes: x (B, L, dim), rest: the branch's further inputs -> (B, L, dim)."""
        out: Tensor = self.dropout(self.module(x, *rest)) + x
        return out


class CrossAttentionLayer(nn.Sequential):
    """``Residual(LatentCrossAttention, cross_attn_drop)`` then ``Residual(PerceiverMlp, mlp_drop)``.

    Args:
        dim: latent width.
        num_heads: heads.
        mlp_ratio: MLP widening factor.
        kv_dim: context width (default ``dim``).
        cross_attn_drop: dropout on the cross-attention branch output.
        mlp_drop: dropout on the MLP branch output.
        attn_drop: dropout on the attention probabilities.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: int,
        kv_dim: int | None = None,
        cross_attn_drop: float = 0.1,
        mlp_drop: float = 0.5,
        attn_drop: float = 0.1,
    ) -> None:
        super().__init__(
            Residual(
                LatentCrossAttention(dim, num_heads, kv_dim=kv_dim, attn_drop=attn_drop), cross_attn_drop
            ),
            Residual(PerceiverMlp(dim, mlp_ratio), mlp_drop),
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        """Shapes: x (B, L, dim) latents, context (B, M, kv_dim) -> (B, L, dim)."""
        out: Tensor = self[1](self[0](x, context))
        return out


class SelfAttentionLayer(nn.Sequential):
    """``Residual(LatentSelfAttention, mlp_drop)`` then ``Residual(PerceiverMlp, mlp_drop)``.

    Officially the self-attention branch's residual dropout is ``mlp_drop``, not the attention dropout.

    Args:
        dim: width.
        num_heads: heads.
        mlp_ratio: MLP widening factor.
        mlp_drop: dropout on both branch outputs.
        attn_drop: dropout on the attention probabilities.
    """

    def __init__(
        self, dim: int, num_heads: int, *, mlp_ratio: int, mlp_drop: float = 0.5, attn_drop: float = 0.1
    ) -> None:
        super().__init__(
            Residual(LatentSelfAttention(dim, num_heads, attn_drop=attn_drop), mlp_drop),
            Residual(PerceiverMlp(dim, mlp_ratio), mlp_drop),
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Shapes: x (B, L, dim) -> (B, L, dim)."""
        out: Tensor = self[1](self[0](x))
        return out


class PerceiverTrunk(nn.Module):
    """Cross-attention from latents to a memory, then self-attention layers; see the module docstring.

    Layers are numbered for :meth:`forward`'s ``capture`` as the official part-segmentation code does:
    0 is the output of the first cross-attention layer, ``i + 1`` the output of self-attention layer ``i``
    (so :attr:`depth` = ``1 + num_sa_layers``; later cross-attention layers are not numbered).

    Args:
        dim: latent width D.
        num_heads: heads of every attention layer.
        num_sa_layers: self-attention layers (>= 0).
        num_cross_layers: cross-attention layers (>= 1, at most ``num_sa_layers + 1``).
        mlp_ratio: integer MLP widening factor of every layer.
        kv_dim: memory width (default ``dim``).
        mlp_drop: residual dropout of the self-attention and MLP branches.
        cross_attn_drop: residual dropout of the cross-attention branch.
        attn_drop: dropout on attention probabilities.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        num_sa_layers: int,
        num_cross_layers: int = 1,
        mlp_ratio: int = 2,
        kv_dim: int | None = None,
        mlp_drop: float = 0.5,
        cross_attn_drop: float = 0.1,
        attn_drop: float = 0.1,
    ) -> None:
        super().__init__()
        if num_sa_layers < 0 or not 1 <= num_cross_layers <= num_sa_layers + 1:
            raise ValueError(
                f"need num_sa_layers >= 0 and 1 <= num_cross_layers <= num_sa_layers + 1, got "
                f"num_cross_layers={num_cross_layers}, num_sa_layers={num_sa_layers}"
            )
        self.num_cross_layers = num_cross_layers

        def cross() -> CrossAttentionLayer:
            return CrossAttentionLayer(
                dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                kv_dim=kv_dim,
                cross_attn_drop=cross_attn_drop,
                mlp_drop=mlp_drop,
                attn_drop=attn_drop,
            )

        self.cross_attn = cross()
        self.cross_attn_n: CrossAttentionLayer | None = cross() if num_cross_layers > 1 else None
        self.sa_layers = nn.ModuleList(
            SelfAttentionLayer(dim, num_heads, mlp_ratio=mlp_ratio, mlp_drop=mlp_drop, attn_drop=attn_drop)
            for _ in range(num_sa_layers)
        )

    @property
    def depth(self) -> int:
        """Numbered layers: the first cross-attention layer and every self-attention layer."""
        return 1 + len(self.sa_layers)

    def forward(
        self, x: Tensor, pos: Tensor, memory: Tensor, *, capture: Sequence[int] = ()
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Runs the trunk.

        Args:
            x: (B, L, D) initial latents.
            pos: (B or 1, L, D) positional embedding, added to the running latents before every layer.
            memory: (B, M, kv_dim) keys/values of the cross-attention (no positional term).
            capture: layer numbers (non-negative, see the class docstring) whose outputs are returned.

        Returns:
            ``(latents (B, L, D) after the last layer, {layer number: (B, L, D) output})``.
        """
        wanted = set(capture)
        captured: dict[int, Tensor] = {}
        x = self.cross_attn(x + pos, memory)
        if 0 in wanted:
            captured[0] = x
        for i, layer in enumerate(self.sa_layers):
            if i + 1 < self.num_cross_layers and self.cross_attn_n is not None:
                x = self.cross_attn_n(x + pos, memory)
            x = layer(x + pos)
            if i + 1 in wanted:
                captured[i + 1] = x
        return x, captured


class PointInputAdapter(nn.Module):
    """Per-point tokens: ``point_mlp`` = Linear(C→64), LayerNorm, ReLU, Linear(64→dim) (names 0, 1, 3).

    Args:
        dim: token width.
        in_channels: per-point channels (3 for xyz).
        hidden: hidden width (64 officially).
    """

    def __init__(self, dim: int, in_channels: int = 3, hidden: int = 64) -> None:
        super().__init__()
        if min(dim, in_channels, hidden) < 1:
            raise ValueError(f"dim, in_channels and hidden must be >= 1, got {dim}, {in_channels}, {hidden}")
        self.in_channels = in_channels
        self.point_mlp = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, dim)
        )

    def forward(self, points: Tensor) -> Tensor:
        """Shapes: points (B, N, in_channels) -> (B, N, dim)."""
        if points.ndim != 3 or points.shape[-1] != self.in_channels:
            raise ValueError(f"points must have shape (B, N, {self.in_channels}), got {tuple(points.shape)}")
        out: Tensor = self.point_mlp(points)
        return out


class ProjectionHead(nn.Sequential):
    """ViPFormer's ``latent_head``: BN, ReLU, Linear(in→dim, no bias), BN, ReLU, Linear(dim→dim, no bias).

    Names ``0`` and ``3`` (BatchNorm1d), ``2`` and ``5`` (Linear), as the official keys.

    Args:
        in_dim: input width (2D: the pooled concat[max, mean] feature).
        dim: hidden and output width (D).
    """

    def __init__(self, in_dim: int, dim: int) -> None:
        if min(in_dim, dim) < 1:
            raise ValueError(f"in_dim and dim must be >= 1, got {in_dim}, {dim}")
        super().__init__(
            nn.BatchNorm1d(in_dim),
            nn.ReLU(),
            nn.Linear(in_dim, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(),
            nn.Linear(dim, dim, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Shapes: x (B, in_dim) -> (B, dim)."""
        out: Tensor = super().forward(x)
        return out
