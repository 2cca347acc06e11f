"""Near-duplicate search of ``pcpt-data dedup``: exact (IndexFlatL2) and IVF (IndexIVFFlat) side by side.

For each size N it builds N synthetic shape descriptors of the real dimension (3 + 4 x 32 = 131, unit
norm, non-negative like the real ones: three sorted extents and four cumulative histograms, each a smooth
function of a few shape parameters drawn around 200 "families", plus per-bin noise so that distinct clouds
are rarely closer than 0.02), of which ``--dup-fraction`` are planted near-duplicates: a copy of another
descriptor moved by 0.2 to 0.8 x ``--threshold`` in a random direction, at a random position. Then it runs
``datapipes.dedup_search.search_near_pairs`` with each index, every (size, index) in its own process so
that the peak memory is its own, and reports

* ``seconds``: the whole search (index build, k-means for IVF, range search of every descriptor);
* ``peak_rss_mb`` (the process's peak resident memory during the search; the count restarts before it
  where Linux allows, ``peak_is_search_only``), ``data_rss_mb`` (resident memory just before the search:
  Python, faiss and the descriptors, ``descriptors_mb`` of them; ``startup_rss_mb`` before generating
  them) and ``search_rss_mb`` (peak minus data: what the search added);
* ``pairs``, ``planted_recall`` (share of the planted pairs found) and, for IVF, the index settings,
  ``cells_per_query`` and ``unverified`` (clouds whose partners were not provably all searched);
* per size, ``speedup`` (exact seconds / IVF seconds) and ``ivf_equals_exact`` (the IVF pair set is the
  exact one) when both ran.

The exact index runs only up to ``--exact-max`` descriptors (its time grows with N squared); nothing is
extrapolated. ``descriptor_ms_per_cloud`` times the descriptor of one 1024-point cloud, the per-cloud cost
of reading shards that comes before any search.

Usage::

    python benchmarks/bench_dedup.py --sizes 10000,100000,1000000 --threads 2 > dedup.json

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine_info  # noqa: E402

DIM_EXTENT, BINS = 3, 32
DIM = DIM_EXTENT + 4 * BINS
FAMILIES = 200
METHODS = ("exact", "ivf")
_GEN_BLOCK = 1 << 13


def _mb(num_bytes: float) -> float:
    return round(num_bytes / 2**20, 1)


def rss_mb() -> tuple[float, float]:
    """``(current, peak)`` resident memory of this process in MiB (Linux ``/proc/self/status``).

    Elsewhere both are the peak from ``getrusage`` (KiB on Linux, bytes on macOS, reported as is).
    """
    try:
        status = Path("/proc/self/status").read_text()
        fields = dict(
            line.split(":", 1) for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM"))
        )
        return round(int(fields["VmRSS"].split()[0]) / 1024, 1), round(
            int(fields["VmHWM"].split()[0]) / 1024, 1
        )
    except (OSError, KeyError, ValueError):
        peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return peak, peak


def reset_peak_rss() -> bool:
    """Restarts the peak resident memory count at the current one (Linux ``clear_refs``); False if unable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _descriptor_block(count: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(count, DIM)`` float32 unit-norm descriptors around the family ``centres`` ``(F, 11)``."""
    latent = centres[rng.integers(0, len(centres), count)] + rng.normal(scale=0.08, size=(count, 11))
    latent = np.clip(latent, 0.0, 1.0)
    extents = np.sort(0.2 + 0.8 * latent[:, :3], axis=1)[:, ::-1]
    edges = (np.arange(BINS) + 1) * 2.5 / BINS
    loc, scale = 0.3 + 1.5 * latent[:, 3:7, None], 0.05 + 0.35 * latent[:, 7:11, None]
    cdf = 1.0 / (1.0 + np.exp(-(edges - loc) / scale)) / np.sqrt(BINS)
    vec = np.concatenate([extents, cdf.reshape(count, -1)], axis=1)
    vec += rng.normal(scale=0.002, size=vec.shape)
    return (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)


def synthetic_descriptors(
    size: int, *, dup_fraction: float, threshold: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors with planted near-duplicates (see the module docstring), generated in blocks.

    Args:
        size: number of descriptors N.
        dup_fraction: share of them that are planted copies of another one.
        threshold: the dedup threshold; a copy lies 0.2 to 0.8 x ``threshold`` from its original.
        seed: everything is a function of it.

    Returns:
        ``(descriptors (N, 131) float32, planted (P, 2) int64)`` with ``planted[:, 0] < planted[:, 1]``,
        sorted by rows.
    """
    rng = np.random.default_rng(seed)
    num_dups = round(size * dup_fraction)
    if size < 2 * num_dups:
        raise ValueError(f"dup_fraction {dup_fraction} leaves too few originals for {size} descriptors")
    centres = rng.uniform(0.0, 1.0, (FAMILIES, 11))
    out = np.empty((size, DIM), np.float32)
    copies = rng.choice(size, size=num_dups, replace=False)
    originals = np.setdiff1d(np.arange(size), copies)
    for start in range(0, len(originals), _GEN_BLOCK):
        rows = originals[start : start + _GEN_BLOCK]
        out[rows] = _descriptor_block(len(rows), centres, rng)
    sources = rng.choice(originals, size=num_dups, replace=False)
    step = rng.normal(size=(num_dups, DIM))
    step *= (rng.uniform(0.2, 0.8, num_dups) * threshold / np.linalg.norm(step, axis=1))[:, None]
    moved = out[sources] + step
    out[copies] = (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)
    planted = np.sort(np.stack([sources, copies], axis=1), axis=1)
    return out, planted[np.lexsort((planted[:, 1], planted[:, 0]))]


def run_one(size: int, method: str, args: argparse.Namespace, pairs_file: Path | None) -> dict[str, Any]:
    """Searches one synthetic set with one index in this process; the row of the report."""
    import faiss

    from datapipes.dedup_search import search_near_pairs

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    startup, _ = rss_mb()
    desc, planted = synthetic_descriptors(
        size, dup_fraction=args.dup_fraction, threshold=args.threshold, seed=args.seed
    )
    data, _ = rss_mb()
    reset = reset_peak_rss()
    options: dict[str, Any] = {"nlist": args.nlist, "nprobe": args.nprobe} if method == "ivf" else {}
    begin = time.perf_counter()
    found = search_near_pairs(desc, threshold=args.threshold, index=method, seed=args.seed, **options)
    seconds = time.perf_counter() - begin
    _, peak = rss_mb()
    pairs = np.stack([found.a, found.b], axis=1)
    if pairs_file is not None:
        np.save(pairs_file, pairs)
    found_keys = set(map(tuple, pairs.tolist()))
    hits = sum(tuple(p) in found_keys for p in planted.tolist())
    info = found.info.to_dict()
    row: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "peak_rss_mb": peak,
        "data_rss_mb": data,
        "search_rss_mb": round(peak - data, 1),
        "startup_rss_mb": startup,
        "peak_is_search_only": reset,
        "descriptors_mb": _mb(desc.nbytes),
        "pairs": len(pairs),
        "planted_pairs": len(planted),
        "planted_recall": round(hits / len(planted), 6) if len(planted) else None,
        "gpu": info["gpu"],
    }
    if method == "ivf":
        row.update(
            {k: info[k] for k in ("nlist", "nprobe", "train_samples", "cells_per_query", "unverified")}
        )
    return row


