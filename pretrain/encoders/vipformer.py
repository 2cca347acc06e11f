"""ViPFormer encoders (Sun et al., ICRA 2023): the point family ``vipformer_point`` and the image encoder.

Both encoders share the Perceiver-style trunk of :mod:`pretrain.nn.perceiver` (see there for the exact
layer equations). Architecture names of the paper map onto specs as ``E{ca}CL{sa}SL-H{heads}D{dim}-L{latents}-
MR{mlp}`` -> ``num_cross_layers``, ``num_sa_layers``, ``num_heads``, ``embed_dim``, ``num_latents``,
``mlp_ratio``; the released configurations are the named sizes ``h4d256`` (E1CL8SL-H4D256-L128-MR2) and
``h6d384`` (E1CL8SL-H6D384-L128-MR4).

Point encoder (:class:`ViPFormerPointEncoder`), as the official ``CrossFormer_pc_mp``:

* per-point tokens (the cross-attention memory): ``input_adapter.point_mlp`` = Linear 3→64, LayerNorm, ReLU,
  Linear 64→D over every input point;
* latents: G = ``num_latents`` FPS centres, their K = ``group_size`` nearest points, embedded by the
  ``Group2Emb`` mini-PointNet (Conv1d 3→64, BN, ReLU, Conv1d 64→128; max; concat[global, per-point]
  → 256; Conv1d 256→256, BN, ReLU, Conv1d 256→D; max) -> one token per patch;
* positional embedding of the centres: Linear(3→128), GELU, Linear(128→D), added to the latents before
  every layer of the trunk;
* output: the latents after the last layer (no final LayerNorm); pooled feature concat[max, mean] (the
  official ``backbone_feats``).

``official_centering`` reproduces the official patch-centring bug (METHODS.md §5.3): only the 3 neighbours
of each patch with the lowest point index are made centre-relative, the others keep absolute coordinates
(the order ``topk(sorted=False)`` returns on CUDA, where the released weights were trained). Off by default,
on for imported official weights. FPS: pcpt's deterministic start 0 by default; ``fps_start="random"`` draws
the start from the caller's generator as the official code does (from the global one). Like the official
FPS there is no near-origin skip and ties go to the first index. kNN uses pcpt's exact distances; the
official expanded ``-2c·p + |c|² + |p|²`` form can pick another neighbour only at float32 near-ties.

Image encoder (:class:`ViPFormerImageEncoder`, official ``CrossFormer_img_mp``): images (B, 3, H, W),
already normalised, cut into ``patch_size``² patches flattened in (p1, p2, c) order (channel-last, as the
official code), Linear(p²·3→D), a learned positional parameter (1, L, D); the trunk uses the patch
embeddings both as the initial latents and as the memory (without the positional term).

Parameter names (official -> pcpt, a prefix edit in ``pretrain.importers``): ``group2emb.`` -> ``tokenizer.``,
``position_emb.`` -> ``pos_embed.``, ``input_adapter.`` kept, ``encoder.`` -> ``trunk.`` (with
``cross_attn_n`` -> ``cross_attn`` for one cross-attention layer), ``patch2emb.1.`` -> ``patch_embed.``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pretrain.encoders.base import EncoderOutput, PointEncoder, resolve_layers
from pretrain.encoders.spec import EncoderSpec, check_fps_start, check_positive_int
from pretrain.encoders.tokenizer import PointTokens, group_by_spec
from pretrain.nn.perceiver import PerceiverTrunk, PointInputAdapter
from pretrain.nn.pointnet import MiniPointNet
from pretrain.nn.pos_embed import CenterPosEmbed
from pretrain.ops import PatchGroups, gather_points

__all__ = [
    "IMAGE_SIZES",
    "OFFICIAL_CENTERED_NEIGHBOURS",
    "POINT_SIZES",
    "Group2Emb",
    "ViPFormerImageEncoder",
    "ViPFormerImageSpec",
    "ViPFormerPointEncoder",
    "ViPFormerPointSpec",
    "official_partial_centering",
]

#: neighbours per patch the official ``divide_patches`` makes centre-relative.
OFFICIAL_CENTERED_NEIGHBOURS = 3


def _check_trunk(spec: Any) -> None:
    for name in ("embed_dim", "num_cross_layers", "num_sa_layers", "num_heads", "mlp_ratio"):
        check_positive_int(name, getattr(spec, name))
    if spec.embed_dim % spec.num_heads:
        raise ValueError(f"num_heads={spec.num_heads} must divide embed_dim={spec.embed_dim}")
    if spec.num_cross_layers > spec.num_sa_layers + 1:
        raise ValueError(
            f"num_cross_layers={spec.num_cross_layers} needs num_sa_layers >= {spec.num_cross_layers - 1} "
            "(later cross-attention layers run before self-attention layers)"
        )
    for name in ("mlp_drop", "cross_attn_drop", "attn_drop"):
        if not 0.0 <= getattr(spec, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(spec, name)}")


def _trunk(spec: Any) -> PerceiverTrunk:
    return PerceiverTrunk(
        spec.embed_dim,
        num_heads=spec.num_heads,
        num_sa_layers=spec.num_sa_layers,
        num_cross_layers=spec.num_cross_layers,
        mlp_ratio=spec.mlp_ratio,
        mlp_drop=spec.mlp_drop,
        cross_attn_drop=spec.cross_attn_drop,
        attn_drop=spec.attn_drop,
    )


def _named(cls: Any, sizes: dict[str, dict[str, Any]], size: str, overrides: dict[str, Any]) -> Any:
    if size not in sizes:
        raise ValueError(f"unknown {cls.__name__} size {size!r}; known: {sorted(sizes)}")
    return cls.from_dict({**sizes[size], **overrides})


# ------------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class ViPFormerPointSpec(EncoderSpec):
    """Architecture of the ViPFormer point encoder (``arch="vipformer_point"``).

    Defaults: E1CL8SL-H4D256-L128-MR2, the official dropouts, pcpt's deterministic FPS and full centring.

    Attributes:
        arch: ``"vipformer_point"``.
        embed_dim: latent width D.
        num_latents: latents = FPS patches per cloud (also :attr:`num_groups`).
        group_size: points K per patch.
        num_cross_layers: cross-attention layers (the first one, then a shared one before self-attention
            layers ``0 .. num_cross_layers - 2``).
        num_sa_layers: self-attention layers.
        num_heads: attention heads of every layer.
        mlp_ratio: integer MLP widening factor.
        mlp_drop: residual dropout of the self-attention and MLP branches (0.5 officially).
        cross_attn_drop: residual dropout of the cross-attention branch (0.1 officially).
        attn_drop: dropout on attention probabilities (0.1 officially).
        official_centering: only the 3 lowest-index neighbours of each patch are centre-relative (the
            official bug; on for imported official weights).
        fps_start: index of the first FPS centre, or ``"random"`` (drawn from the caller's generator;
            officially random).
        fps_skip_near_origin: the pointnet2_ops near-origin skip (False: ViPFormer's FPS has none).
    """

    arch: Literal["vipformer_point"] = "vipformer_point"
    embed_dim: int = 256
    num_latents: int = 128
    group_size: int = 32
    num_cross_layers: int = 1
    num_sa_layers: int = 8
    num_heads: int = 4
    mlp_ratio: int = 2
    mlp_drop: float = 0.5
    cross_attn_drop: float = 0.1
    attn_drop: float = 0.1
    official_centering: bool = False
    fps_start: int | Literal["random"] = 0
    fps_skip_near_origin: bool = False

    def __post_init__(self) -> None:
        if self.arch != "vipformer_point":
            raise ValueError(f"ViPFormerPointSpec has arch 'vipformer_point', got {self.arch!r}")
        _check_trunk(self)
        check_positive_int("num_latents", self.num_latents)
        check_positive_int("group_size", self.group_size)
        check_fps_start(self.fps_start)

    @property
    def num_groups(self) -> int:
        """Patches per cloud (= ``num_latents``; the grouping interface of pcpt specs)."""
        return self.num_latents

    @property
    def depth(self) -> int:
        """Numbered layers for ``return_layers``: the first cross-attention layer and the SA layers."""
        return 1 + self.num_sa_layers

    @classmethod
    def named(cls, size: str, **overrides: Any) -> ViPFormerPointSpec:
        """A named size with optional field overrides.

        Sizes: ``tiny`` (64 wide, 2 SA layers, 4 heads, 32 latents of 16 points; tests and smoke runs),
        ``h4d256`` (E1CL8SL-H4D256-L128-MR2) and ``h6d384`` (E1CL8SL-H6D384-L128-MR4), both 128 latents of 32.

        Raises:
            ValueError: unknown size or override field.
        """
        spec: ViPFormerPointSpec = _named(cls, POINT_SIZES, size, overrides)
        return spec


@dataclass(frozen=True)
class ViPFormerImageSpec(EncoderSpec):
    """Architecture of the ViPFormer image encoder (``arch="vipformer_image"``; kind ``image_encoder``).

    Attributes:
        arch: ``"vipformer_image"``.
        image_size: square input size in pixels (144 officially).
        patch_size: square patch size in pixels; divides ``image_size`` (12 officially: 144 patches).
        embed_dim: width D.
        num_cross_layers: cross-attention layers.
        num_sa_layers: self-attention layers.
        num_heads: attention heads.
        mlp_ratio: integer MLP widening factor.
        mlp_drop: residual dropout of the self-attention and MLP branches.
        cross_attn_drop: residual dropout of the cross-attention branch.
        attn_drop: dropout on attention probabilities.
    """

    arch: Literal["vipformer_image"] = "vipformer_image"
    image_size: int = 144
    patch_size: int = 12
    embed_dim: int = 256
    num_cross_layers: int = 1
    num_sa_layers: int = 8
    num_heads: int = 4
    mlp_ratio: int = 2
    mlp_drop: float = 0.5
    cross_attn_drop: float = 0.1
    attn_drop: float = 0.1

    def __post_init__(self) -> None:
        if self.arch != "vipformer_image":
            raise ValueError(f"ViPFormerImageSpec has arch 'vipformer_image', got {self.arch!r}")
        _check_trunk(self)
        check_positive_int("image_size", self.image_size)
        check_positive_int("patch_size", self.patch_size)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")

    @property
    def num_patches(self) -> int:
        """Patches (tokens) per image L = (image_size / patch_size)²."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: patch_size² · 3."""
        return self.patch_size * self.patch_size * 3

    @property
    def depth(self) -> int:
        """Numbered layers: the first cross-attention layer and the SA layers."""
        return 1 + self.num_sa_layers

    @classmethod
    def named(cls, size: str, **overrides: Any) -> ViPFormerImageSpec:
        """A named size with optional field overrides.

        Sizes: ``tiny`` (48-pixel images in 12-pixel patches, 64 wide, 2 SA layers, 4 heads), ``h4d256`` and
        ``h6d384`` (the official 144-pixel images in 12-pixel patches, as the point sizes).

        Raises:
            ValueError: unknown size or override field.
        """
        spec: ViPFormerImageSpec = _named(cls, IMAGE_SIZES, size, overrides)
        return spec


_TRUNK_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 64, "num_cross_layers": 1, "num_sa_layers": 2, "num_heads": 4, "mlp_ratio": 2},
    "h4d256": {"embed_dim": 256, "num_cross_layers": 1, "num_sa_layers": 8, "num_heads": 4, "mlp_ratio": 2},
    "h6d384": {"embed_dim": 384, "num_cross_layers": 1, "num_sa_layers": 8, "num_heads": 6, "mlp_ratio": 4},
}
#: named sizes of :class:`ViPFormerPointSpec`.
POINT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {**_TRUNK_SIZES["tiny"], "num_latents": 32, "group_size": 16},
    "h4d256": {**_TRUNK_SIZES["h4d256"], "num_latents": 128, "group_size": 32},
    "h6d384": {**_TRUNK_SIZES["h6d384"], "num_latents": 128, "group_size": 32},
}
#: named sizes of :class:`ViPFormerImageSpec`.
IMAGE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {**_TRUNK_SIZES["tiny"], "image_size": 48, "patch_size": 12},
    "h4d256": {**_TRUNK_SIZES["h4d256"], "image_size": 144, "patch_size": 12},
    "h6d384": {**_TRUNK_SIZES["h6d384"], "image_size": 144, "patch_size": 12},
}


