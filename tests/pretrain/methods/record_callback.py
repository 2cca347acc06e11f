"""A callback for multi-process tests: records each rank's batch keys and final weight digest to JSON."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


def params_sha256(module: torch.nn.Module) -> str:
    """sha256 over the names and values of a module's parameters, in name order (buffers excluded)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RecordRank(pl.Callback):
    """Writes ``<out_dir>/rank<r>.json`` with the keys of every training batch and a hash of the parameters.

    Parameters (not BatchNorm running statistics, which DDP keeps per rank unless ``sync_batchnorm``) must be
    identical on every rank after each optimizer step.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.keys: list[list[str]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.keys.append(list(getattr(batch, "key", [])))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "keys": self.keys,
            "weights_sha256": params_sha256(pl_module),
        }
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
