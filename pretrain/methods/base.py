"""Shared orchestration for pre-training methods.

:class:`PretrainModule` owns the encoder (built from an :class:`~pretrain.encoders.spec.EncoderSpec`), the
official optimiser recipe (AdamW with the Point-BERT/Point-MAE no-decay rule, per-step cosine schedule with
linear warmup), per-step seeded random generators (no global random state for masks), the metadata that makes
a Lightning checkpoint exportable (``checkpoint["pcpt"]``) and :meth:`export_encoder`. Methods subclass it and
implement ``training_step``; the math lives in ``pretrain.ops``, ``pretrain.nn`` and the loss functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from pretrain.checkpoint import git_sha, save_encoder
from pretrain.encoders import build_encoder
from pretrain.encoders.base import PointEncoder
from pretrain.encoders.spec import DataContract, EncoderSpec
from pretrain.training import configure_adamw_cosine, epochs_trained, seed_step_randomness, seeded_generator

__all__ = ["PretrainModule"]


class PretrainModule(pl.LightningModule):
    """Base LightningModule of every pcpt pre-training method.

    Args:
        encoder: architecture of the encoder being pre-trained (``None`` for methods that train no
            point encoder, such as the Point-BERT tokenizer; they override :meth:`write_artifact`).
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay (not applied to 1-D parameters, biases and ``*token*``).
        warmup_epochs: linear warmup length in epochs (converted to optimizer steps).
        min_lr: final learning rate of the cosine schedule.
        warmup_init_lr: learning rate at step 0.
        num_points: points per cloud; recorded in the artifact's data contract.
        normalization: cloud normalisation the data uses; recorded in the data contract.
        seed: base seed of the per-step mask generators.
    """

    method_name: str = "pretrain"

    def __init__(
        self,
        encoder: EncoderSpec | None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 10.0,
        min_lr: float = 1e-6,
        warmup_init_lr: float = 1e-6,
        num_points: int = 1024,
        normalization: str = "unit_sphere",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.encoder_spec: EncoderSpec | None = (
            encoder if encoder is None or isinstance(encoder, EncoderSpec) else EncoderSpec.from_dict(encoder)
        )
        if self.encoder_spec is not None:  # None: the method trains something else (e.g. a tokenizer)
            self.encoder: PointEncoder = build_encoder(self.encoder_spec)
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.min_lr = min_lr
        self.warmup_init_lr = warmup_init_lr
        self.num_points = num_points
        self.normalization = normalization
        self.seed = seed
        self.fps_ordered_data = False
        self.provenance_extra: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------- randomness
    def step_generator(self, batch_idx: int = 0, stream: int = 0) -> torch.Generator:
        """A CPU generator seeded by (seed, rank, global step, batch index, stream).

        Masks and other per-step draws come from it, so a run is reproducible and a resumed run continues
        with the same draws it would have made, and ranks draw different masks.
        """
        return seeded_generator(self.seed, self.global_rank, self.global_step, batch_idx, stream)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seeds the default generators for this step (drop-path, dropout): see ``seed_step_randomness``."""
        seed_step_randomness(self.seed, "layers", self.global_rank, self.global_step, batch_idx)

    # --------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        """AdamW over the official decay / no-decay groups and a per-step warmup + cosine schedule."""
        return configure_adamw_cosine(
            self,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            min_lr=self.min_lr,
            warmup_init_lr=self.warmup_init_lr,
        )

    # ------------------------------------------------------------------------------------ data contract
    def setup(self, stage: str) -> None:
        """Reads the data contract (points, normalisation, FPS order) from the datamodule, if it has one."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        contract = getattr(datamodule, "data_contract", None)
        if isinstance(contract, Mapping):
            self.num_points = int(contract.get("num_points", self.num_points))
            self.normalization = str(contract.get("normalization", self.normalization))
            self.fps_ordered_data = bool(contract.get("fps_order", False))

    @property
    def data_contract(self) -> DataContract:
        """Preprocessing the encoder is trained with (stored in the artifact)."""
        normalization: Literal["unit_sphere", "none"] = (
            "unit_sphere" if self.normalization == "unit_sphere" else "none"
        )
        return DataContract(
            num_points=self.num_points, normalization=normalization, fps_order=self.fps_ordered_data
        )

    def pcpt_metadata(self) -> dict[str, Any]:
        """Plain-data description written into every Lightning checkpoint under ``"pcpt"``."""
        return {
            "method": self.method_name,
            **self.exported_module_metadata(),
            "data_contract": self.data_contract.to_dict(),
            "config_sha256": self.provenance_extra.get("config_sha256"),
            "data_manifest_sha256": self.provenance_extra.get("data_manifest_sha256"),
        }

    def exported_module_metadata(self) -> dict[str, Any]:
        """What ``pcpt-pretrain export`` rebuilds: artifact ``kind``, spec and weights' ``encoder_prefix``."""
        return {
            "kind": "point_encoder",
            "encoder_spec": None if self.encoder_spec is None else self.encoder_spec.to_dict(),
            "encoder_prefix": "encoder.",
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stores :meth:`pcpt_metadata` so ``pcpt-pretrain export`` can rebuild the encoder from the ckpt."""
        checkpoint["pcpt"] = self.pcpt_metadata()

    def export_encoder(self, out_dir: str | Path, **provenance: Any) -> Path:
        """Writes the method's artifact (:meth:`write_artifact`) with the provenance of this run.

        Args:
            out_dir: artifact directory.
            **provenance: fields that override the collected ones (method, step, epoch, git commit, ...).
        """
        info = {
            "method": self.method_name,
            "step": int(self.global_step),
            "epoch": epochs_trained(self._trainer) if self._trainer is not None else 0,
            "git_sha": git_sha(),
            **{k: v for k, v in self.provenance_extra.items() if v is not None},
            **provenance,
        }
        return self.write_artifact(out_dir, info)

    def write_artifact(self, out_dir: str | Path, provenance: Mapping[str, Any]) -> Path:
        """Writes the encoder artifact (``encoder.safetensors`` + ``encoder.json``) to ``out_dir``.

        Methods that train something other than a point encoder override this (and
        :meth:`exported_module_metadata`).
        """
        return save_encoder(out_dir, self.encoder, data=self.data_contract, provenance=provenance)

    @staticmethod
    def batch_points(batch: Any) -> Tensor:
        """The (B, N, 3) points of a batch (a ``PointBatch`` or a bare tensor)."""
        points = getattr(batch, "points", batch)
        if not isinstance(points, Tensor) or points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"expected a batch with points (B, N, 3), got {type(batch).__name__}")
        return points
