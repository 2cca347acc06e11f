"""Point-BERT stage 1: the discrete VAE tokenizer (Yu et al., CVPR 2022).

group (FPS + kNN) → mini-PointNet → DGCNN logits over the codebook → Gumbel-softmax (temperature cosine
1 → 1/16 over 100k iterations) → codebook → DGCNN → folding decoder → Chamfer-L1 (coarse) + Chamfer-L1 (fine)
+ w(it)·KL(u ‖ q̄) (w = 0 for 10k iterations, then a cosine ramp to 0.1 over 100k). The per-iteration schedules
read ``global_step``, so a resumed run continues them where it stopped. The end of ``fit`` writes a
``dvae_tokenizer`` artifact (``pretrain.dvae``), the input of
:class:`~pretrain.methods.point_bert.PointBERT`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pretrain.dvae import DiscreteVAE, DVAESpec
from pretrain.dvae_eval import (
    code_counts,
    code_perplexity,
    hard_code_batch_metrics,
    reconstruction_losses,
    validation_noise_seed,
)
from pretrain.losses import dvae_kl_uniform
from pretrain.methods.base import PretrainModule
from pretrain.nn.folding import FoldingDecoder
from pretrain.schedules import cosine_ramp
from pretrain.training import derive_seed

__all__ = ["PointDVAE"]


class PointDVAE(PretrainModule):
    """Trains the Point-BERT dVAE tokenizer.

    The module holds the tokenizer as ``dvae`` (weights ``dvae.*``, the official key layout after the prefix);
    it trains no transformer encoder, so the encoder the base class builds is dropped.

    Args:
        dvae: tokenizer architecture (default: the official one, 64 × 32 patches, 8192 codes).
        temperature_start: Gumbel-softmax temperature at iteration 0.
        temperature_end: temperature after ``temperature_iters`` iterations (1/16).
        temperature_iters: length of the temperature cosine (100k).
        kl_start_it: iteration where the KL weight starts to ramp (10k).
        kl_ramp_iters: length of the KL weight cosine ramp (100k).
        kl_weight_max: final KL weight (0.1).
        **kwargs: optimiser (official: AdamW lr 5e-4, weight decay 5e-4), schedule (10 warmup epochs), data
            contract and seed of the per-step Gumbel noise (see :class:`PretrainModule`).
    """

    method_name = "PointDVAE"
    accepts_init_from = False
    exported_module = "dvae"
    #: ``compile=True`` compiles the folding decoder (the DGCNN's kNN graph stays eager).
    compile_types = (FoldingDecoder,)

    def __init__(
        self,
        dvae: DVAESpec | None = None,
        *,
        temperature_start: float = 1.0,
        temperature_end: float = 1.0 / 16.0,
        temperature_iters: int = 100_000,
        kl_start_it: int = 10_000,
        kl_ramp_iters: int = 100_000,
        kl_weight_max: float = 0.1,
        **kwargs: Any,
    ) -> None:
        spec = dvae if dvae is not None else DVAESpec()
        if not isinstance(spec, DVAESpec):
            spec = DVAESpec.from_dict(spec)
        super().__init__(None, **kwargs)
        if not (temperature_start > 0 and temperature_end > 0):
            raise ValueError(f"temperatures must be > 0, got {temperature_start} and {temperature_end}")
        if temperature_iters < 1 or kl_ramp_iters < 1 or kl_start_it < 0:
            raise ValueError(
                "temperature_iters and kl_ramp_iters must be >= 1 and kl_start_it >= 0, got "
                f"{temperature_iters}, {kl_ramp_iters}, {kl_start_it}"
            )
        if kl_weight_max < 0:
            raise ValueError(f"kl_weight_max must be >= 0, got {kl_weight_max}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.dvae_spec = spec
        self.dvae = DiscreteVAE(spec)
        self.temperature_start, self.temperature_end = temperature_start, temperature_end
        self.temperature_iters = temperature_iters
        self.kl_start_it, self.kl_ramp_iters, self.kl_weight_max = kl_start_it, kl_ramp_iters, kl_weight_max
        # Per-rank code histograms of the current training / validation epoch (not DDP buffers).
        self._code_counts: Tensor | None = None
        self._val_code_counts: Tensor | None = None

    # ------------------------------------------------------------------------------------------ schedules
    def temperature_at(self, it: int) -> float:
        """Gumbel-softmax temperature at iteration ``it`` (cosine from start to end, then constant)."""
        return cosine_ramp(
            it,
            start_it=0,
            ramp_iters=self.temperature_iters,
            start_value=self.temperature_start,
            end_value=self.temperature_end,
        )

    def kl_weight_at(self, it: int) -> float:
        """KL weight at iteration ``it`` (0, then a cosine ramp to ``kl_weight_max``, then constant)."""
        return cosine_ramp(
            it,
            start_it=self.kl_start_it,
            ramp_iters=self.kl_ramp_iters,
            start_value=0.0,
            end_value=self.kl_weight_max,
        )

    # ------------------------------------------------------------------------------------------- training
    def _noise(self, *parts: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(derive_seed(self.seed, self.global_rank, *parts))
        return generator

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        points = self.batch_points(batch)
        it = int(self.global_step)
        temperature, kl_weight = self.temperature_at(it), self.kl_weight_at(it)
        groups = self.dvae.group(points)
        out = self.dvae(
            groups.neighborhoods,
            groups.centers,
            temperature=temperature,
            generator=self._noise(it, self._micro_batch.index),
        )
        loss_coarse, loss_fine = reconstruction_losses(out, groups)
        kl = dvae_kl_uniform(out.logits)
        loss = loss_coarse + loss_fine + kl_weight * kl
        counts = code_counts(out.logits, self.dvae_spec.codebook_size)
        self._code_counts = counts if self._code_counts is None else self._code_counts + counts
        size = points.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict(
            {
                "train/loss_coarse": loss_coarse,
                "train/loss_fine": loss_fine,
                "train/kl": kl,
                "train/kl_weight": kl_weight,
                "train/temperature": temperature,
                "train/code_perplexity": code_perplexity(counts),
            },
            batch_size=size,
        )
        return loss

    def on_train_epoch_start(self) -> None:
        self._code_counts = None

    def on_train_epoch_end(self) -> None:
        """Logs codebook usage over the epoch: ``train/epoch_code_perplexity``, ``train/dead_codes``."""
        self._log_code_usage(self._code_counts, "train")

    def on_validation_epoch_start(self) -> None:
        self._val_code_counts = None

    def on_validation_epoch_end(self) -> None:
        """Logs codebook usage of the hard codes over the validation set (``val/code_perplexity``, ...)."""
        self._log_code_usage(self._val_code_counts, "val")

    def _log_code_usage(self, counts: Tensor | None, stage: str) -> None:
        """Logs the perplexity and the never-chosen (dead) codes of a histogram summed over ranks."""
        if counts is None:
            return
        if self._trainer is not None and self.trainer.world_size > 1:
            gathered = self.all_gather(counts)
            if not isinstance(gathered, Tensor):
                raise RuntimeError(f"all_gather returned {type(gathered).__name__}, expected a tensor")
            counts = gathered.sum(dim=0)
        dead = float((counts == 0).sum())
        # Equal on every rank after the gather, so sync_dist averages identical values.
        self.log(f"{stage}/dead_codes", dead, sync_dist=True)
        name = "epoch_code_perplexity" if stage == "train" else "code_perplexity"
        self.log(f"{stage}/{name}", code_perplexity(counts), sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Hard codes at temperature 1 (the official validation): patch and whole-cloud Chamfer distances.

        The hard codes of every batch also enter the validation codebook histogram (perplexity, dead codes).
        ``pcpt-pretrain eval-tokenizer`` computes the same metrics from a tokenizer artifact.
        """
        points = self.batch_points(batch)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(validation_noise_seed(self.seed, self.global_rank, batch_idx))
        metrics, counts = hard_code_batch_metrics(self.dvae, points, generator)
        self._val_code_counts = counts if self._val_code_counts is None else self._val_code_counts + counts
        self.log_dict({f"val/{name}": value for name, value in metrics.items()}, batch_size=points.shape[0],
                      sync_dist=True)  # fmt: skip
        return metrics["loss_recon"]
