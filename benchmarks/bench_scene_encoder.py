"""Scene encoder: FlatFormer-style flattened groups vs SST-style padded windows, same scans, one run.

Builds one :class:`~pretrain.scene_encoder.PillarSceneEncoder` per partition from the same spec and copies the
weights of the first into the second (the partition changes no parameter), then times, on the same real
LiDAR scans (LAS/LAZ files read with laspy; points outside the spec's range dropped):

* ``forward``: the encoder on all non-empty pillars of one scan (eval mode, no gradient), seconds per scan;
* ``train_step``: forward + backward of the encoder on one scan, seconds per scan;

and reports the padding overhead of each partition (padded slots / pillars, averaged over layers), the pillar
count per scan and the speed-up of flat groups over padded windows. The partitions alternate within every
repetition so that a load change on a shared machine hits both alike; the median and the min over
repetitions are reported.

Run::

    python benchmarks/bench_scene_encoder.py --scans ../shared/data/kitti_raw_0005/velodyne --num-scans 4 \
        --size kitti_cpu --repeats 5 --threads 2

Prints one JSON document.
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

#: encoder sizes: "kitti_cpu" = configs/pretrain/geomae_scene_kitti_cpu.yaml, "base" = the released SST
#: encoder (configs/pretrain/geomae_scene.yaml) with the KITTI z range.
SIZES: dict[str, dict[str, Any]] = {
    "kitti_cpu": {
        "point_range": (-51.2, -51.2, -3.0, 51.2, 51.2, 1.0),
        "pillar_size": (0.256, 0.256),
        "point_channels": ("intensity",),
        "vfe_dims": (32, 64),
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 4,
        "ffn_dim": 128,
    },
    "base": {
        "point_range": (-51.2, -51.2, -3.0, 51.2, 51.2, 1.0),
        "point_channels": ("intensity",),
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scans", type=Path, required=True, help="folder of .las/.laz scans (searched recursively)"
    )
    parser.add_argument("--num-scans", type=int, default=4, help="scans timed (default 4)")
    parser.add_argument("--size", choices=sorted(SIZES), default="kitti_cpu", help="encoder size")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args(argv)
    if args.num_scans < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--num-scans, --repeats and --threads must be >= 1")
    return args


def read_scans(folder: Path, count: int) -> list[tuple[Any, Any]]:
    """The first ``count`` scans: (xyz (N, 3) float32 metres, intensity (N, 1) float32 in [0, 1])."""
    import laspy
    import numpy as np

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".las", ".laz"))[:count]
    if not files:
        sys.exit(f"{folder}: no .las/.laz files")
    scans = []
    for path in files:
        las = laspy.read(path)
        xyz = np.stack([las.x, las.y, las.z], axis=1).astype(np.float32)
        intensity = (np.asarray(las.intensity, dtype=np.float32) / 65535.0)[:, None]
        scans.append((xyz, intensity))
    return scans


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from pretrain.scene_encoder import PillarSceneEncoder, SceneEncoderSpec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scans = read_scans(args.scans, args.num_scans)
    encoders = {}
    for partition in ("flat", "padded"):
        spec = SceneEncoderSpec.from_dict({**SIZES[args.size], "partition": partition})
        encoders[partition] = PillarSceneEncoder(spec)
    encoders["padded"].load_state_dict(encoders["flat"].state_dict())

    inputs = []
    for xyz, intensity in scans:
        points = torch.from_numpy(xyz)[None]
        feats = torch.from_numpy(intensity)[None]
        inputs.append((points, torch.ones(points.shape[:2], dtype=torch.bool), feats))

    def forward(partition: str, scan: int) -> None:
        encoder = encoders[partition].eval()
        with torch.no_grad():
            encoder.encode(*inputs[scan])

    def train_step(partition: str, scan: int) -> None:
        encoder = encoders[partition].train()
        encoder.zero_grad(set_to_none=True)
        encoder.encode(*inputs[scan]).features.sum().backward()

    pillars, overhead = [], {"flat": [], "padded": []}
    for points, valid, _ in inputs:
        coords = encoders["flat"].pillarize(points, valid).coords
        pillars.append(int(coords.shape[0]))
        for partition, encoder in encoders.items():
            overhead[partition].append(encoder.transformer.padding_overhead(coords))

    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, fn in (("forward", forward), ("train_step", train_step)):
        for partition in encoders:  # warm-up
            fn(partition, 0)
        samples: dict[str, list[float]] = {"flat": [], "padded": []}
        for _ in range(args.repeats):
            for partition in encoders:
                total = sum(timed(lambda p=partition, s=s, f=fn: f(p, s)) for s in range(len(inputs)))
                samples[partition].append(total / len(inputs))
        results[name] = {
            partition: {"median_s_per_scan": statistics.median(v), "min_s_per_scan": min(v)}
            for partition, v in samples.items()
        }
        results[name]["speedup_flat_over_padded"] = {
            "median": results[name]["padded"]["median_s_per_scan"]
            / results[name]["flat"]["median_s_per_scan"]
        }

    report = {
        "benchmark": "scene_encoder_partition",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "torch": torch.__version__,
        "size": args.size,
        "spec": encoders["flat"].spec.to_dict(),
        "scans": {"folder": str(args.scans), "count": len(inputs)},
        "pillars_per_scan": pillars,
        "padding_overhead": {k: statistics.mean(v) for k, v in overhead.items()},
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
