"""GeoMAE at object level: masked patches predict geometric targets of their points (Tian et al., CVPR 2023).

The same patch encoder family as Point-MAE (FPS + kNN patches, mini-PointNet tokens, a ViT over the visible
patches), so the encoder transfers through the same ``point_encoder`` artifact to finetuning, probes and
few-shot. Instead of the masked points themselves, the decoder's features of each masked patch predict, by
linear heads, the geometric targets of ``pretrain.ops.geometric_targets.patch_targets``:

* the centroid of the patch's points in the patch's cell (a cube around its centre), in ``[0, 1]³``;
* the centroids and the occupancy of the ``sub³`` sub-cells of that cube;
* the surface normal (sign resolved outward, or left as the eigensolver gives it with ``normal_sign="none"``)
  and the curvature (the normalised eigenvalues of the scatter matrix);
* optionally the masked points (Point-MAE's Chamfer-L2 target, ``chamfer_weight > 0``).

The loss is the weighted sum of the terms (GeoMAE's weights: centroids ×10, occupancy ×5, normal ×4). The
released scene-level GeoMAE config never trains curvature; pcpt does (``curvature_weight``; 0 reproduces it).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from pretrain.encoders import PointViT, PointViTSpec
from pretrain.losses import masked_mse, occupancy_bce
from pretrain.methods.base import PretrainModule
from pretrain.nn.mae_decoder import MaskedTokenDecoder
from pretrain.ops import block_group_mask, chamfer_distance, random_group_mask
from pretrain.ops.geometric_targets import PatchTargets, patch_targets
from pretrain.ops.grouping import PatchGroups

__all__ = ["GeoMAE"]


class GeoMAE(PretrainModule):
    """Masked geometric-target prediction on point patches.

    Args:
        encoder: encoder architecture (the Point-MAE family, ``arch: point_vit``).
        mask_ratio: fraction of patches masked, ``int(mask_ratio * G)`` per sample.
        mask_type: ``"rand"`` (uniform) or ``"block"`` (nearest patches to a random centre).
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder attention heads (default: the encoder's).
        decoder_drop_path: stochastic depth of the decoder.
        sub_cells: sub-cells per axis of each patch's cell for the sub-centroid and occupancy targets.
        normal_sign: ``"outward"`` (away from the cloud's centre) or ``"none"`` (the eigensolver's arbitrary
            sign, the official behaviour under an MSE loss).
        centroid_weight: weight of the patch-centroid term.
        sub_centroid_weight: weight of the sub-cell centroid term (occupied sub-cells only).
        occupancy_weight: weight of the sub-cell occupancy term.
        normal_weight: weight of the normal term.
        curvature_weight: weight of the curvature term (0: not trained, as the released GeoMAE config).
        chamfer_weight: weight of Point-MAE's Chamfer-L2 term on the masked points (0: off).
        embed_masked_patches: also embed the masked patches, as the official Point-MAE code does (see
            ``PointMAE``); by default only the visible ones are embedded.
        **kwargs: optimiser, schedule, data contract and seed (see :class:`PretrainModule`).
    """

    method_name = "GeoMAE"
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
        sub_cells: int = 4,
        normal_sign: Literal["outward", "none"] = "outward",
        centroid_weight: float = 10.0,
        sub_centroid_weight: float = 10.0,
        occupancy_weight: float = 5.0,
        normal_weight: float = 4.0,
        curvature_weight: float = 4.0,
        chamfer_weight: float = 0.0,
        embed_masked_patches: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        if not isinstance(self.encoder, PointViT):
            raise ValueError(f"GeoMAE trains a point_vit encoder, got arch {encoder.arch!r}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if int(mask_ratio * self.encoder.spec.num_groups) < 1:
            raise ValueError(
                f"mask_ratio={mask_ratio} masks no patch of num_groups={self.encoder.spec.num_groups}"
            )
        if sub_cells < 1:
            raise ValueError(f"sub_cells must be >= 1, got {sub_cells}")
        self.set_loss_weights(
            {
                "centroid": centroid_weight,
                "sub_centroid": sub_centroid_weight,
                "occupancy": occupancy_weight,
                "normal": normal_weight,
                "curvature": curvature_weight,
                "chamfer": chamfer_weight,
            }
        )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.mask_ratio, self.mask_type = mask_ratio, mask_type
        self.embed_masked_patches = embed_masked_patches
        self.sub_cells, self.normal_sign = sub_cells, normal_sign
        dim = self.encoder.spec.embed_dim
        self.decoder = MaskedTokenDecoder(
            dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads or self.encoder.spec.num_heads,
            drop_path=decoder_drop_path,
            mlp_ratio=self.encoder.spec.mlp_ratio,
        )
        slots = sub_cells**3
        self.heads = nn.ModuleDict(
            {
                "centroid": nn.Linear(dim, 3),
                "sub_centroid": nn.Linear(dim, 3 * slots),
                "occupancy": nn.Linear(dim, 2 * slots),
                "normal": nn.Linear(dim, 3),
                "curvature": nn.Linear(dim, 3),
            }
        )
        if chamfer_weight > 0:
            self.heads["chamfer"] = nn.Linear(dim, 3 * self.encoder.spec.group_size)

    def make_mask(self, groups: PatchGroups, generator: torch.Generator | None = None) -> Tensor:
        """Bool (B, G) mask with ``int(mask_ratio * G)`` masked patches per sample."""
        batch, num_groups, _ = groups.centers.shape
        if self.mask_type == "block":
            return block_group_mask(groups.centers, self.mask_ratio, generator=generator)
        return random_group_mask(
            batch, num_groups, self.mask_ratio, device=groups.centers.device, generator=generator
        )

    def masked_targets(self, groups: PatchGroups, mask: Tensor) -> tuple[PatchTargets, Tensor]:
        """Geometric targets (no gradient) and centre-relative points (B, M, K, 3) of the masked patches."""
        batch, _, group_size, _ = groups.neighborhoods.shape
        points = groups.neighborhoods[mask].reshape(batch, -1, group_size, 3)
        centers = groups.centers[mask].reshape(batch, -1, 3)
        with torch.no_grad():
            targets = patch_targets(
                points.float(), centers.float(), sub=self.sub_cells, normal_sign=self.normal_sign
            )
        return targets, points

    def loss_terms(
        self, points: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """The unweighted loss terms of a batch of clouds (B, N, 3), with a given or freshly drawn mask.

        Returns:
            ``{"centroid", "sub_centroid", "occupancy", "normal", "curvature"[, "chamfer"]}`` -> () scalars.
        """
        groups = self.encoder.group(points, generator=generator)
        if mask is None:
            mask = self.make_mask(groups, generator)
        batch = mask.shape[0]
        visible = self.encoder.encode_kept(groups, ~mask, embed_all=self.embed_masked_patches).tokens
        masked_centers = groups.centers[mask].reshape(batch, -1, 3)
        visible_centers = groups.centers[~mask].reshape(batch, -1, 3)
        features = self.decoder.decode(visible, visible_centers, masked_centers)  # (B, M, D)
        num_masked, slots = features.shape[1], self.sub_cells**3
        target, masked_points = self.masked_targets(groups, mask)
        out = {name: head(features) for name, head in self.heads.items()}
        terms = {
            "centroid": masked_mse(out["centroid"], target.centroid),
            "sub_centroid": masked_mse(
                out["sub_centroid"].reshape(batch, num_masked, slots, 3),
                target.sub_centroid,
                target.sub_occupancy,
            ),
            "occupancy": occupancy_bce(
                out["occupancy"].reshape(batch, num_masked, slots, 2), target.sub_occupancy
            ),
            "normal": masked_mse(out["normal"], target.normal),
            "curvature": masked_mse(out["curvature"], target.curvature),
        }
        if "chamfer" in out:
            predicted = out["chamfer"].reshape_as(masked_points)
            terms["chamfer"] = chamfer_distance(
                predicted.flatten(0, 1).float(), masked_points.flatten(0, 1).float(), variant="l2"
            )
        return terms

    def _step(self, batch: Any, generator: torch.Generator, stage: str) -> Tensor:
        points = self.batch_points(batch)
        terms = self.loss_terms(points, generator=generator)
        loss = self.total_loss(terms)
        self.log_loss(stage, loss, terms, points.shape[0])
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, self.step_generator(), "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + batch_idx)  # same masks every validation
        return self._step(batch, generator, "val")
