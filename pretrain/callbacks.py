"""Lightning callbacks for pre-training: online kNN monitoring and encoder-artifact export.

* :class:`KNNMonitor` measures how linearly useful the features are while pre-training runs: every
  ``every_n_epochs`` it extracts frozen pooled features of a small labelled set (train and test splits of a
  shard directory, or arrays) with ``pl_module.encoder`` and logs the kNN accuracy of test against train as
  ``val/knn_acc``. Rank 0 computes, the value is broadcast, every rank logs the same number.
* :class:`EncoderExport` writes the encoder artifact (``pretrain.checkpoint.save_encoder``) at the end of
  training and on demand.

Both expect a LightningModule with these attributes (``pretrain.methods.base.PretrainModule`` has them):

* ``encoder`` – a :class:`~pretrain.encoders.base.PointEncoder`;
* ``data_contract`` – a :class:`~pretrain.encoders.spec.DataContract` (or its dict form);
* ``method_name`` – a short method name for the provenance (default: the class name);
* optionally ``encoder_spec`` (must equal ``encoder.spec``; the artifact stores ``encoder.spec``),
  ``num_points`` (points per cloud for the monitor) and ``provenance_extra`` (dict merged into provenance).

The kNN classifier itself (:func:`knn_predict`) lives here so that the monitor and the offline probe
(``finetune.probes``, which imports it) give identical numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch

__all__ = ["KNN_TEMPERATURE", "EncoderExport", "KNNMonitor", "knn_predict"]

#: temperature of the ``vote="weighted"`` kNN (exp(similarity / T), as in InstDisc / DINO).
KNN_TEMPERATURE = 0.07


# -------------------------------------------------------------------------------------- kNN classification


def _knn_search_faiss(
    train_x: np.ndarray, test_x: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    dim = train_x.shape[1]
    index = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    index.add(np.ascontiguousarray(train_x, dtype=np.float32))
    scores, idx = index.search(np.ascontiguousarray(test_x, dtype=np.float32), k)
    if metric != "cosine":
        scores = -scores  # squared L2 distance -> similarity (larger is closer)
    return scores.astype(np.float32), idx.astype(np.int64)


def _knn_search_torch(
    train_x: np.ndarray, test_x: np.ndarray, k: int, metric: str, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    ref = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    query = torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.float32))
    all_scores, all_idx = [], []
    for start in range(0, query.shape[0], chunk):
        q = query[start : start + chunk]
        if metric == "cosine":
            sim = q @ ref.T
        else:
            sim = -((q * q).sum(1, keepdim=True) - 2.0 * (q @ ref.T) + (ref * ref).sum(1)[None, :])
        scores, idx = sim.topk(k, dim=1, largest=True, sorted=True)
        all_scores.append(scores)
        all_idx.append(idx)
    return torch.cat(all_scores).numpy(), torch.cat(all_idx).numpy().astype(np.int64)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    k: int = 20,
    metric: Literal["cosine", "euclidean"] = "cosine",
    vote: Literal["majority", "weighted"] = "majority",
    backend: Literal["faiss", "torch"] = "faiss",
) -> np.ndarray:
    """Predicted labels of ``test_x`` from its ``k`` nearest train features.

    Votes: ``"majority"`` counts the neighbours per class; a tie between classes goes to the class with the
    larger summed similarity of its neighbours, then to the smaller label. ``"weighted"`` sums
    ``exp(similarity / 0.07)`` per class (cosine only). ``k`` larger than the train set is clipped.

    Args:
        train_x: (S_train, D) reference features.
        train_y: (S_train,) integer labels, ``>= 0``.
        test_x: (S_test, D) query features.
        k: neighbours, ``>= 1``.
        metric: ``"cosine"`` (features L2-normalised, inner product) or ``"euclidean"``.
        vote: ``"majority"`` or ``"weighted"``.
        backend: ``"faiss"`` (exact flat index: ``IndexFlatIP`` / ``IndexFlatL2``) or ``"torch"`` (chunked
            matrix product); both give the same predictions.

    Returns:
        (S_test,) int64 predicted labels.

    Raises:
        ValueError: bad ``k``, ``metric``, ``vote`` or ``backend``, mismatched shapes or negative labels.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    if vote not in ("majority", "weighted"):
        raise ValueError(f"vote must be 'majority' or 'weighted', got {vote!r}")
    if vote == "weighted" and metric != "cosine":
        raise ValueError("vote='weighted' needs metric='cosine'")
    if backend not in ("faiss", "torch"):
        raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")
    train_x = np.asarray(train_x, dtype=np.float32)
    test_x = np.asarray(test_x, dtype=np.float32)
    train_y = np.asarray(train_y, dtype=np.int64)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"need 2-D features of equal width, got {train_x.shape} and {test_x.shape}")
    if train_y.shape != (train_x.shape[0],) or train_x.shape[0] == 0:
        raise ValueError(f"train_y must have shape ({train_x.shape[0]},) with at least one sample")
    if train_y.min() < 0:
        raise ValueError("train_y must be >= 0")
    if test_x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    if metric == "cosine":
        train_x, test_x = _l2_normalize(train_x), _l2_normalize(test_x)
    k = min(k, train_x.shape[0])
    search = _knn_search_faiss if backend == "faiss" else _knn_search_torch
    scores, idx = search(train_x, test_x, k, metric)

    num_queries, num_classes = idx.shape[0], int(train_y.max()) + 1
    rows = np.repeat(np.arange(num_queries), k)
    labels = train_y[idx].reshape(-1)
    flat_scores = scores.reshape(-1).astype(np.float64)
    if vote == "weighted":
        weights = np.zeros((num_queries, num_classes))
        np.add.at(weights, (rows, labels), np.exp(flat_scores / KNN_TEMPERATURE))
        return weights.argmax(axis=1).astype(np.int64)
    counts = np.zeros((num_queries, num_classes), dtype=np.int64)
    np.add.at(counts, (rows, labels), 1)
    sim_sum = np.zeros((num_queries, num_classes))
    np.add.at(sim_sum, (rows, labels), flat_scores)
    # among the most voted classes the largest summed similarity wins; argmax then takes the smaller label
    tie_break = np.where(counts == counts.max(axis=1, keepdims=True), sim_sum, -np.inf)
    return tie_break.argmax(axis=1).astype(np.int64)


