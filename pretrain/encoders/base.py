"""The interface every pcpt point encoder implements, and its output type.

An encoder is composed of three parts: a point tokenizer (points -> tokens and their positions, see
``pretrain.encoders.tokenizer``), a positional encoding of the positions, and a trunk of transformer blocks
that can take per-block context (``pretrain.nn.transformer``). Methods never subclass an encoder to change its
forward pass: they drop tokens (``keep``, MAE style), swap them for the mask token (``replace``, BERT style),
read intermediate blocks (``return_layers``) or hand each block a context (``contexts``: adapters).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.encoders.spec import EncoderSpec
from pretrain.encoders.tokenizer import PointTokens

__all__ = ["EncoderOutput", "PointEncoder", "check_token_mask", "resolve_layers"]


@dataclass
class EncoderOutput:
    """What an encoder returns.

    Attributes:
        tokens: (B, G', D) tokens after the final norm (CLS excluded); G' = G, or the kept count.
        centers: (B, G', 3) positions of those tokens.
        cls: (B, D) CLS token after the final norm, or None when the encoder has no CLS token.
        layers: raw outputs (before the final norm) of the blocks named in ``return_layers``, in the order
            requested, each (B, G', D), without the CLS token.
    """

    tokens: Tensor
    centers: Tensor
    cls: Tensor | None = None
    layers: list[Tensor] = field(default_factory=list)


def check_token_mask(name: str, mask: Tensor, batch: int, num_tokens: int) -> None:
    """Checks a bool (B, G) token mask (``keep`` / ``replace``).

    Raises:
        ValueError: another dtype or shape (the message names ``name``).
    """
    if mask.dtype != torch.bool or mask.shape != (batch, num_tokens):
        raise ValueError(
            f"{name} must be a bool tensor of shape ({batch}, {num_tokens}), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


def resolve_layers(return_layers: Sequence[int], depth: int) -> list[int]:
    """Block indices (negative counts from the end) -> non-negative ones.

    Raises:
        ValueError: an index outside ``[-depth, depth)``.
    """
    resolved = []
    for i in return_layers:
        if not -depth <= i < depth:
            raise ValueError(f"return_layers index {i} out of range for depth {depth}")
        resolved.append(i % depth)
    return resolved


class PointEncoder(nn.Module, ABC):
    """A transformer over point tokens, built from its family's spec alone.

    Subclasses implement :meth:`tokenize` and :meth:`forward` and set ``spec``; encoding a raw cloud and
    pooling are shared.
    """

    spec: EncoderSpec

    @abstractmethod
    def tokenize(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PointTokens:
        """Clouds (B, N, 3) -> groups (with ``centers`` (B, G, 3)) and tokens (B, G, D).

        ``generator`` is the only source of randomness (e.g. a random FPS start).
        """

    @abstractmethod
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
        """Runs the trunk over tokens.

        Args:
            tokens: (B, G, D) tokens from :meth:`tokenize`.
            centers: (B, G, 3) token positions, for the positional encoding.
            keep: optional bool (B, G) with the same count per row; only True tokens are processed.
            replace: optional bool (B, G); True tokens are swapped for the mask token, positions kept.
            return_layers: block indices (negative counts from the end) whose raw outputs are returned.
            contexts: one context per block, handed to the blocks' adapters.

        Returns:
            The encoder output; see :class:`EncoderOutput`.
        """

    def encode(
        self,
        xyz: Tensor,
        *,
        generator: torch.Generator | None = None,
        contexts: Sequence[Any] | None = None,
    ) -> EncoderOutput:
        """Tokenizes and encodes clouds (B, N, 3) without masking."""
        groups, tokens = self.tokenize(xyz, generator=generator)
        return self(tokens, groups.centers, contexts=contexts)

    def pool(self, out: EncoderOutput) -> Tensor:
        """Global feature (B, 2D): concat[CLS, max over tokens] with a CLS token, else concat[max, mean]."""
        pooled_max = out.tokens.amax(dim=1)
        if out.cls is not None:
            return torch.cat([out.cls, pooled_max], dim=-1)
        return torch.cat([pooled_max, out.tokens.mean(dim=1)], dim=-1)

    @property
    def embed_dim(self) -> int:
        """Token width D."""
        return int(self.spec.embed_dim)  # type: ignore[attr-defined]

    @property
    def pooled_dim(self) -> int:
        """Width of :meth:`pool` output (2D)."""
        return 2 * self.embed_dim

    @property
    def min_points(self) -> int:
        """The fewest points per cloud :meth:`tokenize` accepts (1 unless a family needs more)."""
        return 1

    @property
    def has_cls_token(self) -> bool:
        """Whether :class:`EncoderOutput` carries a CLS token (then :meth:`pool` is concat[CLS, max])."""
        return False