# ---------------------------------------------------------------------------------------------- patches


class Group2Emb(MiniPointNet):
    """ViPFormer's patch mini-PointNet (official ``Group2Emb``): patches (B, G, K, 3) -> (B, G, out_dim).

    Conv1d 3→64, BN, ReLU, Conv1d 64→128; max; concat[global, per-point]; Conv1d 256→256, BN, ReLU,
    Conv1d 256→out; max. The Point-BERT mini-PointNet at half the widths (same forward pass, official
    names ``first_conv.*``, ``second_conv.*``).

    Args:
        out_dim: token width D.
        in_channels: per-point channels (3 for xyz).
    """

    def __init__(self, out_dim: int, in_channels: int = 3) -> None:
        super().__init__(out_dim, in_channels)
        self.first_conv = nn.Sequential(
            nn.Conv1d(in_channels, 64, 1), nn.BatchNorm1d(64), nn.ReLU(inplace=True), nn.Conv1d(64, 128, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(256, 256, 1), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Conv1d(256, out_dim, 1)
        )


def official_partial_centering(
    xyz: Tensor, groups: PatchGroups, count: int = OFFICIAL_CENTERED_NEIGHBOURS
) -> Tensor:
    """Patch points as the official ``divide_patches`` produces them on CUDA (METHODS.md §5.3).

    The ``count`` neighbours of each patch with the lowest point index are centre-relative (exactly
    ``groups.neighborhoods``); the other neighbours keep their absolute coordinates. Slot order is that of
    ``groups`` (the mini-PointNet max-pools, so it does not matter).

    Args:
        xyz: (B, N, 3) the clouds ``groups`` was made from.
        groups: their patches (``idx`` (B, G, K) into N, ``neighborhoods`` (B, G, K, 3)).
        count: neighbours made centre-relative (3 officially; all when ``count >= K``).

    Returns:
        (B, G, K, 3), differentiable in ``xyz``.
    """
    absolute = gather_points(xyz, groups.idx)
    lowest = groups.idx.argsort(dim=-1, stable=True)[..., :count]
    centred = torch.zeros_like(groups.idx, dtype=torch.bool).scatter_(-1, lowest, True)
    return torch.where(centred.unsqueeze(-1), groups.neighborhoods, absolute)


# -------------------------------------------------------------------------------------------- encoders


class ViPFormerPointEncoder(PointEncoder):
    """The ViPFormer point encoder built from a :class:`ViPFormerPointSpec` (see the module docstring).

    The cross-attention needs the per-point tokens of the whole cloud: :meth:`encode` computes them, and
    :meth:`forward` takes them as ``memory``. Masking (``keep``, ``replace``) and adapter contexts are not
    supported (the latents are the FPS patches; dropping some would still let the memory see their points).

    Args:
        spec: architecture.
    """

    spec: ViPFormerPointSpec

    def __init__(self, spec: ViPFormerPointSpec) -> None:
        super().__init__()
        if not isinstance(spec, ViPFormerPointSpec):
            raise ValueError(f"ViPFormerPointEncoder needs a ViPFormerPointSpec, got {type(spec).__name__}")
        self.spec = spec
        dim = spec.embed_dim
        self.input_adapter = PointInputAdapter(dim)
        self.tokenizer = Group2Emb(dim)
        self.pos_embed = CenterPosEmbed(dim)
        self.trunk = _trunk(spec)

    @property
    def min_points(self) -> int:
        """``max(num_latents, group_size)``: FPS needs G points, every patch K neighbours."""
        return max(self.spec.num_latents, self.spec.group_size)

    def group(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PatchGroups:
        """FPS + kNN patches of clouds (B, N, 3) with the spec's grouping settings."""
        return group_by_spec(xyz, self.spec, generator=generator)

    def patches(self, xyz: Tensor, groups: PatchGroups) -> Tensor:
        """The mini-PointNet input (B, G, K, 3): centre-relative patches, or the official partial centring."""
        if self.spec.official_centering:
            return official_partial_centering(xyz, groups)
        return groups.neighborhoods

    def point_tokens(self, xyz: Tensor) -> Tensor:
        """Per-point tokens (B, N, D) of clouds (B, N, 3): the cross-attention memory."""
        out: Tensor = self.input_adapter(xyz)
        return out

    def tokenize(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PointTokens:
        """Groups clouds (B, N, 3) and embeds the patches -> (groups, latents (B, G, D))."""
        groups = self.group(xyz, generator=generator)
        return PointTokens(groups, self.tokenizer(self.patches(xyz, groups)))

    def encode(
        self,
        xyz: Tensor,
        *,
        generator: torch.Generator | None = None,
        contexts: Sequence[Any] | None = None,
    ) -> EncoderOutput:
        """Encodes clouds (B, N, 3): latents from :meth:`tokenize`, memory from :meth:`point_tokens`."""
        groups, tokens = self.tokenize(xyz, generator=generator)
        return self(tokens, groups.centers, contexts=contexts, memory=self.point_tokens(xyz))

    def forward(
        self,
        tokens: Tensor,
        centers: Tensor,
        *,
        keep: Tensor | None = None,
        replace: Tensor | None = None,
        return_layers: Sequence[int] = (),
        contexts: Sequence[Any] | None = None,
        memory: Tensor | None = None,
    ) -> EncoderOutput:
        """Runs the trunk over the latents.

        Args:
            tokens: (B, G, D) latents from :meth:`tokenize`.
            centers: (B, G, 3) patch centres, for the positional embedding.
            keep: not supported (must be None).
            replace: not supported (must be None).
            return_layers: layer numbers (0 = first cross-attention layer, ``i + 1`` = self-attention layer
                ``i``; negative counts from the end) whose outputs are returned.
            contexts: not supported (must be None).
            memory: (B, N, D) per-point tokens from :meth:`point_tokens` (required).

        Returns:
            :class:`EncoderOutput` with the latents after the last layer (B, G, D), the centres, no CLS
            token, and the requested layer outputs.

        Raises:
            ValueError: ``keep``, ``replace`` or ``contexts`` given, no ``memory``, bad shapes, or a layer
                number out of range.
        """
        for name, value in (("keep", keep), ("replace", replace), ("contexts", contexts)):
            if value is not None:
                raise ValueError(f"the vipformer_point encoder does not support {name}= (no token masking)")
        self._check_inputs(tokens, centers, memory)
        assert memory is not None  # checked above
        layer_ids = resolve_layers(return_layers, self.spec.depth)
        x, captured = self.trunk(tokens, self.pos_embed(centers), memory, capture=layer_ids)
        return EncoderOutput(tokens=x, centers=centers, layers=[captured[i] for i in layer_ids])

    def _check_inputs(self, tokens: Tensor, centers: Tensor, memory: Tensor | None) -> None:
        dim = self.spec.embed_dim
        if tokens.ndim != 3 or tokens.shape[-1] != dim:
            raise ValueError(f"tokens must have shape (B, G, {dim}), got {tuple(tokens.shape)}")
        batch, num_groups, _ = tokens.shape
        if centers.shape != (batch, num_groups, 3):
            raise ValueError(
                f"centers must have shape ({batch}, {num_groups}, 3) to match tokens, "
                f"got {tuple(centers.shape)}"
            )
        if memory is None:
            raise ValueError(
                "the vipformer_point encoder needs memory= (B, N, D) per-point tokens from point_tokens(xyz) "
                "for its cross-attention; encode(xyz) computes them"
            )
        if memory.ndim != 3 or memory.shape[0] != batch or memory.shape[-1] != dim:
            raise ValueError(f"memory must have shape ({batch}, N, {dim}), got {tuple(memory.shape)}")


class ViPFormerImageEncoder(nn.Module):
    """The ViPFormer image encoder built from a :class:`ViPFormerImageSpec` (see the module docstring).

    Parameters: ``patch_embed.*`` (Linear p²·3→D), ``pos_embed`` (1, L, D), ``trunk.*``.

    Args:
        spec: architecture.
    """

    spec: ViPFormerImageSpec

    def __init__(self, spec: ViPFormerImageSpec) -> None:
        super().__init__()
        if not isinstance(spec, ViPFormerImageSpec):
            raise ValueError(f"ViPFormerImageEncoder needs a ViPFormerImageSpec, got {type(spec).__name__}")
        self.spec = spec
        self.patch_embed = nn.Linear(spec.patch_dim, spec.embed_dim)
        self.pos_embed = nn.Parameter(torch.randn(1, spec.num_patches, spec.embed_dim))  # official init
        self.trunk = _trunk(spec)

    @property
    def embed_dim(self) -> int:
        """Token width D."""
        return self.spec.embed_dim

    @property
    def pooled_dim(self) -> int:
        """Width of :meth:`pool` output (2D)."""
        return 2 * self.spec.embed_dim

    def patchify(self, images: Tensor) -> Tensor:
        """Cuts images into flattened patches in (p1, p2, c) order.

        Args:
            images: (B, 3, H, W) with H = W = ``image_size``.

        Returns:
            (B, L, p·p·3), patches in row-major order over the image.
        """
        size, patch = self.spec.image_size, self.spec.patch_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        batch, side = images.shape[0], size // patch
        hwc = images.permute(0, 2, 3, 1)  # channel-last, as the official input
        grid = hwc.reshape(batch, side, patch, side, patch, 3).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(batch, side * side, self.spec.patch_dim)

    def encode_layers(self, images: Tensor, return_layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """Encodes images and returns intermediate layers.

        Args:
            images: (B, 3, H, W) normalised images.
            return_layers: layer numbers (0 = first cross-attention layer, ``i + 1`` = self-attention layer
                ``i``; negative counts from the end).

        Returns:
            ``(tokens (B, L, D) after the last layer, [requested outputs (B, L, D)])``.
        """
        layer_ids = resolve_layers(return_layers, self.spec.depth)
        tokens = self.patch_embed(self.patchify(images))
        x, captured = self.trunk(tokens, self.pos_embed.to(tokens.dtype), tokens, capture=layer_ids)
        return x, [captured[i] for i in layer_ids]

    def forward(self, images: Tensor) -> Tensor:
        """Shapes: normalised images (B, 3, H, W) -> tokens (B, L, D) after the last layer (L = 144)."""
        tokens, _ = self.encode_layers(images)
        return tokens

    def pool(self, tokens: Tensor) -> Tensor:
        """Global feature (B, 2D): concat[max, mean] over tokens (B, L, D) (official ``backbone_feats``)."""
        return torch.cat([tokens.amax(dim=1), tokens.mean(dim=1)], dim=-1)


# Modules built outside LightningCLI pickle these into hyper-parameters; keep such checkpoints loadable
# under torch.load(weights_only=True).
torch.serialization.add_safe_globals([ViPFormerPointSpec, ViPFormerImageSpec])
