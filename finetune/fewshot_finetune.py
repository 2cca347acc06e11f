"""Few-shot protocol ``finetune``: finetuning of the encoder on each episode's support set.

The Point-BERT / Point-MAE few-shot protocol (150 epochs, 10 warmup, AdamW 5e-4 / wd 0.05, batch 32, 1024
points, gradient clipping 10) trains a fresh classifier from the artifact on the ``way × shot`` support clouds
of every fold. The official code reports the best epoch's accuracy on the query set, i.e. selects on the
numbers it reports; pcpt evaluates the queries once, after the last epoch, so nothing is selected on them.

Instead of an artifact, a fold can start from an encoder spec (:func:`encoder_spec_from_config`, e.g. the
``model.encoder`` of ``configs/finetune/any2point_minilm.yaml``): an Any2Point spec adapts its frozen source
model afresh in every fold (tokenizer, adapters, CLS, norm and head train), a ``point_adapter`` spec adapts
a frozen encoder artifact, a ``point_vit`` spec trains from a random init. What trains and the parameter
counts are part of the result.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import yaml

from finetune.classification import PointClassifier
from finetune.data import ArraysDataModule
from finetune.episodes import EpisodeSet, episode_labels
from finetune.fewshot import FewShotResult
from pretrain.encoders import EncoderSpec, spec_from_dict
from pretrain.optim import AdamW
from pretrain.schedules import WarmupCosineLR
from pretrain.training import derive_seed

__all__ = ["EncoderConfig", "encoder_spec_from_config", "run_fewshot_finetune"]


class EncoderConfig(NamedTuple):
    """What a few-shot run takes from a finetune config.

    Attributes:
        spec: the encoder spec (``model.encoder``).
        head: the head style (``model.head``, default ``"mae"``).
        num_points: points per cloud (``data.num_points``), or ``None`` when the config does not say.
    """

    spec: EncoderSpec
    head: str
    num_points: int | None


def encoder_spec_from_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> EncoderConfig:
    """The encoder spec, head style and points per cloud of a finetune config (or of a bare spec file).

    Args:
        path: a ``pcpt-finetune fit`` YAML config (``model.encoder``, ``model.head`` and
            ``data.num_points`` are read; the rest is ignored), or a YAML mapping that is the encoder spec
            itself (``arch`` and its fields).
        overrides: spec fields replaced before the spec is built (e.g. ``{"tokenizer_k": 16}``).

    Raises:
        ValueError: unreadable YAML, no encoder spec in it, a pretrained artifact instead of a spec, or
            invalid spec fields (the message names the file).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the config: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping (a finetune config or an encoder spec)")
    model = data.get("model") if "model" in data else None
    head, num_points = "mae", None
    data_section = data.get("data")
    if isinstance(data_section, dict) and data_section.get("num_points") is not None:
        num_points = int(data_section["num_points"])
    if model is not None:
        if not isinstance(model, dict):
            raise ValueError(f"{path}: 'model' must be a mapping")
        if model.get("pretrained"):
            raise ValueError(
                f"{path}: model.pretrained is set ({model['pretrained']}); pass that artifact as ART instead"
            )
        head = str(model.get("head") or "mae")
        data = model.get("encoder")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config has no model.encoder spec")
    try:
        spec = spec_from_dict({**data, **(overrides or {})})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid encoder spec: {err}") from err
    return EncoderConfig(spec, head, num_points)


def run_fewshot_finetune(
    artifact: str | Path | None,
    episodes: EpisodeSet,
    *,
    encoder: EncoderSpec | None = None,
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
        artifact: encoder artifact directory; ``None`` builds ``encoder`` afresh in every fold.
        episodes: the folds (support / query keys).
        encoder: the encoder spec of a run without an artifact (see the module docstring).
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
        A :class:`FewShotResult` with protocol ``"finetune"``; selection = last epoch. Its ``params`` say
        what trains (``trains``), the parameter counts and the mean training time per fold.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if (artifact is None) == (encoder is None):
        raise ValueError("give exactly one of an encoder artifact or an encoder spec")
    accuracies: list[float] = []
    fit_seconds: list[float] = []
    trains, counts = "", {}
    for fold, episode in enumerate(episodes.episodes):
        support = np.stack([support_clouds[k] for k in episode.support]).astype(np.float32)
        query = np.stack([query_clouds[k] for k in episode.query]).astype(np.float32)
        s_labels = episode_labels(len(episode.support), episodes.way)
        q_labels = episode_labels(len(episode.query), episodes.way)
        pl.seed_everything(derive_seed(episodes.seed, fold) % 2**31, verbose=False)
        num_points = int(support.shape[1])
        model = PointClassifier(
            num_classes=episodes.way,
            pretrained=None if artifact is None else str(artifact),
            encoder=encoder,  # type: ignore[arg-type]  # the families PointClassifier accepts
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
        trains, counts = model.protocol, model.parameter_counts()
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        fit_seconds.append(time.perf_counter() - start)
        metrics = trainer.test(model, datamodule=data, verbose=False)
        accuracies.append(float(metrics[0]["test/acc"]))
    params: dict[str, Any] = {
        "epochs": epochs,
        "warmup_epochs": warmup_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "head": head,
        "optimizer": "AdamW wd 0.05, cosine, grad clip 10",
        "trains": trains,
        "parameters": counts,
        "fit_seconds_per_fold": round(sum(fit_seconds) / len(fit_seconds), 2),
    }
    return FewShotResult.from_folds(
        episodes,
        accuracies,
        protocol="finetune",
        selection="last epoch of each fold; queries evaluated once after training (no selection on them)",
        params=params,
    )
