"""``pcpt-data export-hf SHARDS DEST``: shards as a Hugging Face dataset (``save_to_disk`` folder or Parquet).

Every split of the manifest becomes a split of the dataset, one row per sample, in shard order:

=========== ==================================================== =============================================
column      ``datasets`` feature                                 from
=========== ==================================================== =============================================
``key``     ``Value("string")``                                  the sample key
``points``  list of ``Sequence(Value("float32"), length=3)``     ``xyz.npy`` ``(N, 3)``
``normals`` list of ``Sequence(Value("float32"), length=3)``     ``normal.npy`` ``(N, 3)``, when stored
``curv``    list of ``Value("float32")`` (or of length-1 lists)  ``curv.npy`` ``(N,)`` / ``(N, 1)``, if stored
``feat``    list of ``{channel: Value("float32")}`` structs, or  ``feat.npy`` ``(N, C)``, when stored (structs
            of ``Sequence(Value("float32"), length=C)``          when the manifest names the channels)
``label``   ``ClassLabel(names=manifest classes)``               ``cls.txt``, when stored
``image``   ``Image()``                                          ``img.png`` / ``img.jpg`` (one view)
``images``  list of ``Image()``                                  ``img.0.png``, ... (several views, in order)
``meta``    ``Value("string")``: the JSON object                 ``meta.json``, when stored
=========== ==================================================== =============================================

Images keep their stored PNG/JPEG bytes unchanged. ``--format disk`` writes a ``DatasetDict.save_to_disk``
folder (``datasets.load_from_disk(DEST)``); ``--format parquet`` writes the files of a hub dataset repository,
``DEST/data/<split>-00000-of-0000N.parquet`` as ``push_to_hub`` names them, so any split name is found
(``datasets.load_dataset("parquet", data_dir=DEST)``, or upload DEST), with the features in the schema
metadata so ``ClassLabel`` and ``Image`` survive. Samples are streamed:
``--row-group-size`` rows at a time are held in memory. Nothing appears at DEST until the export is complete
(it is written next to DEST, then renamed).

``pcpt-data convert hf DEST OUT --no-normalize`` (plus ``--no-fps`` when the shards are not in farthest-point
order) gives back the same samples: keys, labels, class names, points, normals, features with their channel
names, image bytes and meta (the importer adds ``num_points`` to meta). A key found in several splits (a
shard folder needs keys unique within a split, a conversion across splits) comes back prefixed with its
split (``test_<key>``). Curvature is exported but not read back by the importer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.cli_common import add_command
from datapipes.errors import UserError
from datapipes.progress import Progress

__all__ = ["ExportReport", "add_export_hf_parser", "export_hf", "hf_features", "reimport_command"]

FORMATS = ("disk", "parquet")
#: shard field -> column (``images`` becomes ``image`` or ``images``, see :func:`hf_features`).
COLUMNS = {
    "xyz": "points",
    "normal": "normals",
    "curv": "curv",
    "feat": "feat",
    "label": "label",
    "meta": "meta",
}
_KNOWN_FIELDS = frozenset({*COLUMNS, "images"})
#: per-point columns -> their shard field.
_POINT_FIELDS = {COLUMNS[f]: f for f in ("xyz", "normal", "curv", "feat")}


@dataclass(frozen=True)
class ExportReport:
    """Outcome of an export (the summary printed by the CLI).

    Attributes:
        shards: the source shard folder.
        dest: the written dataset.
        format: ``disk`` or ``parquet``.
        samples: split -> rows written.
        files: split -> files written (Parquet files, or Arrow files of the ``save_to_disk`` folder).
        classes: class names (the ``label`` feature's names).
        columns: column names in order.
        reimport: the ``pcpt-data convert hf`` command that reads the export back into the same samples.
    """

    shards: str
    dest: str
    format: str
    samples: dict[str, int]
    files: dict[str, int]
    classes: list[str]
    columns: list[str]
    reimport: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def hf_features(manifest: Mapping[str, Any]) -> Any:
    """The ``datasets.Features`` of the rows of a shard folder (see the module docstring).

    Args:
        manifest: the folder's manifest (``fields``, ``classes``).

    Returns:
        A ``datasets.Features`` with the columns in the order of the module docstring.

    Raises:
        UserError: the manifest has no ``xyz`` field or a field the export does not know.
    """
    import datasets

    fields = manifest.get("fields") or {}
    unknown = sorted(set(fields) - _KNOWN_FIELDS)
    if "xyz" not in fields or unknown:
        problem = f"fields {unknown} unknown to export-hf" if unknown else "no xyz field"
        raise UserError(f"manifest.json: {problem}")
    f32 = datasets.Value("float32")
    point3 = [datasets.Sequence(f32, length=3)]
    features: dict[str, Any] = {"key": datasets.Value("string"), "points": point3}
    if "normal" in fields:
        features["normals"] = point3
    if "curv" in fields:
        tail = list(fields["curv"].get("shape", ["N"]))[1:]
        features["curv"] = [datasets.Sequence(f32, length=1)] if tail == [1] else [f32]
    if "feat" in fields:
        spec = fields["feat"]
        channels = spec.get("channels")
        if channels:
            features["feat"] = [{str(name): f32 for name in channels}]
        else:
            features["feat"] = [datasets.Sequence(f32, length=int(spec["shape"][1]))]
    if "label" in fields:
        classes = [str(c) for c in manifest.get("classes") or []]
        features["label"] = datasets.ClassLabel(names=classes) if classes else datasets.Value("int64")
    if "images" in fields:
        views = int(fields["images"].get("shape", [1])[0])
        features["image" if views == 1 else "images"] = datasets.Image() if views == 1 else [datasets.Image()]
    if "meta" in fields:
        features["meta"] = datasets.Value("string")
    return datasets.Features(features)


def reimport_command(dest: str | Path, manifest: Mapping[str, Any]) -> str:
    """The ``pcpt-data convert hf`` command that reads an export back into the same samples."""
    fps = "" if manifest.get("fps_ordered") else " --no-fps"
    return f"pcpt-data convert hf {dest} OUT --no-normalize{fps}"


def _list_array(values: Sequence[np.ndarray], kind: Any) -> Any:
    """A ``list<...>`` Arrow array of per-point float arrays ``(N_i,)`` or ``(N_i, C)`` of type ``kind``."""
    import pyarrow as pa

    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(v, dtype=np.float32).reshape(len(v), -1) for v in values])
    item = kind.value_type
    if pa.types.is_fixed_size_list(item):
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), type=item)
    elif pa.types.is_struct(item):
        columns = [pa.array(np.ascontiguousarray(flat[:, i]), pa.float32()) for i in range(item.num_fields)]
        inner = pa.StructArray.from_arrays(columns, fields=list(item))
    else:
        inner = pa.array(flat.reshape(-1), pa.float32())
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner, type=kind)


def _image_array(images: Sequence[bytes], kind: Any) -> Any:
    """An ``Image()`` column: ``struct<bytes, path>`` with the bytes unchanged and no path."""
    import pyarrow as pa

    arrays = [pa.array(list(images), pa.binary()), pa.nulls(len(images), pa.string())]
    return pa.StructArray.from_arrays(arrays, fields=list(kind))


def _record_batch(samples: Sequence[Mapping[str, Any]], schema: Any, where: str) -> Any:
    """The rows of ``samples`` (decoded shard samples) as one Arrow record batch of ``schema``."""
    import pyarrow as pa

    from datapipes.shards.codecs import dumps

    arrays = []
    for name in schema.names:
        kind = schema.field(name).type
        if name == "key":
            arrays.append(pa.array([s["key"] for s in samples], pa.string()))
        elif name in _POINT_FIELDS:
            arrays.append(_list_array([s[_POINT_FIELDS[name]] for s in samples], kind))
        elif name == "label":
            arrays.append(pa.array([int(s["label"]) for s in samples], pa.int64()))
        elif name == "image":
            arrays.append(_image_array([s["images"][0] for s in samples], kind))
        elif name == "images":
            views = [s["images"] for s in samples]
            offsets = np.concatenate([[0], np.cumsum([len(v) for v in views])]).astype(np.int32)
            flat = _image_array([im for v in views for im in v], kind.value_type)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), flat, type=kind))
        elif name == "meta":
            arrays.append(pa.array([dumps(s["meta"]) for s in samples], pa.string()))
        else:  # pragma: no cover - hf_features lists only the columns above
            raise ValueError(f"{where}: no rule for column {name!r}")
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _samples(
    root: Path, split: str, manifest: Mapping[str, Any], views: int, tick: Callable[[int], None]
) -> Iterator[dict[str, Any]]:
    """The decoded samples of one split, checked against the manifest (image views included)."""
    from datapipes.shards import iter_split_samples

    for sample in iter_split_samples(root, split, manifest=manifest):
        got = len(sample.get("images") or [])
        if got != views:
            raise UserError(f"{root}: sample {sample['key']} has {got} image(s), its manifest says {views}")
        tick(1)
        yield sample


def _chunks(samples: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """``samples`` in lists of up to ``size``."""
    iterator = iter(samples)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _file_counts(samples: Mapping[str, int], rows_per_file: int) -> dict[str, int]:
    return {split: max(1, math.ceil(n / rows_per_file)) for split, n in samples.items()}


def _write_parquet(
    root: Path,
    out: Path,
    manifest: Mapping[str, Any],
    schema: Any,
    files: Mapping[str, int],
    options: tuple[int, int, int],
    tick: Callable[[int], None],
) -> None:
    """``out/data/<split>-IIIII-of-NNNNN.parquet``: ``rows_per_file`` rows each, ``row_group`` per group."""
    import pyarrow.parquet as pq

    rows_per_file, row_group, views = options
    (out / "data").mkdir()
    for split, count in files.items():
        samples = _samples(root, split, manifest, views, tick)
        for index in range(count):
            path = out / "data" / f"{split}-{index:05d}-of-{count:05d}.parquet"
            with pq.ParquetWriter(str(path), schema) as writer:
                for chunk in _chunks(itertools.islice(samples, rows_per_file), row_group):
                    writer.write_batch(_record_batch(chunk, schema, split))
        extra = next(samples, None)  # runs the reader's end-of-split checks
        if extra is not None:
            raise UserError(f"{root}: split {split!r} holds more samples than its manifest lists")


def _write_disk(
    root: Path,
    out: Path,
    work: Path,
    manifest: Mapping[str, Any],
    features: Any,
    files: Mapping[str, int],
    options: tuple[int, int],
    tick: Callable[[int], None],
) -> None:
    """A ``DatasetDict.save_to_disk`` folder: each split streamed to an Arrow file, then saved in shards."""
    import datasets
    import pyarrow as pa

    row_group, views = options
    schema = features.arrow_schema
    splits = {}
    for split in files:
        path = work / f"{split}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as stream:
            for chunk in _chunks(_samples(root, split, manifest, views, tick), row_group):
                stream.write_batch(_record_batch(chunk, schema, split))
        info = datasets.DatasetInfo(description=f"pcpt shards {root.name}", features=features)
        splits[split] = datasets.Dataset.from_file(str(path), info=info, split=split)
    with _quiet_datasets():
        datasets.DatasetDict(splits).save_to_disk(str(out), num_shards=dict(files))


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hides the progress bars of ``datasets`` (pcpt reports progress itself), restoring them after."""
    from datasets.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _check_dest(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise UserError(f"{dest}: already exists and is not an empty folder; export-hf writes a new DEST")


def export_hf(
    shards: str | Path,
    dest: str | Path,
    *,
    fmt: str = "disk",
    rows_per_file: int = 1000,
    row_group_size: int = 100,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Writes every split of a shard folder as a Hugging Face dataset (see the module docstring).

    Args:
        shards: the shard folder (with ``manifest.json``).
        dest: the new dataset folder; must not exist or be empty.
        fmt: ``disk`` (``save_to_disk`` folder) or ``parquet`` (hub-named Parquet files).
        rows_per_file: rows per Parquet file / per Arrow file of the ``save_to_disk`` folder.
        row_group_size: rows per Parquet row group and per Arrow record batch (the rows held in memory).
        progress: called with the number of samples just read.

    Returns:
        The report.

    Raises:
        UserError: SHARDS is not a finished shard folder or is damaged, DEST exists and is not empty, or a
            bad option.
    """
    from datapipes.shards import read_manifest

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for flag, value in (("--rows-per-file", rows_per_file), ("--row-group-size", row_group_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    root, dest = Path(shards), Path(dest)
    manifest = read_manifest(root)
    _check_dest(dest)
    features = hf_features(manifest)
    fields = manifest["fields"]
    views = int(fields["images"].get("shape", [1])[0]) if "images" in fields else 0
    samples = {split: int(info["samples"]) for split, info in sorted(manifest["splits"].items())}
    files = _file_counts(samples, rows_per_file)
    tick = progress or (lambda n: None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    try:
        out = work / "out"
        out.mkdir()
        if fmt == "parquet":
            _write_parquet(
                root,
                out,
                manifest,
                features.arrow_schema,
                files,
                (rows_per_file, row_group_size, views),
                tick,
            )
        else:
            _write_disk(root, out, work, manifest, features, files, (row_group_size, views), tick)
        _check_dest(dest)
        os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportReport(
        shards=str(root),
        dest=str(dest),
        format=fmt,
        samples=samples,
        files=files,
        classes=[str(c) for c in manifest.get("classes") or []],
        columns=list(features),
        reimport=reimport_command(dest, manifest),
    )


_DESCRIPTION = """\
Write a pcpt shard folder (every split) as a Hugging Face dataset: a DatasetDict save_to_disk folder
(--format disk, read with datasets.load_from_disk) or the Parquet files of a hub dataset repository,
DEST/data/<split>-00000-of-0000N.parquet (--format parquet, read with
datasets.load_dataset("parquet", data_dir=DEST), or upload DEST to the hub).

Columns: key (string), points (N x 3 float32), normals, curv, feat (per-point features; a struct per point
when the manifest names the channels), label (ClassLabel with the manifest's class names), image (one view)
or images (several views; Image features holding the stored PNG/JPEG bytes), meta (JSON string), each when
the shards store it. Samples are streamed (--row-group-size rows in memory); DEST appears only when
complete. "pcpt-data convert hf DEST OUT --no-normalize" (add --no-fps for shards not in farthest-point
order) reads the export back into the same samples.
"""


def add_export_hf_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``pcpt-data export-hf`` (see :func:`~datapipes.cli_common.add_command`)."""
    p = add_command(
        subparsers,
        "export-hf",
        run_export_hf,
        help="write a shard folder as a Hugging Face dataset (save_to_disk folder or Parquet files)",
        description=_DESCRIPTION,
        epilog=(
            "examples:\n"
            "  pcpt-data export-hf out/mn40 hf/mn40\n"
            "  pcpt-data export-hf out/mn40 hf/mn40-parquet --format parquet --rows-per-file 2000"
        ),
    )
    p.add_argument("shards", metavar="SHARDS", help="shard folder (with manifest.json)")
    p.add_argument("dest", metavar="DEST", help="new dataset folder (must not exist or be empty)")
    p.add_argument(
        "--format",
        default="disk",
        metavar="{disk,parquet}",
        help="a save_to_disk folder (default) or hub-named Parquet files",
    )
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=1000,
        metavar="R",
        help="rows per Parquet file / Arrow file of the save_to_disk folder (default 1000)",
    )
    p.add_argument(
        "--row-group-size",
        type=int,
        default=100,
        metavar="G",
        help="rows per Parquet row group, and the rows held in memory at a time (default 100)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_export_hf(args: argparse.Namespace) -> int:
    """Handler of ``pcpt-data export-hf``: exports, prints the summary, returns the exit status."""
    from datapipes.shards import read_manifest

    total = sum(int(info["samples"]) for info in read_manifest(args.shards)["splits"].values())
    with Progress(total, "export-hf", "sample", disable=args.quiet) as bar:
        report = export_hf(
            args.shards,
            args.dest,
            fmt=args.format,
            rows_per_file=args.rows_per_file,
            row_group_size=args.row_group_size,
            progress=bar.update,
        )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return 0
    lines = [f"exported {report.shards} -> {report.dest} ({report.format})"]
    lines += [f"  {s}: {n} samples in {report.files[s]} file(s)" for s, n in report.samples.items()]
    lines.append(f"  classes: {len(report.classes)}")
    lines.append(f"  columns: {', '.join(report.columns)}")
    lines.append(f"  read back with: {report.reimport}")
    print("\n".join(lines))
    return 0
