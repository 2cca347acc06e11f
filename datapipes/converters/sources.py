"""Helpers for walking source trees and reading plain point files (shared by several formats)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.converters.base import Reject, WorkItem, item_rng
from datapipes.errors import UserError
from datapipes.shards.codecs import read_npy_header

SPLITS = ("train", "test")


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(*parts: str) -> str:
    """Joins parts into a shard-safe key: anything but letters, digits, ``_`` and ``-`` becomes ``_``.

    Args:
        parts: key components, joined with ``_``.

    Returns:
        The key (never empty).
    """
    key = "_".join(_KEY_UNSAFE.sub("_", p).strip("_") for p in parts if p)
    return key or "_"


def as_points(array: Any, what: str = "points") -> tuple[np.ndarray, np.ndarray | None]:
    """Splits an ``(N, 3)`` or ``(N, 6)`` (xyz + normals) array into xyz and normals.

    Args:
        array: the loaded array.
        what: name used in the rejection reason.

    Returns:
        ``(xyz, normal or None)``.

    Raises:
        Reject: not a 2-D numeric array with 3 or 6 columns.
    """
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiu":
        raise Reject(f"wrong array dtype {arr.dtype}: expected numeric {what}")
    if arr.ndim != 2 or arr.shape[1] not in (3, 6):
        raise Reject(f"wrong array shape {tuple(arr.shape)}: expected (N, 3) or (N, 6) {what}")
    if arr.shape[1] == 6:
        return arr[:, :3], arr[:, 3:6]
    return arr, None


def require_dir(src: Path, what: str) -> Path:
    """Checks that ``src`` is a directory.

    Raises:
        UserError: it does not exist or is not a directory.
    """
    if not src.exists():
        raise UserError(f"{src}: no such file or directory ({what} expected)")
    if not src.is_dir():
        raise UserError(f"{src}: not a directory ({what} expected)")
    return src


def check_file(path: Path) -> int:
    """Returns the file size; rejects missing and zero-byte files.

    Raises:
        Reject: the file is missing or empty.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise Reject("missing file") from None
    if size == 0:
        raise Reject("empty file (0 bytes)")
    return size


def npy_shape(path: Path) -> tuple[int, ...] | None:
    """The array shape in a ``.npy`` header, or ``None`` when the file is missing or not ``.npy``."""
    try:
        with path.open("rb") as fh:
            return tuple(read_npy_header(fh)[0])
    except Exception:  # a probe: any unreadable header means "not a usable .npy" (read() gives the reason)
        return None


def load_npy(path: Path) -> np.ndarray:
    """Loads a ``.npy`` array with NumPy's reader, never unpickling, with precise reasons for bad files.

    Args:
        path: the file.

    Returns:
        The array.

    Raises:
        Reject: missing, empty, not ``.npy``, object dtype, or truncated.
    """
    size = check_file(path)
    with path.open("rb") as fh:
        try:
            shape, _, dtype = read_npy_header(fh)
        except (ValueError, EOFError, SyntaxError, TypeError, KeyError) as err:  # header is a Python literal
            raise Reject(f"not a .npy file ({type(err).__name__}: {err})") from None
        if dtype.hasobject:
            raise Reject("object (pickled) .npy arrays are refused")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        available = size - fh.tell()
        if available < expected:
            raise Reject(
                f"truncated .npy file: header says {shape} {dtype} ({expected} bytes), {available} present"
            )
        fh.seek(0)
        return np.lib.format.read_array(fh, allow_pickle=False)


def first_has_normals(items: Sequence[WorkItem]) -> bool:
    """Whether the first readable ``.npy`` among ``items`` (sorted order) has 6 columns (xyz + normals)."""
    for item in items:
        shape = npy_shape(Path(item.path))
        if shape is not None and len(shape) == 2:
            return shape[1] == 6
    return False


def class_dirs(src: Path) -> list[str]:
    """Sorted names of the sub-directories of ``src`` (hidden ones skipped)."""
    return sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))


def object_key(class_name: str, stem: str) -> str:
    """The key of an object file: its stem when it already starts with ``<class>_`` (ModelNet), else both."""
    if stem.startswith(f"{class_name}_"):
        return make_key(stem)
    return make_key(class_name, stem)


def class_split_items(
    src: Path, suffixes: Sequence[str], *, test_fraction: float = 0.0, seed: int = 0
) -> tuple[dict[str, list[WorkItem]], list[str]]:
    """Lists ``<class>/{train,test}/*<suffix>`` files, or ``<class>/**/*<suffix>`` with a seeded split.

    When any class folder has a ``train`` or ``test`` sub-folder, those decide the split (files elsewhere are
    ignored). Otherwise every file under a class folder goes to ``train``, except a seeded
    ``test_fraction`` of each class, which goes to ``test``.

    Args:
        src: the root with one folder per class.
        suffixes: accepted file suffixes (lower case, with the dot).
        test_fraction: fraction of each class sent to ``test`` when there are no split folders.
        seed: seed of that split.

    Returns:
        ``(splits, classes)``: items per split sorted by (class, path), and sorted class names.

    Raises:
        UserError: no class folders or no matching files.
    """
    classes = class_dirs(src)
    if not classes:
        raise UserError(f"{src}: no class folders (expected <class>/... with {', '.join(suffixes)} files)")
    has_split_dirs = any((src / c / s).is_dir() for c in classes for s in SPLITS)
    if has_split_dirs and test_fraction > 0:
        raise UserError(f"{src}: --test-fraction cannot be used when class folders have train/test folders")
    splits: dict[str, list[WorkItem]] = {s: [] for s in SPLITS}

    def files_under(folder: Path) -> list[Path]:
        return sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
        )

    for label, name in enumerate(classes):
        if has_split_dirs:
            per_split = {s: files_under(src / name / s) if (src / name / s).is_dir() else [] for s in SPLITS}
        else:
            files = files_under(src / name)
            n_test = round(test_fraction * len(files))
            test_idx = set(item_rng(seed, f"__test_split__/{name}").permutation(len(files))[:n_test].tolist())
            per_split = {
                "train": [f for i, f in enumerate(files) if i not in test_idx],
                "test": [f for i, f in enumerate(files) if i in test_idx],
            }
        for split, files in per_split.items():
            for f in files:
                rel = f.relative_to(src)
                stem_parts = rel.relative_to(name).with_suffix("").parts
                if has_split_dirs:
                    stem_parts = stem_parts[1:]
                splits[split].append(
                    WorkItem(
                        key=object_key(name, "_".join(stem_parts)),
                        split=split,
                        source=rel.as_posix(),
                        path=str(f),
                        label=label,
                        class_name=name,
                    )
                )
    splits = {s: items for s, items in splits.items() if items}
    if not splits:
        raise UserError(f"{src}: no {'/'.join(suffixes)} files under the class folders")
    return splits, classes
