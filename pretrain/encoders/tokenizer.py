"""Point tokenizers: points in, tokens and their positions out (the first stage of every encoder).

:class:`PatchTokenizer` is the Point-BERT / Point-MAE one: farthest-point-sampled centres, the ``K`` nearest
points of each centre as a patch (``pretrain.ops.group_points``), and a BatchNorm mini-PointNet that embeds
each patch into one token. Its parameters are the mini-PointNet's (``first_conv.*``, ``second_conv.*``), so
an encoder holding it as ``tokenizer`` keeps the official key layout. Other tokenizers (pillars or voxels of a
LiDAR scene) return the same :class:`PointTokens`: tokens, plus groups whose ``centers`` give the positions.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from pretrain.nn.pointnet import MiniPointNet
from pretrain.ops import PatchGroups, group_points

__all__ = ["GroupingSpec", "PatchTokenizer", "PointTokens", "group_by_spec"]


class GroupingSpec(Protocol):
    """The grouping settings of a spec (``PointViTSpec``, ``DVAESpec``)."""

    @property
    def num_groups(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def fps_start(self) -> int | Literal["random"]: ...
    @property
    def fps_skip_near_origin(self) -> bool: ...


class PointTokens(NamedTuple):
    """What a point tokenizer returns (unpacks as ``groups, tokens``).

    Attributes:
        groups: the point groups the tokens stand for; ``groups.centers`` (B, G, 3) are their positions
            (for patches also ``neighborhoods`` (B, G, K, 3), centre-relative).
        tokens: (B, G, D) one token per group.
    """

    groups: PatchGroups
    tokens: Tensor

    @property
    def centers(self) -> Tensor:
        """(B, G, 3) token positions."""
        return self.groups.centers


def group_by_spec(
    xyz: Tensor, spec: GroupingSpec, *, generator: torch.Generator | None = None
) -> PatchGroups:
    """FPS + kNN patches with a spec's settings (G, K, FPS start, near-origin skip).

    Shapes:
        xyz: (B, N, 3). returns: centres (B, G, 3) and centre-relative neighbourhoods (B, G, K, 3).

    Raises:
        ValueError: ``xyz`` is not (B, N, 3), or has fewer points than ``num_groups`` or ``group_size``.
    """
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"xyz must have shape (B, N, 3), got {tuple(xyz.shape)}")
    needed = max(spec.num_groups, spec.group_size)
    if xyz.shape[1] < needed:
        raise ValueError(
            f"clouds have {xyz.shape[1]} points but the encoder needs at least {needed} "
            f"(num_groups={spec.num_groups}, group_size={spec.group_size})"
        )
    return group_points(
        xyz,
        spec.num_groups,
        spec.group_size,
        fps_start=spec.fps_start,
        skip_near_origin=spec.fps_skip_near_origin,
        generator=generator,
    )


class PatchTokenizer(MiniPointNet):
    """FPS + kNN patches embedded by a mini-PointNet: clouds (B, N, 3) -> :class:`PointTokens`.

    Calling the module embeds already grouped patches (B, G, K, 3) -> (B, G, out_dim), as
    :class:`~pretrain.nn.pointnet.MiniPointNet` does; :meth:`tokenize` groups and embeds raw clouds.

    Args:
        out_dim: token width.
        grouping: the grouping settings (a spec with ``num_groups``, ``group_size``, ``fps_start``,
            ``fps_skip_near_origin``).
    """

    def __init__(self, out_dim: int, grouping: GroupingSpec) -> None:
        super().__init__(out_dim)
        self.grouping = grouping

    def group(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PatchGroups:
        """Patches of clouds (B, N, 3); ``generator`` is used only by ``fps_start="random"``."""
        return group_by_spec(xyz, self.grouping, generator=generator)

    def tokenize(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PointTokens:
        """Groups clouds (B, N, 3) and embeds each patch -> groups and tokens (B, G, out_dim)."""
        groups = self.group(xyz, generator=generator)
        return PointTokens(groups, self(groups.neighborhoods))
