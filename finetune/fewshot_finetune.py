"""Few-shot protocol ``finetune``: full finetuning of the encoder on each episode's support set.

The Point-BERT / Point-MAE few-shot protocol (150 epochs, 10 warmup, AdamW 5e-4 / wd 0.05, batch 32, 1024
points, gradient clipping 10) trains a fresh classifier from the artifact on the ``way × shot`` support clouds
of every fold. The official code reports the best epoch's accuracy on the query set, i.e. selects on the
numbers it reports; pcpt evaluates the queries once, after the last epoch, so nothing is selected on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np

from finetune.classification import PointClassifier
from finetune.data import ArraysDataModule
from finetune.episodes import EpisodeSet, episode_labels
from finetune.fewshot import FewShotResult
from pretrain.optim import AdamW
from pretrain.schedules import WarmupCosineLR
from pretrain.training import derive_seed

__all__ = ["run_fewshot_finetune"]


def run_fewshot_finetune(
    artifact: str | Path,
    episodes: EpisodeSet,
    *,
    support_clouds: Mapping[str, np.ndarray],
    query_clouds: Mapping[str, np.ndarray],
    epochs: int = 150,
    warmup_epochs: float = 10.0,
    batch_size: int = 32,
    lr: float = 5e-4,
    head: str = "mae",
    accelerator: str = "cpu",
    progress: bool = False,
) -> FewShotResult:
    """Finetunes a classifier per episode and returns the query accuracy of each fold.

    Args:
        artifact: encoder artifact directory.
        episodes: the folds (support / query keys).
        support_clouds: key -> (N, 3) cloud for every support key.
        query_clouds: key -> (N, 3) cloud for every query key.
        epochs: training epochs per fold (150 officially).
        warmup_epochs: linear warmup epochs.
        batch_size: training batch size.
        lr: peak learning rate.
        head: classification head style (``"mae"`` or ``"bert"``).
        accelerator: Lightning accelerator (``"cpu"``, ``"gpu"``, ``"auto"``).
        progress: show Lightning's progress bar.

    Returns:
        A :class:`FewShotResult` with protocol ``"finetune"``; selection = last epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    accuracies: list[float] = []
    for fold, episode in enumerate(episodes.episodes):
        support = np.stack([support_clouds[k] for k in episode.support]).astype(np.float32)
        query = np.stack([query_clouds[k] for k in episode.query]).astype(np.float32)
        s_labels = episode_labels(len(episode.support), episodes.way)
        q_labels = episode_labels(len(episode.query), episodes.way)
        pl.seed_everything(derive_seed(episodes.seed, fold) % 2**31, verbose=False)
        num_points = int(support.shape[1])
        model = PointClassifier(
            num_classes=episodes.way,
            pretrained=str(artifact),
            head="bert" if head == "bert" else "mae",
            optimizer=partial(AdamW, lr=lr, weight_decay=0.05),
            lr_scheduler=partial(WarmupCosineLR, warmup_epochs=warmup_epochs),
            num_points=num_points,
            pool_points=num_points,
            vote_views=0,
            seed=fold,
        )
        data = ArraysDataModule(
            (support, s_labels, list(episode.support)),
            (query, q_labels, list(episode.query)),
            batch_size=min(batch_size, len(episode.support)),
        )
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=epochs,
            gradient_clip_val=10.0,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=data)
        metrics = trainer.test(model, datamodule=data, verbose=False)
        accuracies.append(float(metrics[0]["test/acc"]))
    params: dict[str, Any] = {
        "epochs": epochs,
        "warmup_epochs": warmup_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "head": head,
        "optimizer": "AdamW wd 0.05, cosine, grad clip 10",
    }
    return FewShotResult.from_folds(
        episodes,
        accuracies,
        protocol="finetune",
        selection="last epoch of each fold; queries evaluated once after training (no selection on them)",
        params=params,
    )
