"""Training helpers shared by pre-training methods and finetuning modules.

``configure_adamw_cosine`` is the official Point-BERT/Point-MAE optimiser recipe as a Lightning
``configure_optimizers`` return value; ``derive_seed`` turns a tuple of integers (seed, rank, step, ...) into
a 64-bit seed so per-step random draws come from explicit generators, not global random state.
"""

from __future__ import annotations

import hashlib
from typing import Any

import lightning.pytorch as pl
import torch

from pretrain.optim import param_groups
from pretrain.schedules import warmup_cosine_scheduler

__all__ = ["configure_adamw_cosine", "derive_seed", "seeded_generator"]


def derive_seed(*parts: int | str) -> int:
    """A stable non-negative 63-bit seed from ``parts`` (same parts → same seed, on every platform)."""
    key = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def seeded_generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


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
    length in epochs is converted with the trainer's estimated steps per epoch.
    """
    optimizer = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr)
    trainer = module.trainer
    total_steps = max(int(trainer.estimated_stepping_batches), 1)
    steps_per_epoch = max(total_steps // max(trainer.max_epochs or 1, 1), 1)
    warmup_steps = max(min(round(warmup_epochs * steps_per_epoch), total_steps - 1), 0)
    scheduler = warmup_cosine_scheduler(
        optimizer,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        min_lr=min_lr,
        warmup_init_lr=warmup_init_lr,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
