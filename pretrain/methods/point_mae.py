"""Point-MAE pre-training (Pang et al., ECCV 2022).

group (FPS + kNN) → random mask (60 % of patches, fixed count) → encode visible patches only → decode with
mask tokens → Chamfer-L2 between predicted and true masked patches (centre-relative coordinates).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from pretrain.encoders import PointViT, PointViTSpec
from pretrain.methods.base import PretrainModule
from pretrain.nn.mae_decoder import MAEDecoder
from pretrain.ops import block_group_mask, chamfer_distance, random_group_mask
from pretrain.ops.grouping import PatchGroups

__all__ = ["PointMAE"]


class PointMAE(PretrainModule):
    """Masked autoencoding of point patches.

    Args:
        encoder: encoder architecture (the official size is ``PointViTSpec()``).
        mask_ratio: fraction of patches masked, ``int(mask_ratio * G)`` per sample.
        mask_type: ``"rand"`` (uniform, official) or ``"block"`` (nearest patches to a random centre).
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder attention heads (default: the encoder's).
        decoder_drop_path: stochastic depth of the decoder.
        loss: ``"cdl2"`` (official) or ``"cdl1"`` Chamfer variant.
        embed_masked_patches: also run the mini-PointNet on the masked patches and discard their tokens, as
            the official code does. By default only the visible patches are embedded (40 % of the
            mini-PointNet's work at mask ratio 0.6); the only difference is which patches the tokenizer's
            BatchNorm takes its training-mode batch statistics from (see ``PointViT.encode_kept``).
        **kwargs: optimiser, schedule, data contract and seed (see :class:`PretrainModule`).
    """

    method_name = "PointMAE"
    encoder: PointViT

    def __init__(
        self,
        encoder: PointViTSpec,
        *,
        mask_ratio: float = 0.6,
        mask_type: Literal["rand", "block"] = "rand",
        decoder_depth: int = 4,
        decoder_num_heads: int | None = None,
        decoder_drop_path: float = 0.1,
        loss: Literal["cdl2", "cdl1"] = "cdl2",
        embed_masked_patches: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        if not isinstance(self.encoder, PointViT):
            raise ValueError(f"PointMAE trains a point_vit encoder, got arch {encoder.arch!r}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if int(mask_ratio * self.encoder.spec.num_groups) < 1:
            raise ValueError(
                f"mask_ratio={mask_ratio} masks no patch of num_groups={self.encoder.spec.num_groups}"
            )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.mask_ratio = mask_ratio
        self.mask_type = mask_type
        self.embed_masked_patches = embed_masked_patches
        self.loss_variant: Literal["l1", "l2"] = "l2" if loss == "cdl2" else "l1"
        self.decoder = MAEDecoder(
            self.encoder.spec.embed_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads or self.encoder.spec.num_heads,
            group_size=self.encoder.spec.group_size,
            drop_path=decoder_drop_path,
            mlp_ratio=self.encoder.spec.mlp_ratio,
        )

    def make_mask(self, groups: PatchGroups, generator: torch.Generator | None = None) -> Tensor:
        """Bool (B, G) mask with ``int(mask_ratio * G)`` masked patches per sample."""
        batch, num_groups, _ = groups.centers.shape
        if self.mask_type == "block":
            return block_group_mask(groups.centers, self.mask_ratio, generator=generator)
        return random_group_mask(
            batch, num_groups, self.mask_ratio, device=groups.centers.device, generator=generator
        )

    def reconstruct(self, groups: PatchGroups, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Embeds and encodes the visible patches and predicts the masked ones.

        Args:
            groups: patches of the batch (centres (B, G, 3), neighbourhoods (B, G, K, 3)).
            mask: bool (B, G), True = masked, equal count per row.

        Returns:
            (prediction (B, M, K, 3), target (B, M, K, 3)), both centre-relative.
        """
        batch = mask.shape[0]
        visible = self.encoder.encode_kept(groups, ~mask, embed_all=self.embed_masked_patches).tokens
        masked_centers = groups.centers[mask].reshape(batch, -1, 3)
        visible_centers = groups.centers[~mask].reshape(batch, -1, 3)
        prediction = self.decoder(visible, visible_centers, masked_centers)
        target = groups.neighborhoods[mask].reshape_as(prediction)
        return prediction, target

    def loss_for(
        self, points: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Point-MAE loss of a batch of clouds (B, N, 3), with a given or freshly drawn mask."""
        groups = self.encoder.group(points, generator=generator)  # used by fps_start="random"
        if mask is None:
            mask = self.make_mask(groups, generator)
        prediction, target = self.reconstruct(groups, mask)
        return chamfer_distance(
            prediction.flatten(0, 1).float(), target.flatten(0, 1).float(), variant=self.loss_variant
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        points = self.batch_points(batch)
        loss = self.loss_for(points, generator=self.step_generator())
        self.log("train/loss", loss, prog_bar=True, batch_size=points.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        points = self.batch_points(batch)
        generator = torch.Generator().manual_seed(self.seed + batch_idx)  # same masks every validation
        loss = self.loss_for(points, generator=generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=points.shape[0], sync_dist=True)
        return loss
