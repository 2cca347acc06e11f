"""Hugging Face datasets: ``hf`` (a ``save_to_disk`` folder, Parquet files, or a hub id when online).

SRC may be:

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``);
- a ``.parquet`` file, a folder of them (searched recursively) or a glob; the split of a file named like
  the hub's ``<split>-00000-of-00002.parquet`` is ``<split>`` (any name of letters, digits and ``_``),
  else the first of ``train``, ``test``, ``validation``, ``valid``, ``val`` found among the words of its
  relative path (else ``train``);
- a hub id (``owner/name``), loaded with ``datasets.load_dataset`` (needs network; dataset scripts are
  never run: no ``trust_remote_code``).

Rows are read straight from the underlying Arrow/Parquet files with pyarrow, so each worker opens only the
files it needs. ``--points-column`` (default: the first of ``points``, ``xyz``, ``pos``, ``point_cloud``,
``pointcloud``, ``pc``, ``coords``) holds ``(N, 3)`` or ``(N, 6)`` arrays; a ``normal``/``normals`` column
is used when present. ``--label-column`` (default ``label`` when present) holds integers (class names from
a ``ClassLabel`` feature, else ``"0"``, ``"1"``, ...) or strings (sorted to give indices).
``--split-map train=train,validation=test`` renames source splits and keeps only the listed ones.

Other columns, as ``pcpt-data export-hf`` writes them (so an export reads back into the same samples):

- ``key`` (or ``__key__``, as the hub's webdataset loader names it): string sample keys, used as they are
  when they are valid shard keys (otherwise made safe; a key found in several splits is prefixed with its
  split, ``test_<key>``, as a conversion needs keys unique across splits); rows without one get
  ``<split>_<row>``;
- ``image`` (one view) or ``images`` (a list of views): ``Image`` features (``{bytes, path}`` structs); PNG
  and JPEG bytes are stored unchanged, other formats re-encoded as PNG; every row must hold as many views
  as the first one;
- ``feat``: per-point features, ``(N, C)`` lists or a list of ``{channel: value}`` structs (the struct's
  field names become the manifest's channel names);
- ``meta``: a JSON object (string) or a struct, merged into the sample's meta.
"""

from __future__ import annotations

import glob
import io
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.converters.base import Converter, ConvertOptions, Plan, RawCloud, Reject, WorkItem
from datapipes.converters.sources import as_points, make_key
from datapipes.errors import UserError
from datapipes.shards.codecs import image_suffix
from datapipes.shards.format import validate_key

POINT_COLUMNS = ("points", "xyz", "pos", "point_cloud", "pointcloud", "pc", "coords")
NORMAL_COLUMNS = ("normal", "normals")
KEY_COLUMNS = ("key", "__key__")
IMAGE_COLUMNS = ("image", "images")
FEAT_COLUMN = "feat"
META_COLUMN = "meta"
_SPLIT_WORDS = ("train", "test", "validation", "valid", "val")
#: Parquet file names of hub datasets (``push_to_hub``, ``export-hf``): ``<split>-00000-of-00002.parquet``.
_HUB_FILE = re.compile(r"^([A-Za-z0-9_]+)-\d{5}-of-\d{5}\.parquet$")


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
    hub = _HUB_FILE.match(rel.rsplit("/", 1)[-1])
    if hub is not None:
        return hub.group(1)
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


def _is_image_struct(kind: Any) -> bool:
    """Whether an Arrow type is the storage of a ``datasets.Image`` feature (``struct<bytes, path>``)."""
    import pyarrow as pa

    return bool(pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)


@dataclass(frozen=True)
class _Columns:
    """The columns of a source, resolved once from a file's schema (see the module docstring).

    ``image`` is ``(column, one view per row)``; ``channels`` the feature names of a struct ``feat``.
    """

    points: str | None
    normal: str | None
    key: str | None
    image: tuple[str, bool] | None
    feat: str | None
    channels: tuple[str, ...]
    meta: str | None


