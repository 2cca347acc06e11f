"""The interface every pcpt point encoder implements, and its output type.

Methods never subclass an encoder to change its forward pass: they drop tokens (``keep``, MAE style),
swap them for the mask token (``replace``, BERT style) or read intermediate blocks (``return_layers``).
The forward path has named stages: ``group`` → ``embed`` → ``forward`` (positional embedding, blocks, norm).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from pretrain.encoders.spec import EncoderSpec
from pretrain.ops import PatchGroups, group_points

__all__ = ["EncoderOutput", "GroupingSpec", "PointEncoder", "group_by_spec"]


class GroupingSpec(Protocol):
    """The grouping settings of a spec (:class:`EncoderSpec`, ``DVAESpec``)."""

    @property
    def num_groups(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def fps_start(self) -> int | Literal["random"]: ...
    @property
    def fps_skip_near_origin(self) -> bool: ...


def group_by_spec(
    xyz: Tensor, spec: GroupingSpec, *, generator: torch.Generator | None = None
) -> PatchGroups:
    """FPS + kNN patches with a spec's settings (G, K, FPS start, near-origin skip).

    Shapes:
        xyz: (B, N, 3). returns: centres (B, G, 3) and centre-relative neighbourhoods (B, G, K, 3).
    """
    return group_points(
        xyz,
        spec.num_groups,
        spec.group_size,
        fps_start=spec.fps_start,
        skip_near_origin=spec.fps_skip_near_origin,
        generator=generator,
    )


@dataclass
class EncoderOutput:
    """What an encoder returns.

    Attributes:
        tokens: (B, G', D) patch tokens after the final norm (CLS excluded); G' = G, or the kept count.
        centers: (B, G', 3) centres of those patches.
        cls: (B, D) CLS token after the final norm, or None when the spec has no CLS token.
        layers: raw outputs (before the final norm) of the blocks named in ``return_layers``, in the order
            requested, each (B, G', D), patch tokens only.
    """

    tokens: Tensor
    centers: Tensor
    cls: Tensor | None = None
    layers: list[Tensor] = field(default_factory=list)


class PointEncoder(nn.Module, ABC):
    """A transformer over point patches, built from an :class:`EncoderSpec` alone.

    Subclasses implement :meth:`embed` and :meth:`forward`; grouping, tokenising, encoding a raw cloud and
    pooling are shared.
    """

    spec: EncoderSpec
    #: top-level parameter names that count as embeddings (layer id 0) in :meth:`layer_id`.
    embedding_names: frozenset[str] = frozenset(
        {"tokenizer", "reduce_dim", "pos_embed", "cls_token", "cls_pos", "mask_token"}
    )

    def group(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PatchGroups:
        """Splits clouds into patches with the spec's grouping settings (FPS start, near-origin skip).

        Args:
            xyz: (B, N, 3) points, N >= ``spec.group_size`` and N >= ``spec.num_groups``.
            generator: used only when ``spec.fps_start == "random"``.

        Returns:
            Patch groups with centres (B, G, 3) and centre-relative neighbourhoods (B, G, K, 3).
        """
        spec = self.spec
        if xyz.ndim != 3 or xyz.shape[-1] != 3:
            raise ValueError(f"xyz must have shape (B, N, 3), got {tuple(xyz.shape)}")
        needed = max(spec.num_groups, spec.group_size)
        if xyz.shape[1] < needed:
            raise ValueError(
                f"clouds have {xyz.shape[1]} points but the encoder needs at least {needed} "
                f"(num_groups={spec.num_groups}, group_size={spec.group_size})"
            )
        return group_by_spec(xyz, spec, generator=generator)

    @abstractmethod
    def embed(self, neighborhoods: Tensor) -> Tensor:
        """Embeds patches: (B, G, K, 3) centre-relative points -> (B, G, D) tokens."""

    def tokenize(
        self, xyz: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[PatchGroups, Tensor]:
        """Groups clouds (B, N, 3) and embeds the patches -> (groups, tokens (B, G, D))."""
        groups = self.group(xyz, generator=generator)
        return groups, self.embed(groups.neighborhoods)

    @abstractmethod
    def forward(
        self,
        tokens: Tensor,
        centers: Tensor,
        *,
        keep: Tensor | None = None,
        replace: Tensor | None = None,
        return_layers: Sequence[int] = (),
    ) -> EncoderOutput:
        """Runs the transformer over patch tokens.

        Args:
            tokens: (B, G, D) patch embeddings from :meth:`embed`.
            centers: (B, G, 3) patch centres, used for the positional embedding.
            keep: optional bool (B, G) with the same count per row; only True tokens are processed.
            replace: optional bool (B, G); True tokens are swapped for the mask token, positions kept.
            return_layers: block indices (negative counts from the end) whose raw outputs are returned.

        Returns:
            The encoder output; see :class:`EncoderOutput`.
        """

    def encode(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> EncoderOutput:
        """Groups, embeds and encodes clouds (B, N, 3) without masking."""
        groups, tokens = self.tokenize(xyz, generator=generator)
        return self(tokens, groups.centers)

    def pool(self, out: EncoderOutput) -> Tensor:
        """Global feature (B, 2D): concat[CLS, max over tokens] with a CLS token, else concat[max, mean]."""
        pooled_max = out.tokens.amax(dim=1)
        if out.cls is not None:
            return torch.cat([out.cls, pooled_max], dim=-1)
        return torch.cat([pooled_max, out.tokens.mean(dim=1)], dim=-1)

    @property
    def embed_dim(self) -> int:
        """Token width D."""
        return self.spec.embed_dim

    @property
    def pooled_dim(self) -> int:
        """Width of :meth:`pool` output (2D)."""
        return 2 * self.spec.embed_dim

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay.

        Returns:
            0 for embeddings (tokenizer, reduce_dim, pos_embed, tokens), i + 1 for ``blocks.{i}.*``,
            depth + 1 for the rest (final norm).
        """
        parts = name.split(".")
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1]) + 1
        if parts[0] in self.embedding_names:
            return 0
        return self.spec.depth + 1
