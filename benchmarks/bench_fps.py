"""Farthest point sampling on CPU: pcpt's numba and torch backends vs open3d's C++ vs a naive torch loop.

Prints one JSON document to stdout. For each thread count in ``--threads`` and each case (batch of B clouds,
N -> S points) it reports the time per cloud of

* ``pcpt_numba`` / ``pcpt_torch``: ``pretrain.ops.farthest_point_sample`` on the whole float32 batch
  (default mode) with the numba kernels (the CPU default) and with the pure torch loop
  (``PCPT_DISABLE_NUMBA=1``); ``pcpt_numba_parity`` / ``pcpt_torch_parity`` the same with
  ``skip_near_origin=True`` (pointnet2_ops parity);
* ``open3d``: ``PointCloud.farthest_point_down_sample(S)``, one cloud at a time (float64, as open3d stores
  points; the clouds are built before timing). In open3d 0.20 this loop runs on one thread whatever
  ``--threads`` says;
* ``naive``: a plain per-cloud torch loop (distance, minimum, ``argmax`` with a host sync per step), timed on
  the first ``--naive-clouds`` clouds;

plus speed ratios and exactness flags: both pcpt backends give identical indices in both modes; pcpt (on the
float64 clouds, start 0) selects the same set as open3d for every cloud (open3d returns the chosen points in
index order); pcpt's float32 indices equal the naive loop's, in order.

``--threads`` sets torch's intra-op threads, which the numba backend also uses to share clouds among
threads. ``--load`` starts one CPU-bound busy-loop process for the whole run (and stops it at the end) to
measure robustness on a shared machine. ``first_call_s`` is the wall time of the very first numba call in
the process (compilation on a fresh install, loading the on-disk cache afterwards).

Run: ``python benchmarks/bench_fps.py --repeats 5 --threads 1 2`` and again with ``--load``. The timing
is the median over repeats (``min`` also reported) after one warm-up call; the methods alternate within each
repetition so that a load change on a shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CASES = ((32, 1024, 64), (32, 8192, 1024))
DISABLE_NUMBA_ENV = "PCPT_DISABLE_NUMBA"  # datapipes.fps_numba.DISABLE_NUMBA_ENV


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per method (default 5)")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch intra-op thread counts to measure, in one run (default: 1 2)",
    )
    parser.add_argument(
        "--naive-clouds", type=int, default=4, help="clouds timed for the naive loop (default 4)"
    )
    parser.add_argument(
        "--case",
        type=int,
        nargs=3,
        action="append",
        metavar=("B", "N", "S"),
        help="a case of B clouds of N points -> S samples (repeatable; default: 32 1024 64 and 32 8192 1024)",
    )
    parser.add_argument(
        "--load", action="store_true", help="run one CPU-bound busy-loop process alongside the benchmark"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random clouds (default 0)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.threads) < 1 or args.naive_clouds < 1:
        parser.error("--repeats, --threads and --naive-clouds must be >= 1")
    if args.case and any(b < 1 or not 1 <= s <= n for b, n, s in args.case):
        parser.error("--case needs B >= 1 and 1 <= S <= N")
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


def sig4(value: float) -> float:
    """``value`` to 4 significant digits: a small positive time or ratio never rounds to 0."""
    return float(f"{value:.4g}")


@contextmanager
def busy_process(enabled: bool) -> Iterator[int | None]:
    """Runs ``python -c 'while True: pass'`` for the duration of the block when enabled; yields its pid."""
    if not enabled:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # let it reach the scheduler before timing starts
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def numba_disabled() -> Iterator[None]:
    """Forces pcpt's torch FPS loop (the switch is read on every call)."""
    before = os.environ.get(DISABLE_NUMBA_ENV)
    os.environ[DISABLE_NUMBA_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[DISABLE_NUMBA_ENV]
        else:
            os.environ[DISABLE_NUMBA_ENV] = before


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(max(args.threads))  # for any OpenMP code; set before imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import numpy as np
    import open3d as o3d
    import torch
    from machine import machine_info

    from datapipes import fps_numba
    from pretrain.ops import farthest_point_sample
    from pretrain.ops.sampling import fps_backend

    if not fps_numba.numba_enabled():
        raise SystemExit(
            "bench_fps.py compares the numba backend: pip install numba (and unset PCPT_DISABLE_NUMBA)"
        )

    def torch_fps(xyz: torch.Tensor, num_samples: int, **kwargs: Any) -> torch.Tensor:
        with numba_disabled():
            assert fps_backend(xyz) == "torch"
            return farthest_point_sample(xyz, num_samples, **kwargs)

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
    cases = [tuple(c) for c in args.case] if args.case else list(CASES)
    results: list[dict[str, Any]] = []
    with busy_process(args.load) as busy_pid:
        begin = time.perf_counter()
        farthest_point_sample(torch.zeros(1, 8, 3), 2)  # the first numba call of the process
        first_call_s = time.perf_counter() - begin
        farthest_point_sample(torch.zeros(1, 8, 3, dtype=torch.float64), 2)  # compile/load float64 too
        for batch, num_points, num_samples in cases:
            clouds64 = rng.standard_normal((batch, num_points, 3))
            clouds64 /= np.linalg.norm(clouds64, axis=-1).max(axis=1)[:, None, None]  # unit sphere
            xyz = torch.from_numpy(clouds64).float()
            o3d_clouds = [o3d.geometry.PointCloud(o3d.utility.Vector3dVector(c)) for c in clouds64]
            few = xyz[: args.naive_clouds]

            # exactness, once per case
            same_backends = all(
                torch.equal(
                    farthest_point_sample(xyz, num_samples, skip_near_origin=p),
                    torch_fps(xyz, num_samples, skip_near_origin=p),
                )
                for p in (False, True)
            )
            idx64 = farthest_point_sample(torch.from_numpy(clouds64), num_samples).numpy()
            same_as_open3d = all(
                np.array_equal(
                    np.asarray(c.farthest_point_down_sample(num_samples).points), clouds64[b][np.sort(i)]
                )
                for b, (c, i) in enumerate(zip(o3d_clouds, idx64))
            )
            idx32 = farthest_point_sample(few, num_samples)
            same_as_naive = all(torch.equal(naive_fps(c, num_samples), i) for c, i in zip(few, idx32))

            for threads in args.threads:
                torch.set_num_threads(threads)
                times = timed(
                    {
                        "pcpt_numba": lambda: farthest_point_sample(xyz, num_samples),  # noqa: B023
                        "pcpt_torch": lambda: torch_fps(xyz, num_samples),  # noqa: B023
                        "pcpt_numba_parity": lambda: farthest_point_sample(
                            xyz,  # noqa: B023
                            num_samples,  # noqa: B023
                            skip_near_origin=True,
                        ),
                        "pcpt_torch_parity": lambda: torch_fps(xyz, num_samples, skip_near_origin=True),  # noqa: B023
                        "open3d": lambda: [c.farthest_point_down_sample(num_samples) for c in o3d_clouds],  # noqa: B023
                        "naive": lambda: [naive_fps(c, num_samples) for c in few],  # noqa: B023
                    },
                    args.repeats,
                )
                clouds = dict.fromkeys(times, batch) | {"naive": len(few)}
                per_cloud = {name: statistics.median(t) / clouds[name] for name, t in times.items()}
                best = {name: min(t) / clouds[name] for name, t in times.items()}
                results.append(
                    {
                        "threads": threads,
                        "batch": batch,
                        "num_points": num_points,
                        "num_samples": num_samples,
                        "ms_per_cloud": {k: sig4(v * 1e3) for k, v in per_cloud.items()},
                        "ms_per_cloud_min": {k: sig4(v * 1e3) for k, v in best.items()},
                        "numba_speedup_vs_open3d": sig4(per_cloud["open3d"] / per_cloud["pcpt_numba"]),
                        "numba_speedup_vs_torch": sig4(per_cloud["pcpt_torch"] / per_cloud["pcpt_numba"]),
                        "torch_speedup_vs_open3d": sig4(per_cloud["open3d"] / per_cloud["pcpt_torch"]),
                        "numba_speedup_vs_naive": sig4(per_cloud["naive"] / per_cloud["pcpt_numba"]),
                        "exact_numba_vs_torch": same_backends,
                        "exact_vs_open3d": same_as_open3d,
                        "exact_vs_naive": same_as_naive,
                        "exact": same_backends and same_as_open3d and same_as_naive,
                    }
                )

    report = {
        "benchmark": "farthest_point_sample (CPU)",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_fps.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "threads": args.threads,
        "repeats": args.repeats,
        "load": {"busy_process": args.load, "pid": busy_pid},
        "first_call_s": sig4(first_call_s),
        "machine": machine_info(load_before),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numba": _numba_version(),
            "open3d": o3d.__version__,
            "numpy": np.__version__,
        },
        "results": results,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _numba_version() -> str:
    import numba

    return str(numba.__version__)


if __name__ == "__main__":
    main()
