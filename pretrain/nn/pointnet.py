"""Mini-PointNet patch embedding of Point-BERT (Yu et al., CVPR 2022) and Point-MAE (Pang et al., ECCV 2022).

Parameter names follow the official ``Encoder`` module (``first_conv``, ``second_conv``; Conv1d with kernel
size 1, BatchNorm at index 1), so official weights load by a prefix edit only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MiniPointNet"]


class MiniPointNet(nn.Module):
    """Embeds each patch of K points into one vector.

    Per point: Conv1d 3→128, BN, ReLU, Conv1d 128→256; max over the K points gives a 256-d global feature
    that is concatenated to every per-point feature (512); then Conv1d 512→512, BN, ReLU, Conv1d 512→out
    and a max over the K points. The forward pass computes this function (equal up to float rounding; a test
    keeps the literal Conv1d form as its reference) as channels-last matmuls, with the global half of
    ``second_conv[0]`` applied once per patch instead of once per point: half the multiply-adds of the widest
    layer.

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

    @staticmethod
    def _layer(stack: nn.Sequential, index: int) -> nn.Conv1d:
        layer = stack[index]
        if not isinstance(layer, nn.Conv1d):
            raise TypeError(f"expected Conv1d at index {index}, got {type(layer).__name__}")
        return layer

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
        first, second = self.first_conv, self.second_conv
        conv1, bn1, conv2 = self._layer(first, 0), first[1], self._layer(first, 3)
        conv3, bn2, conv4 = self._layer(second, 0), second[1], self._layer(second, 3)
        # Kernel-size-1 convolutions as matmuls over channels-last points; BatchNorm1d over (points, C)
        # normalises with the same per-channel statistics as over (patches, C, K).
        x = patches.reshape(batch * groups * k, channels)
        x = F.relu(bn1(F.linear(x, conv1.weight.squeeze(-1), conv1.bias)))
        feat = F.linear(x, conv2.weight.squeeze(-1), conv2.bias).view(batch * groups, k, -1)  # (BG, K, 256)
        global_feat = feat.amax(dim=1)  # (BG, 256)
        # second_conv[0] sees cat[global (256), per-point (256)]: the global half is the same for all K points
        # of a patch, so its product is taken once per patch and broadcast.
        weight = conv3.weight.squeeze(-1)
        split = global_feat.shape[1]
        per_patch = F.linear(global_feat, weight[:, :split], conv3.bias)  # (BG, 512)
        hidden = F.linear(feat, weight[:, split:]) + per_patch[:, None]  # (BG, K, 512)
        hidden = F.relu(bn2(hidden.reshape(batch * groups * k, -1)))
        out = F.linear(hidden, conv4.weight.squeeze(-1), conv4.bias).view(batch * groups, k, self.out_dim)
        return out.amax(dim=1).view(batch, groups, self.out_dim)
