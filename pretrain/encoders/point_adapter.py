"""Any2Point's adapters on a frozen pcpt point encoder (``arch="point_adapter"``).

Parameter-efficient finetuning at the end of the chain of stages: the encoder of a ``point_encoder`` artifact
from any pre-training stage (Point-MAE, Point-BERT, GeoMAE object level, a ViPFormer stage on a ``point_vit``
encoder) is frozen whole (tokenizer, positional MLP, blocks), and the same adapters as Any2Point's are
attached to its blocks (``pretrain.nn.any2point_adapter``): a bottleneck adapter on every block's MLP
branch and, on every block's output, the any-to-3D guided adapter (the 6 virtual views of
``pretrain.ops.virtual_projection`` cut the tokens into cells for a local attention shared by all blocks;
voxel clusters of the token centres weigh the views). The encoder keeps its own positional encoding (it
already encodes 3-D positions); its final LayerNorm trains, as Any2Point's ``encoder.norm`` does.

The frozen encoder is not part of the state dict: the spec names the artifact and the sha256 of its weights,
checked when the adapted encoder is built (artifacts of it hold the adapters and the norm only).
Families whose blocks take adapter contexts are supported (``point_vit``); others are refused with a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from datapipes.errors import UserError
from datapipes.files import sha256_file
from pretrain.artifact_files import WEIGHTS_FILE, load_artifact_tensors, load_state_strict
from pretrain.encoders.adapter_options import AdapterOptions, build_adapters, shared_attention_aliases
from pretrain.encoders.base import EncoderOutput, PointEncoder
from pretrain.encoders.frozen import leave_out_of_state, own_tensors
from pretrain.encoders.point_vit import PointViT
from pretrain.encoders.registry import build_encoder, spec_from_dict
from pretrain.encoders.spec import EncoderSpec
from pretrain.encoders.tokenizer import PointTokens
from pretrain.nn.any2point_adapter import guided_context_1d
from pretrain.nn.transformer import Block

__all__ = ["BaseEncoderError", "PointAdapterEncoder", "PointAdapterSpec"]


class BaseEncoderError(UserError):
    """A base encoder artifact that is missing, of an unsupported family, or not the one trained with."""


@dataclass(frozen=True)
class PointAdapterSpec(AdapterOptions, EncoderSpec):
    """Adapters on a frozen pcpt encoder artifact (``arch="point_adapter"``).

    Attributes:
        arch: ``"point_adapter"``.
        base_path: the frozen encoder's artifact directory.
        base_sha256: sha256 of its weights file; None until first built (then recorded and checked).
        train_norm: train the encoder's final LayerNorm.

        The adapter fields are those of :class:`~pretrain.encoders.adapter_options.AdapterOptions`
        (``cell_1d`` in positions of a 77-long line).
    """

    arch: Literal["point_adapter"] = "point_adapter"
    base_path: str = ""
    base_sha256: str | None = None
    train_norm: bool = True

    tuple_fields = ("direction",)

    def __post_init__(self) -> None:
        if self.arch != "point_adapter":
            raise ValueError(f"PointAdapterSpec has arch 'point_adapter', got {self.arch!r}")
        if not self.base_path:
            raise ValueError("base_path is required: the frozen encoder's artifact directory")
        self.check_adapter_options()


def load_base_encoder(spec: PointAdapterSpec) -> tuple[PointViT, str]:
    """The frozen encoder a spec names, loaded strictly, and the sha256 of its weights.

    Raises:
        BaseEncoderError: missing artifact, another sha256 than the spec's, or a family whose blocks take
            no adapter contexts.
    """
    path = Path(spec.base_path).expanduser()
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BaseEncoderError(f"{path}: the frozen base encoder artifact is missing (no {WEIGHTS_FILE})")
    sha = sha256_file(weights)
    if spec.base_sha256 is not None and sha != spec.base_sha256:
        raise BaseEncoderError(
            f"{weights}: sha256 {sha} is not the base encoder the adapters were trained on "
            f"({spec.base_sha256})"
        )
    tensors, meta = load_artifact_tensors(path, kind="point_encoder")
    base = build_encoder(spec_from_dict(meta.get("spec", {})))
    if not isinstance(base, PointViT):
        raise BaseEncoderError(
            f"{path}: a {meta.get('spec', {}).get('arch')!r} encoder; adapters need blocks that take "
            "adapter contexts (the point_vit family: Point-MAE, Point-BERT, GeoMAE object level, ViPFormer "
            "on point_vit)"
        )
    for name in meta.get("extra_tensors", []):
        tensors.pop(name, None)
    load_state_strict(base, tensors, source=weights)
    return base, sha


class PointAdapterEncoder(PointEncoder):
    """A frozen pcpt encoder with Any2Point's adapters (see the module docstring).

    Trainable: ``base.blocks.{i}.adapters.mlp.*`` (bottleneck), ``attn1.*`` / ``norm3.*`` (the shared local
    attention), ``base.blocks.{i}.adapters.output.*`` (guided adapters, without the shared attention) and,
    with ``train_norm``, ``base.norm.*``. Everything else of ``base`` is frozen and not saved.

    Args:
        spec: the adapters and the base artifact.

    Raises:
        BaseEncoderError: see :func:`load_base_encoder`.
    """

    spec: PointAdapterSpec

    def __init__(self, spec: PointAdapterSpec) -> None:
        super().__init__()
        if not isinstance(spec, PointAdapterSpec):
            raise ValueError(f"PointAdapterEncoder needs a PointAdapterSpec, got {type(spec).__name__}")
        base, sha = load_base_encoder(spec)
        where = str(Path(spec.base_path).expanduser().resolve())  # loads from any working directory
        self.spec = replace(spec, base_path=where, base_sha256=sha)
        self.base = base
        frozen = frozenset(base.state_dict()) - (
            {f"norm.{k}" for k in base.norm.state_dict()} if spec.train_norm else set()
        )
        base.requires_grad_(False)
        base.norm.requires_grad_(spec.train_norm)
        adapters = build_adapters(spec, base.embed_dim, len(base.blocks))
        for block, adapter in zip(base.blocks, adapters.mlp, strict=False):
            cast(Block, block).attach_adapter("mlp", adapter)
        for block, guided in zip(base.blocks, adapters.guided, strict=False):
            cast(Block, block).attach_adapter("output", guided)
        self.attn1, self.norm3 = adapters.attn1, adapters.norm3
        self._frozen_keys = frozen
        aliases = {f"base.{key}": "" for key in frozen}
        guided_at = (f"base.blocks.{i}.adapters.output." for i in range(len(adapters.guided)))
        aliases.update(shared_attention_aliases(adapters, guided_at))
        leave_out_of_state(self, aliases)
        self.train()  # the frozen base in eval mode from the start (Lightning never calls train())

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The parts that train, by module (every parameter in them trains, shared ones counted once)."""
        parts: dict[str, nn.Module] = {"attn1": self.attn1, "norm3": self.norm3}
        if self.spec.train_norm:
            parts["norm"] = self.base.norm
        for i, block in enumerate(self.base.blocks):
            for site, adapter in cast(Block, block).adapters.items():
                parts[f"{site}.{i}"] = adapter
        return parts

    def frozen_state(self) -> dict[str, Tensor]:
        """The frozen base tensors (names relative to ``base``), e.g. to check they never change."""
        own = own_tensors(self.base)
        return {key: own[key] for key in sorted(self._frozen_keys)}

    @property
    def embed_dim(self) -> int:
        """Token width D (the base's)."""
        return self.base.embed_dim

    @property
    def has_cls_token(self) -> bool:
        """Whether the base has a CLS token (then :meth:`pool` is concat[CLS, max])."""
        return self.base.has_cls_token

    @property
    def min_points(self) -> int:
        """Points per cloud the base's grouping needs."""
        return self.base.min_points

    def train(self, mode: bool = True) -> PointAdapterEncoder:
        """Train mode for the adapters; the frozen base stays in eval mode (its drop-path, dropout, BN)."""
        super().train(mode)
        self.base.eval()
        for block in self.base.blocks:
            cast(Block, block).adapters.train(mode)
        return self

    def tokenize(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PointTokens:
        """The frozen base's tokens of clouds (B, N, 3)."""
        return self.base.tokenize(xyz, generator=generator)

    def forward(
        self,
        tokens: Tensor,
        centers: Tensor,
        *,
        keep: Tensor | None = None,
        replace: Tensor | None = None,
        return_layers: Sequence[int] = (),
        contexts: Sequence[Any] | None = None,
    ) -> EncoderOutput:
        """Runs the frozen base with the adapters; ``contexts`` are computed here from ``centers``.

        Args:
            tokens: (B, G, D) tokens from :meth:`tokenize`.
            centers: (B, G, 3) their centres.
            keep: as the base encoder's (MAE-style token dropping).
            replace: as the base encoder's (needs its mask token).
            return_layers: block indices whose raw outputs are returned.
            contexts: not supported (must be None).

        Returns:
            The base's :class:`EncoderOutput`.
        """
        if contexts is not None:
            raise ValueError("the point_adapter encoder computes its adapters' contexts itself")
        spec = self.spec
        if keep is not None:  # the guided context must describe the tokens that remain
            kept = centers[keep].reshape(centers.shape[0], -1, 3)
        else:
            kept = centers
        context = guided_context_1d(
            kept,
            voxel_size=spec.voxel_size,
            direction=spec.direction,
            translation=spec.translation,
            cell=spec.cell_1d,
            has_cls=self.base.has_cls_token,
        )
        return self.base(
            tokens,
            centers,
            keep=keep,
            replace=replace,
            return_layers=return_layers,
            contexts=[context] * len(self.base.blocks),
        )
