"""Shape classification on top of a pre-trained encoder artifact (full finetuning or a frozen linear probe).

The Point-MAE / Point-BERT classification recipe: the feature is concat[CLS output, max-pool of patch
outputs]; the head is Point-MAE's (Linear-BN-ReLU-Dropout ×2 + Linear) or Point-BERT's (Linear-ReLU-Dropout +
Linear). Training draws ``num_points`` of the first ``pool_points`` stored points (= FPS to the pool) at
random and applies scale-and-translate. Evaluation uses the first ``num_points`` points (FPS) with no
augmentation; voting (a fixed number of augmented views, logits averaged) is reported separately, never as
a best-of-N maximum.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from datapipes.errors import UserError
from finetune.contract import check_data_contract
from pretrain.checkpoint import load_encoder, read_artifact_meta
from pretrain.encoders import build_encoder
from pretrain.encoders.any2point import Any2PointSpec
from pretrain.encoders.base import PointEncoder
from pretrain.encoders.point_adapter import PointAdapterSpec
from pretrain.encoders.spec import PointViTSpec
from pretrain.ops.transforms import random_point_subset, scale_and_translate
from pretrain.optim import AdamW, configure_optimization
from pretrain.schedules import WarmupCosineLR
from pretrain.training import MicroBatchIndex, seed_step_randomness, seeded_generator

__all__ = ["FROZEN_FILES_KEY", "PointClassifier", "classification_head"]

#: checkpoint entry with the sha256 of frozen files whose tensors the checkpoint does not hold.
FROZEN_FILES_KEY = "pcpt_frozen_files"


def classification_head(
    in_dim: int, num_classes: int, style: Literal["mae", "bert"] = "mae"
) -> nn.Sequential:
    """The official classification heads (indices match the official ``cls_head_finetune`` keys).

    Shapes: (B, in_dim) -> (B, num_classes).
    """
    if style == "mae":
        return nn.Sequential(
            nn.Linear(in_dim, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )
    if style == "bert":
        return nn.Sequential(
            nn.Linear(in_dim, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, num_classes)
        )
    raise ValueError(f"head must be 'mae' or 'bert', got {style!r}")


class PointClassifier(pl.LightningModule):
    """Finetunes (or linearly probes) an encoder for classification.

    Args:
        num_classes: number of classes (linked from the data module).
        pretrained: encoder artifact directory; ``None`` trains from a random init of ``encoder``.
        encoder: architecture for a run without an artifact, ignored when ``pretrained`` is set: a
            ``point_vit`` spec trains from a random init ("scratch"); an ``any2point`` spec adapts its frozen
            source model (only the tokenizer, adapters, CLS, final norm and head train); a
            ``point_adapter`` spec adapts a frozen pcpt encoder artifact (adapters, final norm and head).
        freeze_encoder: linear probe: the encoder is frozen (eval mode) and only the head trains.
        head: ``"mae"`` or ``"bert"`` head.
        drop_path: stochastic depth of the encoder during finetuning.
        label_smoothing: cross-entropy label smoothing ε.
        optimizer: parameter groups -> optimiser (default AdamW; the Point-MAE recipe, lr 5e-4 and weight
            decay 0.05, is in ``configs/finetune/classify.yaml``); no decay on 1-D parameters, biases, tokens.
        lr_scheduler: optimiser -> per-step schedule (default: warmup then cosine, sized from the data).
        num_points: points fed to the encoder.
        pool_points: training draws ``num_points`` of the first ``pool_points`` stored points (1200 for 1024).
        augment: apply scale-and-translate during training.
        vote_views: augmented views averaged for the voting accuracy at test time (0 disables).
        seed: seed of the per-step sampling / augmentation generators and of the dropout draws.
        strict_contract: refuse data whose point count differs from the artifact's data contract (off:
            finetune at another point count, e.g. 2048 points from a 1024-point pre-training).
    """

    def __init__(
        self,
        num_classes: int,
        pretrained: str | None = None,
        encoder: PointViTSpec | Any2PointSpec | PointAdapterSpec | None = None,
        *,
        freeze_encoder: bool = False,
        head: Literal["mae", "bert"] = "mae",
        drop_path: float = 0.1,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        num_points: int = 1024,
        pool_points: int = 1200,
        augment: bool = True,
        vote_views: int = 10,
        seed: int = 0,
        strict_contract: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if pool_points < num_points:
            raise ValueError(f"pool_points ({pool_points}) must be >= num_points ({num_points})")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.freeze_encoder = freeze_encoder
        self.label_smoothing = label_smoothing
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.num_points, self.pool_points, self.augment = num_points, pool_points, augment
        self.vote_views, self.seed, self.strict_contract = vote_views, seed, strict_contract
        self._micro_batch = MicroBatchIndex()
        self.encoder, self.artifact_meta = self._build_encoder(pretrained, encoder, drop_path, freeze_encoder)
        feature_dim = 2 * self.encoder.embed_dim
        self.cls_head_finetune = classification_head(feature_dim, num_classes, head)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    @staticmethod
    def _build_encoder(
        pretrained: str | None,
        spec: PointViTSpec | Any2PointSpec | PointAdapterSpec | None,
        drop_path: float,
        frozen: bool,
    ) -> tuple[PointEncoder, dict[str, Any]]:
        if pretrained is None and isinstance(spec, Any2PointSpec):
            adapted = build_encoder(spec)
            source = {"file": spec.source_path, "sha256": adapted.spec.source_sha256}  # type: ignore[attr-defined]
            return adapted, {"provenance": {"method": "any2point", "source": source}}
        if pretrained is None and isinstance(spec, PointAdapterSpec):
            adapted = build_encoder(spec)
            frozen_base = {"artifact": spec.base_path, "sha256": adapted.spec.base_sha256}  # type: ignore[attr-defined]
            return adapted, {"provenance": {"method": "point_adapter", "base": frozen_base}}
        if pretrained is None:
            base = spec if spec is not None else PointViTSpec()
            base = PointViTSpec.from_dict({**base.to_dict(), "drop_path": 0.0 if frozen else drop_path})
            if not frozen:
                base = PointViTSpec.from_dict({**base.to_dict(), "cls_token": True})
            return build_encoder(base), {"provenance": {"method": "random-init"}}
        meta = read_artifact_meta(pretrained)
        fields = meta["spec"]  # families differ: only the fields this encoder's spec has are changed
        overrides: dict[str, Any] = {}
        if "drop_path" in fields:
            overrides["drop_path"] = 0.0 if frozen else drop_path
        expected_missing: frozenset[str] = frozenset()
        if "cls_token" in fields and not fields["cls_token"] and not frozen:
            # Point-MAE encoders are pre-trained without CLS; finetuning adds a fresh CLS token + position.
            overrides["cls_token"] = True
            expected_missing = frozenset({"cls_token", "cls_pos"})
        encoder, meta = load_encoder(pretrained, expected_missing=expected_missing, spec_overrides=overrides)
        if getattr(encoder, "mask_token", None) is not None:
            encoder.mask_token.requires_grad_(False)  # only used by BERT-style pre-training
        return encoder, meta

    @property
    def protocol(self) -> str:
        """What trains, in words (results.json): linear probe, adapters on a frozen model, full finetuning."""
        if self.freeze_encoder:
            return "linear probe (frozen encoder)"
        spec = getattr(self.encoder, "spec", None)
        arch = getattr(spec, "arch", None)
        if arch == "any2point":
            return "any2point (frozen source; Point-PN tokenizer, adapters, CLS, norm and head train)"
        if arch == "point_adapter":
            norm = ", final norm" if getattr(spec, "train_norm", False) else ""
            return f"adapters on a frozen encoder (adapters{norm} and head train)"
        return "full finetuning"

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and frozen parameter counts of the whole model (encoder + head)."""
        params = list(self.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return {"trainable": trainable, "frozen": sum(p.numel() for p in params) - trainable}

    def on_fit_start(self) -> None:
        """Prints how many parameters train (recorded in ``results.json`` too)."""
        counts = self.parameter_counts()
        rank_zero_info(
            f"pcpt-finetune: {counts['trainable']:,} trainable parameters, {counts['frozen']:,} frozen"
        )

    def _frozen_files(self) -> dict[str, str]:
        """sha256 of the frozen files the encoder is built on (an Any2Point source, an adapted base)."""
        spec = self.encoder.spec
        return {
            key: str(getattr(spec, key)) for key in ("source_sha256", "base_sha256") if hasattr(spec, key)
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Records the sha256 of frozen files left out of the weights (checked when the checkpoint loads)."""
        checkpoint[FROZEN_FILES_KEY] = self._frozen_files()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a checkpoint whose frozen files (not in its weights) differ from the ones loaded now.

        Raises:
            UserError: another source model or base encoder than the checkpoint was trained on.
        """
        recorded = checkpoint.get(FROZEN_FILES_KEY) or {}
        for key, sha in self._frozen_files().items():
            if key in recorded and recorded[key] != sha:
                raise UserError(
                    f"the checkpoint was trained on a frozen file with {key} {recorded[key]}, but the one "
                    f"loaded now has {sha}: point the config at the same file"
                )

    def check_data(self, num_points: int, normalization: str | None, *, data_root: str = "data") -> list[str]:
        """Checks the data against the pretrained artifact's data contract (nothing to check from scratch).

        Args:
            num_points: points per cloud the data module feeds.
            normalization: the data's normalisation (from its manifest), or None when unknown.
            data_root: named in messages.

        Returns:
            Warnings for the caller to show (a point count changed on purpose, an unknown normalisation).

        Raises:
            UserError: another normalisation than the contract's; another point count than the contract's
                unless ``strict_contract`` is off; fewer points than the encoder's patch grouping needs.
        """
        if num_points < self.encoder.min_points:
            raise UserError(
                f"{data_root}: {num_points} points per cloud are fewer than the "
                f"{self.encoder.min_points} the encoder's tokenizer needs"
            )
        if self.hparams.get("pretrained") is None:
            return []
        try:
            return check_data_contract(
                self.artifact_meta,
                num_points,
                normalization,
                allow_num_points_change=not self.strict_contract,
                override_hint="pass --model.strict_contract false to finetune at {n} points on purpose",
            )
        except UserError as err:
            raise UserError(f"{data_root} vs {self.hparams['pretrained']}: {err}") from err

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, points: Tensor) -> Tensor:
        """Class logits. Shapes: points (B, N, 3) -> (B, num_classes)."""
        if self.freeze_encoder:
            self.encoder.eval()
            with torch.no_grad():
                features = self.encoder.pool(self.encoder.encode(points))
        else:
            features = self.encoder.pool(self.encoder.encode(points))
        logits: Tensor = self.cls_head_finetune(features)
        return logits

    def _generator(self, stream: int) -> torch.Generator:
        micro = self._micro_batch.index
        return seeded_generator(self.seed, self.global_rank, self.global_step, micro, stream)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seeds the default generators for this step (dropout in the head, drop-path in the encoder)."""
        micro = self._micro_batch.advance(self.global_step)
        seed_step_randomness(self.seed, "layers", self.global_rank, self.global_step, micro)

    def _train_view(self, points: Tensor, generator: torch.Generator) -> Tensor:
        pool = points[:, : self.pool_points]
        view = random_point_subset(pool, self.num_points, generator=generator)
        return scale_and_translate(view, generator=generator) if self.augment else view

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        points, labels = batch.points, batch.label
        logits = self(self._train_view(points, self._generator(0)))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        self.log("train/acc", acc, batch_size=labels.shape[0])
        return loss

    def _eval_logits(self, points: Tensor) -> Tensor:
        out: Tensor = self(points[:, : self.num_points])
        return out

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits = self._eval_logits(batch.points)
        acc = (logits.argmax(-1) == batch.label).float().mean()
        loss = F.cross_entropy(logits, batch.label)
        self.log("val/acc", acc, prog_bar=True, batch_size=batch.label.shape[0], sync_dist=True)
        self.log("val/loss", loss, batch_size=batch.label.shape[0], sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        labels = batch.label
        logits = self._eval_logits(batch.points)
        self.log(
            "test/acc",
            (logits.argmax(-1) == labels).float().mean(),
            batch_size=labels.shape[0],
            sync_dist=True,
        )
        if self.vote_views > 0:
            generator = seeded_generator(self.seed, "vote", batch_idx)
            votes = torch.stack(
                [self(self._train_view(batch.points, generator)).softmax(-1) for _ in range(self.vote_views)]
            ).mean(0)
            vote_acc = (votes.argmax(-1) == labels).float().mean()
            self.log(f"test/acc_vote{self.vote_views}", vote_acc, batch_size=labels.shape[0], sync_dist=True)

    # ----------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        """The injected optimiser over the decay / no-decay groups and its per-step schedule."""
        return configure_optimization(self, self.optimizer, self.lr_scheduler)
