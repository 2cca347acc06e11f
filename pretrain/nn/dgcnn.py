"""The small DGCNN of the Point-BERT dVAE (Yu et al., CVPR 2022), run over patch centres.

Four EdgeConv layers over the ``k`` nearest centres (``k = 4``, the centre itself included, as KNN_CUDA
returns it), each a bias-free 1×1 Conv2d on the edge feature ``[x_j - x_i, x_i]``, GroupNorm(4) and
LeakyReLU(0.2), then a max over the neighbours; the four outputs are concatenated (256 + 512 + 512 + 1024 =
2304 channels at the official widths) and mapped by a bias-free Conv1d + GroupNorm(4) + LeakyReLU(0.2) to
the output width. The output layer is activated too, so the dVAE's codebook logits are LeakyReLU outputs.

Parameter names follow the official module (``input_trans``, ``layer1`` … ``layer5``, each ``.0`` conv and
``.1`` GroupNorm), so official weights load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pretrain.ops import gather_points, knn

__all__ = ["DGCNN", "OFFICIAL_DGCNN_DIMS"]

#: widths of the official DGCNN: input transform, then the four EdgeConv layers.
OFFICIAL_DGCNN_DIMS: tuple[int, ...] = (128, 256, 512, 512, 1024)


class DGCNN(nn.Module):
    """EdgeConv network over the centres of the patches of each cloud.

    Args:
        in_dim: input feature width per centre.
        out_dim: output width (the codebook size for ``dgcnn_1``, the decoder width for ``dgcnn_2``).
        k: neighbours per centre, the centre itself included (4 officially).
        dims: ``(input transform width, edge-conv widths...)``; official ``(128, 256, 512, 512, 1024)``.
        num_groups: GroupNorm groups; every edge-conv width and ``out_dim`` must be divisible by it.
        negative_slope: LeakyReLU slope.

    Raises:
        ValueError: non-positive sizes, fewer than two ``dims``, or widths GroupNorm cannot split.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        k: int = 4,
        dims: Sequence[int] = OFFICIAL_DGCNN_DIMS,
        num_groups: int = 4,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        dims = tuple(dims)
        if len(dims) < 2:
            raise ValueError(f"dims must hold an input width and at least one edge-conv width, got {dims}")
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("k", k), ("num_groups", num_groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise ValueError(f"dims must be positive ints, got {dims}")
        bad = [d for d in (*dims[1:], out_dim) if d % num_groups]
        if bad:
            raise ValueError(
                f"GroupNorm({num_groups}) cannot split widths {bad}; use multiples of {num_groups}"
            )
        self.k = k
        self.dims = dims
        self.input_trans = nn.Conv1d(in_dim, dims[0], 1)
        previous = dims[0]
        for i, width in enumerate(dims[1:], start=1):
            layer = nn.Sequential(
                nn.Conv2d(2 * previous, width, kernel_size=1, bias=False),
                nn.GroupNorm(num_groups, width),
                nn.LeakyReLU(negative_slope=negative_slope),
            )
            self.add_module(f"layer{i}", layer)
            previous = width
        self.num_edge_layers = len(dims) - 1
        head = nn.Sequential(
            nn.Conv1d(sum(dims[1:]), out_dim, kernel_size=1, bias=False),
            nn.GroupNorm(num_groups, out_dim),
            nn.LeakyReLU(negative_slope=negative_slope),
        )
        self.add_module(f"layer{len(dims)}", head)
        self.out_dim = out_dim

    def forward(self, features: Tensor, centers: Tensor) -> Tensor:
        """Maps per-centre features through the EdgeConv stack.

        Args:
            features: (B, G, in_dim) per-centre features.
            centers: (B, G, 3) centre coordinates (the graph: k nearest centres, the centre included).

        Returns:
            (B, G, out_dim) outputs.

        Raises:
            ValueError: mismatched shapes or fewer than ``k`` centres.
        """
        if features.ndim != 3 or centers.ndim != 3 or centers.shape[:2] != features.shape[:2]:
            raise ValueError(
                f"features (B, G, C) and centers (B, G, 3) must match, got {tuple(features.shape)} "
                f"and {tuple(centers.shape)}"
            )
        if centers.shape[1] < self.k:
            raise ValueError(f"DGCNN needs at least k={self.k} centres per cloud, got {centers.shape[1]}")
        _, idx = knn(centers.detach(), centers.detach(), self.k)  # (B, G, k), self first
        x = self.input_trans(features.transpose(1, 2)).transpose(1, 2)  # (B, G, C0)
        outputs = []
        for i in range(1, self.num_edge_layers + 1):
            edge = edge_features(x, idx)  # (B, 2C, G, k)
            x = getattr(self, f"layer{i}")(edge).amax(dim=-1).transpose(1, 2)  # (B, G, C_i)
            outputs.append(x)
        head = getattr(self, f"layer{self.num_edge_layers + 1}")
        out: Tensor = head(torch.cat(outputs, dim=-1).transpose(1, 2)).transpose(1, 2)
        return out


def edge_features(x: Tensor, idx: Tensor) -> Tensor:
    """EdgeConv inputs ``[x_j - x_i, x_i]`` for the neighbours ``j`` of every point ``i``.

    Shapes:
        x: (B, G, C) features, channels last.
        idx: (B, G, k) long neighbour indices into G.
        returns: (B, 2C, G, k), channels first for the 1×1 Conv2d (difference channels first).
    """
    neighbours = gather_points(x, idx)  # (B, G, k, C)
    centre = x.unsqueeze(2).expand_as(neighbours)
    return torch.cat([neighbours - centre, centre], dim=-1).permute(0, 3, 1, 2)
