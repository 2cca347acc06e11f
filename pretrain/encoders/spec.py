"""Value objects that describe an encoder and the data it expects.

Every encoder family has one spec class (a subclass of :class:`EncoderSpec` with its ``arch``) holding
everything needed to rebuild the encoder without the training code; it is stored in every encoder artifact
and parsed by LightningCLI from YAML. :class:`PointViTSpec` is the Point-BERT / Point-MAE family.
:class:`DataContract` records the preprocessing the encoder was trained with, so downstream code can check
that its data matches.

The defaults reproduce the official Point-MAE encoder (Pang et al., ECCV 2022): 384 wide, 12 blocks, 6 heads,
64 patches of 32 points, FPS starting at index 0 with the pointnet2 near-origin skip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch

from pretrain.nn.transformer import BlockOptions

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "NAMED_SIZES",
    "DataContract",
    "EncoderSpec",
    "PointViTSpec",
    "check_fps_start",
    "check_positive_int",
    "dataclass_from_dict",
]


def check_positive_int(name: str, value: int) -> None:
    """Spec field validation.

    Raises:
        ValueError: ``value`` is not an int >= 1 (bools are refused); the message names ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


SpecT = TypeVar("SpecT", bound="DataclassInstance")


def dataclass_from_dict(
    cls: type[SpecT], data: Mapping[str, Any], tuple_fields: tuple[str, ...] = ()
) -> SpecT:
    """Builds a spec dataclass from plain data (the ``from_dict`` of every pcpt spec).

    Args:
        cls: the dataclass.
        data: field values; missing fields take their defaults.
        tuple_fields: fields whose JSON lists become tuples.

    Raises:
        ValueError: ``data`` is not a mapping, names unknown fields (listed with the known ones), or holds
            values ``cls`` rejects.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}; known fields: {sorted(known)}")
    values = dict(data)
    for name in tuple_fields:
        if name in values and isinstance(values[name], list):
            values[name] = tuple(values[name])
    return cls(**values)


class PlainData:
    """``to_dict`` / ``from_dict`` of a frozen spec dataclass (JSON and ``weights_only`` friendly).

    Fields listed in ``tuple_fields`` are lists in plain data and tuples on the dataclass.
    """

    tuple_fields: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON and ``torch.load(weights_only=True)`` friendly)."""
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        for name in self.tuple_fields:
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls: type[PlainDataT], data: Mapping[str, Any]) -> PlainDataT:
        """Inverse of :meth:`to_dict`; missing fields take their defaults.

        Raises:
            ValueError: unknown fields (named in the message) or invalid values.
        """
        return dataclass_from_dict(cls, data, tuple_fields=cls.tuple_fields)  # type: ignore[type-var]


PlainDataT = TypeVar("PlainDataT", bound=PlainData)


@dataclass(frozen=True)
class EncoderSpec(PlainData):
    """What every encoder family's spec has: the ``arch`` that names the family in the registry.

    Each family (``pretrain.encoders.registry``) defines one frozen dataclass that subclasses this one, sets
    ``arch`` to a ``Literal`` with its own name as the default, and holds every field needed to rebuild the
    encoder from the artifact alone.
    """

    arch: str


