"""Per-cloud normal estimation of the converters: pcpt's scipy orientation vs open3d's, in one run.

Prints one JSON document to stdout. For each cloud size in ``--points`` (noisy tori, spheres and boxes,
``--clouds`` of them, built before timing) it reports the median and minimum time per cloud of

* ``open3d_consistent``: the previous ``estimate_normals_curvature(orient="consistent")``: open3d kNN
  covariances, numpy ``eigh``, open3d's ``orient_normals_consistent_tangent_plane`` and the global flip;
* ``pcpt_consistent``: :func:`datapipes.mesh.estimate_normals_curvature` with ``orient="consistent"``
  (scipy kNN, batched covariances, ``eigh``, scipy minimum spanning forest and sign propagation);
* ``pcpt_outward``: the same with ``orient="outward"`` (open3d covariances, no graph);

plus the speed-up of pcpt over open3d and, per method, the fraction of points whose normal points to the
same side as the true surface normal (``agree_truth``). Both consistent methods are timed alternately
within each repetition, after one warm-up call, so that a load change on a shared machine hits them alike.

``--threads`` sets ``OMP_NUM_THREADS`` for open3d (read when it is first imported; the default 1
measures one converter worker).

Run: ``python benchmarks/bench_normals.py --points 2048 8192 --clouds 8 --repeats 3 --k 16``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, nargs="+", default=[2048, 8192], help="points per cloud")
    parser.add_argument("--clouds", type=int, default=6, help="clouds per size (default 6)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the clouds (default 3)")
    parser.add_argument("--k", type=int, default=16, help="neighbourhood size (default 16, as pcpt-data)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_cloud(rng: np.random.Generator, n: int, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy closed surface: ``(points, true outward normals)``, both ``(n, 3)`` float64."""
    if kind == 0:  # torus
        u, v = rng.uniform(0, 2 * np.pi, (2, n))
        normal = np.c_[np.cos(v) * np.cos(u), np.cos(v) * np.sin(u), np.sin(v)]
        pts = np.c_[np.cos(u), np.sin(u), np.zeros(n)] + 0.35 * normal
    elif kind == 1:  # sphere
        normal = rng.normal(size=(n, 3))
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        pts = normal.copy()
    else:  # box
        size = np.array([1.0, 0.7, 0.5])
        face = rng.integers(0, 6, n)
        axis, side = face % 3, np.where(face < 3, 1.0, -1.0)
        pts = rng.uniform(-1, 1, (n, 3)) * size
        pts[np.arange(n), axis] = side * size[axis]
        normal = np.zeros((n, 3))
        normal[np.arange(n), axis] = side
    return pts + rng.normal(scale=0.002, size=pts.shape), normal


def open3d_consistent(pts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The previous implementation of ``estimate_normals_curvature(orient="consistent")``."""
    import open3d as o3d

    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    pcd.estimate_covariances(o3d.geometry.KDTreeSearchParamKNN(knn=k))
    eigval, eigvec = np.linalg.eigh(np.asarray(pcd.covariances))
    total = eigval.sum(axis=1)
    curv = np.divide(np.clip(eigval[:, 0], 0.0, None), total, out=np.zeros(len(pts)), where=total > 1e-300)
    pcd.normals = o3d.utility.Vector3dVector(eigvec[:, :, 0])
    pcd.orient_normals_consistent_tangent_plane(k)
    normal = np.asarray(pcd.normals)
    if float(np.einsum("ij,ij->", normal, pts - pts.mean(axis=0))) < 0.0:
        normal = -normal
    return normal.astype(np.float32), curv.astype(np.float32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import open3d as o3d

    from datapipes.mesh import estimate_normals_curvature

    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    methods: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
        "open3d_consistent": lambda p: open3d_consistent(p, args.k),
        "pcpt_consistent": lambda p: estimate_normals_curvature(p, k=args.k, orient="consistent"),
        "pcpt_outward": lambda p: estimate_normals_curvature(p, k=args.k, orient="outward"),
    }
    rng = np.random.default_rng(args.seed)
    cases = []
    for n in args.points:
        clouds = [make_cloud(rng, n, i % 3) for i in range(args.clouds)]
        times: dict[str, list[float]] = {m: [] for m in methods}
        agree: dict[str, list[float]] = {m: [] for m in methods}
        for name, fn in methods.items():  # warm-up (imports) and orientation quality
            for pts, truth in clouds:
                agree[name].append(float(np.mean(np.sum(fn(pts)[0] * truth, axis=1) > 0)))
        for _ in range(args.repeats):
            for pts, _truth in clouds:
                for name, fn in methods.items():
                    start = time.perf_counter()
                    fn(pts)
                    times[name].append(time.perf_counter() - start)
        result = {
            m: {
                "median_ms": 1e3 * statistics.median(t),
                "min_ms": 1e3 * min(t),
                "agree_truth": min(agree[m]),
            }
            for m, t in times.items()
        }
        speedup = result["open3d_consistent"]["median_ms"] / result["pcpt_consistent"]["median_ms"]
        cases.append({"points": n, "clouds": args.clouds, "methods": result, "speedup_consistent": speedup})
    report = {
        "benchmark": "normals",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "open3d": o3d.__version__,
        "threads": args.threads,
        "k": args.k,
        "repeats": args.repeats,
        "cases": cases,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
