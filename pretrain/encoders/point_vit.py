"""The Point-BERT / Point-MAE transformer encoder (``arch="point_vit"``).

Architecturally identical to the official encoders (Yu et al., CVPR 2022; Pang et al., ECCV 2022) with the
default :class:`~pretrain.encoders.spec.PointViTSpec`: the patch tokenizer (FPS + kNN, BatchNorm
mini-PointNet), a ``reduce_dim`` Linear when the tokenizer's width differs from the transformer's (as in
Point-BERT), an MLP positional encoding of patch centres re-added before every block, pre-norm blocks without
qkv bias, and a final LayerNorm. Optional CLS token (+ its own positional embedding ``cls_pos``) and mask
token. Block options (post-norm, qkv bias, dropouts, LayerScale, activation) are spec fields.

Parameter names: ``tokenizer.first_conv.*``, ``tokenizer.second_conv.*``, ``reduce_dim.*``,
``pos_embed.{0,2}.*``, ``blocks.{i}.*``, ``norm.*``, ``cls_token``, ``cls_pos``, ``mask_token``; official
checkpoints map onto them by prefix edits only (``pretrain.importers``). ``pos_embed`` is the positional
encoding part: any module mapping centres (B, G, 3) to (B, G, D) can replace it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.encoders.base import EncoderOutput, PointEncoder, check_token_mask, resolve_layers
from pretrain.encoders.spec import PointViTSpec
from pretrain.encoders.tokenizer import PatchTokenizer, PointTokens
from pretrain.nn import Block, CenterPosEmbed, drop_path_rates
from pretrain.nn.transformer import run_blocks
from pretrain.ops import PatchGroups

__all__ = ["PointViT"]


def _check_keep(keep: Tensor, batch: int, num_groups: int) -> int:
    """Checks a bool (B, G) ``keep`` mask with the same count per row; returns that count."""
    check_token_mask("keep", keep, batch, num_groups)
    counts = keep.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"keep must select the same number of tokens per row, got {counts.tolist()}")
    return int(counts[0]) if batch else 0


class PointViT(PointEncoder):
    """Point-BERT / Point-MAE encoder built from a :class:`PointViTSpec`.

    Args:
        spec: architecture.
    """

    spec: PointViTSpec

    def __init__(self, spec: PointViTSpec) -> None:
        super().__init__()
        if not isinstance(spec, PointViTSpec):
            raise ValueError(f"PointViT needs a PointViTSpec, got {type(spec).__name__}")
        self.spec = spec
        dim = spec.embed_dim
        self.tokenizer = PatchTokenizer(spec.tokenizer_dim, spec)
        self.reduce_dim: nn.Module = (
            nn.Linear(spec.tokenizer_dim, dim) if spec.has_reduce_dim else nn.Identity()
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.cls_token else None
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim)) if spec.cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.mask_token else None
        self.pos_embed: nn.Module = CenterPosEmbed(dim)
        options = spec.block_options
        self.blocks = nn.ModuleList(
            Block(dim, spec.num_heads, options=options, drop_path=rate)
            for rate in drop_path_rates(spec.drop_path, spec.depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Point-MAE initialisation.

        Trunc-normal(0.02) for Linear/Conv1d weights and the tokens, zero biases, LayerNorm (1, 0); BatchNorm
        keeps its defaults.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for token in (self.cls_token, self.cls_pos, self.mask_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)

    @property
    def min_points(self) -> int:
        """``max(num_groups, group_size)``: FPS needs G points, every patch K neighbours."""
        return max(self.spec.num_groups, self.spec.group_size)

    @property
    def has_cls_token(self) -> bool:
        """Whether the spec has a CLS token."""
        return self.spec.cls_token

    def group(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PatchGroups:
        """Patches of clouds (B, N, 3) with the spec's grouping settings (see :class:`PatchTokenizer`)."""
        return self.tokenizer.group(xyz, generator=generator)

    def embed(self, neighborhoods: Tensor) -> Tensor:
        """Embeds patches: (B, G, K, 3) centre-relative points -> (B, G, D) tokens."""
        out: Tensor = self.reduce_dim(self.tokenizer(neighborhoods))
        return out

    def tokenize(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PointTokens:
        """Groups clouds (B, N, 3) and embeds the patches -> (groups, tokens (B, G, D))."""
        groups = self.group(xyz, generator=generator)
        return PointTokens(groups, self.embed(groups.neighborhoods))

    def encode_kept(self, groups: PatchGroups, keep: Tensor, *, embed_all: bool = False) -> EncoderOutput:
        """Embeds and encodes the kept patches of each cloud (MAE-style encoding of the visible patches).

        The mini-PointNet runs on the kept patches only, unless ``embed_all`` (the official Point-MAE code
        embeds every patch and then drops the masked tokens). The two give the same tokens when the
        tokenizer's BatchNorm uses running statistics (eval mode); in training mode its batch statistics
        come from the embedded patches, so they differ by which patches those are. Embedding only the kept
        ones takes ``keep``'s fraction of the mini-PointNet's work (40 % at mask ratio 0.6).

        Args:
            groups: patches (centres (B, G, 3), neighbourhoods (B, G, K, 3)).
            keep: bool (B, G), the same count per row.
            embed_all: embed every patch, then select (the official computation).

        Returns:
            :class:`EncoderOutput` of the kept tokens (B, G', D) and their centres (B, G', 3).
        """
        if not embed_all:
            batch, num_groups = groups.centers.shape[:2]
            kept = _check_keep(keep, batch, num_groups)
            neighborhoods = groups.neighborhoods[keep].reshape(batch, kept, *groups.neighborhoods.shape[2:])
            return self(self.embed(neighborhoods), groups.centers[keep].reshape(batch, kept, 3))
        return self(self.embed(groups.neighborhoods), groups.centers, keep=keep)

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
        """Runs the transformer over patch tokens.

        Args:
            tokens: (B, G, D) patch embeddings from :meth:`embed`.
            centers: (B, G, 3) patch centres.
            keep: optional bool (B, G), same count per row; only True tokens are processed (MAE style).
            replace: optional bool (B, G); True tokens become the mask token before any ``keep``
                selection (BERT style); needs ``spec.mask_token``.
            return_layers: block indices (negative counts from the end) whose raw outputs are returned.
            contexts: one context per block for the blocks' adapters.

        Returns:
            :class:`EncoderOutput` with tokens (B, G', D), centres (B, G', 3), CLS (B, D) or None, and the
            requested block outputs.

        Raises:
            ValueError: bad shapes, unequal ``keep`` counts, ``replace`` without a mask token, or a block
                index out of range.
        """
        batch, num_groups, dim = self._check_inputs(tokens, centers)
        layer_ids = resolve_layers(return_layers, self.spec.depth)
        x = tokens
        if replace is not None:
            if self.mask_token is None:
                raise ValueError("replace= needs an encoder spec with mask_token=True")
            check_token_mask("replace", replace, batch, num_groups)
            x = torch.where(replace.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        if keep is not None:
            _check_keep(keep, batch, num_groups)
            x = x[keep].reshape(batch, -1, dim)
            centers = centers[keep].reshape(batch, -1, 3)
        pos = self.pos_embed(centers)
        prefix = 0
        if self.cls_token is not None and self.cls_pos is not None:
            prefix = 1
            x = torch.cat([self.cls_token.expand(batch, -1, -1).to(x.dtype), x], dim=1)
            pos = torch.cat([self.cls_pos.expand(batch, -1, -1).to(pos.dtype), pos], dim=1)
        x, captured = run_blocks(
            self.blocks,
            x,
            pos,
            pos_every_block=self.spec.pos_every_block,
            contexts=contexts,
            capture=layer_ids,
            skip=prefix,
        )
        x = self.norm(x)
        return EncoderOutput(
            tokens=x[:, prefix:],
            centers=centers,
            cls=x[:, 0] if prefix else None,
            layers=[captured[i] for i in layer_ids],
        )

    def _check_inputs(self, tokens: Tensor, centers: Tensor) -> tuple[int, int, int]:
        if tokens.ndim != 3 or tokens.shape[-1] != self.spec.embed_dim:
            raise ValueError(
                f"tokens must have shape (B, G, {self.spec.embed_dim}), got {tuple(tokens.shape)}"
            )
        batch, num_groups, dim = tokens.shape
        if centers.shape != (batch, num_groups, 3):
            raise ValueError(
                f"centers must have shape ({batch}, {num_groups}, 3) to match tokens, "
                f"got {tuple(centers.shape)}"
            )
        return batch, num_groups, dim
