"""Small synthetic LiDAR scans written as real LAS/LAZ files (laspy), for the scene tests."""

from __future__ import annotations

from pathlib import Path

import laspy
import numpy as np


def synthetic_scan(rng: np.random.Generator, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """A street-like scan in the sensor frame: ground plane at z = -1.7 m, two walls and a box.

    Returns:
        (xyz (N, 3) float64 metres within +-6 m, intensity (N,) uint16).
    """
    parts = []
    n = num_points // 4
    ground = np.column_stack([rng.uniform(-6, 6, (n, 2)), np.full(n, -1.7)])
    wall_a = np.column_stack([rng.uniform(-6, 6, n), np.full(n, 4.5), rng.uniform(-1.7, 1.0, n)])
    wall_b = np.column_stack([np.full(n, -5.0), rng.uniform(-4, 4, n), rng.uniform(-1.7, 1.0, n)])
    rest = num_points - 3 * n
    box = rng.uniform([1.0, -2.0, -1.7], [3.0, -1.0, -0.3], (rest, 3))
    parts = [ground, wall_a, wall_b, box]
    xyz = np.concatenate(parts) + rng.normal(0, 0.01, (num_points, 3))
    intensity = rng.integers(0, 65535, num_points).astype(np.uint16)
    return xyz, intensity


def write_las_scans(
    folder: Path, count: int, *, points: int = 1500, seed: int = 0, laz: bool = False
) -> list[Path]:
    """Writes ``count`` synthetic scans as LAS 1.2 point format 1 (with GPS time), 1 cm quantisation.

    Scan ``i`` has ``points * (i + 1)`` points, so batches mix very different pillar counts.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        xyz, intensity = synthetic_scan(rng, points * (i + 1))
        header = laspy.LasHeader(point_format=1, version="1.2")
        header.scales = np.array([0.01, 0.01, 0.01])
        header.offsets = np.zeros(3)
        las = laspy.LasData(header)
        las.x, las.y, las.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        las.intensity = intensity
        las.gps_time = 1000.0 + i * 0.1 + np.linspace(0, 0.1, len(xyz))
        path = folder / f"{i:06d}.{'laz' if laz else 'las'}"
        las.write(path)
        paths.append(path)
    return paths
