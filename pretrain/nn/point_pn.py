"""Point-PN point tokenizer: the trainable 3D tokenizer of Any2Point (Tang et al., ECCV 2024).

Re-implementation of ``Point_PN_scan`` (``models/backbone/Point_PN.py`` in every Any2Point sub-project), a
hierarchical, parametric variant of Point-NN (Zhang et al., CVPR 2023), batched and in pure torch:

1. **Raw-point embedding** ``raw_embed``: Conv1d 3→``in_dim`` (no bias), BatchNorm1d, ReLU, applied to the
   xyz coordinates (Any2Point feeds the coordinates as the point features).
2. **Stages** ``stages.{i}`` (``num_stages``, 3 officially), each halving the points and doubling the width
   ``C_i = in_dim * 2**i`` → ``2 * C_i``:

   * farthest point sampling of ``N_i // 2`` centres among the current points, first pick index 0, with the
     near-origin skip of pointnet2_ops by default (:func:`~pretrain.ops.sampling.farthest_point_sample`);
     the ``k`` nearest current points of every centre (the centre is its own first neighbour);
   * **LGA** (local geometry aggregation): neighbour offsets from the centre are normalised
     (:func:`normalize_offsets`); each neighbour's feature is concatenated with its centre's feature
     ``[f_neighbour, f_centre]`` (``2 * C_i`` channels, no linear layer in between); the trigonometric
     encoding of the normalised offsets (:func:`trig_pos_encoding`, PosE) is *added*; then residual
     bottleneck blocks ``stages.{i}.blocks.{j}`` (Conv2d 1×1 ``C→h`` + BN2d + ReLU, Conv2d ``h→C`` + BN2d,
     add the input, ReLU);
   * max-pool over the ``k`` neighbours gives the stage's features at the centres.
3. Optional ``proj`` (Linear) when ``out_dim != in_dim * 2**num_stages`` (see :class:`PointPN`).

The official configuration (1024 points, ``in_dim`` 96, 3 stages, k 81, ``scan``) returns 128 tokens of
width 768 and their centres (276,672 parameters). Parameter names map to the official ones by
:func:`official_key_to_pcpt`.

Parity with the official module (checked once, outside the test suite, by running the official
``Point_PN.py`` of ``Any2Point_CLIP_Lang`` and ``Any2Point_clip_lang_modelnet`` on CPU with pcpt's
pointnet2_ops-parity FPS in place of the CUDA kernel): in eval mode the float32 tokens and centres are
bit-identical at the official size; in float64 train mode the tokens and all parameter gradients agree to
about 1e-14. Deliberate differences:

* ``mn40`` normalises by a per-sample std by default (the official std spans the whole batch; see
  :func:`normalize_offsets`); ``scan`` returns 0 instead of NaN on an all-zero axis of a group.
* The PosE frequency table is computed in the input dtype (the official one is always float32; identical
  for float32 input).
* Ties among the ``k``-th nearest neighbours are broken by index (official: ``topk``, unspecified); the
  neighbour order does not matter (max-pool, max-abs and std are order-free).
* The number of centres follows the input (``N // 2`` per stage) instead of being fixed at construction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.ops.grouping import gather_points, group_points

__all__ = [
    "BottleneckBlock",
    "PointPN",
    "PointPNStage",
    "StageOutput",
    "normalize_offsets",
    "official_key_to_pcpt",
    "trig_pos_encoding",
]

NormalizeMode = Literal["scan", "mn40"]
"""Neighbour-offset normalisation of the LGA: ``scan`` (ScanObjectNN projects) or ``mn40`` (ModelNet40)."""

MN40_STD_EPS = 1e-5
"""Added to the standard deviation before dividing (``mn40`` mode), as in the official code."""


def trig_pos_encoding(xyz: Tensor, dim: int, alpha: float = 1000.0, beta: float = 100.0) -> Tensor:
    """Trigonometric positional encoding (PosE) of Point-NN / Point-PN, channels last.

    With ``F = dim // 6``, coordinate ``a`` (of 3) fills channels ``[2F·a, 2F·a + F)`` with
    ``sin(beta · x_a / alpha**(j / F))`` for ``j = 0 … F-1`` and the next ``F`` channels with the matching
    cosines; this is exactly the official ``PosE_Geo`` layout (``cat([sin, cos])`` per coordinate, then
    coordinate-major). Official widths are multiples of 6 (192, 384, 768); for other widths the last
    ``dim - 6F`` channels are zero (the official code cannot run with such widths).

    Args:
        xyz: Normalised neighbour offsets, any float dtype.
        dim: Output width, ``>= 6``.
        alpha: Frequency base (1000 officially).
        beta: Coordinate scale (100 officially).

    Returns:
        The encoding, same dtype and device as ``xyz``. Differentiable in ``xyz``.

    Shapes:
        xyz: (..., 3), e.g. (B, G, K, 3).
        returns: (..., dim).

    Raises:
        ValueError: If the last axis of ``xyz`` is not 3 or ``dim < 6``.
    """
    if xyz.shape[-1] != 3:
        raise ValueError(f"xyz must have 3 coordinates on its last axis, got shape {tuple(xyz.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 6:
        raise ValueError(f"dim must be an int >= 6, got {dim!r}")
    feat_dim = dim // 6
    feat_range = torch.arange(feat_dim, dtype=xyz.dtype, device=xyz.device)
    dim_embed = torch.pow(alpha, feat_range / feat_dim)  # (F,)
    div_embed = (beta * xyz).unsqueeze(-1) / dim_embed  # (..., 3, F)
    embed = torch.cat([torch.sin(div_embed), torch.cos(div_embed)], dim=-1)  # (..., 3, 2F)
    embed = embed.flatten(-2)  # (..., 6F), coordinate-major
    if 6 * feat_dim < dim:
        embed = torch.cat([embed, embed.new_zeros(*embed.shape[:-1], dim - 6 * feat_dim)], dim=-1)
    return embed


def normalize_offsets(offsets: Tensor, mode: NormalizeMode, *, batch_std: bool = False) -> Tensor:
    """Normalises neighbour offsets (neighbour minus centre) as the LGA of Point-PN does.

    * ``scan``: every coordinate axis of every group is divided by that group's largest absolute offset
      along that axis (per group *and per axis*, over its K neighbours; no epsilon). An axis whose offsets
      are all zero stays zero (the official code divides 0 by 0 and yields NaN there).
    * ``mn40``: division by ``std + 1e-5``, the (unbiased) standard deviation of all offsets of the cloud
      (all groups, neighbours and axes). The official code takes the std over the *whole batch tensor*,
      so a sample's tokens depend on its batch-mates; ``batch_std=True`` reproduces that, the default
      computes it per sample (identical for a batch of one).

    Args:
        offsets: Neighbour offsets.
        mode: ``"scan"`` or ``"mn40"``.
        batch_std: ``mn40`` only: one std over the whole batch (official) instead of one per sample.

    Returns:
        Normalised offsets, same shape and dtype. Differentiable.

    Shapes:
        offsets: (B, G, K, 3).
        returns: (B, G, K, 3).

    Raises:
        ValueError: On an unknown mode or a non-(B, G, K, 3) input.
    """
    if offsets.dim() != 4 or offsets.shape[-1] != 3:
        raise ValueError(f"offsets must be a (B, G, K, 3) tensor, got {tuple(offsets.shape)}")
    if mode == "scan":
        max_abs = offsets.abs().amax(dim=2, keepdim=True)  # (B, G, 1, 3)
        # Where the maximum is 0 every offset is 0: dividing by 1 keeps 0 (and a finite gradient).
        safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
        return offsets / safe
    if mode == "mn40":
        if batch_std:
            std = torch.std(offsets)
        else:
            std = torch.std(offsets.flatten(1), dim=1).view(-1, 1, 1, 1)
        return offsets / (std + MN40_STD_EPS)
    raise ValueError(f"mode must be 'scan' or 'mn40', got {mode!r}")


class BottleneckBlock(nn.Module):
    """Residual 1×1 Conv2d bottleneck of the LGA (official ``Linear2Layer``), applied channels last.

    ``relu(net2(net1(x)) + x)`` with ``net1`` = Conv2d ``C→hidden`` (bias), BN2d, ReLU and ``net2`` =
    Conv2d ``hidden→C`` (bias), BN2d. The parameters live in real ``Conv2d`` / ``BatchNorm2d`` modules (the
    official shapes and names), but the forward pass runs on channels-last ``(B, G, K, C)`` tensors: each
    1×1 convolution is a ``linear`` with the flattened kernel, and each BatchNorm2d module is called on a
    ``(B·G·K, C, 1, 1)`` view, which normalises over exactly the same ``B·G·K`` positions (same batch
    statistics and running-stat updates as on ``(B, C, G, K)``).

    Args:
        channels: C.
        hidden: Bottleneck width (``C // 2``; 32 in the third official stage).
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        if channels < 1 or hidden < 1:
            raise ValueError(f"channels and hidden must be >= 1, got {channels}, {hidden}")
        self.net1 = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU())
        self.net2 = nn.Sequential(nn.Conv2d(hidden, channels, 1), nn.BatchNorm2d(channels))

    @staticmethod
    def _conv_bn(conv: nn.Module, bn: nn.Module, x: Tensor) -> Tensor:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected Conv2d, got {type(conv).__name__}")
        y = F.linear(x, conv.weight.flatten(1), conv.bias)
        out: Tensor = bn(y.reshape(-1, y.shape[-1], 1, 1))
        return out.reshape(y.shape)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block.

        Args:
            x: (B, G, K, C) grouped features, channels last.

        Returns:
            (B, G, K, C).
        """
        hidden = F.relu(self._conv_bn(self.net1[0], self.net1[1], x))
        return F.relu(self._conv_bn(self.net2[0], self.net2[1], hidden) + x)


class StageOutput(NamedTuple):
    """Result of one :class:`PointPNStage`.

    Attributes:
        centers: (B, G, 3) centre coordinates in FPS selection order.
        features: (B, G, C_out) max-pooled features at the centres.
        center_idx: (B, G) long indices of the centres into the stage's input points.
        neighbor_idx: (B, G, K) long indices of each centre's K nearest input points, nearest first.
    """

    centers: Tensor
    features: Tensor
    center_idx: Tensor
    neighbor_idx: Tensor


class PointPNStage(nn.Module):
    """One Point-PN stage: FPS to half the points, kNN, LGA (normalise, expand, PosE, blocks), max-pool.

    Args:
        in_channels: C, width of the incoming point features; the stage outputs ``2 * C``.
        k: Neighbours per centre.
        num_blocks: Residual bottleneck blocks.
        hidden: Bottleneck width of the blocks.
        normalize: Offset normalisation (see :func:`normalize_offsets`).
        alpha: PosE frequency base.
        beta: PosE coordinate scale.
        mn40_batch_std: ``mn40`` with the official whole-batch std.
        skip_near_origin: pointnet2_ops FPS parity (see :func:`~pretrain.ops.sampling.farthest_point_sample`).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        k: int,
        num_blocks: int,
        hidden: int,
        normalize: NormalizeMode,
        alpha: float,
        beta: float,
        mn40_batch_std: bool = False,
        skip_near_origin: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 3:
            raise ValueError(f"in_channels must be >= 3 (PosE needs 2 * C >= 6), got {in_channels}")
        if k < 1 or num_blocks < 0:
            raise ValueError(f"k must be >= 1 and num_blocks >= 0, got {k}, {num_blocks}")
        if normalize not in ("scan", "mn40"):
            raise ValueError(f"normalize must be 'scan' or 'mn40', got {normalize!r}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels
        self.k = k
        self.normalize: NormalizeMode = normalize
        self.alpha = alpha
        self.beta = beta
        self.mn40_batch_std = mn40_batch_std
        self.skip_near_origin = skip_near_origin
        self.blocks = nn.ModuleList(BottleneckBlock(self.out_channels, hidden) for _ in range(num_blocks))

    def forward(self, xyz: Tensor, features: Tensor) -> StageOutput:
        """Groups the points around ``N // 2`` centres and aggregates each group into one feature.

        Args:
            xyz: (B, N, 3) point coordinates.
            features: (B, N, C) point features, channels last.

        Returns:
            A :class:`StageOutput` with ``G = N // 2`` centres and ``C_out = 2 * C`` channels.

        Raises:
            ValueError: If the shapes disagree, ``N < 2`` or ``k > N``.
        """
        if (
            features.dim() != 3
            or features.shape[:2] != xyz.shape[:2]
            or features.shape[2] != self.in_channels
        ):
            raise ValueError(
                f"features must be (B, N, {self.in_channels}) matching xyz {tuple(xyz.shape)}, "
                f"got {tuple(features.shape)}"
            )
        num_points = xyz.shape[1]
        if num_points < 2 or self.k > num_points:
            raise ValueError(f"a stage needs 2 <= N and k={self.k} <= N, got N={num_points}")
        groups = group_points(
            xyz, num_points // 2, self.k, fps_start=0, skip_near_origin=self.skip_near_origin
        )
        offsets = normalize_offsets(groups.neighborhoods, self.normalize, batch_std=self.mn40_batch_std)
        neighbor_feat = gather_points(features, groups.idx)  # (B, G, K, C)
        center_feat = gather_points(features, groups.center_idx)  # (B, G, C)
        grouped = torch.cat([neighbor_feat, center_feat.unsqueeze(2).expand_as(neighbor_feat)], dim=-1)
        grouped = grouped + trig_pos_encoding(offsets, self.out_channels, self.alpha, self.beta)
        for block in self.blocks:
            grouped = block(grouped)
        pooled = grouped.amax(dim=2)  # (B, G, 2C)
        return StageOutput(groups.centers, pooled, groups.center_idx, groups.idx)


class PointPN(nn.Module):
    """Point-PN tokenizer of Any2Point: ``(B, N, 3)`` points → ``G = N / 2**num_stages`` centres and tokens.

    Widths: the raw embedding has ``in_dim`` channels and each stage doubles them, reaching
    ``in_dim * 2**num_stages``. ``in_dim=None`` (default) derives ``in_dim = out_dim / 2**num_stages``,
    which must then divide exactly (768 → 96 with 3 stages, the official configuration; 32 → 8 or 64 → 16
    with 2 stages). An explicit ``in_dim`` whose final width differs from ``out_dim`` adds ``proj``, a Linear
    layer to ``out_dim`` (like the ``proj`` that Any2Point's ``PointViT`` puts after the tokenizer when the
    widths differ); otherwise there is no ``proj``.

    Each stage takes ``N_i // 2`` centres of its ``N_i`` input points; ``N`` divisible by ``2**num_stages``
    gives exactly ``N / 2**num_stages`` tokens. ``k`` must not exceed the points entering the last stage
    (``N / 2**(num_stages - 1)``). Deterministic: FPS starts at index 0 and nothing is random; in eval mode
    every sample's output is independent of its batch-mates (also for ``mn40`` unless ``mn40_batch_std``).

    Args:
        out_dim: Token width (768 officially).
        in_dim: Raw-embedding width (96 officially), or ``None`` to derive it from ``out_dim``.
        num_stages: Stages (3 officially).
        k: Neighbours per centre in every stage (81 in the CLIP ScanObjectNN project; 64 for DINOv2 and
            ImageBind on ScanObjectNN and for CLIP on ModelNet40; 81 for DINOv2 and ImageBind on ModelNet40).
        normalize: Offset normalisation, ``"scan"`` (ScanObjectNN projects) or ``"mn40"`` (ModelNet40).
        alpha: PosE frequency base (1000).
        beta: PosE coordinate scale (100).
        blocks_per_stage: Bottleneck blocks per stage; ``None`` is the official ``(2, 1, 1, …)``.
        bottleneck_dims: Bottleneck width per stage; ``None`` is the official rule: ``C_out // 2``, except
            stage index 2 which uses ``last_bottleneck``.
        last_bottleneck: Bottleneck width of stage index 2 when ``bottleneck_dims`` is ``None`` (32; the
            DINOv2 project's ``lastdim``).
        mn40_batch_std: ``mn40`` with the official std over the whole batch (batch-dependent).
        skip_near_origin: FPS with pointnet2_ops' near-origin skip and tie-break (Any2Point's Point-PN
            imports ``pointnet2_ops.pointnet2_utils.furthest_point_sample``); ``False`` is plain FPS.
    """

    def __init__(
        self,
        out_dim: int = 768,
        *,
        in_dim: int | None = None,
        num_stages: int = 3,
        k: int = 81,
        normalize: NormalizeMode = "scan",
        alpha: float = 1000.0,
        beta: float = 100.0,
        blocks_per_stage: Sequence[int] | None = None,
        bottleneck_dims: Sequence[int] | None = None,
        last_bottleneck: int = 32,
        mn40_batch_std: bool = False,
        skip_near_origin: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim must be an int >= 1, got {out_dim!r}")
        if in_dim is None:
            if out_dim % 2**num_stages:
                raise ValueError(
                    f"out_dim={out_dim} is not divisible by 2**num_stages={2**num_stages}; pass in_dim "
                    "explicitly (a Linear projection to out_dim is then added)"
                )
            in_dim = out_dim // 2**num_stages
        if in_dim < 3:
            raise ValueError(f"in_dim must be >= 3 (PosE needs stage widths >= 6), got {in_dim}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if normalize not in ("scan", "mn40"):
            raise ValueError(f"normalize must be 'scan' or 'mn40', got {normalize!r}")
        if not (math.isfinite(alpha) and alpha > 0 and math.isfinite(beta)):
            raise ValueError(f"alpha must be finite and > 0 and beta finite, got {alpha}, {beta}")
        widths = [in_dim * 2 ** (i + 1) for i in range(num_stages)]
        blocks = list(blocks_per_stage) if blocks_per_stage is not None else [2] + [1] * (num_stages - 1)
        if bottleneck_dims is not None:
            hidden = list(bottleneck_dims)
        else:
            hidden = [last_bottleneck if i == 2 else w // 2 for i, w in enumerate(widths)]
        if len(blocks) != num_stages or len(hidden) != num_stages:
            raise ValueError(
                f"blocks_per_stage and bottleneck_dims need {num_stages} entries, got {blocks} and {hidden}"
            )

        self.out_dim = out_dim
        self.in_dim = in_dim
        self.num_stages = num_stages
        self.stage_widths = tuple(widths)
        self.k = k
        self.normalize: NormalizeMode = normalize
        self.alpha = alpha
        self.beta = beta
        self.raw_embed = nn.Sequential(nn.Conv1d(3, in_dim, 1, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU())
        self.stages = nn.ModuleList(
            PointPNStage(
                width // 2,
                k=k,
                num_blocks=num_blocks,
                hidden=h,
                normalize=normalize,
                alpha=alpha,
                beta=beta,
                mn40_batch_std=mn40_batch_std,
                skip_near_origin=skip_near_origin,
            )
            for width, num_blocks, h in zip(widths, blocks, hidden)
        )
        self.proj: nn.Linear | None = nn.Linear(widths[-1], out_dim) if widths[-1] != out_dim else None

    def embed_points(self, xyz: Tensor) -> Tensor:
        """Raw-point embedding.

        Args:
            xyz: (B, N, 3) coordinates.

        Returns:
            (B, N, in_dim) per-point features, channels last.
        """
        out: Tensor = self.raw_embed(xyz.transpose(1, 2)).transpose(1, 2)
        return out

    def forward(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        """Tokenizes point clouds.

        Args:
            xyz: (B, N, 3) point coordinates (1024 points officially).

        Returns:
            ``(centers, tokens)``: (B, G, 3) token centres in FPS selection order and (B, G, out_dim) tokens,
            ``G = N / 2**num_stages`` (floored at each stage).

        Raises:
            ValueError: If ``xyz`` is not (B, N, 3) float, or a stage has too few points for ``k``.
        """
        if not isinstance(xyz, Tensor) or xyz.dim() != 3 or xyz.shape[-1] != 3 or not xyz.is_floating_point():
            shape = tuple(xyz.shape) if isinstance(xyz, Tensor) else type(xyz).__name__
            raise ValueError(f"xyz must be a float (B, N, 3) tensor, got {shape}")
        min_points = max(2 ** (self.num_stages - 1) * self.k, 2**self.num_stages)
        if xyz.shape[1] < min_points:
            raise ValueError(
                f"PointPN(num_stages={self.num_stages}, k={self.k}) needs N >= {min_points} points, "
                f"got {xyz.shape[1]}"
            )
        centers, features = xyz, self.embed_points(xyz)
        for stage in self.stages:
            centers, features, _, _ = stage(centers, features)
        if self.proj is not None:
            features = self.proj(features)
        return centers, features


_OFFICIAL_RAW = re.compile(r"^EncP\.raw_point_embed\.net\.(\d+)\.(.+)$")
_OFFICIAL_BLOCK = re.compile(r"^EncP\.LGA_list\.(\d+)\.linear2\.(\d+)\.(net[12]\.\d+\..+)$")


def official_key_to_pcpt(key: str) -> str:
    """Maps a parameter/buffer name of the official ``Point_PN_scan`` to the :class:`PointPN` name.

    ``EncP.raw_point_embed.net.{0,1}.*`` → ``raw_embed.{0,1}.*`` and
    ``EncP.LGA_list.{i}.linear2.{j}.net{1,2}.{0,1}.*`` → ``stages.{i}.blocks.{j}.net{1,2}.{0,1}.*``; the
    official module has no other parameters (``PosE_Geo``, ``FPS_kNN`` and ``Pooling`` are parameter-free).
    In an Any2Point checkpoint the keys carry the prefix ``encoder.patch_embed.`` (OpenPoints projects) or
    ``patch_embed.`` (ModelNet projects); strip it first.

    Raises:
        ValueError: For a key that is not a Point-PN parameter or buffer.
    """
    match = _OFFICIAL_RAW.match(key)
    if match is not None:
        return f"raw_embed.{match.group(1)}.{match.group(2)}"
    match = _OFFICIAL_BLOCK.match(key)
    if match is not None:
        return f"stages.{match.group(1)}.blocks.{match.group(2)}.{match.group(3)}"
    raise ValueError(f"not a Point_PN_scan parameter name: {key!r}")
