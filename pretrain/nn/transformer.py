"""Pre-norm ViT block with timm-0.4.5 parameter names, as used by Point-BERT and Point-MAE.

Names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) match the official
checkpoints; the qkv projection has no bias. Attention runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "Block", "DropPath", "Mlp", "drop_path_rates"]


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic-depth rate per block: ``linspace(0, drop_path, depth)`` (timm / official)."""
    return [float(r) for r in torch.linspace(0.0, drop_path, depth)]


class DropPath(nn.Module):
    """Stochastic depth: zeroes the whole residual branch of a sample with probability ``p`` in training.

    Kept samples are scaled by ``1 / (1 - p)``. Like ``nn.Dropout`` it draws from the default generator of
    the tensor's device (seeded by the trainer).

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


class Mlp(nn.Module):
    """fc1 → GELU → fc2.

    Args:
        dim: input and output width.
        hidden: hidden width.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (B, L, dim) -> (B, L, dim)."""
        out: Tensor = self.fc2(self.act(self.fc1(x)))
        return out


class Attention(nn.Module):
    """Multi-head self-attention with a bias-free qkv projection; scale head_dim^-0.5.

    Args:
        dim: width; must be divisible by ``num_heads``.
        num_heads: number of heads.
        qkv_bias: bias on the qkv projection (False in the official models).
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (B, L, dim) -> (B, L, dim)."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, dh)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        proj: Tensor = self.proj(out)
        return proj


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

    Args:
        dim: width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        drop_path: stochastic-depth probability of this block.
    """

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (B, L, dim) -> (B, L, dim)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
