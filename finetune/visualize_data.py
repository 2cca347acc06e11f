"""Data preparation for ``pcpt-finetune visualize curves|results|embedding`` (no drawing here).

* Training curves: :func:`find_log_sources` finds Lightning ``CSVLogger`` files (``metrics.csv``) and
  TensorBoard event files under a run folder; :func:`read_csv_metrics` and :func:`read_tensorboard_metrics`
  turn them into ``metric -> (steps, values)`` series.
* Evaluation results: :func:`collect_results` reads the evaluations an artifact records in ``encoder.json``
  (``evaluations``, appended by ``pcpt-finetune probe`` / ``fewshot``) or the ``--json`` report of those
  commands, and :func:`group_results` sorts them into one panel per protocol and setting.
* Embeddings: :func:`per_class_subset` picks a stratified subset, :func:`project_2d` maps pooled features to
  2-D (PCA, or t-SNE after standardisation and a PCA to at most 50 dimensions).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.errors import UserError

__all__ = [
    "CSV_NAME",
    "LogSources",
    "ResultRow",
    "Series",
    "collect_results",
    "find_log_sources",
    "group_results",
    "per_class_subset",
    "project_2d",
    "read_csv_metrics",
    "read_tensorboard_metrics",
    "tensorboard_available",
]

#: the file Lightning's CSVLogger writes.
CSV_NAME = "metrics.csv"
#: columns of a CSVLogger file that are not metrics.
_INDEX_COLUMNS = ("step", "epoch")
#: a metric's (steps (T,), values (T,)) series.
Series = tuple[np.ndarray, np.ndarray]


# ------------------------------------------------------------------------------------------------ curves


@dataclass
class LogSources:
    """Log files found under a run folder.

    Attributes:
        csv: ``metrics.csv`` files, sorted.
        tensorboard: folders holding TensorBoard event files (``events.out.tfevents.*``), sorted.
    """

    csv: list[Path]
    tensorboard: list[Path]


def find_log_sources(run_dir: str | Path) -> LogSources:
    """The ``metrics.csv`` files and TensorBoard event folders under ``run_dir`` (or the one file given).

    Raises:
        UserError: ``run_dir`` does not exist.
    """
    root = Path(run_dir)
    if root.is_file():
        if root.name.startswith("events.out.tfevents"):
            return LogSources([], [root.parent])
        return LogSources([root], [])
    if not root.is_dir():
        raise UserError(f"{root}: no such run folder")
    csv_files = sorted(root.rglob(CSV_NAME))
    event_dirs = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    return LogSources(csv_files, event_dirs)


def read_csv_metrics(path: str | Path) -> dict[str, Series]:
    """Every metric column of a Lightning ``metrics.csv`` as (steps, values), empty cells skipped.

    The x values are the ``step`` column (the row number when there is none); ``step`` and ``epoch`` are not
    metrics. Rows whose value is empty (another metric logged at that step) are skipped.

    Raises:
        UserError: an unreadable file or one without a header.
    """
    src = Path(path)
    try:
        with open(src, newline="") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{src}: cannot read metrics: {err}") from err
    if not columns:
        raise UserError(f"{src}: empty metrics file (no header)")
    series: dict[str, Series] = {}
    for name in columns:
        if name in _INDEX_COLUMNS:
            continue
        steps, values = [], []
        for i, row in enumerate(rows):
            value = _number(row.get(name))
            if value is None:
                continue
            step = _number(row.get("step")) if "step" in columns else float(i)
            steps.append(float(i) if step is None else step)
            values.append(value)
        if values:
            series[name] = (np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64))
    return series


def _number(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (its event reader) can be imported."""
    try:
        from tensorboard.backend.event_processing import event_accumulator  # noqa: F401
    except ImportError:
        return False
    return True


def read_tensorboard_metrics(folder: str | Path) -> dict[str, Series]:
    """Every scalar of the TensorBoard event files in ``folder`` as (steps, values), sorted by step.

    Raises:
        UserError: ``tensorboard`` is not installed.
    """
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError as err:
        raise UserError("reading TensorBoard event files needs tensorboard: pip install tensorboard") from err
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    series: dict[str, Series] = {}
    for tag in acc.Tags().get("scalars", []):
        if tag in _INDEX_COLUMNS:
            continue
        events = sorted(acc.Scalars(tag), key=lambda e: e.step)
        steps = np.asarray([e.step for e in events], dtype=np.float64)
        values = np.asarray([e.value for e in events], dtype=np.float64)
        keep = np.isfinite(values)
        if keep.any():
            series[tag] = (steps[keep], values[keep])
    return series


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ResultRow:
    """One evaluation result drawn as a bar.

    Attributes:
        label: the model (artifact folder name, or the ``artifact`` named in a JSON report).
        panel: the protocol and setting, e.g. ``"probe svm (test)"`` or ``"fewshot svm 5-way 10-shot"``.
        mean: accuracy in percent (single pass for probes, the mean over folds for few-shot).
        std: standard deviation over folds in percent (0 for a single-pass probe).
        folds: folds averaged (1 for a probe).
        data: the data evaluated on (its path as recorded).
        date: when it was recorded ("" for a JSON report).
        source: the file the row was read from.
    """

    label: str
    panel: str
    mean: float
    std: float
    folds: int
    data: str
    date: str
    source: str


