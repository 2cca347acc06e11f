"""Few-shot evaluation of the folds of an :class:`~finetune.episodes.EpisodeSet`: SVM protocol and results.

Protocol ``"svm"`` (:func:`run_fewshot_svm`): frozen pooled features, StandardScaler fitted on the episode's
support set, ``SVC(kernel="linear", C=1)`` (the CrossPoint / ViPFormer classifier), accuracy on the episode's
query set; nothing is selected, so no data is used for selection. The ``"finetune"`` protocol (full
finetuning per fold, :mod:`finetune.fewshot_finetune`) reports through the same :class:`FewShotResult`:
per-fold accuracies, their mean and sample standard deviation (ddof=1), and the episodes' checksum.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from finetune.episodes import EpisodeSet, episode_labels

__all__ = ["FewShotResult", "run_fewshot_svm", "summarize_folds"]


def summarize_folds(accuracies: Sequence[float]) -> tuple[float, float | None]:
    """Mean and **sample** standard deviation (ddof=1) of per-fold accuracies; std is None for one fold."""
    values = np.asarray(list(accuracies), dtype=np.float64)
    if values.size == 0:
        raise ValueError("no fold accuracies to summarize")
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else None
    return mean, std


@dataclass
class FewShotResult:
    """Few-shot outcome over all folds.

    Attributes:
        protocol: ``"svm"`` (frozen features + linear SVM) or ``"finetune"`` (full finetuning per fold).
        way: classes per episode.
        shot: support samples per class.
        query: query samples per class.
        fold_accuracies: accuracy of every fold on its query set, fractions in [0, 1].
        mean: mean of ``fold_accuracies``.
        std: sample standard deviation (ddof=1) of ``fold_accuracies``; None with a single fold.
        selection: which data chose hyper-parameters or epochs, in words.
        episodes_sha256: checksum of the episode file the folds come from.
        seed: episode seed.
        support_split: split of the support samples.
        query_split: split of the query samples.
        params: protocol settings (classifier, C, scaler, or finetune recipe).
        std_kind: how ``std`` is computed.
    """

    protocol: str
    way: int
    shot: int
    query: int
    fold_accuracies: list[float]
    mean: float
    std: float | None
    selection: str
    episodes_sha256: str
    seed: int
    support_split: str = "train"
    query_split: str = "test"
    params: dict[str, Any] = field(default_factory=dict)
    std_kind: str = "sample (ddof=1)"

    @property
    def folds(self) -> int:
        """Number of folds."""
        return len(self.fold_accuracies)

    @classmethod
    def from_folds(
        cls,
        episodes: EpisodeSet,
        accuracies: Sequence[float],
        *,
        protocol: str,
        selection: str,
        params: Mapping[str, Any] | None = None,
    ) -> FewShotResult:
        """Builds a result for ``episodes`` from per-fold accuracies (any protocol)."""
        if len(accuracies) != episodes.folds:
            raise ValueError(f"got {len(accuracies)} fold accuracies for {episodes.folds} episodes")
        mean, std = summarize_folds(accuracies)
        return cls(
            protocol=protocol,
            way=episodes.way,
            shot=episodes.shot,
            query=episodes.query,
            fold_accuracies=[float(a) for a in accuracies],
            mean=mean,
            std=std,
            selection=selection,
            episodes_sha256=episodes.sha256,
            seed=episodes.seed,
            support_split=episodes.support_split,
            query_split=episodes.query_split,
            params=dict(params or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data (JSON) form, with ``folds``."""
        data = dataclasses.asdict(self)
        data["folds"] = self.folds
        return data

    def summary(self) -> str:
        """``mean ± std`` in percent, e.g. ``"91.10 ± 7.20"``."""
        std = "n/a" if self.std is None or math.isnan(self.std) else f"{100 * self.std:.2f}"
        return f"{100 * self.mean:.2f} ± {std}"


def _rows(features: Mapping[str, np.ndarray], keys: Sequence[str], role: str) -> np.ndarray:
    missing = [k for k in keys if k not in features]
    if missing:
        raise ValueError(f"no {role} features for keys {missing[:3]}{' …' if len(missing) > 3 else ''}")
    return np.stack([np.asarray(features[k], dtype=np.float32) for k in keys])


def run_fewshot_svm(
    episodes: EpisodeSet,
    *,
    support_features: Mapping[str, np.ndarray],
    query_features: Mapping[str, np.ndarray] | None = None,
    c: float = 1.0,
    kernel: Literal["linear"] = "linear",
) -> FewShotResult:
    """Few-shot accuracy with a linear SVM on frozen features, one fit per episode.

    Per episode: StandardScaler fitted on the support features, ``SVC(kernel="linear", C=c)`` fitted on the
    standardised support set (labels ``0..way-1``), accuracy on the query set. Deterministic.

    Args:
        episodes: the episodes.
        support_features: pooled feature (D,) per key of the support split.
        query_features: pooled feature per key of the query split; None when both splits are the same.
        c: SVM regularisation (1.0, as in CrossPoint / ViPFormer).
        kernel: only ``"linear"``.

    Returns:
        The result with per-fold accuracies, mean and sample std.

    Raises:
        ValueError: a key without features, ``c <= 0`` or an unknown kernel.
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    if kernel != "linear":
        raise ValueError(f"kernel must be 'linear', got {kernel!r}")
    q_features = support_features if query_features is None else query_features
    accuracies: list[float] = []
    for ep in episodes.episodes:
        sx = _rows(support_features, ep.support, "support")
        qx = _rows(q_features, ep.query, "query")
        sy = episode_labels(len(ep.support), episodes.way)
        qy = episode_labels(len(ep.query), episodes.way)
        model = make_pipeline(StandardScaler(), SVC(kernel="linear", C=c))
        model.fit(sx, sy)
        accuracies.append(float(np.mean(model.predict(qx) == qy)))
    return FewShotResult.from_folds(
        episodes,
        accuracies,
        protocol="svm",
        selection="none: C fixed in advance; the query set is only used for the reported accuracy",
        params={"classifier": "SVC(kernel='linear')", "C": c, "scaler": "standard (fit on support)"},
    )