def descriptor_ms_per_cloud(clouds: int = 64, points: int = 1024, seed: int = 0) -> float:
    """Milliseconds of ``shape_descriptor`` on one ``points``-point cloud (median over ``clouds``)."""
    from datapipes.dedup import shape_descriptor

    rng = np.random.default_rng(seed)
    times = []
    for _ in range(clouds):
        xyz = rng.normal(size=(points, 3)).astype(np.float32)
        begin = time.perf_counter()
        shape_descriptor(xyz)
        times.append(time.perf_counter() - begin)
    return round(float(np.median(times)) * 1e3, 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000", help="descriptor counts, comma separated")
    parser.add_argument("--methods", default=",".join(METHODS), help="exact,ivf (default both)")
    parser.add_argument(
        "--exact-max", type=int, default=100_000, help="largest size the exact index runs on (default 100000)"
    )
    parser.add_argument("--dup-fraction", type=float, default=0.01, help="planted copies (default 0.01)")
    parser.add_argument("--threshold", type=float, default=0.006, help="dedup threshold (default 0.006)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default: pcpt's default)")
    parser.add_argument("--nprobe", type=int, default=None, help="most IVF cells per query (default: pcpt's)")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.size_list = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    args.method_list = args.methods.split(",")
    unknown = sorted(set(args.method_list) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if min(args.size_list) < 2 or args.threads < 0 or args.exact_max < 0:
        parser.error("--sizes must be >= 2, --threads and --exact-max >= 0")
    if not 0.0 <= args.dup_fraction <= 0.5 or args.threshold <= 0:
        parser.error("--dup-fraction must be in [0, 0.5] and --threshold > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        size, method = int(args.child[0]), args.child[1]
        print(json.dumps(run_one(size, method, args, args.pairs_file)))
        return
    import faiss

    given = sys.argv[1:] if argv is None else argv
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.size_list:
            entry: dict[str, Any] = {"size": size}
            for method in args.method_list:
                if method == "exact" and size > args.exact_max:
                    entry[method] = {"skipped": f"size {size} > --exact-max {args.exact_max}"}
                    continue
                pairs_file = Path(tmp) / f"{method}-{size}.npy"
                cmd = [sys.executable, __file__, *given, "--child", str(size), method]
                cmd += ["--pairs-file", str(pairs_file)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                entry[method] = json.loads(out)
            ran = [m for m in METHODS if m in entry and "skipped" not in entry[m]]
            if ran == list(METHODS):
                exact, ivf = (np.load(Path(tmp) / f"{m}-{size}.npy") for m in METHODS)
                exact_set, ivf_set = set(map(tuple, exact.tolist())), set(map(tuple, ivf.tolist()))
                entry["ivf_equals_exact"] = exact_set == ivf_set
                entry["ivf_missed_vs_exact"] = len(exact_set - ivf_set)
                entry["speedup"] = round(entry["exact"]["seconds"] / max(entry["ivf"]["seconds"], 1e-9), 2)
            results.append(entry)
    report = {
        "benchmark": "dedup near-pair search: exact (IndexFlatL2) vs ivf (IndexIVFFlat)",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_dedup.py " + " ".join(given),
        "threads": args.threads or faiss.omp_get_max_threads(),
        "threshold": args.threshold,
        "dup_fraction": args.dup_fraction,
        "dim": DIM,
        "exact_max": args.exact_max,
        "descriptor_ms_per_cloud": descriptor_ms_per_cloud(),
        "machine": machine_info(load_before),
        "versions": {
            "python": platform.python_version(),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
        "results": results,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