# ------------------------------------------------------------------------------------------------ monitor


def _pooled_features(
    encoder: torch.nn.Module, xyz: torch.Tensor, *, batch_size: int, device: torch.device
) -> np.ndarray:
    """(S, 2D) pooled features in eval mode without gradients; the encoder's previous mode is restored."""
    was_training = encoder.training
    encoder.eval()
    chunks: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for start in range(0, xyz.shape[0], batch_size):
                batch = xyz[start : start + batch_size].to(device)
                pooled = encoder.pool(encoder.encode(batch))  # type: ignore[operator]
                chunks.append(pooled.float().cpu().numpy())
    finally:
        encoder.train(was_training)
    return np.concatenate(chunks, axis=0)


class KNNMonitor(pl.Callback):
    """Logs the kNN accuracy of frozen pooled features on a labelled set during pre-training.

    Every ``every_n_epochs`` training epochs (at the end of the epoch), global rank 0 extracts pooled
    features (``encoder.pool(encoder.encode(xyz))``, eval mode, no gradients; the previous mode is restored)
    of the train and test clouds, classifies the test features with :func:`knn_predict` (faiss, cosine,
    majority vote) and broadcasts the accuracy; every rank then logs it under ``log_name`` via
    ``pl_module.log`` (so ``ModelCheckpoint(monitor="val/knn_acc")`` works). A failure on rank 0 is broadcast
    too and raised on every rank, so no rank waits forever. Keep the set small (a few thousand clouds): the
    other ranks wait while rank 0 computes.

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
        for name, value in (("every_n_epochs", every_n_epochs), ("k", k), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_points is not None and num_points < 1:
            raise ValueError(f"num_points must be a positive int or None, got {num_points!r}")
        if backend not in ("faiss", "torch"):
            raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")
        self.data_root = None if data_root is None else Path(data_root)
        self.train_split, self.test_split = train_split, test_split
        self.num_points = num_points
        self.every_n_epochs, self.k, self.batch_size = every_n_epochs, k, batch_size
        self.backend: Literal["faiss", "torch"] = backend
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
        encoder = pl_module.encoder
        if not isinstance(encoder, torch.nn.Module):
            raise ValueError(f"{type(pl_module).__name__} has no 'encoder' module to monitor")
        device = pl_module.device
        train_x = _pooled_features(encoder, train_xyz, batch_size=self.batch_size, device=device)
        test_x = _pooled_features(encoder, test_xyz, batch_size=self.batch_size, device=device)
        pred = knn_predict(train_x, train_y, test_x, k=self.k, backend=self.backend)
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


# ------------------------------------------------------------------------------------------------- export


class EncoderExport(pl.Callback):
    """Writes the encoder artifact of the module at the end of training, and on demand via :meth:`export`.

    The artifact goes to ``<dirpath>/<subdir>``; ``dirpath`` defaults to ``trainer.log_dir`` (the logger's
    version directory, or ``default_root_dir`` without a logger). Global rank 0 writes (atomically, via
    :func:`pretrain.checkpoint.save_encoder`) and broadcasts success or its error, so every rank returns (or
    raises) together.

    Args:
        dirpath: parent directory of the artifact; None for ``trainer.log_dir``.
        subdir: artifact directory name.
        on_train_end: export when ``fit`` finishes.
    """

    def __init__(
        self, dirpath: str | Path | None = None, *, subdir: str = "encoder", on_train_end: bool = True
    ) -> None:
        super().__init__()
        if not subdir:
            raise ValueError("subdir must be a non-empty directory name")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.subdir = subdir
        self.export_on_train_end = on_train_end
        #: path of the last artifact written (rank 0), else None.
        self.last_path: Path | None = None

    def target_dir(self, trainer: pl.Trainer) -> Path:
        """Where the artifact goes; call on every rank (``trainer.log_dir`` broadcasts)."""
        base = self.dirpath if self.dirpath is not None else Path(trainer.log_dir or trainer.default_root_dir)
        return base / self.subdir

    @staticmethod
    def provenance(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Method name, step, epoch, git sha and the module's ``provenance_extra``."""
        from pretrain.checkpoint import git_sha

        extra = getattr(pl_module, "provenance_extra", None) or {}
        return {
            "method": str(getattr(pl_module, "method_name", type(pl_module).__name__)),
            "class_path": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "git_sha": git_sha(),
            **{k: v for k, v in dict(extra).items() if v is not None},
        }

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Writes the artifact now; call on every rank. Returns its path on rank 0, None elsewhere.

        Raises:
            ValueError: the module lacks ``encoder`` or ``data_contract``, or ``encoder_spec`` differs from
                ``encoder.spec``.
        """
        from pretrain.checkpoint import save_encoder
        from pretrain.encoders.spec import DataContract

        encoder = getattr(pl_module, "encoder", None)
        contract = getattr(pl_module, "data_contract", None)
        if encoder is None or not hasattr(encoder, "spec"):
            raise ValueError(f"{type(pl_module).__name__} has no 'encoder' with a spec to export")
        if contract is None:
            raise ValueError(f"{type(pl_module).__name__} has no 'data_contract' to record in the artifact")
        if isinstance(contract, Mapping):
            contract = DataContract.from_dict(contract)
        spec = getattr(pl_module, "encoder_spec", None)
        if spec is not None and spec != encoder.spec:
            raise ValueError(f"encoder_spec {spec} differs from encoder.spec {encoder.spec}")
        target = self.target_dir(trainer)
        written: Path | None = None
        error: str | None = None
        if trainer.is_global_zero:
            try:
                written = save_encoder(
                    target, encoder, data=contract, provenance=self.provenance(trainer, pl_module)
                )
            except Exception as err:  # re-raised on every rank after the broadcast
                error = f"{type(err).__name__}: {err}"
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise RuntimeError(f"EncoderExport failed to write {target} on rank 0: {error}")
        self.last_path = written
        return written

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Exports the final encoder when ``on_train_end`` was requested."""
        if self.export_on_train_end:
            self.export(trainer, pl_module)