def _columns(schema: Any, points_column: str | None) -> _Columns:
    import pyarrow as pa

    names = list(schema.names)
    string = (pa.string(), pa.large_string())
    key = next((c for c in KEY_COLUMNS if c in names and schema.field(c).type in string), None)
    image = None
    for name in IMAGE_COLUMNS:
        kind = schema.field(name).type if name in names else None
        if kind is not None and _is_image_struct(kind):
            image = (name, True)
        elif kind is not None and pa.types.is_list(kind) and _is_image_struct(kind.value_type):
            image = (name, False)
        if image is not None:
            break
    feat, channels = None, ()
    kind = schema.field(FEAT_COLUMN).type if FEAT_COLUMN in names else None
    if kind is not None and (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        feat = FEAT_COLUMN
        if pa.types.is_struct(kind.value_type):
            channels = tuple(kind.value_type.field(i).name for i in range(kind.value_type.num_fields))
    meta_kind = schema.field(META_COLUMN).type if META_COLUMN in names else None
    is_meta = meta_kind is not None and (meta_kind in string or pa.types.is_struct(meta_kind))
    return _Columns(
        points=_pick(names, points_column, POINT_COLUMNS, "--points-column"),
        normal=next((c for c in NORMAL_COLUMNS if c in names), None),
        key=key,
        image=image,
        feat=feat,
        channels=channels,
        meta=META_COLUMN if is_meta else None,
    )


def _values(sources: dict[str, list[tuple[_Part, int]]], split: str, column: str) -> list[Any]:
    """One column's value for every row of a split (``None`` for the rows of unreadable files)."""
    cache: dict[str, list[Any]] = {}
    values: list[Any] = []
    for part, row in sources[split]:
        if part.error:
            values.append(None)
            continue
        if part.path not in cache:
            cache[part.path] = _column(part, column)
        values.append(cache[part.path][row])
    return values


def _sample_key(value: Any, split: str, idx: int) -> str:
    """A row's key: its ``key`` value if it is a valid shard key (made safe otherwise), else generated."""
    if not isinstance(value, str) or not value:
        return make_key(split, f"{idx:07d}")
    try:
        return validate_key(value)
    except ValueError:
        return make_key(value)


def _row_keys(
    sources: dict[str, list[tuple[_Part, int]]], splits: list[str], column: str | None
) -> dict[str, list[str]]:
    """The sample key of every row of ``splits`` (see :func:`_sample_key`).

    A conversion needs keys unique across splits, while a shard folder needs them unique within a split
    only: a ``key`` value found in several splits is prefixed with its split (``train_<key>``) everywhere.
    """
    keys: dict[str, list[str]] = {}
    for split in splits:
        values = _values(sources, split, column) if column else [None] * len(sources[split])
        keys[split] = [_sample_key(value, split, idx) for idx, value in enumerate(values)]
    owners: dict[str, set[str]] = {}
    for split, split_keys in keys.items():
        for key in split_keys:
            owners.setdefault(key, set()).add(split)
    shared = {key for key, found_in in owners.items() if len(found_in) > 1}
    if shared:
        keys = {s: [make_key(s, k) if k in shared else k for k in ks] for s, ks in keys.items()}
    return keys


def _image_bytes(value: Any, where: str) -> bytes:
    """PNG/JPEG bytes of one ``Image`` value (``{bytes, path}``); other formats are re-encoded as PNG."""
    data = value.get("bytes") if isinstance(value, dict) else None
    if not isinstance(data, bytes | bytearray) or not data:
        raise Reject(f"{where}: no image bytes (a path-only image cannot be read)")
    data = bytes(data)
    try:
        image_suffix(data, where=where)
        return data
    except ValueError:
        pass
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise Reject(f"{where}: undecodable image ({err})") from None
    return buf.getvalue()


def _images_entry(column: str, views: int, first: bytes) -> dict[str, Any]:
    """The manifest's ``images`` entry of the source's own views (size from the first row's first view)."""
    from PIL import Image

    entry: dict[str, Any] = {"views": views, "source": "hf", "column": column}
    try:
        with Image.open(io.BytesIO(first)) as image:
            width, height = image.size
            entry["format"] = "jpg" if image.format == "JPEG" else "png"
            entry["channels"] = len(image.getbands())
    except (OSError, ValueError):
        return entry
    entry["size"] = width if width == height else [height, width]
    return entry


def _meta(value: Any) -> dict[str, Any]:
    """A ``meta`` value as a dict: a struct, or a string holding a JSON object; other strings give ``{}``.

    Raises:
        Reject: a struct with values JSON cannot hold (bytes, dates).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    if not isinstance(value, dict):
        return {}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise Reject(f"{META_COLUMN!r} value is not JSON serialisable") from None
    return dict(value)


def _feat(value: Any, channels: tuple[str, ...], rows: int) -> np.ndarray:
    """One row's ``feat`` as an ``(N, C)`` float array (struct rows ordered by ``channels``)."""
    if channels:
        try:
            array = np.asarray([[p[c] for c in channels] for p in value], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise Reject(f"malformed {FEAT_COLUMN!r} value") from None
    else:
        try:
            array = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            raise Reject(f"wrong array shape: ragged or non-numeric {FEAT_COLUMN!r} value") from None
        array = array.reshape(len(array), -1) if array.ndim == 1 else array
    if array.ndim != 2 or len(array) != rows:
        raise Reject(f"wrong {FEAT_COLUMN!r} shape {array.shape}: expected ({rows}, C)")
    return array


class HuggingFace(Converter):
    """A Hugging Face dataset (see the module docstring for the accepted sources and columns)."""

    name = "hf"
    summary = "Hugging Face dataset: save_to_disk folder, parquet file/folder/glob, or hub id"
    accepts = frozenset({"points_column", "label_column", "split_map"})

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Opens the source, resolves columns, keys and labels, and lists one item per row."""
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
        cols = _columns(schema, options.points_column)
        points_col = cols.points
        if points_col is None:
            raise UserError(f"no points column found among {', '.join(columns)}; pass --points-column")
        label_col = _pick(columns, options.label_column, ("label",), "--label-column")
        classes: list[str] = []
        labels: dict[str, list[Any]] = {s: [None] * len(sources[s]) for s in split_map}
        if label_col is not None:
            feature = datasets.Features.from_arrow_schema(schema).get(label_col)
            labels = {split: _values(sources, split, label_col) for split in split_map}
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
        keys = _row_keys(sources, list(split_map), cols.key)
        splits: dict[str, list[WorkItem]] = {}
        for source_split, out_split in sorted(split_map.items()):
            items = splits.setdefault(out_split, [])
            rows = zip(sources[source_split], labels[source_split], keys[source_split])
            for idx, ((part, row), label, key) in enumerate(rows):
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
                        key=key,
                        split=out_split,
                        source=f"{source_split}#{idx}",
                        path=part.path,
                        row=row,
                        label=-1 if error or label is None else int(label),
                        class_name="" if error or label is None else classes[label],
                        error=error,
                    )
                )
        wanted = [points_col, cols.image[0]] if cols.image else [points_col]
        first_row = _row(first.path, first.kind, 0, wanted)
        first_points = np.asarray(first_row.get(points_col) or [])
        source_normals = cols.normal is not None or (first_points.ndim == 2 and first_points.shape[1] == 6)
        images = None
        if cols.image is not None:
            name, single = cols.image
            value = first_row.get(name)
            views = [value] if single else list(value or [])
            if not views:
                raise UserError(f"{first.path}: the first row has no image in {name!r}")
            try:
                first_view = _image_bytes(views[0], f"column {name!r}")
            except Reject as err:
                raise UserError(f"{first.path}: first row: {err}") from None
            images = _images_entry(name, len(views), first_view)
        info = {
            "kind": kind,
            "points_column": points_col,
            "label_column": label_col,
            "normal_column": cols.normal,
            "key_column": cols.key,
            "image_column": cols.image[0] if cols.image else None,
            "feat_column": cols.feat,
            "meta_column": cols.meta,
        }
        channels = {"feat": cols.channels} if cols.feat and cols.channels else {}
        return Plan(
            splits=splits,
            classes=classes,
            source_normals=source_normals,
            info={"hf": info},
            channels=channels,
            images=images,
        )

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Reads one row's points (and normals, features, image views and meta)."""
        kind = "parquet" if item.path.endswith(".parquet") else "arrow"
        cols = _columns(_schema(_Part(item.path, kind, 0)), options.points_column)
        points_col = cols.points
        if points_col is None:
            raise Reject("no points column")
        extra = [c for c in (cols.normal, cols.feat, cols.meta, cols.image and cols.image[0]) if c]
        values = _row(item.path, kind, item.row, [points_col, *extra])
        raw = values.get(points_col)
        if raw is None:
            raise Reject(f"empty {points_col!r} value")
        try:
            array = np.asarray(raw, dtype=np.float64)
        except (ValueError, TypeError):
            raise Reject(f"wrong array shape: ragged or non-numeric {points_col!r} value") from None
        xyz, normal = as_points(array, f"{points_col!r} values")
        normal_col = cols.normal
        if normal_col is not None and values.get(normal_col) is not None:
            normal = np.asarray(values[normal_col], dtype=np.float64)
            if normal.shape != xyz.shape:
                raise Reject(f"wrong {normal_col!r} shape {normal.shape}: expected {xyz.shape}")
        cloud = RawCloud(xyz=xyz, normal=normal)
        if cols.feat is not None:
            if values.get(cols.feat) is None:
                raise Reject(f"empty {cols.feat!r} value")
            cloud.feat = _feat(values[cols.feat], cols.channels, len(xyz))
        if cols.meta is not None:
            cloud.meta = _meta(values.get(cols.meta))
        if cols.image is not None:
            name, single = cols.image
            value = values.get(name)
            views = [value] if single and value is not None else list(value or [])
            if options.max_views is not None and len(views) != options.max_views:
                raise Reject(f"{len(views)} image(s) in {name!r}, the first row has {options.max_views}")
            cloud.images = [_image_bytes(v, f"{name!r} view {i}") for i, v in enumerate(views)]
        return cloud
