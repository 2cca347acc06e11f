"""Mini-PointNet patch embedding of Point-BERT (Yu et al., CVPR 2022) and Point-MAE (Pang et al., ECCV 2022).

Parameter names follow the official ``Encoder`` module (``first_conv``, ``second_conv``; Conv1d with kernel
size 1, BatchNorm at index 1), so official weights load by a prefix edit only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MiniPointNet"]


class MiniPointNet(nn.Module):
    """Embeds each patch of K points into one vector.

    Per point: Conv1d 3→128, BN, ReLU, Conv1d 128→256; max over the K points gives a 256-d global feature
    that is concatenated to every per-point feature (512); then Conv1d 512→512, BN, ReLU, Conv1d 512→out
    and a max over the K points.

    Args:
        out_dim: output width (``encoder_channel``: 384 in Point-MAE, 256 in Point-BERT).
        in_channels: per-point input channels (3 for xyz).
    """

    def __init__(self, out_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        if out_dim < 1 or in_channels < 1:
            raise ValueError(f"out_dim and in_channels must be >= 1, got {out_dim}, {in_channels}")
        self.out_dim = out_dim
        self.in_channels = in_channels
        self.first_conv = nn.Sequential(
            nn.Conv1d(in_channels, 128, 1),
            nn.BatchNorm1d(128),
            nn.ReLU(inplace=True),
            nn.Conv1d(128, 256, 1),
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Conv1d(512, out_dim, 1),
        )

    def forward(self, patches: Tensor) -> Tensor:
        """Embeds patches.

        Args:
            patches: (B, G, K, C) points per patch, channels last (centre-relative xyz for C = 3).

        Returns:
            (B, G, out_dim) one token per patch.
        """
        if patches.ndim != 4 or patches.shape[-1] != self.in_channels:
            raise ValueError(
                f"patches must have shape (B, G, K, {self.in_channels}), got {tuple(patches.shape)}"
            )
        batch, groups, k, channels = patches.shape
        x = patches.reshape(batch * groups, k, channels).transpose(1, 2)  # (BG, C, K)
        feat = self.first_conv(x)  # (BG, 256, K)
        global_feat = feat.amax(dim=2, keepdim=True)  # (BG, 256, 1)
        feat = torch.cat([global_feat.expand(-1, -1, k), feat], dim=1)  # (BG, 512, K)
        feat = self.second_conv(feat)  # (BG, out, K)
        return feat.amax(dim=2).reshape(batch, groups, self.out_dim)
