"""ViPFormer (ICRA 2023): image-point contrastive pre-training of a point encoder and an image encoder.

Each step takes a batch of clouds with their image views (``PointBatch.images``), makes two random point
views of every cloud (``pretrain.ops.view_augment.augment_point_views``) and one augmented image of a view
drawn at random (``augment_images``), and trains

    IMID = NT-Xent(z(view 1), z(view 2)),    CMID = NT-Xent((z(view 1) + z(view 2)) / 2, z(image)),
    loss = imid_weight · IMID + cmid_weight · CMID,

where ``z`` are the projection heads' outputs of the pooled encoder features (``pretrain.ops.contrastive``,
temperature 0.1). Negatives are gathered across ranks with gradients (the official code uses each GPU's batch
only: ``gather_negatives=False``), and the method runs on one device too. The point branch is any pcpt point
encoder: the ViPFormer point encoder by default, or, through ``init_from``, the encoder of an earlier stage
(a Point-MAE or GeoMAE artifact), which the contrastive stage then continues. The point encoder is exported
as the run's artifact; the image encoder goes with it as a companion artifact (``<artifact>/image_encoder``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pretrain.encoders import PointViTSpec, ViPFormerImageEncoder, ViPFormerImageSpec, ViPFormerPointSpec
from pretrain.methods.base import PretrainModule
from pretrain.nn.perceiver import ProjectionHead
from pretrain.ops.contrastive import nt_xent
from pretrain.ops.view_augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_images,
    augment_point_views,
    resize_shorter_and_crop,
)

__all__ = ["ViPFormer"]


class ViPFormer(PretrainModule):
    """Image-point contrastive pre-training (IMID + CMID NT-Xent).

    Args:
        encoder: the point encoder's spec (``vipformer_point`` or ``point_vit``); None with ``init_from``.
        image_encoder: the image encoder's spec (default: the released E1CL8SL-H4D256-L128-MR2 size).
        projection_dim: width of both projection heads' outputs (default: the point encoder's width).
        temperature: NT-Xent temperature.
        imid_weight: weight of the point-point term (0: cross-modal only, the official ``cmc-only``).
        cmid_weight: weight of the point-image term (0: intra-modal only, ``imc-only``; images not needed).
        gather_negatives: negatives from every rank (True) or from this rank's batch only (official).
        point_scale: range of the isotropic scale of a point view.
        point_translate: translation range as a fraction of each axis' extent.
        point_jitter: standard deviation of the per-point jitter (clipped at 5×).
        max_dropout: largest fraction of points dropped (replaced by the first point) in a view.
        rotate_axis: axis of the random rotation of a view (``"y"``: up in ShapeNet/ModelNet meshes).
        brightness: colour-jitter brightness range of the image view.
        contrast: colour-jitter contrast range.
        saturation: colour-jitter saturation range.
        flip_p: probability of a horizontal flip of the image.
        **kwargs: :class:`~pretrain.methods.base.PretrainModule` arguments (optimizer, lr_scheduler, seed,
            init_from, ...).
    """

    method_name = "vipformer"
    companion_modules = ("image_encoder",)

    def __init__(
        self,
        encoder: ViPFormerPointSpec | PointViTSpec | None = None,
        image_encoder: ViPFormerImageSpec | None = None,
        *,
        projection_dim: int | None = None,
        temperature: float = 0.1,
        imid_weight: float = 1.0,
        cmid_weight: float = 1.0,
        gather_negatives: bool = True,
        point_scale: tuple[float, float] = (0.5, 2.0),
        point_translate: float = 0.5,
        point_jitter: float = 0.01,
        max_dropout: float = 0.875,
        rotate_axis: str = "y",
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        flip_p: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if encoder is None and kwargs.get("init_from") is None:
            raise ValueError("ViPFormer needs an encoder spec or init_from (a point_encoder artifact)")
        super().__init__(encoder, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.set_loss_weights({"imid": imid_weight, "cmid": cmid_weight})
        spec = image_encoder if image_encoder is not None else ViPFormerImageSpec()
        if not isinstance(spec, ViPFormerImageSpec):
            spec = ViPFormerImageSpec.from_dict(dict(spec))
        dim = projection_dim or self.encoder.embed_dim
        mask_token = getattr(self.encoder, "mask_token", None)
        if isinstance(mask_token, torch.nn.Parameter):
            mask_token.requires_grad_(False)  # a Point-BERT encoder's: unused here (DDP needs every grad)
        self.point_head = ProjectionHead(self.encoder.pooled_dim, dim)
        # Intra-modal only (cmid_weight 0): no image branch, so nothing untrained is built or exported.
        self.image_encoder: ViPFormerImageEncoder | None = None
        self.image_head: ProjectionHead | None = None
        if cmid_weight > 0:
            self.image_encoder = ViPFormerImageEncoder(spec)
            self.image_head = ProjectionHead(self.image_encoder.pooled_dim, dim)
        self.temperature, self.gather_negatives = temperature, gather_negatives
        self.point_augment: dict[str, Any] = {
            "scale": tuple(point_scale),
            "rotate_axis": rotate_axis,
            "translate": point_translate,
            "jitter_sigma": point_jitter,
            "jitter_clip": 5 * point_jitter,
            "max_dropout": max_dropout,
        }
        self.image_augment: dict[str, Any] = {
            "size": spec.image_size,
            "brightness": brightness,
            "contrast": contrast,
            "saturation": saturation,
            "flip_p": flip_p,
        }

    # ---------------------------------------------------------------------------------------- embeddings
    def point_embeddings(self, points: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Projected point embeddings: clouds (B, N, 3) -> (B, projection_dim)."""
        return self.point_head(self.encoder.pool(self.encoder.encode(points, generator=generator)))

    def companions(self) -> dict[str, torch.nn.Module]:
        """The image encoder, when the run trains one (``cmid_weight > 0``)."""
        return super().companions() if self.image_encoder is not None else {}

    def _image_branch(self) -> tuple[ViPFormerImageEncoder, ProjectionHead]:
        if self.image_encoder is None or self.image_head is None:
            raise ValueError("this ViPFormer has no image branch (cmid_weight=0)")
        return self.image_encoder, self.image_head

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Projected image embeddings: normalised images (B, 3, S, S) -> (B, projection_dim)."""
        encoder, head = self._image_branch()
        return head(encoder.pool(encoder(images)))

    def eval_images(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> the encoder's input without augmentation (resize, normalise)."""
        encoder, _ = self._image_branch()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = resize_shorter_and_crop(images, encoder.spec.image_size)
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (images - mean) / std

    # ------------------------------------------------------------------------------------------- the loss
    def loss_terms(self, batch: Any, generator: torch.Generator, augment: bool = True) -> dict[str, Tensor]:
        """``{"imid", "cmid"}`` of one batch (terms with weight 0 are not computed).

        Args:
            batch: a ``PointBatch`` with ``points`` (B, N, 3) and, when ``cmid_weight > 0``, ``images``
                (B, V, C, H, W) in [0, 1].
            generator: source of every random draw of the step (views, image choice, FPS starts).
            augment: False in validation: the two point views are the cloud itself and the image is only
                resized and normalised (the loss then measures the alignment of the clean pairs).
        """
        points = self.batch_points(batch)
        cross_modal = self.loss_weights["cmid"] > 0
        # Checked before any collective: a rank raising between two gathers would leave the others waiting.
        images = self._one_view(batch, points.shape[0], generator) if cross_modal else None
        with torch.autocast(points.device.type, enabled=False):  # views in the data's precision, not bf16
            if augment:
                views = [
                    augment_point_views(points.float(), generator=generator, **self.point_augment)
                    for _ in range(2)
                ]
                if images is not None:
                    images = augment_images(images.float(), generator=generator, **self.image_augment)
            else:
                views = [points, points]
                images = self.eval_images(images) if images is not None else None
        z1, z2 = (self.point_embeddings(view, generator) for view in views)
        terms: dict[str, Tensor] = {}
        if self.loss_weights["imid"] > 0:
            terms["imid"] = nt_xent(z1, z2, temperature=self.temperature, gather=self.gather_negatives)
        if images is not None:
            z_image = self.image_embeddings(images)
            terms["cmid"] = nt_xent(
                (z1 + z2) / 2, z_image, temperature=self.temperature, gather=self.gather_negatives
            )
        return terms

    @staticmethod
    def _one_view(batch: Any, size: int, generator: torch.Generator) -> Tensor:
        """One image view per cloud, drawn at random: (B, C, H, W)."""
        images = getattr(batch, "images", None)
        if not isinstance(images, Tensor) or images.ndim != 5 or images.shape[0] != size:
            raise ValueError(
                "ViPFormer's cross-modal term needs image views in the batch (B, V, C, H, W): convert the "
                "data with images (e.g. --render-views K) and set data.fields.image_views, or set "
                "model.cmid_weight=0"
            )
        pick = torch.randint(images.shape[1], (size,), generator=generator).to(images.device)
        return images[torch.arange(size, device=images.device), pick]

    def _step(self, batch: Any, generator: torch.Generator, stage: str, augment: bool) -> Tensor:
        terms = self.loss_terms(batch, generator, augment=augment)
        loss = self.total_loss(terms)
        self.log_loss(stage, loss, terms, batch_size=self.batch_points(batch).shape[0])
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, self.step_generator(), "train", augment=True)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + batch_idx)  # the same draws every validation
        return self._step(batch, generator, "val", augment=False)