def collect_results(paths: Sequence[str | Path]) -> list[ResultRow]:
    """Result rows of artifacts (their recorded ``evaluations``) and ``probe``/``fewshot`` JSON reports.

    An artifact that recorded the same evaluation (panel and data) several times contributes the latest.

    Raises:
        UserError: a missing path, unreadable JSON, or a file that is neither an artifact's ``encoder.json``
            nor a probe / few-shot report.
    """
    rows: list[ResultRow] = []
    for path in paths:
        src = Path(path)
        meta_file = src / "encoder.json" if src.is_dir() else src
        if not meta_file.is_file():
            raise UserError(f"{src}: no such artifact folder or JSON file")
        try:
            data = json.loads(meta_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{meta_file}: not a readable JSON file: {err}") from err
        if not isinstance(data, dict):
            raise UserError(f"{meta_file}: expected a JSON object")
        if "evaluations" in data or "format" in data:
            label = (meta_file.parent if meta_file.name == "encoder.json" else meta_file).name
            entries = [e for e in data.get("evaluations") or [] if isinstance(e, dict)]
            latest: dict[tuple[str, str], ResultRow] = {}
            for entry in entries:
                row = _row(entry, label, str(meta_file))
                if row is not None and row.date >= latest.get((row.panel, row.data), row).date:
                    latest[(row.panel, row.data)] = row
            rows.extend(latest.values())
        elif data.get("command") in ("probe", "fewshot"):
            label = Path(str(data.get("artifact") or meta_file.stem)).name
            row = _row(data, label, str(meta_file))
            if row is not None:
                rows.append(row)
        else:
            raise UserError(
                f"{meta_file}: neither an artifact's encoder.json nor a 'pcpt-finetune probe/fewshot --json' "
                "report"
            )
    return rows


def _row(entry: dict[str, Any], label: str, source: str) -> ResultRow | None:
    command, protocol = entry.get("command"), entry.get("protocol", "?")
    data, date = str(entry.get("data", "")), str(entry.get("date", ""))
    if command == "probe" and isinstance(entry.get("accuracy"), (int, float)):
        panel = f"probe {protocol} ({entry.get('test_split', 'test')})"
        return ResultRow(label, panel, 100.0 * float(entry["accuracy"]), 0.0, 1, data, date, source)
    if command == "fewshot" and isinstance(entry.get("mean"), (int, float)):
        panel = f"fewshot {protocol} {entry.get('way')}-way {entry.get('shot')}-shot"
        std = entry.get("std")
        folds = entry.get("folds") or len(entry.get("fold_accuracies") or []) or 1
        std_pct = 100.0 * float(std) if isinstance(std, (int, float)) and math.isfinite(std) else 0.0
        return ResultRow(label, panel, 100.0 * float(entry["mean"]), std_pct, int(folds), data, date, source)
    return None


def group_results(rows: Iterable[ResultRow]) -> dict[str, list[ResultRow]]:
    """Rows by panel (panels sorted, probes first; rows in input order).

    A panel whose rows were evaluated on different data gets the data folder's name in its title, so one
    chart never compares numbers from different data.
    """
    by_panel: dict[str, list[ResultRow]] = {}
    for row in rows:
        by_panel.setdefault(row.panel, []).append(row)
    out: dict[str, list[ResultRow]] = {}
    for panel in sorted(by_panel, key=lambda p: (not p.startswith("probe"), p)):
        members = by_panel[panel]
        datasets = sorted({r.data for r in members})
        if len(datasets) == 1:
            out[panel] = members
            continue
        for data in datasets:
            out[f"{panel} [{Path(data).name or data}]"] = [r for r in members if r.data == data]
    return out


# --------------------------------------------------------------------------------------------- embedding


def per_class_subset(labels: np.ndarray, max_samples: int | None, *, seed: int = 0) -> np.ndarray:
    """Indices of a stratified subset: ``max(1, max_samples // C)`` random samples of each of the C classes.

    Args:
        labels: (S,) class labels.
        max_samples: the most samples kept; None keeps all.
        seed: seeds the choice.

    Returns:
        (S',) int64 indices into ``labels``, ascending; S' <= max(max_samples, C).
    """
    labels = np.asarray(labels)
    if max_samples is None or labels.size <= max_samples:
        return np.arange(labels.size, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = max(1, max_samples // len(classes))
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def project_2d(features: np.ndarray, method: str = "tsne", *, seed: int = 0) -> np.ndarray:
    """2-D coordinates of pooled features.

    Features are standardised (zero mean, unit variance per dimension). ``pca``: the first two principal
    components (sign fixed so that each component's largest loading is positive). ``tsne``: scikit-learn's
    t-SNE (PCA initialisation, perplexity ``min(30, (S − 1) / 3)``) of the first ``min(50, D, S)``
    principal components.

    Args:
        features: (S, D) features, S >= 3.
        method: ``"tsne"`` or ``"pca"``.
        seed: t-SNE's random state.

    Returns:
        (S, 2) float32.

    Raises:
        ValueError: fewer than 3 samples, non-finite features or an unknown method.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"need features (S, D) with S >= 3, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    if method == "pca":
        return _pca(x, 2).astype(np.float32)
    if method != "tsne":
        raise ValueError(f"unknown projection {method!r}; use 'tsne' or 'pca'")
    from sklearn.manifold import TSNE

    reduced = _pca(x, min(50, x.shape[1], x.shape[0]))
    perplexity = float(min(30.0, (x.shape[0] - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(reduced), dtype=np.float32)


def _pca(x: np.ndarray, k: int) -> np.ndarray:
    """Scores on the first ``k`` principal components of centred ``x`` (S, D), deterministic signs."""
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:k]
    signs = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(axis=1)])
    scores: np.ndarray = centred @ (vt * signs[:, None]).T
    if scores.shape[1] < k:  # fewer components than asked (S or D small): pad with zeros
        scores = np.pad(scores, ((0, 0), (0, k - scores.shape[1])))
    return scores
