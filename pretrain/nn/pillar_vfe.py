"""mmdet3d / SST ``DynamicScatterVFE``: one feature per non-empty pillar from all its points, no point cap.

Per point: ``[x, y, z, extra channels..., offset to the pillar's point mean (3), offset to the pillar's
geometric centre (3)]`` (``with_cluster_center=True, with_voxel_center=True, with_distance=False``), then for
each layer ``Linear(bias=False) → BatchNorm1d(eps=1e-3, momentum=0.01) → ReLU``; between layers each point's
feature is concatenated with the max over its pillar, and the last layer's output is max-pooled per pillar.
Parameter names follow SST (``vfe_layers.{i}.linear.weight``, ``vfe_layers.{i}.norm.*``).

Scatter operations are pure torch (``Tensor.scatter_reduce`` with ``"amax"``, ``index_add``): no
``torch_scatter`` or mmcv ``DynamicScatter``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DynamicScatterVFE", "DynamicVFELayer", "scatter_max", "scatter_mean"]


def scatter_max(src: Tensor, index: Tensor, num: int) -> Tensor:
    """Per-group maximum of rows (groups without a row get 0).

    Args:
        src: (M, C) values.
        index: (M,) int64 group of each row, in ``[0, num)``.
        num: number of groups.

    Returns:
        (num, C).
    """
    out = src.new_zeros(num, src.shape[1])
    return out.scatter_reduce(0, index[:, None].expand_as(src), src, reduce="amax", include_self=False)


def scatter_mean(src: Tensor, index: Tensor, num: int) -> Tensor:
    """Per-group mean of rows (groups without a row get 0). Shapes: src (M, C), index (M,) -> (num, C)."""
    total = src.new_zeros(num, src.shape[1]).index_add(0, index, src)
    count = torch.bincount(index, minlength=num).clamp_(min=1).to(src.dtype)
    return total / count[:, None]


class DynamicVFELayer(nn.Module):
    """``Linear(bias=False) → BatchNorm1d(eps=1e-3, momentum=0.01) → ReLU`` on point features.

    Args:
        in_channels: input width.
        out_channels: output width.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=False)
        self.norm = nn.BatchNorm1d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (M, in_channels) -> (M, out_channels)."""
        out: Tensor = torch.relu(self.norm(self.linear(x)))
        return out


class DynamicScatterVFE(nn.Module):
    """Pillar feature encoder over a variable number of points per pillar.

    Args:
        in_channels: raw per-point channels: 3 (xyz) plus the extra channels (intensity, time, ...). The
            first layer sees ``in_channels + 6`` (point-mean and pillar-centre offsets).
        dims: output width of each layer (GeoMAE: 64, 128); layers after the first see twice the previous
            width (point feature concatenated with its pillar's max).
    """

    def __init__(self, in_channels: int, dims: Sequence[int] = (64, 128)) -> None:
        super().__init__()
        if in_channels < 3:
            raise ValueError(f"in_channels must be >= 3 (x, y, z first), got {in_channels}")
        if not dims or any(d < 1 for d in dims):
            raise ValueError(f"dims must be a non-empty sequence of positive widths, got {dims!r}")
        self.in_channels, self.dims = in_channels, tuple(dims)
        widths = [in_channels + 6, *(2 * d for d in self.dims[:-1])]
        self.vfe_layers = nn.ModuleList(DynamicVFELayer(w, d) for w, d in zip(widths, self.dims))

    @property
    def out_channels(self) -> int:
        """Width of the pillar features."""
        return self.dims[-1]

    def forward(self, points: Tensor, point_pillar: Tensor, centers: Tensor) -> Tensor:
        """Encodes pillars.

        Args:
            points: (M, in_channels) kept points, xyz first, then the extra channels.
            point_pillar: (M,) int64 pillar of each point, in ``[0, P)``.
            centers: (P, 3) geometric centre of each pillar (the z centre is the range's z centre).

        Returns:
            (P, dims[-1]) pillar features (0 for a pillar without points).
        """
        if points.ndim != 2 or points.shape[1] != self.in_channels:
            raise ValueError(f"points must be (M, {self.in_channels}), got {tuple(points.shape)}")
        num = centers.shape[0]
        if points.shape[0] == 0:
            return points.new_zeros(num, self.out_channels)
        xyz = points[:, :3]
        mean = scatter_mean(xyz, point_pillar, num)
        x = torch.cat([points, xyz - mean[point_pillar], xyz - centers[point_pillar].to(xyz.dtype)], dim=1)
        for layer in self.vfe_layers[:-1]:
            x = layer(x)
            x = torch.cat([x, scatter_max(x, point_pillar, num)[point_pillar]], dim=1)
        return scatter_max(self.vfe_layers[-1](x), point_pillar, num)
