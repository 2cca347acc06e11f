"""Slow, obviously correct references for the geometric ops: Python loops over points.

``simulate_pointnet2_fps`` replays pointnet2_ops' FPS CUDA kernel thread by thread, reduction step by
reduction step, in float32.
"""

from __future__ import annotations

import math

import numpy as np


def slow_fps(points: np.ndarray, num_samples: int, start: int = 0) -> list[int]:
    """Textbook FPS over one cloud with Python loops; arithmetic in the array's dtype, first maximum wins."""
    n, channels = points.shape
    running = [math.inf] * n
    chosen = [start]
    for _ in range(num_samples - 1):
        center = points[chosen[-1]]
        best, besti = -math.inf, -1
        for k in range(n):
            d = (points[k, 0] - center[0]) * (points[k, 0] - center[0])
            for c in range(1, channels):
                d = d + (points[k, c] - center[c]) * (points[k, c] - center[c])
            running[k] = min(running[k], d)
            if running[k] > best:
                best, besti = running[k], k
        chosen.append(besti)
    return chosen


def kernel_threads(n: int) -> int:
    """``opt_n_threads`` of pointnet2_ops, written as in its C++ source."""
    pow_2 = int(math.log(float(n)) / math.log(2.0))
    return max(min(1 << pow_2, 512), 1)


def simulate_pointnet2_fps(points: np.ndarray, m: int) -> list[int]:
    """Step-by-step simulation of pointnet2_ops' ``furthest_point_sampling_kernel`` for one cloud.

    Every thread of the block scans its strided share of the points and keeps its first strict maximum;
    then the shared-memory reduction merges slot ``tid`` with ``tid + s`` for s = 256, ..., 1 (only the
    steps with ``block_size >= 2 * s``), keeping ``tid`` unless ``v2 > v1``.
    """
    pts = points.astype(np.float32)
    n = len(pts)
    block_size = kernel_threads(n)
    temp = [np.float32(1e10)] * n
    idxs = [0]
    old = 0
    for _ in range(1, m):
        x1, y1, z1 = pts[old]
        dists = [np.float32(-1)] * block_size
        dists_i = [0] * block_size
        for tid in range(block_size):
            besti, best = 0, np.float32(-1)
            for k in range(tid, n, block_size):
                x2, y2, z2 = pts[k]
                mag = (x2 * x2) + (y2 * y2) + (z2 * z2)
                if float(mag) <= 1e-3:
                    continue
                d = (x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1) + (z2 - z1) * (z2 - z1)
                d2 = min(d, temp[k])
                temp[k] = d2
                besti = k if d2 > best else besti
                best = d2 if d2 > best else best
            dists[tid], dists_i[tid] = best, besti
        s = 256
        while s >= 1:
            if block_size >= 2 * s:
                for tid in range(s):
                    v1, v2 = dists[tid], dists[tid + s]
                    i1, i2 = dists_i[tid], dists_i[tid + s]
                    dists[tid] = max(v1, v2)
                    dists_i[tid] = i2 if v2 > v1 else i1
            s //= 2
        old = dists_i[0]
        idxs.append(old)
    return idxs


def lattice_cloud(seed: int, n: int) -> np.ndarray:
    """Points on a half-integer lattice (exact float32 arithmetic, many exact ties), with duplicates,
    the origin and a few near-origin points, shuffled."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(-2, 2.5, 0.5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pts = grid[rng.choice(len(grid), n - 4, replace=False)]
    extra = np.array([[0, 0, 0], [0.01, 0.0, 0.02], pts[0], pts[1]])
    pts = np.concatenate([pts, extra])
    return rng.permutation(pts).astype(np.float32)


def sphere_cloud(seed: int, n: int, near_origin: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = rng.standard_normal((n, 3))
    pts /= np.abs(pts).max()
    pts[rng.choice(n, near_origin, replace=False)] *= 0.02  # inside the 1e-3 squared-norm ball
    return pts.astype(np.float32)


def slow_sqdist(p: np.ndarray, q: np.ndarray) -> np.generic:
    """Squared distance in the arrays' dtype, channel by channel in order."""
    d = (p[0] - q[0]) * (p[0] - q[0])
    for c in range(1, len(p)):
        d = d + (p[c] - q[c]) * (p[c] - q[c])
    return d


def slow_knn(query: np.ndarray, ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort every reference point by (squared distance, index), keep k, square-root the distances."""
    batch, num_query, _ = query.shape
    dist = np.zeros((batch, num_query, k), dtype=query.dtype)
    idx = np.zeros((batch, num_query, k), dtype=np.int64)
    for b in range(batch):
        for i in range(num_query):
            pairs = sorted((slow_sqdist(query[b, i], ref[b, j]), j) for j in range(ref.shape[1]))[:k]
            dist[b, i] = [math.sqrt(d) for d, _ in pairs]
            idx[b, i] = [j for _, j in pairs]
    return dist, idx
