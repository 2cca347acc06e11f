"""Monitoring image-point contrastive pre-training without looking at the test split.

:class:`ContrastiveMonitor` holds out a class-stratified part of the *training* split (seeded) and, every
``every_n_epochs``, measures on it

- ``monitor/svm_acc``: a linear SVM (``SVC(kernel="linear")``, the official monitor's classifier) fitted on
  the frozen pooled point features of the rest of the sampled training clouds and scored on the held-out
  ones;
- ``monitor/retrieval_top1``: image → point retrieval on the held-out (cloud, first image view) pairs: the
  fraction of images whose most similar point embedding (cosine of the projection heads' outputs) is their
  own cloud's. The held-out clouds are held out from the SVM fit only: they belong to the training split,
  so the contrastive loss sees their pairs too; the retrieval measures how well training pairs are aligned
  among unlabelled candidates, not generalisation to new objects.

The official ViPFormer code selects its checkpoint on the SVM accuracy of the *test* split; this monitor
never reads a test split, so a checkpoint chosen with it (``ModelCheckpoint(monitor="monitor/svm_acc")``)
is an honest choice. Rank 0 computes, the values are broadcast, every rank logs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from datapipes.geometry import fps_orders
from datapipes.shards import as_location, iter_split_samples, read_manifest
from datapipes.shards.codecs import decode_image
from datapipes.splits import stratified_split
from pretrain.encoders import PointEncoder
from pretrain.features import extract_features

__all__ = ["ContrastiveMonitor", "retrieval_top1"]

#: (xyz (S, N, 3), labels (S,), images (S, C, H, W) or None, fit indices, held-out indices).
_HeldOut = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]


class _ContrastiveModule(Protocol):
    encoder: PointEncoder

    def point_embeddings(self, points: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def image_embeddings(self, images: Tensor) -> Tensor: ...

    def eval_images(self, images: Tensor) -> Tensor: ...


def retrieval_top1(queries: Tensor, gallery: Tensor) -> float:
    """Fraction of queries (S, D) whose most cosine-similar gallery row (S, D) has the same index."""
    if queries.shape != gallery.shape or queries.ndim != 2:
        raise ValueError(f"need two (S, D) tensors, got {tuple(queries.shape)} and {tuple(gallery.shape)}")
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    g = torch.nn.functional.normalize(gallery.float(), dim=1)
    best = (q @ g.T).argmax(dim=1)
    return float((best == torch.arange(len(q), device=best.device)).float().mean())


class ContrastiveMonitor(pl.Callback):
    """Logs held-out SVM accuracy and image→point retrieval top-1 during image-point pre-training.

    Args:
        data_root: shard directory whose ``split`` has labels (and images for the retrieval); None: the
            training data module's ``data_root``.
        split: the training split the samples come from (never a test split).
        holdout_fraction: fraction of each class held out for scoring.
        max_samples: at most this many clouds are used (a seeded random subset, before the split).
        num_points: points per cloud (first N in FPS order); None: the module's ``num_points``.
        every_n_epochs: run after every n-th training epoch.
        svm_c: the SVM's ``C`` (1, as the official monitor).
        retrieval: also measure image→point retrieval (needs image views in the shards).
        batch_size: clouds or images per forward pass.
        seed: seed of the subset and of the split.
    """

    def __init__(
        self,
        data_root: str | Path | None = None,
        *,
        split: str = "train",
        holdout_fraction: float = 0.2,
        max_samples: int = 2000,
        num_points: int | None = None,
        every_n_epochs: int = 1,
        svm_c: float = 1.0,
        retrieval: bool = True,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if split.lower().startswith("test"):
            raise ValueError(f"ContrastiveMonitor never scores on a test split, got split={split!r}")
        for name, value in (("max_samples", max_samples), ("every_n_epochs", every_n_epochs)):
            if value < 2 if name == "max_samples" else value < 1:
                raise ValueError(f"{name} is too small: {value}")
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        self.data_root, self.split = (None if data_root is None else as_location(data_root)), split
        self.holdout_fraction, self.max_samples, self.num_points = holdout_fraction, max_samples, num_points
        self.every_n_epochs, self.svm_c, self.retrieval = every_n_epochs, svm_c, retrieval
        self.batch_size, self.seed = batch_size, seed
        self._data: _HeldOut | None = None
        #: (epoch, {"svm_acc": ..., "retrieval_top1": ...}) after every evaluation.
        self.history: list[tuple[int, dict[str, float]]] = []

    # ------------------------------------------------------------------------------------------- data
    def _load(self, num_points: int, data_root: str | Path) -> _HeldOut:
        """(xyz (S, N, 3), labels (S,), images (S, C, H, W) or None, fit indices, held-out indices)."""
        if self._data is None:
            fields = ("xyz", "label", "images") if self.retrieval else ("xyz", "label")
            manifest = read_manifest(data_root)
            total = int(manifest["splits"][self.split]["samples"])
            rng = np.random.default_rng(self.seed)
            chosen = set(range(total))
            if total > self.max_samples:
                chosen = {int(i) for i in rng.choice(total, self.max_samples, replace=False)}
            samples = []
            for index, sample in enumerate(iter_split_samples(data_root, self.split, fields=fields)):
                if index in chosen:  # only the chosen clouds, and only their first view, are kept
                    sample["images"] = (sample.get("images") or [])[:1]
                    samples.append(sample)
            smallest = min(int(s["xyz"].shape[0]) for s in samples)
            if smallest < num_points:
                raise ValueError(f"{data_root}: clouds of {smallest} points, fewer than {num_points}")
            clouds = [s["xyz"] for s in samples]
            if not manifest.get("fps_ordered", False):  # the first points are an FPS subsample only then
                clouds = [c[order] for c, order in zip(clouds, fps_orders(clouds, num_points))]
            xyz = np.stack([c[:num_points] for c in clouds]).astype(np.float32)
            labels = np.array([int(s.get("label", -1)) for s in samples], dtype=np.int64)
            if (labels < 0).any():
                raise ValueError(f"{data_root}: split {self.split!r} has unlabelled clouds")
            images = None
            if self.retrieval:
                if any(not s.get("images") for s in samples):
                    raise ValueError(
                        f"{data_root}: split {self.split!r} has clouds without image views; convert "
                        "with images or set retrieval=False"
                    )
                where = f"{data_root}/{self.split}"
                images = np.stack([decode_image(s["images"][0], where=where) for s in samples])
            fit_idx, held_idx = stratified_split(labels, self.holdout_fraction, self.seed)
            self._data = (xyz, labels, images, fit_idx, held_idx)
        return self._data

    # ---------------------------------------------------------------------------------------- measure
    def compute(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """``{"svm_acc", "retrieval_top1"?}`` of the current encoders, on this process."""
        from sklearn.svm import SVC

        module: Any = pl_module
        num_points = self.num_points or int(getattr(module, "num_points", 1024))
        xyz, labels, images, fit_idx, held_idx = self._load(num_points, self._data_root(module))
        features = extract_features(
            module.encoder,
            xyz,
            batch_size=self.batch_size,
            device=module.device,
            generator=torch.Generator().manual_seed(self.seed),
        )
        svm = SVC(kernel="linear", C=self.svm_c).fit(features[fit_idx], labels[fit_idx])
        result = {"svm_acc": float(np.mean(svm.predict(features[held_idx]) == labels[held_idx]))}
        if images is not None and getattr(module, "image_encoder", None) is not None:
            result["retrieval_top1"] = self._retrieval(module, xyz[held_idx], images[held_idx])
        return result

    def _data_root(self, module: Any) -> str | Path:
        if self.data_root is not None:
            return self.data_root
        trainer = getattr(module, "_trainer", None)
        root = getattr(getattr(trainer, "datamodule", None), "data_root", None)
        if root is None:
            raise ValueError(
                "ContrastiveMonitor needs data_root when the trainer has no data module with one"
            )
        return as_location(root)

    def _retrieval(self, module: _ContrastiveModule, xyz: np.ndarray, images: np.ndarray) -> float:
        was_training = module.training  # type: ignore[attr-defined]
        module.eval()  # type: ignore[attr-defined]
        device = module.device  # type: ignore[attr-defined]
        points, pictures = [], []
        try:
            with torch.no_grad():
                for start in range(0, len(xyz), self.batch_size):
                    chunk = torch.from_numpy(xyz[start : start + self.batch_size]).to(device)
                    gen = torch.Generator().manual_seed(self.seed)
                    points.append(module.point_embeddings(chunk, gen).float().cpu())
                    view = torch.from_numpy(images[start : start + self.batch_size]).to(device)
                    pictures.append(module.image_embeddings(module.eval_images(view)).float().cpu())
        finally:
            if was_training:
                module.train()  # type: ignore[attr-defined]
        return retrieval_top1(torch.cat(pictures), torch.cat(points))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Computes on rank 0, broadcasts, logs on every rank."""
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        result: tuple[dict[str, float], str | None] = ({}, None)
        if trainer.is_global_zero:
            try:
                result = (self.compute(pl_module), None)
            except Exception as err:  # re-raised on every rank after the broadcast
                result = ({}, f"{type(err).__name__}: {err}")
        values, error = trainer.strategy.broadcast(result, src=0)
        if error is not None:
            raise RuntimeError(f"ContrastiveMonitor failed on rank 0: {error}")
        self.history.append((int(trainer.current_epoch), dict(values)))
        for name, value in values.items():
            pl_module.log(f"monitor/{name}", float(value), on_step=False, on_epoch=True, prog_bar=True)
