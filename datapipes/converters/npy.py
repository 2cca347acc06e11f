"""Point arrays stored as ``.npy`` files: ``npy-tree`` (class/split folders) and ``shapenet55``."""

from __future__ import annotations

import os
from pathlib import Path

from datapipes.converters.base import Converter, ConvertOptions, Plan, RawCloud, WorkItem
from datapipes.converters.sources import (
    as_points,
    class_split_items,
    first_has_normals,
    load_npy,
    make_key,
    require_dir,
)
from datapipes.errors import UserError


class NpyTree(Converter):
    """``<class>/{train,test}/*.npy`` float arrays ``(N, 3)`` or ``(N, 6)`` (xyz + normals).

    Labels are class indices in sorted class-folder order. All points are kept unless ``--points`` is given.
    ``--render-views`` splats the points with z up (the ModelNet40 clouds this layout usually holds stand
    on z; ``--render-up`` for others).
    """

    name = "npy-tree"
    summary = "<class>/{train,test}/*.npy point arrays (N,3) or (N,6) xyz+normals"
    render_up = "z"

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Lists the ``.npy`` files per split and class."""
        require_dir(src, "a folder of <class>/{train,test}/*.npy")
        splits, classes = class_split_items(src, (".npy",), seed=options.seed)
        first = [item for split in sorted(splits) for item in splits[split]]
        return Plan(splits=splits, classes=classes, source_normals=first_has_normals(first))

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Loads one array (no pickle)."""
        xyz, normal = as_points(load_npy(Path(item.path)))
        return RawCloud(xyz=xyz, normal=normal)


_SHAPENET_LISTS_HELP = (
    "ShapeNet-55 split lists train.txt and test.txt not found in {where}. They are not part of the "
    "ShapeNet55 data download: take them from the Point-BERT repository "
    "(data/ShapeNet55-34/ShapeNet-55/train.txt and test.txt, 41,952 and 10,518 lines) and put them in "
    "SRC/ShapeNet-55/ (or next to shapenet_pc/)"
)


def _find_shapenet(src: Path) -> tuple[Path, Path]:
    """Returns ``(point folder, list folder)`` for a ShapeNet-55 root or its ``shapenet_pc`` folder."""
    require_dir(src, "a ShapeNet55-34 folder with shapenet_pc/ and ShapeNet-55/{train,test}.txt")
    pc_dir = src / "shapenet_pc" if (src / "shapenet_pc").is_dir() else src
    candidates = [src / "ShapeNet-55", src, pc_dir.parent / "ShapeNet-55", pc_dir.parent]
    for folder in candidates:
        if (folder / "train.txt").is_file() and (folder / "test.txt").is_file():
            return pc_dir, folder
    where = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise UserError(_SHAPENET_LISTS_HELP.format(where=where))


class ShapeNet55(Converter):
    """ShapeNet-55 as released with Point-BERT: ``shapenet_pc/<synset>-<model>.npy`` (8192, 3) + split lists.

    The label is the index of the synset among the sorted synsets named in the lists; class names are the
    synset ids. Files named in a list but missing are rejected.
    """

    name = "shapenet55"
    summary = "shapenet_pc/<synset>-<model>.npy + ShapeNet-55/{train,test}.txt"

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Reads the split lists and maps each entry to its point file."""
        pc_dir, list_dir = _find_shapenet(src)
        entries: dict[str, list[str]] = {}
        for split in ("train", "test"):
            lines = os.fsdecode((list_dir / f"{split}.txt").read_bytes()).split()  # names, as file names
            entries[split] = sorted(dict.fromkeys(ln.strip() for ln in lines if ln.strip()))
        synsets = sorted({e.split("-", 1)[0] for names in entries.values() for e in names})
        index = {s: i for i, s in enumerate(synsets)}
        splits: dict[str, list[WorkItem]] = {}
        for split, names in entries.items():
            items = []
            for entry in names:
                synset = entry.split("-", 1)[0]
                path = pc_dir / entry
                items.append(
                    WorkItem(
                        key=make_key(Path(entry).stem),
                        split=split,
                        source=path.relative_to(src).as_posix() if path.is_relative_to(src) else entry,
                        path=str(path),
                        label=index[synset],
                        class_name=synset,
                    )
                )
            splits[split] = items
        first = [item for split in sorted(splits) for item in splits[split]]
        return Plan(
            splits=splits,
            classes=synsets,
            source_normals=first_has_normals(first),
            info={"lists": str(list_dir)},
        )

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Loads one ``(8192, 3)`` array."""
        xyz, normal = as_points(load_npy(Path(item.path)))
        return RawCloud(xyz=xyz, normal=normal)
