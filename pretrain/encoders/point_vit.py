"""The Point-BERT / Point-MAE transformer encoder ("point_vit").

Architecturally identical to the official encoders (Yu et al., CVPR 2022; Pang et al., ECCV 2022):
a BatchNorm mini-PointNet per patch (plus a ``reduce_dim`` Linear when its width differs from the
transformer's, as in Point-BERT), an MLP positional embedding of patch centres re-added before every block,
timm-style pre-norm blocks without qkv bias, and a final LayerNorm. Optional CLS token (+ its own
positional embedding ``cls_pos``) and mask token.

Parameter names: ``tokenizer.first_conv.*``, ``tokenizer.second_conv.*``, ``reduce_dim.*``,
``pos_embed.{0,2}.*``, ``blocks.{i}.*``, ``norm.*``, ``cls_token``, ``cls_pos``, ``mask_token``; official
checkpoints map onto them by prefix edits only (``pretrain.importers``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pretrain.encoders.base import EncoderOutput, PointEncoder
from pretrain.encoders.spec import EncoderSpec
from pretrain.nn import Block, CenterPosEmbed, MiniPointNet, drop_path_rates

__all__ = ["PointViT"]


class PointViT(PointEncoder):
    """Point-BERT / Point-MAE encoder built from an :class:`EncoderSpec`.

    Args:
        spec: architecture; ``spec.arch`` must be ``"point_vit"``.
    """

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        if spec.arch != "point_vit":
            raise ValueError(f"PointViT needs spec.arch='point_vit', got {spec.arch!r}")
        self.spec = spec
        dim = spec.embed_dim
        self.tokenizer = MiniPointNet(spec.tokenizer_dim)
        self.reduce_dim: nn.Module = (
            nn.Linear(spec.tokenizer_dim, dim) if spec.has_reduce_dim else nn.Identity()
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.cls_token else None
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim)) if spec.cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.mask_token else None
        self.pos_embed = CenterPosEmbed(dim)
        self.blocks = nn.ModuleList(
            Block(dim, spec.num_heads, mlp_ratio=spec.mlp_ratio, drop_path=rate)
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

    def embed(self, neighborhoods: Tensor) -> Tensor:
        """Embeds patches.

        Args:
            neighborhoods: (B, G, K, 3) centre-relative patch points.

        Returns:
            (B, G, D) tokens (mini-PointNet, then ``reduce_dim`` when present).
        """
        out: Tensor = self.reduce_dim(self.tokenizer(neighborhoods))
        return out

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
            centers: (B, G, 3) patch centres.
            keep: optional bool (B, G), same count per row; only True tokens are processed (MAE style).
            replace: optional bool (B, G); True tokens become the mask token before any ``keep``
                selection (BERT style); needs ``spec.mask_token``.
            return_layers: block indices (negative counts from the end) whose raw outputs are returned.

        Returns:
            :class:`EncoderOutput` with tokens (B, G', D), centres (B, G', 3), CLS (B, D) or None, and the
            requested block outputs.

        Raises:
            ValueError: bad shapes, unequal ``keep`` counts, ``replace`` without a mask token, or a block
                index out of range.
        """
        batch, num_groups, dim = self._check_inputs(tokens, centers)
        layer_ids = self._resolve_layers(return_layers)
        x = tokens
        if replace is not None:
            if self.mask_token is None:
                raise ValueError("replace= needs an encoder spec with mask_token=True")
            self._check_mask("replace", replace, batch, num_groups)
            x = torch.where(replace.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        if keep is not None:
            self._check_mask("keep", keep, batch, num_groups)
            counts = keep.sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise ValueError(f"keep must select the same number of tokens per row, got {counts.tolist()}")
            x = x[keep].reshape(batch, -1, dim)
            centers = centers[keep].reshape(batch, -1, 3)
        pos = self.pos_embed(centers)
        prefix = 0
        if self.cls_token is not None and self.cls_pos is not None:
            prefix = 1
            x = torch.cat([self.cls_token.expand(batch, -1, -1).to(x.dtype), x], dim=1)
            pos = torch.cat([self.cls_pos.expand(batch, -1, -1).to(pos.dtype), pos], dim=1)
        captured: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x + pos)
            if i in layer_ids:
                captured[i] = x[:, prefix:]
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

    @staticmethod
    def _check_mask(name: str, mask: Tensor, batch: int, num_groups: int) -> None:
        if mask.dtype != torch.bool or mask.shape != (batch, num_groups):
            raise ValueError(
                f"{name} must be a bool tensor of shape ({batch}, {num_groups}), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )

    def _resolve_layers(self, return_layers: Sequence[int]) -> list[int]:
        depth = self.spec.depth
        resolved = []
        for i in return_layers:
            if not -depth <= i < depth:
                raise ValueError(f"return_layers index {i} out of range for depth {depth}")
            resolved.append(i % depth)
        return resolved
