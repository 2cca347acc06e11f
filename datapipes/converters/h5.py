"""HDF5 sources: ``modelnet-h5`` (``modelnet40_ply_hdf5_2048``) and ``scanobjectnn`` (official h5 files).

Each file holds ``data`` ``(n, P, 3)`` and ``label`` ``(n,)`` or ``(n, 1)`` (optionally ``normal``
``(n, P, 3)``); a work item is one row. A file that cannot be opened or has the wrong layout becomes one
rejected item naming the file and the problem. ScanObjectNN is not normalised by default (the official
loaders feed the points as stored; ``--normalize`` turns it on).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.converters.base import Converter, ConvertOptions, Plan, RawCloud, WorkItem
from datapipes.converters.sources import as_points, make_key, require_dir
from datapipes.errors import UserError

SCANOBJECTNN_CLASSES = (
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door",
    "shelf", "table", "bed", "pillow", "sink", "sofa", "toilet",
)  # fmt: skip
"""The 15 ScanObjectNN categories in label order."""

SCANOBJECTNN_FILES = {
    "obj_bg": ("main_split", "{split}_objectdataset.h5"),
    "obj_only": ("main_split_nobg", "{split}_objectdataset.h5"),
    "pb_t50_rs": ("main_split", "{split}_objectdataset_augmentedrot_scale75.h5"),
}
"""Variant -> (folder, file pattern) with ``split`` in ``training``/``test``."""


@lru_cache(maxsize=8)
def _open_h5(path: str) -> Any:
    """A read-only handle kept open for the life of the (worker) process."""
    import h5py

    return h5py.File(path, "r")


def _inspect_h5(path: Path) -> tuple[np.ndarray, str, bool]:
    """Reads the labels of one file and checks its layout; returns ``(labels, error, has_normal)``."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if "data" not in fh or "label" not in fh:
                return (
                    np.zeros(0, np.int64),
                    f"HDF5 file without 'data' and 'label' datasets (has {sorted(fh)})",
                    False,
                )
            data_shape = fh["data"].shape
            has_normal = "normal" in fh
            labels = np.asarray(fh["label"][()]).reshape(-1)
            if len(data_shape) != 3 or data_shape[2] < 3:
                return labels, f"wrong 'data' shape {tuple(data_shape)}: expected (n, P, 3)", False
            if len(labels) != data_shape[0]:
                return (
                    labels,
                    f"'label' has {len(labels)} entries for {data_shape[0]} clouds in 'data'",
                    False,
                )
            if has_normal and fh["normal"].shape != data_shape:
                return (
                    labels,
                    f"'normal' shape {fh['normal'].shape} differs from 'data' shape {data_shape}",
                    False,
                )
            if labels.dtype.kind not in "iu":
                return labels, f"'label' has non-integer dtype {labels.dtype}", False
    except OSError as err:
        return np.zeros(0, np.int64), f"unreadable HDF5 file ({err})", False
    return labels.astype(np.int64), "", has_normal


def _h5_plan(
    src: Path, files: dict[str, list[Path]], classes: list[str] | None, info: dict[str, Any]
) -> Plan:
    """One item per row of every file; one rejected item per unusable file."""
    inspected = {f: _inspect_h5(f) for fs in files.values() for f in fs}
    usable = [(lab, has_normal) for lab, err, has_normal in inspected.values() if not err]
    if classes is None:
        top = max((int(lab.max()) for lab, _ in usable if lab.size), default=-1)
        classes = [f"class_{i:02d}" for i in range(top + 1)]
    splits: dict[str, list[WorkItem]] = {}
    for split, paths in files.items():
        items: list[WorkItem] = []
        for path in paths:
            labels, error, _ = inspected[path]
            rel = path.relative_to(src).as_posix()
            if error:
                items.append(WorkItem(make_key(path.stem), split, rel, str(path), error=error))
                continue
            for row, label in enumerate(labels.tolist()):
                bad = not 0 <= label < len(classes)
                items.append(
                    WorkItem(
                        key=make_key(path.stem, f"{row:05d}"),
                        split=split,
                        source=f"{rel}#{row}",
                        path=str(path),
                        row=row,
                        label=-1 if bad else label,
                        class_name="" if bad else classes[label],
                        error=f"label {label} outside [0, {len(classes)})" if bad else "",
                    )
                )
        splits[split] = items
    source_normals = bool(usable) and usable[0][1]
    return Plan(splits=splits, classes=classes, source_normals=source_normals, info=info)


def _read_row(item: WorkItem) -> RawCloud:
    fh = _open_h5(item.path)
    xyz, normal = as_points(fh["data"][item.row], "cloud in 'data'")
    if "normal" in fh:
        normal = np.asarray(fh["normal"][item.row])
    return RawCloud(xyz=xyz, normal=normal)


class ModelNetH5(Converter):
    """``modelnet40_ply_hdf5_2048/ply_data_{train,test}*.h5``; class names from ``shape_names.txt``."""

    name = "modelnet-h5"
    summary = "modelnet40_ply_hdf5_2048/ply_data_{train,test}*.h5 (+ shape_names.txt)"

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Lists the rows of every train/test file."""
        require_dir(src, "a modelnet40_ply_hdf5_2048 folder")
        files = {split: sorted(src.glob(f"ply_data_{split}*.h5")) for split in ("train", "test")}
        files = {s: fs for s, fs in files.items() if fs}
        if not files:
            raise UserError(f"{src}: no ply_data_train*.h5 / ply_data_test*.h5 files")
        names = src / "shape_names.txt"
        classes = (
            [ln.strip() for ln in names.read_text().splitlines() if ln.strip()] if names.is_file() else None
        )
        return _h5_plan(src, files, classes, {})

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Reads one row."""
        return _read_row(item)


class ScanObjectNN(Converter):
    """Official ScanObjectNN h5 files; ``--variant obj_bg|obj_only|pb_t50_rs`` picks the files.

    SRC is the folder holding ``main_split/`` and ``main_split_nobg/`` (or the split folder itself).
    """

    name = "scanobjectnn"
    summary = "ScanObjectNN h5 files, --variant obj_bg|obj_only|pb_t50_rs (no normalisation by default)"
    default_normalize = False
    variants = tuple(SCANOBJECTNN_FILES)
    accepts = frozenset({"variant"})

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Finds the variant's training/test files and lists their rows."""
        require_dir(src, "the ScanObjectNN h5_files folder")
        variant = options.variant or "obj_bg"
        folder, pattern = SCANOBJECTNN_FILES[variant]
        base = src / folder if (src / folder).is_dir() else src
        files: dict[str, list[Path]] = {}
        for split, official in (("train", "training"), ("test", "test")):
            path = base / pattern.format(split=official)
            if not path.is_file():
                raise UserError(f"{path}: missing ScanObjectNN {variant} file (is SRC the h5_files folder?)")
            files[split] = [path]
        return _h5_plan(src, files, list(SCANOBJECTNN_CLASSES), {"variant": variant})

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Reads one row."""
        return _read_row(item)
