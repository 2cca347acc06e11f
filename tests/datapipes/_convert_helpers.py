"""Helpers shared by the converter tests: run the CLI in-process, read shards back, slow references."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.converters.cli import add_convert_parser
from datapipes.dedup import add_dedup_parser
from datapipes.errors import run_cli
from datapipes.shards import iter_shard_samples, read_manifest, shard_paths


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="pcpt-data")
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(sub)
    add_dedup_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def cli_main(argv: Sequence[str]) -> int:
    """``pcpt-data`` with only the convert and dedup commands (exit status like the real one)."""
    return run_cli("pcpt-data", _main, list(argv))


def convert_cli(fmt: str, src: Path | str, out: Path, *extra: str) -> int:
    return cli_main(["convert", fmt, str(src), str(out), "--quiet", *extra])


def read_split(out: Path, split: str) -> dict[str, dict[str, Any]]:
    manifest = read_manifest(out)
    samples: dict[str, dict[str, Any]] = {}
    for path in shard_paths(out, split, manifest):
        for sample in iter_shard_samples(path):
            assert sample["key"] not in samples
            samples[sample["key"]] = sample
    return samples


def read_rejected(out: Path) -> list[dict[str, str]]:
    path = out / "rejected.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rejected_by_source(out: Path) -> dict[str, str]:
    return {r["source"]: r["reason"] for r in read_rejected(out)}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def naive_fps(xyz: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Textbook farthest point sampling (float64 distances, ties to the lowest index)."""
    pts = np.asarray(xyz, dtype=np.float64)
    chosen = [start]
    dist = np.full(len(pts), np.inf)
    for _ in range(n - 1):
        dist = np.minimum(dist, ((pts - pts[chosen[-1]]) ** 2).sum(axis=1))
        dist[chosen] = -1.0
        chosen.append(int(np.argmax(dist)))
    return np.array(chosen)


def unit_sphere(xyz: np.ndarray) -> np.ndarray:
    pts = np.asarray(xyz, dtype=np.float64)
    centred = pts - pts.mean(axis=0)
    return centred / np.linalg.norm(centred, axis=1).max()


def sorted_rows(xyz: np.ndarray) -> np.ndarray:
    arr = np.asarray(xyz, dtype=np.float64)
    return arr[np.lexsort(arr.T[::-1])]


def write_mesh_tree(src: Path, *, train: int, test: int) -> Path:
    """A ModelNet-like ``<class>/{train,test}/*.off`` tree of three open3d shapes plus one broken file."""
    import open3d as o3d

    shapes = {
        "box": o3d.geometry.TriangleMesh.create_box(1.0, 2.0, 0.5),
        "ball": o3d.geometry.TriangleMesh.create_sphere(resolution=6),
        "cone": o3d.geometry.TriangleMesh.create_cone(),
    }
    for c, mesh in shapes.items():
        for split, count in (("train", train), ("test", test)):
            (src / c / split).mkdir(parents=True)
            for i in range(count):
                mesh.scale(1.1, center=(0, 0, 0))
                assert o3d.io.write_triangle_mesh(str(src / c / split / f"{c}_{split}{i}.off"), mesh)
    (src / "box" / "train" / "box_broken.off").write_text("OFF\n8 12 0\n")
    return src
