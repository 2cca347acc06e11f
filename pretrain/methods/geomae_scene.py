"""GeoMAE at scene level: masked pillars of LiDAR scans predict geometric targets (Tian et al., CVPR 2023).

Per step (all batched, pure torch; ``pretrain.ops`` and ``pretrain.nn`` hold the maths):

1. global scene augmentation of the padded batch (rotation about z, scale, BEV flips), then dynamic
   pillarisation inside the point range (no point cap per pillar);
2. geometric targets of every pillar from its points (``pretrain.ops.geometric_targets.pillar_targets``):
   normalised centroids of the pillar and of its "med" and "low" sub-voxels, their occupancy, and the normal
   and curvature of the 3 × 3 pillar neighbourhood (METHODS §4.4);
3. a uniform random 70 % of every scan's non-empty pillars are masked; the scene encoder (pillar feature
   encoder + window transformer, ``pretrain.scene_encoder``) runs on the visible pillars only;
4. the encoded visible pillars and a learnable mask token at every masked pillar go through two independent
   window-transformer decoders: a centroid/occupancy branch and a normal/curvature branch;
5. linear heads on the masked pillars; the loss is GeoMAE's six-term weighted sum (low / med / top centroids
   ×10 / ×8 / ×10, low / med occupancy ×5 / ×2, normal ×4) plus the curvature term the released config
   computes but never trains (``curvature_weight``; 0 reproduces the official loss).

The exported module is the scene encoder (artifact kind ``scene_encoder``), which gives per-pillar features
and coordinates for a scan (``pcpt-finetune embed``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from pretrain.encoders import DataContract
from pretrain.losses import masked_mse, occupancy_bce
from pretrain.methods.base import PretrainModule
from pretrain.nn.window_attention import WindowTransformer
from pretrain.ops.geometric_targets import PillarTargets, pillar_targets
from pretrain.ops.masking import random_segment_mask
from pretrain.ops.pillars import Pillars
from pretrain.ops.scene_augment import augment_scenes
from pretrain.scene_encoder import PillarSceneEncoder, SceneEncoderSpec

__all__ = ["GeoMAEScene"]


class GeoMAEScene(PretrainModule):
    """Masked geometric-target prediction on the pillars of LiDAR scans.

    Args:
        encoder: scene encoder architecture (``arch: pillar_flatformer``).
        mask_ratio: fraction of every scan's non-empty pillars masked (floored).
        decoder_depth: window-attention layers of each decoder branch (4 = two SST blocks, official).
        low_ratio: "low" sub-voxels per pillar along (x, y, z) (official 4, 4, 8 = 128 slots).
        med_ratio: "med" sub-voxels per pillar along (x, y, z) (official 2, 2, 4 = 16 slots).
        normal_sign: ``"viewpoint"`` (normals face the sensor at the origin) or ``"none"`` (the arbitrary
            sign of the official SVD, under an MSE loss).
        low_centroid_weight: weight of the low sub-voxel centroid term.
        med_centroid_weight: weight of the med sub-voxel centroid term.
        top_centroid_weight: weight of the pillar centroid term.
        low_occupancy_weight: weight of the low occupancy term.
        med_occupancy_weight: weight of the med occupancy term.
        normal_weight: weight of the normal term.
        curvature_weight: weight of the curvature term (0: not trained, as the released config).
        scene_augment: apply the global scene augmentation while training (named apart from the data
            module's ``augment``, its per-cloud transforms, which scenes leave at ``none``).
        rotation: rotation about z drawn from U(-rotation, rotation) radians.
        scale: global scale drawn from U(scale[0], scale[1]).
        flip_x: probability of negating x (mmdet3d's "vertical" BEV flip).
        flip_y: probability of negating y (mmdet3d's "horizontal" BEV flip).
        **kwargs: optimiser, schedule, point budget and seed (see :class:`PretrainModule`).
    """

    method_name = "GeoMAEScene"
    accepts_init_from = False
    #: nothing compiles: the window attention gathers data-dependent groups of pillars for every scan.
    compile_types = ()
    encoder: PillarSceneEncoder  # type: ignore[assignment]

    def __init__(
        self,
        encoder: SceneEncoderSpec,
        *,
        mask_ratio: float = 0.7,
        decoder_depth: int = 4,
        low_ratio: tuple[int, int, int] = (4, 4, 8),
        med_ratio: tuple[int, int, int] = (2, 2, 4),
        normal_sign: Literal["viewpoint", "none"] = "viewpoint",
        low_centroid_weight: float = 10.0,
        med_centroid_weight: float = 8.0,
        top_centroid_weight: float = 10.0,
        low_occupancy_weight: float = 5.0,
        med_occupancy_weight: float = 2.0,
        normal_weight: float = 4.0,
        curvature_weight: float = 4.0,
        scene_augment: bool = True,
        rotation: float = 0.3925,
        scale: tuple[float, float] = (0.95, 1.05),
        flip_x: float = 0.5,
        flip_y: float = 0.5,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("normalization", "none")
        super().__init__(None, **kwargs)
        if not isinstance(encoder, SceneEncoderSpec):
            encoder = SceneEncoderSpec.from_dict(encoder)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if decoder_depth < 1:
            raise ValueError(f"decoder_depth must be >= 1, got {decoder_depth}")
        for name, ratio in (("low_ratio", low_ratio), ("med_ratio", med_ratio)):
            if len(ratio) != 3 or min(ratio) < 1:
                raise ValueError(f"{name} must be three sub-voxel counts >= 1 along (x, y, z), got {ratio}")
        self.set_loss_weights(
            {
                "low_centroid": low_centroid_weight,
                "med_centroid": med_centroid_weight,
                "top_centroid": top_centroid_weight,
                "low_occupancy": low_occupancy_weight,
                "med_occupancy": med_occupancy_weight,
                "normal": normal_weight,
                "curvature": curvature_weight,
            }
        )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.encoder = PillarSceneEncoder(encoder)
        self.mask_ratio = mask_ratio
        self.low_ratio, self.med_ratio = tuple(low_ratio), tuple(med_ratio)
        self.normal_sign: Literal["viewpoint", "none"] = normal_sign
        self.scene_augment = scene_augment
        self.augment_args = {"rotation": rotation, "scale": tuple(scale), "flip_x": flip_x, "flip_y": flip_y}
        spec, dim = encoder, encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoders = nn.ModuleDict(
            {
                branch: WindowTransformer(
                    dim,
                    depth=decoder_depth,
                    num_heads=spec.num_heads,
                    ffn_dim=spec.ffn_dim,
                    window=spec.window,
                    partition=spec.partition,
                    group_size=spec.group_size,
                    buckets=spec.buckets,
                    dropout=spec.dropout,
                )
                for branch in ("centroid", "normal")
            }
        )
        low, med = _slots(self.low_ratio), _slots(self.med_ratio)
        self.heads = nn.ModuleDict(
            {
                "low_centroid": nn.Linear(dim, 3 * low),
                "med_centroid": nn.Linear(dim, 3 * med),
                "top_centroid": nn.Linear(dim, 3),
                "low_occupancy": nn.Linear(dim, 2 * low),
                "med_occupancy": nn.Linear(dim, 2 * med),
                "normal": nn.Linear(dim, 3),
                "curvature": nn.Linear(dim, 3),
            }
        )

    @property
    def data_contract(self) -> DataContract:
        """Point budget, no normalisation (metres), and the channels the encoder reads."""
        return DataContract(
            num_points=self.num_points,
            normalization="none",
            fps_order=False,
            channels=("x", "y", "z", *self.encoder.spec.point_channels),
        )

    # ------------------------------------------------------------------------------------------ batches
    def scene_inputs(self, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """Points (B, N, 3), valid (B, N) and the encoder's point channels (B, N, C) or None of a batch.

        Raises:
            ValueError: the batch lacks channels the encoder reads (the message names them).
        """
        points = self.batch_points(batch)
        mask = getattr(batch, "mask", None)
        valid = mask() if callable(mask) else torch.isfinite(points).all(dim=-1)
        wanted = tuple(self.encoder.spec.point_channels)
        if not wanted:
            return points, valid, None
        names = tuple(getattr(batch, "feat_names", None) or ())
        feats = getattr(batch, "feats", None)
        missing = [name for name in wanted if name not in names]
        if feats is None or missing:
            raise ValueError(
                f"the scene encoder reads point channels {list(wanted)}, the batch has {list(names)}; set "
                f"data.fields.point_features: {list(wanted)}"
            )
        index = torch.tensor([names.index(name) for name in wanted], device=feats.device)
        return points, valid, feats.index_select(-1, index)

    # --------------------------------------------------------------------------------------------- loss
    def targets(self, points: Tensor, pillars: Pillars) -> PillarTargets:
        """Geometric targets of every pillar (no gradient)."""
        spec = self.encoder.spec
        xyz = points.reshape(-1, 3)[pillars.point_index].float()
        with torch.no_grad():
            return pillar_targets(
                xyz,
                pillars.point_pillar,
                pillars.coords,
                point_range=spec.point_range,
                pillar_size=spec.pillar_size,
                low_ratio=self.low_ratio,  # type: ignore[arg-type]
                med_ratio=self.med_ratio,  # type: ignore[arg-type]
                normal_sign=self.normal_sign,
            )

    def loss_terms(self, batch: Any, generator: torch.Generator, *, augment: bool) -> dict[str, Tensor]:
        """The unweighted loss terms of a batch of scans.

        Returns:
            One () scalar per target (the keys of ``loss_weights``).

        Raises:
            ValueError: a batch without any pillar inside the point range.
        """
        points, valid, feats = self.scene_inputs(batch)
        if augment:
            points = augment_scenes(points, valid, generator=generator, **self.augment_args)  # type: ignore[arg-type]
        pillars, tokens = self.encoder.embed(points, valid, feats)
        if pillars.coords.shape[0] == 0:
            raise ValueError(f"no point of the batch lies inside point_range {self.encoder.spec.point_range}")
        target = self.targets(points, pillars)
        masked = random_segment_mask(
            pillars.coords[:, 0], self.mask_ratio, num_segments=pillars.batch_size, generator=generator
        )
        visible = self.encoder(tokens, pillars.coords, keep=~masked)
        full = self.mask_token.to(visible.dtype).expand(tokens.shape[0], -1).clone()
        full[~masked] = visible
        centroid_features = self.decoders["centroid"](full, pillars.coords)[masked]
        normal_features = self.decoders["normal"](full, pillars.coords)[masked]
        out = {
            name: head(normal_features if name in ("normal", "curvature") else centroid_features)
            for name, head in self.heads.items()
        }
        num_masked = int(masked.sum())
        low, med = _slots(self.low_ratio), _slots(self.med_ratio)
        return {
            "low_centroid": masked_mse(
                out["low_centroid"].reshape(num_masked, low, 3),
                target.low_centroid[masked],
                target.low_occupancy[masked],
            ),
            "med_centroid": masked_mse(
                out["med_centroid"].reshape(num_masked, med, 3),
                target.med_centroid[masked],
                target.med_occupancy[masked],
            ),
            "top_centroid": masked_mse(out["top_centroid"], target.top_centroid[masked]),
            "low_occupancy": occupancy_bce(
                out["low_occupancy"].reshape(num_masked, low, 2), target.low_occupancy[masked]
            ),
            "med_occupancy": occupancy_bce(
                out["med_occupancy"].reshape(num_masked, med, 2), target.med_occupancy[masked]
            ),
            "normal": masked_mse(out["normal"], target.normal[masked]),
            "curvature": masked_mse(out["curvature"], target.curvature[masked]),
        }

    def _step(self, batch: Any, generator: torch.Generator, stage: str) -> Tensor:
        terms = self.loss_terms(batch, generator, augment=self.scene_augment and stage == "train")
        loss = self.total_loss(terms)
        self.log_loss(stage, loss, terms, len(batch) if hasattr(batch, "__len__") else 1)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, self.step_generator(), "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + batch_idx)  # same masks every validation
        return self._step(batch, generator, "val")


def _slots(ratio: tuple[int, ...]) -> int:
    return int(ratio[0] * ratio[1] * ratio[2])
