"""Conversion throughput of ``pcpt-data convert`` with 1 and 2 local workers.

Prints one JSON document to stdout with, per case and worker count, samples/s, samples/s per worker and
where the CPU time went: ``main_cpu_s`` (user + system seconds of the converting process: planning,
appending the workers' ready tar blocks, hashing, progress records) and ``workers_cpu_s`` (user + system
seconds of the pool's worker processes, reaped by ``engine.close()`` inside the case; 0 with one worker,
which runs in the main process):

* ``meshes``: ``mesh-folder`` on generated meshes (open3d primitives, midpoint-subdivided, randomly scaled,
  written as ``.off`` and ``.ply`` under class folders in a temporary directory) -> ``--points`` surface
  samples (default 8192) with face normals, unit-sphere normalisation and full FPS order;
* ``npy-tree``: ``/work/shared/data/ModelNet40``-style ``<class>/{train,test}/*.npy`` clouds (1024 points,
  FPS order), when the folder exists (``--modelnet``); ``--modelnet-per-class K`` converts only the first K
  files of each class and split.

Every run writes into a fresh temporary folder (no resumed shards). Worker processes are started inside the
timed region, as a user's command would. Run: ``python benchmarks/bench_convert.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datapipes.converters import (  # noqa: E402
    ConvertOptions,
    convert,
    get_converter,
    resolve_options,
)
from datapipes.engines import LocalEngine  # noqa: E402

DEFAULT_MODELNET = Path("/work/shared/data/ModelNet40")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meshes", type=int, default=120, help="generated meshes (default 120)")
    parser.add_argument("--points", type=int, default=8192, help="surface samples per mesh (default 8192)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--modelnet", type=Path, default=DEFAULT_MODELNET, help="npy-tree folder to convert")
    parser.add_argument(
        "--modelnet-per-class", type=int, default=0, help="first K files per class and split (default all)"
    )
    parser.add_argument("--skip-modelnet", action="store_true", help="only the generated meshes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated meshes (default 0)")
    args = parser.parse_args(argv)
    if args.meshes < 1 or args.points < 1 or min(args.workers) < 1:
        parser.error("--meshes, --points and --workers must be >= 1")
    return args


def make_meshes(root: Path, count: int, seed: int) -> Path:
    """Writes ``count`` meshes (6 classes of primitives, subdivided, scaled) as ``.off``/``.ply`` files."""
    import numpy as np
    import open3d as o3d

    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)  # keep stdout pure JSON
    rng = np.random.default_rng(seed)
    makers = {
        "sphere": lambda: o3d.geometry.TriangleMesh.create_sphere(radius=1.0, resolution=12),
        "box": lambda: o3d.geometry.TriangleMesh.create_box(1.0, 0.6, 0.4),
        "torus": lambda: o3d.geometry.TriangleMesh.create_torus(),
        "cylinder": lambda: o3d.geometry.TriangleMesh.create_cylinder(radius=0.5, height=2.0),
        "cone": lambda: o3d.geometry.TriangleMesh.create_cone(),
        "icosahedron": lambda: o3d.geometry.TriangleMesh.create_icosahedron(),
    }
    src = root / "meshes"
    names = list(makers)
    for i in range(count):
        name = names[i % len(names)]
        mesh = makers[name]().subdivide_midpoint(int(rng.integers(1, 3)))
        vertices = np.asarray(mesh.vertices) * rng.uniform(0.5, 2.0, size=3)
        mesh.vertices = o3d.utility.Vector3dVector(vertices)
        mesh.compute_triangle_normals()
        (src / name).mkdir(parents=True, exist_ok=True)
        suffix = ".off" if i % 2 == 0 else ".ply"
        o3d.io.write_triangle_mesh(src / name / f"{name}_{i:04d}{suffix}", mesh)
    return src


def subset_tree(src: Path, dst: Path, per_class: int) -> Path:
    """Symlinks the first ``per_class`` files of every class and split of an npy tree."""
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        for split_dir in sorted(p for p in class_dir.iterdir() if p.is_dir()):
            target = dst / class_dir.name / split_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted(split_dir.glob("*.npy"))[:per_class]:
                (target / f.name).symlink_to(f)
    return dst


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of ``resource.RUSAGE_SELF`` or ``RUSAGE_CHILDREN`` (reaped children)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_case(fmt: str, src: Path, workers: int, points: int | None, tmp: Path) -> dict[str, Any]:
    converter = get_converter(fmt)
    base = ConvertOptions(format=fmt, src=str(src.resolve()))
    options = resolve_options(converter, base, {"points": points})
    out = tmp / f"out-{fmt}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    engine = LocalEngine(workers)
    main_cpu, workers_cpu = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    try:
        report = convert(converter, options, out, engine)
    finally:
        engine.close()  # joins the pool's workers, so their CPU time is in RUSAGE_CHILDREN
    elapsed = time.perf_counter() - start
    main_cpu = cpu_seconds(resource.RUSAGE_SELF) - main_cpu
    workers_cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - workers_cpu
    samples = sum(report.samples.values())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "format": fmt,
        "workers": workers,
        "samples": samples,
        "rejected": report.rejected,
        "elapsed_s": round(elapsed, 2),
        "samples_per_s": round(samples / elapsed, 2),
        "samples_per_s_per_worker": round(samples / elapsed / workers, 2),
        "main_cpu_s": round(main_cpu, 2),
        "workers_cpu_s": round(workers_cpu, 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp_name:
        tmp = Path(tmp_name)
        meshes = make_meshes(tmp, args.meshes, args.seed)
        for workers in args.workers:
            case = run_case("mesh-folder", meshes, workers, args.points, tmp)
            case["case"] = f"meshes -> {args.points} points + face normals + FPS order"
            results.append(case)
            print(json.dumps(case), file=sys.stderr)
        if not args.skip_modelnet and args.modelnet.is_dir():
            src = args.modelnet
            if args.modelnet_per_class > 0:
                src = subset_tree(args.modelnet, tmp / "modelnet_subset", args.modelnet_per_class)
            for workers in args.workers:
                case = run_case("npy-tree", src, workers, None, tmp)
                case["case"] = f"npy-tree {args.modelnet.name} (all points, FPS order)"
                results.append(case)
                print(json.dumps(case), file=sys.stderr)
    doc = {
        "benchmark": "bench_convert",
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "command": " ".join(["python", sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "results": results,
    }
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
