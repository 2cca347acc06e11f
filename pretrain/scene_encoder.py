"""The GeoMAE scene encoder (Tian et al., CVPR 2023) and its ``scene_encoder`` artifact.

LiDAR scans → dynamic pillars (``pretrain.ops.pillars``, no point cap) → one token per non-empty pillar
from ``DynamicScatterVFE`` (``pretrain.nn.pillar_vfe``) → window attention over the sparse pillars
(``pretrain.nn.window_attention``): FlatFormer-style equal-size flat groups (``partition="flat"``, the
default) or SST's windows padded to buckets (``partition="padded"``, as the official GeoMAE) → final
LayerNorm.

The defaults are GeoMAE's pre-training geometry and SST encoder: range ±51.2 m × [−5, 3] m, 0.256 m pillars
(400 × 400), VFE 64 → 128, 6 SST blocks × 2 layers of width 128, 8 heads, FFN 256, 12 × 12 windows, buckets
56 / 144. Masked pre-training feeds only the visible pillars to the transformer: ``forward(tokens, coords,
keep=visible)``; windows and groups are then built from the visible pillars alone.

The artifact is a directory like an encoder artifact (``encoder.safetensors`` + ``encoder.json``) with
``"kind": "scene_encoder"`` and the :class:`SceneEncoderSpec` as ``spec``; this module registers that kind,
so ``pretrain.artifacts.save_module_artifact`` / ``load_artifact`` handle it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from pretrain.artifacts import ArtifactError, ArtifactKind, load_artifact, register_artifact_kind
from pretrain.encoders.spec import PlainData, check_positive_int
from pretrain.nn.pillar_vfe import DynamicScatterVFE
from pretrain.nn.window_attention import WindowTransformer
from pretrain.ops.pillars import Pillars, grid_shape, pillar_centers, pillarize

__all__ = [
    "SCENE_ENCODER_KIND",
    "SCENE_SIZES",
    "PillarSceneEncoder",
    "SceneEncoderSpec",
    "SceneOutput",
    "load_scene_encoder",
]

SCENE_ENCODER_KIND = "scene_encoder"


def _positive_ints(name: str, values: tuple[int, ...], length: int | None = None) -> None:
    if (length is not None and len(values) != length) or not values:
        raise ValueError(f"{name} must hold {length or 'at least one'} positive ints, got {values!r}")
    for value in values:
        check_positive_int(name, value)


def _as_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class SceneEncoderSpec(PlainData):
    """Architecture of a :class:`PillarSceneEncoder`; everything needed to rebuild it.

    Attributes:
        arch: ``"pillar_flatformer"``.
        point_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` metres; points outside are dropped.
        pillar_size: ``(size_x, size_y)`` metres; must divide the xy range into whole cells.
        point_channels: names of the extra per-point channels after xyz (intensity, time lag, ...), in the
            order of the batch's ``feats``.
        vfe_dims: widths of the pillar VFE layers.
        embed_dim: transformer width D (multiple of 4 and of ``num_heads``); a Linear maps the VFE output to D
            when ``vfe_dims[-1] != embed_dim``.
        depth: window-attention layers (SST blocks × 2).
        num_heads: attention heads.
        ffn_dim: FFN hidden width.
        window: ``(wx, wy)`` window in pillars.
        partition: ``"flat"`` (FlatFormer equal-size groups) or ``"padded"`` (SST windows padded to buckets).
        group_size: slots per flat group.
        buckets: strictly increasing bucket sizes of the padded windows.
        dropout: dropout inside the transformer layers.
    """

    arch: Literal["pillar_flatformer"] = "pillar_flatformer"
    point_range: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    pillar_size: tuple[float, float] = (0.256, 0.256)
    point_channels: tuple[str, ...] = ("intensity",)
    vfe_dims: tuple[int, ...] = (64, 128)
    embed_dim: int = 128
    depth: int = 12
    num_heads: int = 8
    ffn_dim: int = 256
    window: tuple[int, int] = (12, 12)
    partition: Literal["flat", "padded"] = "flat"
    group_size: int = 144
    buckets: tuple[int, ...] = (56, 144)
    dropout: float = 0.0

    tuple_fields: ClassVar[tuple[str, ...]] = (
        "point_range",
        "pillar_size",
        "point_channels",
        "vfe_dims",
        "window",
        "buckets",
    )

    def __post_init__(self) -> None:
        for name in self.tuple_fields:
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        if self.arch != "pillar_flatformer":
            raise ValueError(f"SceneEncoderSpec has arch 'pillar_flatformer', got {self.arch!r}")
        for name, length in (("point_range", 6), ("pillar_size", 2)):
            values = getattr(self, name)
            if (
                not isinstance(values, tuple)
                or len(values) != length
                or any(isinstance(v, bool) or not isinstance(v, int | float) for v in values)
                or not all(math.isfinite(v) for v in values)
            ):
                raise ValueError(f"{name} must be {length} finite numbers, got {values!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        grid_shape(self.point_range, self.pillar_size)  # min < max, size > 0, whole cells
        if not isinstance(self.point_channels, tuple) or not all(
            isinstance(c, str) and c for c in self.point_channels
        ):
            raise ValueError(
                f"point_channels must be a tuple of non-empty names, got {self.point_channels!r}"
            )
        if len(set(self.point_channels)) != len(self.point_channels):
            raise ValueError(f"point_channels has duplicate names: {self.point_channels!r}")
        _positive_ints("vfe_dims", self.vfe_dims)
        _positive_ints("window", self.window, length=2)
        _positive_ints("buckets", self.buckets)
        if any(a >= b for a, b in zip(self.buckets, self.buckets[1:])):
            raise ValueError(f"buckets must be strictly increasing, got {self.buckets!r}")
        for name in ("embed_dim", "depth", "num_heads", "ffn_dim", "group_size"):
            check_positive_int(name, getattr(self, name))
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim must be a multiple of 4 (2-D sine embedding), got {self.embed_dim}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if self.partition not in ("flat", "padded"):
            raise ValueError(f"partition must be 'flat' or 'padded', got {self.partition!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def grid(self) -> tuple[int, int]:
        """BEV grid ``(nx, ny)`` in pillars."""
        return grid_shape(self.point_range, self.pillar_size)

    @classmethod
    def named(cls, size: str, **overrides: Any) -> SceneEncoderSpec:
        """A named size with optional overrides, e.g. ``SceneEncoderSpec.named("tiny", partition="padded")``.

        Sizes: ``tiny`` (32 wide, 4 layers, 12.8 m × 12.8 m at 0.4 m, 4 × 4 windows; tests and smoke runs) and
        ``base`` (GeoMAE's pre-training encoder, the defaults).

        Raises:
            ValueError: unknown size or override field.
        """
        if size not in SCENE_SIZES:
            raise ValueError(f"unknown scene encoder size {size!r}; known: {sorted(SCENE_SIZES)}")
        return cls.from_dict({**SCENE_SIZES[size], **overrides})


SCENE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "point_range": (-6.4, -6.4, -2.0, 6.4, 6.4, 2.0),
        "pillar_size": (0.4, 0.4),
        "vfe_dims": (16, 32),
        "embed_dim": 32,
        "depth": 4,
        "num_heads": 2,
        "ffn_dim": 64,
        "window": (4, 4),
        "group_size": 16,
        "buckets": (8, 16),
    },
    "base": {},
}

torch.serialization.add_safe_globals([SceneEncoderSpec])


class SceneOutput(NamedTuple):
    """What :meth:`PillarSceneEncoder.encode` returns.

    Attributes:
        features: (P, D) encoded pillar features (after the final LayerNorm).
        coords: (P, 3) int64 ``(batch, ix, iy)`` of the pillars.
        centers: (P, 2) metric xy centres of the pillars.
    """

    features: Tensor
    coords: Tensor
    centers: Tensor


class PillarSceneEncoder(nn.Module):
    """GeoMAE's pillar encoder: dynamic pillars → DynamicScatterVFE → window transformer → LayerNorm.

    Args:
        spec: the architecture.
    """

    def __init__(self, spec: SceneEncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.vfe = DynamicScatterVFE(3 + len(spec.point_channels), spec.vfe_dims)
        self.proj: nn.Module = (
            nn.Identity()
            if spec.vfe_dims[-1] == spec.embed_dim
            else nn.Linear(spec.vfe_dims[-1], spec.embed_dim)
        )
        self.transformer = WindowTransformer(
            spec.embed_dim,
            spec.depth,
            spec.num_heads,
            spec.ffn_dim,
            spec.window,
            spec.partition,
            spec.group_size,
            spec.buckets,
            dropout=spec.dropout,
        )
        self.norm = nn.LayerNorm(spec.embed_dim)

    @property
    def embed_dim(self) -> int:
        """Token width D."""
        return self.spec.embed_dim

    def pillarize(self, points: Tensor, valid: Tensor | None) -> Pillars:
        """The spec's dynamic pillars of scans. Shapes: points (B, N, 3), valid (B, N) bool or None."""
        return pillarize(points, valid, point_range=self.spec.point_range, pillar_size=self.spec.pillar_size)

    def pillar_centers(self, coords: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """Metric xy centres of pillars. Shapes: coords (P, 3) -> (P, 2)."""
        return pillar_centers(coords, self.spec.point_range, self.spec.pillar_size, dtype=dtype)

    def embed(self, points: Tensor, valid: Tensor | None, feats: Tensor | None) -> tuple[Pillars, Tensor]:
        """Pillarises scans and encodes every non-empty pillar into one token.

        Args:
            points: (B, N, 3) metric xyz; padding rows NaN or marked by ``valid``.
            valid: (B, N) bool, or None for "every finite row".
            feats: (B, N, C) extra per-point channels named by ``spec.point_channels`` (C of them), or None
                when C = 0.

        Returns:
            ``(pillars, tokens (P, D))``.

        Raises:
            ValueError: ``feats`` missing, unexpected or of the wrong shape.
        """
        channels = len(self.spec.point_channels)
        if channels and (feats is None or feats.shape != (*points.shape[:2], channels)):
            got = None if feats is None else tuple(feats.shape)
            raise ValueError(f"feats must be (B, N, {channels}) {self.spec.point_channels}, got {got}")
        if not channels and feats is not None and feats.shape[-1] != 0:
            raise ValueError(f"this encoder takes no extra point channels, got feats {tuple(feats.shape)}")
        pillars = self.pillarize(points, valid)
        rows = [points.reshape(-1, 3)[pillars.point_index]]
        if channels and feats is not None:
            rows.append(feats.reshape(-1, channels)[pillars.point_index].to(points.dtype))
        z_center = (self.spec.point_range[2] + self.spec.point_range[5]) / 2
        xy = self.pillar_centers(pillars.coords, dtype=points.dtype)
        centers = torch.cat([xy, xy.new_full((xy.shape[0], 1), z_center)], dim=1)
        pooled = self.vfe(torch.cat(rows, dim=1), pillars.point_pillar, centers)
        tokens: Tensor = self.proj(pooled)
        return pillars, tokens

    def forward(self, tokens: Tensor, coords: Tensor, keep: Tensor | None = None) -> Tensor:
        """Runs the window transformer and the final LayerNorm on the kept tokens.

        Args:
            tokens: (P, D) pillar tokens.
            coords: (P, 3) int ``(batch, ix, iy)`` (unique rows, as from :meth:`pillarize`).
            keep: (P,) bool, True = processed (MAE visible pillars); None keeps all. Windows and groups are
                built from the kept pillars only.

        Returns:
            (P_kept, D), in the order of the kept tokens.
        """
        if tokens.ndim != 2 or tokens.shape[1] != self.embed_dim or coords.shape != (tokens.shape[0], 3):
            raise ValueError(
                f"tokens must be (P, {self.embed_dim}) and coords (P, 3), got {tuple(tokens.shape)} and "
                f"{tuple(coords.shape)}"
            )
        if keep is not None:
            if keep.shape != (tokens.shape[0],) or keep.dtype != torch.bool:
                raise ValueError(f"keep must be a (P,) bool mask, got {keep.dtype} {tuple(keep.shape)}")
            tokens, coords = tokens[keep], coords[keep]
        out: Tensor = self.norm(self.transformer(tokens, coords))
        return out

    def encode(self, points: Tensor, valid: Tensor | None, feats: Tensor | None = None) -> SceneOutput:
        """Pillars, tokens and transformer in one call (all pillars kept).

        Args:
            points: (B, N, 3) metric xyz.
            valid: (B, N) bool or None.
            feats: (B, N, C) extra point channels, or None when C = 0.

        Returns:
            :class:`SceneOutput` with P pillars.
        """
        pillars, tokens = self.embed(points, valid, feats)
        return SceneOutput(
            features=self(tokens, pillars.coords),
            coords=pillars.coords,
            centers=self.pillar_centers(pillars.coords, dtype=points.dtype),
        )


# ------------------------------------------------------------------------------------------- artifacts


def _summary(meta: Mapping[str, Any]) -> str:
    spec = meta.get("spec", {})
    grouping = (
        f"flat groups of {spec.get('group_size')}"
        if spec.get("partition") == "flat"
        else f"padded windows {spec.get('buckets')}"
    )
    return (
        f"{spec.get('arch')} scene encoder {spec.get('embed_dim')}x{spec.get('depth')} "
        f"({spec.get('num_heads')} heads), {grouping}, windows {spec.get('window')}, "
        f"pillars {spec.get('pillar_size')} m, {meta.get('num_params', 0):,} parameters"
    )


register_artifact_kind(
    ArtifactKind(
        name=SCENE_ENCODER_KIND,
        module_class=PillarSceneEncoder,
        parse_spec=SceneEncoderSpec.from_dict,
        build=PillarSceneEncoder,
        summary=_summary,
    )
)


def load_scene_encoder(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> tuple[PillarSceneEncoder, dict[str, Any]]:
    """Rebuilds a :class:`PillarSceneEncoder` from a ``scene_encoder`` artifact and loads it strictly.

    Returns:
        (encoder in train mode, metadata).

    Raises:
        ArtifactError: unreadable artifact, wrong kind or invalid spec.
        WeightsMismatchError: missing, unexpected or mis-shaped weights (named in the message).
    """
    module, meta = load_artifact(path, kind=SCENE_ENCODER_KIND, map_location=map_location)
    if not isinstance(module, PillarSceneEncoder):
        raise ArtifactError(f"{path}: the artifact does not hold a PillarSceneEncoder")
    return module, meta
