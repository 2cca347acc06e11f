"""Non-parametric and linear probes on frozen features, with honest model selection.

* :func:`svm_probe`: features standardised with statistics of the fitting set only, then a linear SVM
  (scikit-learn ``LinearSVC``: squared hinge, one-vs-rest, liblinear). The regularisation ``C`` is chosen on a
  stratified validation split held out **from train**; the chosen ``C`` is refitted on all of train and the
  test split is evaluated exactly once. The test split never influences any choice.
* :func:`knn_probe`: cosine (or Euclidean) k-nearest-neighbour classification of test features against train
  features, with faiss (exact ``IndexFlatIP`` / ``IndexFlatL2``) or pure torch; both give the same result.
  The classifier (``pretrain.knn.KNNClassifier``) is shared with the online monitor
  ``pretrain.callbacks.KNNMonitor``, so offline and online kNN numbers agree.

Both return a :class:`ProbeResult` that records the protocol, the selection split and the single-pass test
accuracy (a fraction in [0, 1]).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipes.progress import Progress
from datapipes.splits import stratified_split
from pretrain.knn import KNNClassifier

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

    from pretrain.knn import KNNOptions

__all__ = ["ProbeResult", "knn_probe", "stratified_split", "svm_probe"]

DEFAULT_C_GRID: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass
class ProbeResult:
    """Outcome of one frozen-feature probe.

    Attributes:
        protocol: ``"svm"`` or ``"knn"``.
        accuracy: single-pass test accuracy, a fraction in [0, 1].
        selection: how hyper-parameters were chosen (which split), in words.
        params: the hyper-parameters used for the test pass (e.g. ``{"C": 0.1}`` or ``{"k": 20, ...}``).
        val_accuracy: validation accuracy per candidate (string key, e.g. ``"0.1"``); empty without a search.
        n_train: samples the final model was fitted on (kNN: reference set size).
        n_val: samples of the validation split (0 without a search).
        n_test: test samples evaluated.
        seed: seed of the validation split and the solver.
    """

    protocol: str
    accuracy: float
    selection: str
    params: dict[str, Any] = field(default_factory=dict)
    val_accuracy: dict[str, float] = field(default_factory=dict)
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data (JSON) form."""
        return dataclasses.asdict(self)


def _check_xy(name: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"{name}_x must be 2-D (samples, features), got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}_y must be 1-D with {x.shape[0]} labels, got shape {y.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}_x is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}_x contains NaN or infinite values")
    return x, y.astype(np.int64)


def _fit_linear_svm(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    model = make_pipeline(StandardScaler(), LinearSVC(C=c, max_iter=5000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        model.fit(x, y)
    return model


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(pred == y)) if y.size else float("nan")


def svm_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> ProbeResult:
    """Linear-SVM probe with ``C`` selected on a stratified hold-out of train.

    Steps: split train into fit/val (:func:`stratified_split`, ``val_fraction``, ``seed``); for each ``C``
    fit StandardScaler + LinearSVC on fit and score on val; take the best ``C`` (ties: the smallest, i.e. the
    strongest regularisation); refit on all of train; score test once. With a single ``C`` there is no
    search and no validation split.

    Args:
        train_x: (S_train, D) train features.
        train_y: (S_train,) integer labels.
        test_x: (S_test, D) test features.
        test_y: (S_test,) integer labels.
        c_grid: candidate regularisation strengths, each > 0.
        val_fraction: fraction of every train class held out for selecting ``C``.
        seed: seed of the split and of the solver.
        progress: report each fit on stderr (one per ``C``, then the final one; they can take minutes).

    Returns:
        The probe result; ``params["C"]`` is the chosen value.

    Raises:
        ValueError: malformed arrays, an empty or non-positive ``c_grid``, or a bad ``val_fraction``.
    """
    train_x, train_y = _check_xy("train", train_x, train_y)
    test_x, test_y = _check_xy("test", test_x, test_y)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_x.shape[1]} vs {test_x.shape[1]}")
    grid = [float(c) for c in c_grid]
    if not grid or any(not c > 0 for c in grid):
        raise ValueError(f"c_grid must be a non-empty sequence of positive values, got {list(c_grid)}")
    if np.unique(train_y).size < 2:
        raise ValueError("svm_probe needs at least two classes in train_y")

    val_accuracy: dict[str, float] = {}
    n_val = 0
    fits = 1 if len(grid) == 1 else len(grid) + 1
    with Progress(fits, "linear SVM", "fit", disable=not progress) as bar:
        if len(grid) == 1:
            chosen = grid[0]
            selection = f"none: C={chosen:g} fixed"
        else:
            fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)
            n_val = int(val_idx.size)
            if n_val == 0 or np.unique(train_y[fit_idx]).size < 2:
                raise ValueError("train split too small to hold out a validation split for selecting C")
            for c in grid:
                model = _fit_linear_svm(train_x[fit_idx], train_y[fit_idx], c, seed)
                val_accuracy[f"{c:g}"] = _accuracy(model.predict(train_x[val_idx]), train_y[val_idx])
                bar.update()
            best = max(val_accuracy.values())
            chosen = min(c for c in grid if val_accuracy[f"{c:g}"] == best)
            selection = (
                f"C from {[f'{c:g}' for c in grid]} on a stratified {val_fraction:g} hold-out of train "
                f"(seed {seed}); refit on all train; test evaluated once"
            )
        model = _fit_linear_svm(train_x, train_y, chosen, seed)
        bar.update()
    accuracy = _accuracy(model.predict(test_x), test_y)
    return ProbeResult(
        protocol="svm",
        accuracy=accuracy,
        selection=selection,
        params={"C": chosen, "classifier": "LinearSVC (squared hinge, one-vs-rest)", "scaler": "standard"},
        val_accuracy=val_accuracy,
        n_train=int(train_x.shape[0]),
        n_val=n_val,
        n_test=int(test_x.shape[0]),
        seed=seed,
    )


def knn_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    **options: Unpack[KNNOptions],
) -> ProbeResult:
    """k-nearest-neighbour probe: classify test features by their nearest train features.

    No hyper-parameter is tuned (``k``, metric and vote are fixed in advance), so there is no validation
    split. The classifier is ``pretrain.knn.KNNClassifier(**options)`` (``k`` 20, cosine, majority vote,
    faiss by default); see it for the vote and the backends.

    Args:
        train_x: (S_train, D) train features.
        train_y: (S_train,) integer labels.
        test_x: (S_test, D) test features.
        test_y: (S_test,) integer labels.
        **options: ``k``, ``metric``, ``vote`` and ``backend`` of the classifier.

    Returns:
        The probe result; ``params`` holds the effective ``k``, metric, vote and backend.

    Raises:
        ValueError: malformed arrays or options.
    """
    classifier = KNNClassifier(**options)
    train_x, train_y = _check_xy("train", train_x, train_y)
    test_x, test_y = _check_xy("test", test_x, test_y)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_x.shape[1]} vs {test_x.shape[1]}")
    return ProbeResult(
        protocol="knn",
        accuracy=_accuracy(classifier.predict(train_x, train_y, test_x), test_y),
        selection="none: k, metric and vote fixed in advance (no hyper-parameter search)",
        params=classifier.params(int(train_x.shape[0])),
        n_train=int(train_x.shape[0]),
        n_val=0,
        n_test=int(test_x.shape[0]),
        seed=0,
    )
