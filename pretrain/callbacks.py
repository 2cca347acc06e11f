"""Lightning callback for pre-training: online kNN monitoring of the encoder's frozen features.

:class:`KNNMonitor` measures how linearly useful the features are while pre-training runs: every
``every_n_epochs`` it extracts frozen pooled features of a small labelled set (train and test splits of a
shard directory, or arrays) with ``pl_module.encoder`` (``pretrain.features.extract_features``) and logs
the kNN accuracy of test against train (``pretrain.knn.KNNClassifier``, the classifier of the offline probe
``finetune.probes.knn_probe``) as ``val/knn_acc``. Rank 0 computes, the value is broadcast, every rank logs
the same number.

It expects a LightningModule with an ``encoder`` (a :class:`~pretrain.encoders.base.PointEncoder`) and,
unless ``num_points`` is given, ``num_points`` or a ``data_contract`` (a
:class:`~pretrain.encoders.spec.DataContract` or its dict form) to choose the points per cloud
(``pretrain.methods.base.PretrainModule`` has them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch

from datapipes.shards.remote import as_location
from pretrain.encoders import PointEncoder
from pretrain.features import extract_features
from pretrain.knn import KNNClassifier

__all__ = ["KNNMonitor"]


class KNNMonitor(pl.Callback):
    """Logs the kNN accuracy of frozen pooled features on a labelled set during pre-training.

    Every ``every_n_epochs`` training epochs (at the end of the epoch), global rank 0 extracts pooled
    features (``pretrain.features.extract_features``: eval mode, no gradients, the previous mode restored,
    FPS starts drawn from a fixed seed) of the train and test clouds, classifies the test features with
    ``pretrain.knn.KNNClassifier`` (cosine, majority vote) and broadcasts the accuracy; every rank then logs
    it under ``log_name`` via ``pl_module.log`` (so ``ModelCheckpoint(monitor="val/knn_acc")`` works). A
    failure on rank 0 is broadcast too and raised on every rank, so no rank waits forever. Keep the set small
    (a few thousand clouds): the other ranks wait while rank 0 computes.

    Args:
        data_root: shard directory with labelled splits; None when built with :meth:`from_arrays`.
        train_split: split used as the kNN reference set.
        test_split: split that is classified.
        num_points: points per cloud (first N of the FPS-ordered points); None takes ``pl_module.num_points``
            or the module's data contract.
        every_n_epochs: run after every n-th training epoch.
        k: neighbours.
        batch_size: clouds per forward pass.
        backend: ``"faiss"`` or ``"torch"``.
        log_name: metric name.
    """

    def __init__(
        self,
        data_root: str | Path | None = None,
        *,
        train_split: str = "train",
        test_split: str = "test",
        num_points: int | None = None,
        every_n_epochs: int = 1,
        k: int = 20,
        batch_size: int = 64,
        backend: Literal["faiss", "torch"] = "faiss",
        log_name: str = "val/knn_acc",
    ) -> None:
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_points is not None and num_points < 1:
            raise ValueError(f"num_points must be a positive int or None, got {num_points!r}")
        #: the classifier of the test features (validates ``k`` and ``backend``).
        self.classifier = KNNClassifier(k=k, backend=backend)
        self.data_root = None if data_root is None else as_location(data_root)
        self.train_split, self.test_split = train_split, test_split
        self.num_points = num_points
        self.every_n_epochs, self.batch_size = every_n_epochs, batch_size
        self.log_name = log_name
        self._arrays: tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray] | None = None
        #: accuracy of the last evaluation (fraction in [0, 1]) and the epoch it was measured after.
        self.last_accuracy: float | None = None
        self.history: list[tuple[int, float]] = []

    @classmethod
    def from_arrays(
        cls,
        train_xyz: np.ndarray | torch.Tensor,
        train_labels: np.ndarray | torch.Tensor,
        test_xyz: np.ndarray | torch.Tensor,
        test_labels: np.ndarray | torch.Tensor,
        **kwargs: Any,
    ) -> KNNMonitor:
        """A monitor over in-memory clouds (S, N, 3) and labels (S,) instead of a shard directory."""
        monitor = cls(None, **kwargs)
        monitor._arrays = monitor._check_arrays(train_xyz, train_labels, test_xyz, test_labels)
        return monitor

    @staticmethod
    def _check_arrays(
        train_xyz: Any, train_labels: Any, test_xyz: Any, test_labels: Any
    ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
        out: list[Any] = []
        for name, xyz, labels in (("train", train_xyz, train_labels), ("test", test_xyz, test_labels)):
            points = torch.as_tensor(np.asarray(xyz), dtype=torch.float32)
            y = np.asarray(labels, dtype=np.int64)
            if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] == 0:
                raise ValueError(
                    f"{name}_xyz must have shape (S, N, 3) with S >= 1, got {tuple(points.shape)}"
                )
            if y.shape != (points.shape[0],):
                raise ValueError(f"{name}_labels must have shape ({points.shape[0]},), got {y.shape}")
            out += [points, y]
        return out[0], out[1], out[2], out[3]

    def _resolve_num_points(self, pl_module: pl.LightningModule) -> int:
        if self.num_points is not None:
            return self.num_points
        value = getattr(pl_module, "num_points", None)
        if value is None:
            contract = getattr(pl_module, "data_contract", None)
            value = (
                contract.get("num_points")
                if isinstance(contract, Mapping)
                else getattr(contract, "num_points", None)
            )
        return int(value) if value is not None else 1024

    def _load(
        self, pl_module: pl.LightningModule
    ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
        if self._arrays is None:
            if self.data_root is None:
                raise ValueError("KNNMonitor needs data_root or from_arrays(...)")
            from datapipes.memory import load_split_arrays

            num_points = self._resolve_num_points(pl_module)
            train_xyz, train_y, _ = load_split_arrays(self.data_root, self.train_split, num_points)
            test_xyz, test_y, _ = load_split_arrays(self.data_root, self.test_split, num_points)
            self._arrays = self._check_arrays(train_xyz, train_y, test_xyz, test_y)
        return self._arrays

    def compute(self, pl_module: pl.LightningModule) -> float:
        """Accuracy (fraction in [0, 1]) of the current encoder under the kNN probe, on this process."""
        train_xyz, train_y, test_xyz, test_y = self._load(pl_module)
        encoder = getattr(pl_module, "encoder", None)
        if not isinstance(encoder, PointEncoder):
            raise ValueError(f"{type(pl_module).__name__} has no 'encoder' (a PointEncoder) to monitor")
        train_x, test_x = (
            extract_features(
                encoder,
                xyz,
                batch_size=self.batch_size,
                device=pl_module.device,
                generator=torch.Generator().manual_seed(0),
            )
            for xyz in (train_xyz, test_xyz)
        )
        pred = self.classifier.predict(train_x, train_y, test_x)
        return float(np.mean(pred == test_y))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Computes on rank 0, broadcasts, logs on every rank."""
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        result: tuple[float, str | None] = (float("nan"), None)
        if trainer.is_global_zero:
            try:
                result = (self.compute(pl_module), None)
            except Exception as err:  # re-raised on every rank after the broadcast
                result = (float("nan"), f"{type(err).__name__}: {err}")
        accuracy, error = trainer.strategy.broadcast(result, src=0)
        if error is not None:
            raise RuntimeError(f"KNNMonitor failed on rank 0: {error}")
        self.last_accuracy = float(accuracy)
        self.history.append((int(trainer.current_epoch), float(accuracy)))
        pl_module.log(self.log_name, float(accuracy), on_step=False, on_epoch=True, prog_bar=True)
