"""Tiny shard folders for the data-layer tests (written into tmp_path)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.shards import ShardSetWriter
from datapipes.types import Sample


def make_samples(
    start: int, count: int, *, points: int = 48, classes: int = 3, seed: int = 0
) -> list[Sample]:
    samples: list[Sample] = []
    for k in range(start, start + count):
        rng = np.random.default_rng([seed, k])
        xyz = rng.normal(size=(points, 3)).astype(np.float32)
        normal = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
        samples.append(
            {
                "key": f"s{k:05d}",
                "xyz": xyz,
                "normal": normal.astype(np.float32),
                "label": k % classes,
                "meta": {"index": k, "source": f"src/{k}.npy"},
            }
        )
    return samples


def write_tiny(
    root: Path,
    *,
    shards: dict[str, int] | None = None,
    per_shard: int = 16,
    points: int = 48,
    classes: int = 3,
    fps_ordered: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes ``shards`` (split -> count) of ``per_shard`` samples each and returns the manifest."""
    shards = shards or {"train": 4, "test": 1}
    writer = ShardSetWriter(root, options=options or {"format": "tiny", "points": points})
    k = 0
    for split, n in shards.items():
        for i in range(n):
            writer.write_shard(split, i, make_samples(k, per_shard, points=points, classes=classes), [])
            k += per_shard
    names = [f"c{i}" for i in range(classes)]
    return writer.finalize(num_shards=shards, classes=names, fps_ordered=fps_ordered)


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these members (for crafting bad shards)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def member_offsets(path: Path) -> list[int]:
    """Byte offsets of the tar headers of a shard's members, then of its end-of-archive blocks."""
    data = path.read_bytes()
    offsets, pos = [], 0
    while data[pos : pos + 512] != bytes(512):
        offsets.append(pos)
        size = int(data[pos + 124 : pos + 136].split(b"\0", 1)[0].strip() or b"0", 8)
        pos += 512 + size + (-size % 512)
    return [*offsets, pos]


def truncate_at_member(path: Path, index: int) -> None:
    """Cuts a shard exactly before the header of member ``index`` (a tar header boundary)."""
    cut = member_offsets(path)[index]
    path.write_bytes(path.read_bytes()[:cut])
