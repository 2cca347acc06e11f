"""Tiny labelled shard sets of separable shapes for the evaluation-command tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datapipes.shards import ShardSetWriter

SHAPES = ["sphere", "disc", "line", "cube"]


def shape_cloud(label: int, rng: np.random.Generator, points: int) -> np.ndarray:
    """A unit-sphere-normalised cloud (points, 3) of shape ``SHAPES[label]``."""
    p = rng.normal(size=(points, 3))
    if label == 0:
        p /= np.linalg.norm(p, axis=1, keepdims=True)
    elif label == 1:
        p[:, 2] *= 0.01
    elif label == 2:
        p = np.outer(rng.uniform(-1, 1, points), [1.0, 0.2, 0.0]) + 0.01 * p
    else:
        p = rng.uniform(-1, 1, size=(points, 3))
    p -= p.mean(axis=0)
    return (p / np.linalg.norm(p, axis=1).max()).astype(np.float32)


def write_shape_shards(
    out: Path, num_classes: int, per_class: dict[str, int], points: int, rng: np.random.Generator
) -> Path:
    """One shard per split with ``per_class[split]`` clouds of each of the first ``num_classes`` shapes."""
    writer = ShardSetWriter(out, options={"format": "test", "normalization": "unit_sphere"})
    for split, count in per_class.items():
        samples = [
            {"key": f"{split}_{c}_{i:02d}", "xyz": shape_cloud(c, rng, points), "label": c}
            for c in range(num_classes)
            for i in range(count)
        ]
        writer.write_shard(split, 0, samples, [])  # type: ignore[arg-type]
    writer.finalize(num_shards=dict.fromkeys(per_class, 1), classes=SHAPES[:num_classes], fps_ordered=True)
    return out
