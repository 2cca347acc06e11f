"""k-nearest-neighbour classification of frozen features, shared by the online monitor and the offline probe.

``pretrain.callbacks.KNNMonitor`` (during pre-training) and ``finetune.probes.knn_probe`` (on an encoder
artifact) both classify with :class:`KNNClassifier`, so the online and offline kNN numbers agree.

Neighbours are found by cosine similarity (features L2-normalised, inner product) or by Euclidean distance,
with faiss (exact flat index: ``IndexFlatIP`` / ``IndexFlatL2``) or with a chunked matrix product in torch;
both backends give the same predictions. Votes: ``"majority"`` counts the neighbours per class, a tie
between classes goes to the class with the larger summed similarity of its neighbours, then to the smaller
label; ``"weighted"`` sums ``exp(similarity / KNN_TEMPERATURE)`` per class (cosine only, as in InstDisc /
DINO).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import numpy as np
import torch

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = ["KNN_TEMPERATURE", "KNNClassifier", "KNNOptions", "knn_predict"]

#: temperature of the ``vote="weighted"`` kNN (exp(similarity / T), as in InstDisc / DINO).
KNN_TEMPERATURE = 0.07

Metric = Literal["cosine", "euclidean"]
Vote = Literal["majority", "weighted"]
Backend = Literal["faiss", "torch"]


class KNNOptions(TypedDict, total=False):
    """Keyword options of :class:`KNNClassifier` (each optional; see its defaults)."""

    k: int
    metric: Metric
    vote: Vote
    backend: Backend


@dataclass(frozen=True)
class KNNClassifier:
    """A k-nearest-neighbour classifier of features (see the module docstring for the vote).

    Args:
        k: neighbours, ``>= 1``; larger than the reference set is clipped to its size.
        metric: ``"cosine"`` or ``"euclidean"``.
        vote: ``"majority"`` or ``"weighted"`` (cosine only).
        backend: ``"faiss"`` or ``"torch"``.

    Raises:
        ValueError: a bad ``k``, ``metric``, ``vote`` or ``backend``.
    """

    k: int = 20
    metric: Metric = "cosine"
    vote: Vote = "majority"
    backend: Backend = "faiss"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        if self.metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {self.metric!r}")
        if self.vote not in ("majority", "weighted"):
            raise ValueError(f"vote must be 'majority' or 'weighted', got {self.vote!r}")
        if self.vote == "weighted" and self.metric != "cosine":
            raise ValueError("vote='weighted' needs metric='cosine'")
        if self.backend not in ("faiss", "torch"):
            raise ValueError(f"backend must be 'faiss' or 'torch', got {self.backend!r}")

    def params(self, num_train: int) -> dict[str, Any]:
        """The settings as plain data, with the effective ``k`` for a reference set of ``num_train``."""
        return {**asdict(self), "k": min(self.k, int(num_train))}

    def predict(self, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
        """Predicted labels of ``test_x`` from its nearest train features.

        Args:
            train_x: (S_train, D) reference features.
            train_y: (S_train,) integer labels, ``>= 0``.
            test_x: (S_test, D) query features.

        Returns:
            (S_test,) int64 predicted labels.

        Raises:
            ValueError: mismatched shapes, an empty reference set or negative labels.
        """
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
        if self.metric == "cosine":
            train_x, test_x = _l2_normalize(train_x), _l2_normalize(test_x)
        k = min(self.k, train_x.shape[0])
        search = _search_faiss if self.backend == "faiss" else _search_torch
        scores, idx = search(train_x, test_x, k, self.metric)
        return self._vote(scores, train_y[idx], int(train_y.max()) + 1)

    def _vote(self, scores: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Class per query from the similarities (Q, k) and labels (Q, k) of its neighbours -> (Q,) int64."""
        num_queries, k = labels.shape
        rows = np.repeat(np.arange(num_queries), k)
        flat_labels = labels.reshape(-1)
        flat_scores = scores.reshape(-1).astype(np.float64)
        if self.vote == "weighted":
            weights = np.zeros((num_queries, num_classes))
            np.add.at(weights, (rows, flat_labels), np.exp(flat_scores / KNN_TEMPERATURE))
            return weights.argmax(axis=1).astype(np.int64)
        counts = np.zeros((num_queries, num_classes), dtype=np.int64)
        np.add.at(counts, (rows, flat_labels), 1)
        sim_sum = np.zeros((num_queries, num_classes))
        np.add.at(sim_sum, (rows, flat_labels), flat_scores)
        # among the most voted classes the largest summed similarity wins; argmax then takes the smaller label
        tie_break = np.where(counts == counts.max(axis=1, keepdims=True), sim_sum, -np.inf)
        return tie_break.argmax(axis=1).astype(np.int64)


def knn_predict(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, **options: Unpack[KNNOptions]
) -> np.ndarray:
    """Predicted labels of ``test_x``: ``KNNClassifier(**options).predict(train_x, train_y, test_x)``.

    Shapes:
        train_x: (S_train, D), train_y: (S_train,), test_x: (S_test, D) -> (S_test,) int64.

    Raises:
        ValueError: bad options, mismatched shapes or negative labels.
    """
    return KNNClassifier(**options).predict(train_x, train_y, test_x)


def _search_faiss(
    train_x: np.ndarray, test_x: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Similarities (Q, k) float32, larger is closer, and indices (Q, k) int64 of the k nearest, by faiss."""
    import faiss

    dim = train_x.shape[1]
    index = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    index.add(np.ascontiguousarray(train_x, dtype=np.float32))
    scores, idx = index.search(np.ascontiguousarray(test_x, dtype=np.float32), k)
    if metric != "cosine":
        scores = -scores  # squared L2 distance -> similarity (larger is closer)
    return scores.astype(np.float32), idx.astype(np.int64)


def _search_torch(
    train_x: np.ndarray, test_x: np.ndarray, k: int, metric: str, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_search_faiss` with a matrix product in torch, ``chunk`` queries at a time."""
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
    """Rows scaled to unit L2 norm (all-zero rows stay zero). Shapes: (S, D) -> (S, D) float32."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)
