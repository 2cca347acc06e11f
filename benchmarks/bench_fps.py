"""Farthest point sampling on CPU: pcpt vs open3d's C++ vs a naive per-cloud torch loop.

Prints one JSON document to stdout. For each case (batch of B clouds, N -> S points) it reports the time per
cloud of

* ``pcpt``: ``pretrain.ops.farthest_point_sample`` on the whole float32 batch (default mode), and
  ``pcpt_parity`` with ``skip_near_origin=True`` (pointnet2_ops parity);
* ``open3d``: ``PointCloud.farthest_point_down_sample(S)``, one cloud at a time (float64, as open3d stores
  points; the clouds are built before timing). In open3d 0.20 this loop runs on one thread whatever
  ``--threads`` says;
* ``naive``: a plain per-cloud torch loop (distance, minimum, ``argmax`` with a host sync per step), timed on
  the first ``--naive-clouds`` clouds;

plus the speed ratios and an ``exact`` flag: pcpt (on the float64 clouds, start 0) selects the same set as
open3d for every cloud (open3d returns the chosen points in index order), and pcpt's float32 indices equal
the naive loop's, in order.

Run: ``python benchmarks/bench_fps.py --repeats 5 --threads 2``. The timing is the median over repeats
(``min`` also reported) after one warm-up call; the methods alternate within each repetition so that a
load change on a shared machine hits all of them alike.
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
from pathlib import Path
from typing import Any

CASES = ((32, 1024, 64), (32, 8192, 1024))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per method (default 5)")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch intra-op threads, also exported as OMP_NUM_THREADS (default 2)",
    )
    parser.add_argument(
        "--naive-clouds", type=int, default=4, help="clouds timed for the naive loop (default 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random clouds (default 0)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.naive_clouds < 1:
        parser.error("--repeats, --threads and --naive-clouds must be >= 1")
    return args


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall-clock seconds of every function over ``repeats`` rounds, after one warm-up call each.

    The functions alternate within each round, so a load change on a shared machine affects all of them.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            begin = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - begin)
    return times


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(
        args.threads
    )  # for any OpenMP code in open3d; set before importing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import numpy as np
    import open3d as o3d
    import torch

    from pretrain.ops import farthest_point_sample

    torch.set_num_threads(args.threads)

    def naive_fps(cloud: torch.Tensor, num_samples: int) -> torch.Tensor:
        idx = torch.zeros(num_samples, dtype=torch.long)
        min_sqdist = torch.full((cloud.shape[0],), float("inf"))
        current = 0
        for i in range(num_samples):
            idx[i] = current
            min_sqdist = torch.minimum(min_sqdist, ((cloud - cloud[current]) ** 2).sum(-1))
            current = int(torch.argmax(min_sqdist))
        return idx

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    results: list[dict[str, Any]] = []
    for batch, num_points, num_samples in CASES:
        clouds64 = rng.standard_normal((batch, num_points, 3))
        clouds64 /= np.linalg.norm(clouds64, axis=-1).max(axis=1)[:, None, None]  # unit sphere
        xyz = torch.from_numpy(clouds64).float()
        o3d_clouds = [o3d.geometry.PointCloud(o3d.utility.Vector3dVector(c)) for c in clouds64]

        few = xyz[: args.naive_clouds]
        times = timed(
            {
                "pcpt": lambda: farthest_point_sample(xyz, num_samples),  # noqa: B023
                "pcpt_parity": lambda: farthest_point_sample(xyz, num_samples, skip_near_origin=True),  # noqa: B023
                "open3d": lambda: [c.farthest_point_down_sample(num_samples) for c in o3d_clouds],  # noqa: B023
                "naive": lambda: [naive_fps(c, num_samples) for c in few],  # noqa: B023
            },
            args.repeats,
        )
        clouds = {"pcpt": batch, "pcpt_parity": batch, "open3d": batch, "naive": len(few)}

        idx64 = farthest_point_sample(torch.from_numpy(clouds64), num_samples).numpy()
        same_as_open3d = all(
            np.array_equal(
                np.asarray(c.farthest_point_down_sample(num_samples).points), clouds64[b][np.sort(i)]
            )
            for b, (c, i) in enumerate(zip(o3d_clouds, idx64))
        )
        idx32 = farthest_point_sample(few, num_samples)
        same_as_naive = all(torch.equal(naive_fps(c, num_samples), i) for c, i in zip(few, idx32))

        per_cloud = {name: statistics.median(t) / clouds[name] for name, t in times.items()}
        best = {name: min(t) / clouds[name] for name, t in times.items()}
        results.append(
            {
                "batch": batch,
                "num_points": num_points,
                "num_samples": num_samples,
                "ms_per_cloud": {k: round(v * 1e3, 4) for k, v in per_cloud.items()},
                "ms_per_cloud_min": {k: round(v * 1e3, 4) for k, v in best.items()},
                "speedup_vs_open3d": round(per_cloud["open3d"] / per_cloud["pcpt"], 3),
                "speedup_vs_naive": round(per_cloud["naive"] / per_cloud["pcpt"], 3),
                "naive_vs_open3d": round(per_cloud["naive"] / per_cloud["open3d"], 3),
                "exact_vs_open3d": same_as_open3d,
                "exact_vs_naive": same_as_naive,
                "exact": same_as_open3d and same_as_naive,
            }
        )

    report = {
        "benchmark": "farthest_point_sample (CPU)",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_fps.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open3d": o3d.__version__,
            "numpy": np.__version__,
        },
        "results": results,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
