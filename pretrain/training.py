"""Training helpers shared by pre-training methods and finetuning modules.

``configure_adamw_cosine`` is the official Point-BERT/Point-MAE optimiser recipe as a Lightning
``configure_optimizers`` return value; ``derive_seed`` turns a tuple of integers (seed, rank, step, ...) into
a 64-bit seed so per-step random draws come from explicit generators, not global random state.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import lightning.pytorch as pl
import torch

from pretrain.optim import param_groups
from pretrain.schedules import warmup_cosine_scheduler

__all__ = [
    "configure_adamw_cosine",
    "derive_seed",
    "epochs_trained",
    "seed_step_randomness",
    "seeded_generator",
    "training_steps",
]


def derive_seed(*parts: int | str) -> int:
    """A stable non-negative 63-bit seed from ``parts`` (same parts → same seed, on every platform)."""
    key = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def seeded_generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def seed_step_randomness(*parts: int | str) -> None:
    """Seeds torch's default generators (CPU and CUDA) from ``parts`` before a training step.

    Layers that draw from the default generator (``nn.Dropout``, drop-path) then make the same draws at the
    same step whether a run was interrupted and resumed or not: the draws depend on the step's identity
    (seed, rank, global step, batch index), which the checkpoint restores, not on the history of the process.
    """
    torch.manual_seed(derive_seed(*parts))


def epochs_trained(trainer: pl.Trainer) -> int:
    """Epochs whose every batch has been trained, as a checkpoint saved now would record it.

    Lightning counts an epoch as processed before its end-of-epoch hooks (where checkpoints are saved) and
    as completed after them; the processed count therefore agrees between an end-of-epoch checkpoint and the
    trainer after ``fit`` returns.
    """
    current = trainer.fit_loop.epoch_progress.current
    return int(getattr(current, "processed", current.completed))


def training_steps(trainer: pl.Trainer) -> tuple[int, int]:
    """``(optimizer steps of the whole run, optimizer steps per epoch)``, counted from the data.

    A data module with ``train_batches_per_epoch()`` (pcpt's do) gives the batches per epoch on this rank
    without building a loader, so the training loader is first built by the fit loop after a checkpoint is
    restored (which lets it resume inside an epoch). Other data modules fall back to Lightning's count of the
    training loader. ``limit_train_batches``, gradient accumulation, ``max_epochs`` and ``max_steps`` are
    applied as Lightning applies them; the run ends at whichever of the two limits comes first.

    Raises:
        ValueError: neither ``max_epochs`` nor ``max_steps`` bounds the run.
    """
    datamodule = getattr(trainer, "datamodule", None)
    counter = getattr(datamodule, "train_batches_per_epoch", None)
    if callable(counter):
        batches = int(counter())
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None and float(limit) < 1.0:
            batches = int(batches * float(limit))
    else:
        _ = trainer.estimated_stepping_batches  # builds the loader so that its length is known
        batches = int(trainer.num_training_batches)
    per_epoch = max(math.ceil(batches / max(int(trainer.accumulate_grad_batches), 1)), 1)
    limits = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        limits.append(per_epoch * int(trainer.max_epochs))
    if trainer.max_steps is not None and trainer.max_steps > 0:
        limits.append(int(trainer.max_steps))
    if not limits:
        raise ValueError("the run needs max_epochs or max_steps to size its learning-rate schedule")
    return min(limits), per_epoch


def configure_adamw_cosine(
    module: pl.LightningModule,
    *,
    lr: float,
    weight_decay: float,
    warmup_epochs: float,
    min_lr: float = 1e-6,
    warmup_init_lr: float = 1e-6,
) -> dict[str, Any]:
    """AdamW over the official decay / no-decay groups with a per-step linear-warmup cosine schedule.

    The schedule is stepped every optimizer step (resumable through the scheduler's state dict); the warmup
    length in epochs is converted with the optimizer steps per epoch of the data (:func:`training_steps`).
    """
    optimizer = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr)
    total_steps, steps_per_epoch = training_steps(module.trainer)
    warmup_steps = max(min(round(warmup_epochs * steps_per_epoch), total_steps - 1), 0)
    scheduler = warmup_cosine_scheduler(
        optimizer,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        min_lr=min_lr,
        warmup_init_lr=warmup_init_lr,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
