"""LiDAR scans: ``kitti`` velodyne ``.bin`` frames (float32 ``x, y, z, intensity`` records).

SRC is any folder holding ``.bin`` frames (``sequences/*/velodyne``, ``training/velodyne``, ...), searched
recursively. Frames under a ``testing`` folder go to ``test``, all others to ``train``. Intensity is kept as
``feat`` ``(N, 1)``, its channel named ``intensity`` in the manifest. Scenes are not normalised to the unit
sphere and not FPS-ordered by default (FPS over ~120k points per frame is slow); ``--points N``
subsamples with a seeded random subset, or by FPS with ``--fps``. Estimated normals point towards the
sensor at the origin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datapipes.converters.base import Converter, ConvertOptions, Plan, RawCloud, Reject, WorkItem
from datapipes.converters.las import scene_info
from datapipes.converters.sources import check_file, make_key, require_dir
from datapipes.errors import UserError

RECORD_BYTES = 16
"""Bytes per point: four float32 values."""


class Kitti(Converter):
    """KITTI velodyne ``.bin`` frames."""

    name = "kitti"
    summary = "KITTI velodyne .bin frames (float32 x,y,z,intensity), searched recursively under SRC"
    default_normalize = False
    default_fps = False
    orientation = "viewpoint"
    render_source = None  # scenes: no object views

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Lists every ``.bin`` frame under SRC."""
        require_dir(src, "a folder of KITTI velodyne .bin frames")
        splits: dict[str, list[WorkItem]] = {}
        for path in sorted(src.rglob("*.bin")):
            rel = path.relative_to(src)
            split = "test" if "testing" in rel.parts else "train"
            parts = [p for p in rel.with_suffix("").parts if p != "velodyne"]
            key = make_key(*parts)
            splits.setdefault(split, []).append(WorkItem(key, split, rel.as_posix(), str(path)))
        if not splits:
            raise UserError(f"{src}: no .bin frames found")
        info = scene_info(options, "sensor (Velodyne: x forward, y left, z up)")
        return Plan(splits=splits, classes=[], channels={"feat": ("intensity",)}, info=info)

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Reads one frame."""
        size = check_file(Path(item.path))
        if size % RECORD_BYTES:
            raise Reject(
                f"truncated file: {size} bytes is not a multiple of {RECORD_BYTES} "
                "(float32 x, y, z, intensity records)"
            )
        records = np.fromfile(item.path, dtype="<f4").reshape(-1, 4)
        return RawCloud(xyz=records[:, :3], feat=records[:, 3:4])
