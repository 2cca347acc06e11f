"""Randomness and progress of training runs, shared by pre-training methods and finetuning modules.

``derive_seed`` turns a tuple of integers (seed, rank, step, ...) into a 64-bit seed so per-step random draws
come from explicit generators, not global random state; ``seed_step_randomness`` re-seeds torch's default
generators from the step for the layers that draw from them; ``MicroBatchIndex`` numbers the batches of one
optimiser step; ``epochs_trained`` is the epoch count recorded in provenance.
"""

from __future__ import annotations

import hashlib

import lightning.pytorch as pl
import torch

__all__ = ["MicroBatchIndex", "derive_seed", "epochs_trained", "seed_step_randomness", "seeded_generator"]


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
    (seed, rank, global step, micro-batch index), which the checkpoint restores, not on the history of the
    process.
    """
    torch.manual_seed(derive_seed(*parts))


class MicroBatchIndex:
    """The index of the current training batch within its optimiser step (0 without gradient accumulation).

    Together with the global step it names a training batch uniquely, and unlike Lightning's ``batch_idx`` it
    does not depend on how the loop counted after a resume (Lightning restarts that count from zero when it
    takes a checkpoint saved after an earlier resume at an epoch end for an epoch start). Checkpoints are
    saved between optimiser steps, so a resumed run starts at index 0 like the uninterrupted one.
    """

    def __init__(self) -> None:
        self._step = -1
        self.index = 0

    def advance(self, global_step: int) -> int:
        """Registers a new training batch at ``global_step`` and returns its index within the step."""
        if global_step != self._step:
            self._step, self.index = int(global_step), 0
        else:
            self.index += 1
        return self.index


def epochs_trained(trainer: pl.Trainer) -> int:
    """Epochs whose every batch has been trained, as a checkpoint saved now would record it.

    Lightning counts an epoch as processed before its end-of-epoch hooks (where checkpoints are saved) and
    as completed after them; the processed count therefore agrees between an end-of-epoch checkpoint and the
    trainer after ``fit`` returns.
    """
    current = trainer.fit_loop.epoch_progress.current
    return int(getattr(current, "processed", current.completed))
