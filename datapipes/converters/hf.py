"""Hugging Face datasets: ``hf`` (a ``save_to_disk`` folder, Parquet files, or a hub id when online).

SRC may be:

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``);
- a ``.parquet`` file, a folder of them (searched recursively) or a glob; the split of a file is the first
  of ``train``, ``test``, ``validation``, ``valid``, ``val`` found among the words of its relative path
  (else ``train``), as in the hub's ``train-00000-of-00002.parquet`` naming;
- a hub id (``owner/name``), loaded with ``datasets.load_dataset`` (needs network; dataset scripts are
  never run: no ``trust_remote_code``).

Rows are read straight from the underlying Arrow/Parquet files with pyarrow, so each worker opens only the
files it needs. ``--points-column`` (default: the first of ``points``, ``xyz``, ``pos``, ``point_cloud``,
``pointcloud``, ``pc``, ``coords``) holds ``(N, 3)`` or ``(N, 6)`` arrays; a ``normal``/``normals`` column
is used when present. ``--label-column`` (default ``label`` when present) holds integers (class names from
a ``ClassLabel`` feature, else ``"0"``, ``"1"``, ...) or strings (sorted to give indices).
``--split-map train=train,validation=test`` renames source splits and keeps only the listed ones.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.converters.base import Converter, ConvertOptions, Plan, RawCloud, Reject, WorkItem
from datapipes.converters.sources import as_points, make_key
from datapipes.errors import UserError

POINT_COLUMNS = ("points", "xyz", "pos", "point_cloud", "pointcloud", "pc", "coords")
NORMAL_COLUMNS = ("normal", "normals")
_SPLIT_WORDS = ("train", "test", "validation", "valid", "val")


@dataclass(frozen=True)
class _Part:
    """One Arrow (IPC stream) or Parquet file of a split; ``error`` is set for an unreadable file."""

    path: str
    kind: str
    rows: int
    error: str = ""


@lru_cache(maxsize=16)
def _arrow_table(path: str) -> Any:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


@lru_cache(maxsize=4)
def _parquet_file(path: str) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


@lru_cache(maxsize=4)
def _parquet_row_group(path: str, group: int) -> Any:
    return _parquet_file(path).read_row_group(group)


def _row(path: str, kind: str, row: int, columns: list[str]) -> dict[str, Any]:
    """The Python values of ``columns`` in one row of a file."""
    if kind == "arrow":
        table, local = _arrow_table(path), row
    else:
        meta = _parquet_file(path).metadata
        local, group = row, 0
        while local >= meta.row_group(group).num_rows:
            local -= meta.row_group(group).num_rows
            group += 1
        table = _parquet_row_group(path, group)
    piece = table.slice(local, 1)
    return {c: piece.column(c).to_pylist()[0] for c in columns if c in piece.column_names}


def _schema(part: _Part) -> Any:
    if part.kind == "arrow":
        return _arrow_table(part.path).schema
    return _parquet_file(part.path).schema_arrow


def _column(part: _Part, name: str) -> list[Any]:
    if part.kind == "arrow":
        return list(_arrow_table(part.path).column(name).to_pylist())
    import pyarrow.parquet as pq

    return list(pq.read_table(part.path, columns=[name]).column(name).to_pylist())


def _split_of(rel: str) -> str:
    words = re.split(r"[-_./\\]+", rel.lower())
    for word in words:
        if word in _SPLIT_WORDS:
            return word
    return "train"


def _parquet_sources(src: str) -> dict[str, list[tuple[_Part, int]]] | None:
    path = Path(src)
    if any(ch in src for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(src, recursive=True) if p.endswith(".parquet"))
        prefix = src[: min(src.index(ch) for ch in "*?[" if ch in src)]
        root = Path(prefix) if prefix.endswith("/") else Path(prefix).parent
    elif path.is_file() and path.suffix == ".parquet":
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(path.rglob("*.parquet")), path
    else:
        return None
    if not files:
        return None
    out: dict[str, list[tuple[_Part, int]]] = {}
    for f in files:
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
        rows = out.setdefault(_split_of(rel), [])
        try:
            count = _parquet_file(str(f)).metadata.num_rows
        except Exception as err:  # pyarrow raises several types for garbage files
            rows.append((_Part(str(f), "parquet", 0, f"unreadable Parquet file ({err})"), -1))
            continue
        part = _Part(str(f), "parquet", count)
        rows.extend((part, r) for r in range(count))
    return out


def _dataset_sources(dataset: Any) -> dict[str, list[tuple[_Part, int]]]:
    """Physical (file, row) of every logical row of each split of a ``Dataset``/``DatasetDict``."""
    import datasets

    splits = dict(dataset) if isinstance(dataset, datasets.DatasetDict) else {"train": dataset}
    out: dict[str, list[tuple[_Part, int]]] = {}
    for split, ds in splits.items():
        files = [entry["filename"] for entry in ds.cache_files]
        if not files:
            raise UserError(f"split {split!r} is held in memory only; save it with save_to_disk first")
        parts = [_Part(f, "arrow", _arrow_table(f).num_rows) for f in files]
        physical = [(part, r) for part in parts for r in range(part.rows)]
        indices = getattr(ds, "_indices", None)
        if indices is not None:
            physical = [physical[i] for i in indices.column(0).to_pylist()]
        out[split] = physical
    return out


def _open_source(src: str) -> tuple[dict[str, list[tuple[_Part, int]]], str]:
    import datasets

    path = Path(src)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            return _dataset_sources(datasets.load_from_disk(str(path))), "save_to_disk"
        except (OSError, ValueError) as err:
            raise UserError(f"{src}: cannot load the save_to_disk folder ({err})") from None
    parquet = _parquet_sources(src)
    if parquet is not None:
        return parquet, "parquet"
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        raise UserError(
            f"{src}: not a save_to_disk folder, a .parquet file/folder/glob, or a hub id (owner/name)"
        )
    try:
        return _dataset_sources(datasets.load_dataset(src)), "hub"
    except Exception as err:
        raise UserError(f"{src}: cannot load hub dataset ({type(err).__name__}: {err})") from None


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], flag: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{flag} {wanted!r} is not a column; columns: {', '.join(columns)}")
        return wanted
    return next((c for c in candidates if c in columns), None)


class HuggingFace(Converter):
    """A Hugging Face dataset (see the module docstring for the accepted sources and columns)."""

    name = "hf"
    summary = "Hugging Face dataset: save_to_disk folder, parquet file/folder/glob, or hub id"
    accepts = frozenset({"points_column", "label_column", "split_map"})

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Opens the source, resolves columns and labels, and lists one item per row."""
        import datasets

        sources, kind = _open_source(options.src)
        split_map = dict(options.split_map) if options.split_map else {s: s for s in sources}
        unknown = sorted(set(split_map) - set(sources))
        if unknown:
            raise UserError(f"--split-map names splits {unknown} not in the source (has {sorted(sources)})")
        first = next((part for rows in sources.values() for part, _ in rows if not part.error), None)
        if first is None:
            raise UserError(f"{options.src}: no readable rows")
        schema = _schema(first)
        columns = list(schema.names)
        points_col = _pick(columns, options.points_column, POINT_COLUMNS, "--points-column")
        if points_col is None:
            raise UserError(f"no points column found among {', '.join(columns)}; pass --points-column")
        label_col = _pick(columns, options.label_column, ("label",), "--label-column")
        normal_col = next((c for c in NORMAL_COLUMNS if c in columns), None)
        classes: list[str] = []
        labels: dict[str, list[Any]] = {s: [None] * len(sources[s]) for s in split_map}
        if label_col is not None:
            feature = datasets.Features.from_arrow_schema(schema).get(label_col)
            for split in split_map:
                cache: dict[str, list[Any]] = {}
                values: list[Any] = []
                for part, row in sources[split]:
                    if part.error:
                        values.append(None)
                        continue
                    if part.path not in cache:
                        cache[part.path] = _column(part, label_col)
                    values.append(cache[part.path][row])
                labels[split] = values
            present = [v for vs in labels.values() for v in vs if v is not None]
            if isinstance(feature, datasets.ClassLabel):
                classes = list(feature.names)
            elif present and all(isinstance(v, str) for v in present):
                classes = sorted(set(present))
                index = {c: i for i, c in enumerate(classes)}
                labels = {s: [None if v is None else index[v] for v in vs] for s, vs in labels.items()}
            elif present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
                classes = [str(i) for i in range(max(present) + 1)]
            else:
                raise UserError(f"--label-column {label_col!r} must hold integers or strings")
        splits: dict[str, list[WorkItem]] = {}
        for source_split, out_split in sorted(split_map.items()):
            items = splits.setdefault(out_split, [])
            for idx, ((part, row), label) in enumerate(zip(sources[source_split], labels[source_split])):
                if part.error:
                    name = Path(part.path).name
                    key = make_key(source_split, name)
                    items.append(WorkItem(key, out_split, name, part.path, error=part.error))
                    continue
                error = ""
                if label_col is not None and label is None:
                    error = f"missing {label_col!r} value"
                elif label is not None and not 0 <= label < len(classes):
                    error = f"label {label} outside [0, {len(classes)})"
                items.append(
                    WorkItem(
                        key=make_key(source_split, f"{idx:07d}"),
                        split=out_split,
                        source=f"{source_split}#{idx}",
                        path=part.path,
                        row=row,
                        label=-1 if error or label is None else int(label),
                        class_name="" if error or label is None else classes[label],
                        error=error,
                    )
                )
        first_row = _row(first.path, first.kind, 0, [points_col])
        first_points = np.asarray(first_row.get(points_col) or [])
        source_normals = normal_col is not None or (first_points.ndim == 2 and first_points.shape[1] == 6)
        info = {
            "kind": kind,
            "points_column": points_col,
            "label_column": label_col,
            "normal_column": normal_col,
        }
        return Plan(splits=splits, classes=classes, source_normals=source_normals, info={"hf": info})

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Reads one row's points (and normals)."""
        kind = "parquet" if item.path.endswith(".parquet") else "arrow"
        columns = list(_schema(_Part(item.path, kind, 0)).names)
        points_col = _pick(columns, options.points_column, POINT_COLUMNS, "--points-column")
        normal_col = next((c for c in NORMAL_COLUMNS if c in columns), None)
        if points_col is None:
            raise Reject("no points column")
        values = _row(item.path, kind, item.row, [points_col] + ([normal_col] if normal_col else []))
        raw = values.get(points_col)
        if raw is None:
            raise Reject(f"empty {points_col!r} value")
        try:
            array = np.asarray(raw, dtype=np.float64)
        except (ValueError, TypeError):
            raise Reject(f"wrong array shape: ragged or non-numeric {points_col!r} value") from None
        xyz, normal = as_points(array, f"{points_col!r} values")
        if normal_col is not None and values.get(normal_col) is not None:
            normal = np.asarray(values[normal_col], dtype=np.float64)
            if normal.shape != xyz.shape:
                raise Reject(f"wrong {normal_col!r} shape {normal.shape}: expected {xyz.shape}")
        return RawCloud(xyz=xyz, normal=normal)