@dataclass(frozen=True)
class PointViTSpec(EncoderSpec):
    """Architecture of the Point-BERT / Point-MAE patch transformer (``arch="point_vit"``).

    Attributes:
        arch: ``"point_vit"``.
        embed_dim: transformer width D.
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: hidden width of the block MLP as a multiple of ``embed_dim``.
        num_groups: patches G per cloud (FPS centres).
        group_size: points K per patch (kNN of each centre).
        tokenizer_dim: output width of the point tokenizer's mini-PointNet. Point-BERT uses 256 followed by a
            ``reduce_dim`` Linear to ``embed_dim``; when equal to ``embed_dim`` (Point-MAE) there is no reduce
            layer.
        drop_path: stochastic-depth rate of the last block (linearly increasing from 0).
        cls_token: prepend a learnable CLS token with its own positional embedding ``cls_pos``
            (Point-BERT, finetuned classifiers).
        mask_token: own a learnable mask token for BERT-style replacement (``replace=`` in ``forward``).
        fps_start: index of the first FPS centre, or ``"random"`` (drawn from the caller's generator).
        fps_skip_near_origin: reproduce the pointnet2 kernel, which never picks points with
            x²+y²+z² ≤ 1e-3 after the first centre.
        qkv_bias: bias on the attention's qkv projection (block option; False officially).
        norm_first: pre-norm blocks (True officially) or post-norm.
        attn_drop: dropout on attention probabilities.
        proj_drop: dropout on each residual branch's output.
        layer_scale: LayerScale initial value, or None (officially none).
        activation: block MLP activation.
        pos_every_block: re-add the positional embedding before every block (officially) or once.
    """

    arch: Literal["point_vit"] = "point_vit"
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_groups: int = 64
    group_size: int = 32
    tokenizer_dim: int = 384
    drop_path: float = 0.1
    cls_token: bool = False
    mask_token: bool = False
    fps_start: int | Literal["random"] = 0
    fps_skip_near_origin: bool = True
    qkv_bias: bool = False
    norm_first: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    layer_scale: float | None = None
    activation: Literal["gelu", "gelu_tanh", "quick_gelu", "relu"] = "gelu"
    pos_every_block: bool = True

    def __post_init__(self) -> None:
        if self.arch != "point_vit":
            raise ValueError(f"PointViTSpec has arch 'point_vit', got {self.arch!r}")
        for name in ("embed_dim", "depth", "num_heads", "num_groups", "group_size", "tokenizer_dim"):
            check_positive_int(name, getattr(self, name))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        check_fps_start(self.fps_start)
        _ = self.block_options  # validates the block fields

    @property
    def block_options(self) -> BlockOptions:
        """The block fields as :class:`~pretrain.nn.transformer.BlockOptions`."""
        return BlockOptions(
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            norm_first=self.norm_first,
            attn_drop=self.attn_drop,
            proj_drop=self.proj_drop,
            layer_scale=self.layer_scale,
            activation=self.activation,
        )

    @property
    def has_reduce_dim(self) -> bool:
        """Whether a ``reduce_dim`` Linear maps tokenizer features to ``embed_dim``."""
        return self.tokenizer_dim != self.embed_dim

    @classmethod
    def named(cls, size: str, **overrides: Any) -> PointViTSpec:
        """A named size with optional field overrides, e.g. ``PointViTSpec.named("tiny", cls_token=True)``.

        Sizes: ``tiny`` (32 wide, 2 blocks, 2 heads, 16 groups of 8 points; for tests and smoke runs) and
        ``small`` (the official Point-BERT/Point-MAE encoder: 384 × 12 blocks × 6 heads, 64 groups of 32).

        Raises:
            ValueError: unknown size or override field.
        """
        if size not in NAMED_SIZES:
            raise ValueError(f"unknown encoder size {size!r}; known: {sorted(NAMED_SIZES)}")
        return cls.from_dict({**NAMED_SIZES[size], **overrides})


def check_fps_start(value: object) -> None:
    """Validates an FPS start (an index >= 0 or ``"random"``).

    Raises:
        ValueError: anything else.
    """
    if value != "random" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"fps_start must be an int >= 0 or 'random', got {value!r}")


NAMED_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "num_groups": 16,
        "group_size": 8,
        "tokenizer_dim": 32,
    },
    "small": {
        "embed_dim": 384,
        "depth": 12,
        "num_heads": 6,
        "num_groups": 64,
        "group_size": 32,
        "tokenizer_dim": 384,
    },
}


@dataclass(frozen=True)
class DataContract(PlainData):
    """Preprocessing an encoder was trained with; downstream data must match it.

    Attributes:
        num_points: points per cloud fed to the encoder.
        normalization: ``"unit_sphere"`` (centre on the centroid, scale the farthest point to radius 1)
            or ``"none"``.
        fps_order: whether the clouds were stored in farthest-point order (first n = FPS subsample).
        channels: per-point input channels, in order.
    """

    num_points: int = 1024
    normalization: Literal["unit_sphere", "none"] = "unit_sphere"
    fps_order: bool = False
    channels: tuple[str, ...] = ("x", "y", "z")

    tuple_fields: ClassVar[tuple[str, ...]] = ("channels",)

    def __post_init__(self) -> None:
        check_positive_int("num_points", self.num_points)
        if self.normalization not in ("unit_sphere", "none"):
            raise ValueError(f"normalization must be 'unit_sphere' or 'none', got {self.normalization!r}")
        if not self.channels or not all(isinstance(c, str) for c in self.channels):
            raise ValueError(f"channels must be a non-empty tuple of names, got {self.channels!r}")


# Modules built outside LightningCLI pickle these into hyper-parameters; keep such checkpoints loadable
# under torch.load(weights_only=True).
torch.serialization.add_safe_globals([PointViTSpec, DataContract])
