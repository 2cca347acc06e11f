"""The Point-MAE decoder: light transformer over visible tokens + mask tokens, predicting masked patches.

Pang et al., "Masked Autoencoders for Point Cloud Self-supervised Learning", ECCV 2022. The sequence is
[encoded visible tokens ; a shared learnable mask token repeated for every masked patch]; a separate
positional MLP on all centres is re-added before every block; the final LayerNorm is applied to the masked
positions only, and a linear head predicts ``group_size × 3`` centre-relative coordinates per masked patch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.nn.pos_embed import CenterPosEmbed
from pretrain.nn.transformer import Block, drop_path_rates, run_blocks

__all__ = ["MAEDecoder", "MaskedTokenDecoder"]


class MaskedTokenDecoder(nn.Module):
    """The Point-MAE decoder trunk without a head: features of the masked patches.

    Methods that predict other targets than the masked points (GeoMAE's geometric targets) put their own
    heads on :meth:`decode`.

    Args:
        dim: token width (the encoder's ``embed_dim``).
        depth: number of decoder blocks (4 officially).
        num_heads: attention heads.
        drop_path: stochastic-depth rate of the last block.
        mlp_ratio: block MLP width multiple.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 4,
        num_heads: int = 6,
        drop_path: float = 0.1,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"decoder depth must be >= 1, got {depth}")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = CenterPosEmbed(dim)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, drop_path=rate)
            for rate in drop_path_rates(drop_path, depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def decode(self, visible: Tensor, visible_centers: Tensor, masked_centers: Tensor) -> Tensor:
        """Features of every masked patch after the final norm.

        Args:
            visible: (B, V, D) encoder outputs of the visible patches.
            visible_centers: (B, V, 3) their centres.
            masked_centers: (B, M, 3) centres of the masked patches.

        Returns:
            (B, M, D) features of the masked patches.
        """
        batch, num_masked, _ = masked_centers.shape
        x = torch.cat([visible, self.mask_token.expand(batch, num_masked, -1).to(visible.dtype)], dim=1)
        pos = self.pos_embed(torch.cat([visible_centers, masked_centers], dim=1))
        *first, last = self.blocks
        if not isinstance(last, Block):
            raise TypeError(f"the decoder's blocks must be Blocks, got {type(last).__name__}")
        x, _ = run_blocks(first, x, pos)
        # Only the masked tokens of the last block are read: its other rows are not computed.
        features: Tensor = self.norm(last.forward_tail(x + pos, num_masked))
        return features


class MAEDecoder(MaskedTokenDecoder):
    """Decoder + prediction head of Point-MAE.

    Official key names: ``mask_token``, ``pos_embed``, ``blocks``, ``norm``, ``head``.

    Args:
        dim: token width (the encoder's ``embed_dim``).
        depth: number of decoder blocks (4 officially).
        num_heads: attention heads.
        group_size: points K predicted per masked patch.
        drop_path: stochastic-depth rate of the last block.
        mlp_ratio: block MLP width multiple.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 4,
        num_heads: int = 6,
        group_size: int = 32,
        drop_path: float = 0.1,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__(dim, depth=depth, num_heads=num_heads, drop_path=drop_path, mlp_ratio=mlp_ratio)
        self.group_size = group_size
        self.head = nn.Linear(dim, 3 * group_size)
        self._init_weights(self.head)

    def forward(self, visible: Tensor, visible_centers: Tensor, masked_centers: Tensor) -> Tensor:
        """Predicts the points of every masked patch.

        Args:
            visible: (B, V, D) encoder outputs of the visible patches.
            visible_centers: (B, V, 3) their centres.
            masked_centers: (B, M, 3) centres of the masked patches.

        Returns:
            (B, M, K, 3) predicted centre-relative coordinates, K = ``group_size``.
        """
        batch, num_masked, _ = masked_centers.shape
        out = self.head(self.decode(visible, visible_centers, masked_centers))
        return out.reshape(batch, num_masked, self.group_size, 3)
