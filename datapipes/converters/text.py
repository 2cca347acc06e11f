"""Comma-separated text clouds: ``modelnet-resampled`` (``modelnet40_normal_resampled``).

Layout: ``<variant>_shape_names.txt`` (class order = label), ``<variant>_{train,test}.txt`` (ids such as
``airplane_0001``) and ``<class>/<id>.txt`` with one ``x,y,z,nx,ny,nz`` row per point. ``--variant
modelnet10`` reads the ``modelnet10_*`` lists of the same folder. The default ``--points 8192`` matches the
official 8192-point FPS cache (here with a deterministic start).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datapipes.converters.base import Converter, ConvertOptions, Plan, RawCloud, Reject, WorkItem
from datapipes.converters.sources import as_points, check_file, make_key, require_dir
from datapipes.errors import UserError


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines of a list file; names are decoded like file names (bytes that are not UTF-8 kept)."""
    return [ln.strip() for ln in os.fsdecode(path.read_bytes()).splitlines() if ln.strip()]


class ModelNetResampled(Converter):
    """``modelnet40_normal_resampled`` text files with xyz + normals and the official split lists."""

    name = "modelnet-resampled"
    summary = "modelnet40_normal_resampled: <variant>_{shape_names,train,test}.txt + <class>/<id>.txt"
    default_points = 8192
    variants = ("modelnet40", "modelnet10")
    accepts = frozenset({"variant"})

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Reads the class names and split lists."""
        require_dir(src, "a modelnet40_normal_resampled folder")
        variant = options.variant or "modelnet40"
        names_file = src / f"{variant}_shape_names.txt"
        if not names_file.is_file() and variant == "modelnet40" and (src / "shape_names.txt").is_file():
            names_file = src / "shape_names.txt"
        if not names_file.is_file():
            raise UserError(
                f"{src}: missing {variant}_shape_names.txt (is this modelnet40_normal_resampled?)"
            )
        classes = _read_lines(names_file)
        index = {c: i for i, c in enumerate(classes)}
        splits: dict[str, list[WorkItem]] = {}
        for split in ("train", "test"):
            list_file = src / f"{variant}_{split}.txt"
            if not list_file.is_file():
                raise UserError(f"{src}: missing split list {list_file.name}")
            items = []
            for shape_id in sorted(dict.fromkeys(_read_lines(list_file))):
                class_name = "_".join(shape_id.split("_")[:-1])
                path = src / class_name / f"{shape_id}.txt"
                error = "" if class_name in index else f"class {class_name!r} is not in {names_file.name}"
                items.append(
                    WorkItem(
                        key=make_key(shape_id),
                        split=split,
                        source=f"{class_name}/{shape_id}.txt",
                        path=str(path),
                        label=index.get(class_name, -1),
                        class_name=class_name,
                        error=error,
                    )
                )
            splits[split] = items
        return Plan(splits=splits, classes=classes, source_normals=True, info={"variant": variant})

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Parses one ``x,y,z,nx,ny,nz`` text file."""
        check_file(Path(item.path))
        try:
            rows = np.loadtxt(item.path, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as err:
            raise Reject(f"cannot parse comma-separated rows ({err})") from None
        xyz, normal = as_points(rows, "x,y,z[,nx,ny,nz] rows")
        return RawCloud(xyz=xyz, normal=normal)
