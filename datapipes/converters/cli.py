"""``pcpt-data convert FORMAT SRC OUT``: the command-line front of the converters."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from datapipes.cli_common import add_command
from datapipes.converters import CONVERTERS, get_converter
from datapipes.converters.base import ConvertOptions
from datapipes.converters.driver import ConvertReport, convert, dumps_report, resolve_options
from datapipes.engines import make_engine
from datapipes.errors import UserError
from datapipes.progress import Progress

_DESCRIPTION = """\
Convert a raw dataset into pcpt shards (OUT/<split>-NNNNNN.tar + manifest.json + rejected.jsonl).

Meshes are sampled on the surface (--points, default 8192) with face normals; objects are centred and
scaled to the unit sphere (not kitti, las or scanobjectnn, unless --normalize); points are stored in
farthest-point order (not kitti or las, unless --fps). Running the same command again resumes: complete shards
are verified and kept, the rest is recomputed. Local processes (--workers N) and Ray (--engine ray) give
byte-identical shards.

Ray (--engine ray): without --ray-address a local Ray instance with --workers CPUs is started; with
--ray-address HOST:PORT (the head's GCS address) the work runs on that cluster's nodes, which need pcpt
installed (and the cluster's auth token, e.g. RAY_AUTH_TOKEN, when it uses token authentication). A chunk
whose worker or node dies is run again on the remaining nodes, and no sample is lost or written twice. The
summary (nodes in --json) says how many samples and rejections each node computed.

Image views (image-point pre-training, e.g. ViPFormer): --render-views K renders K PNG views per sample
(meshes ray-cast, point sets splatted; --render-size, --render-up). shapenet-render stores each model's own
renderings (SRC/ShapeNetRendering/<synset>/<model>/rendering/*.png, sorted, the first --max-views) with its
cloud (SRC/ShapeNet/<synset>/<model>.ply|npy|pts), the synset as class; split by SRC/train.txt and
test.txt when present, else by a hash of the model id (--test-fraction, default 0.1); a model without
(enough) renderings is rejected. The manifest's "images" entry says how many views, their size and source.

Bad input: a file that cannot be used (unreadable, malformed or truncated, NaN/inf values or coordinates
beyond 1e18, a degenerate cloud) is skipped and listed with the reason in OUT/rejected.jsonl, and the run
goes on (--strict: fail on the first one). If every input is rejected the command fails (exit 2) and writes
no manifest. File names that are not valid UTF-8 are recorded with \\xNN escapes. A class folder without
usable files keeps its label index (labels stay stable) and is listed under "empty classes" in the summary
(empty_classes in --json).

OUT: must be new, empty, or an earlier pcpt conversion of the same options (which is resumed); any other
folder is refused before anything is written, and pcpt only ever replaces its own files there (shards,
manifest.json, rejected.jsonl, .pcpt-progress/). One conversion at a time writes to OUT: a second one is
refused while the first runs (a lock in OUT/.pcpt-progress/, released when the first ends, even if killed).
"""


def _formats_epilog() -> str:
    width = max(len(name) for name in CONVERTERS)
    lines = ["formats:"]
    lines += [f"  {name:<{width}}  {cls.summary}" for name, cls in CONVERTERS.items()]
    lines += [
        "",
        "examples:",
        "  pcpt-data convert npy-tree data/ModelNet40 out/mn40 --workers 2",
        "  pcpt-data convert modelnet-off ModelNet40 out/mn40-8k --points 8192 --normals",
        "  pcpt-data convert scanobjectnn h5_files out/sonn --variant pb_t50_rs",
        "  pcpt-data convert modelnet-off ModelNet10 out/mn10-img --points 2048 --render-views 4",
        "  pcpt-data convert shapenet-render ShapeNetRender out/snr --max-views 24 --test-fraction 0",
        "  pcpt-data convert hf my_hf_dir out/hf --points-column xyz --split-map train=train,validation=test",
    ]
    return "\n".join(lines)


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``pcpt-data convert`` (see :func:`~datapipes.cli_common.add_command`)."""
    p = add_command(
        subparsers,
        "convert",
        run_convert,
        help="convert a raw dataset (ModelNet, ShapeNet, ScanObjectNN, meshes, KITTI, HF) to shards",
        description=_DESCRIPTION,
        epilog=_formats_epilog(),
    )
    p.add_argument("format", metavar="FORMAT", help=f"source format: {', '.join(CONVERTERS)}")
    p.add_argument("src", metavar="SRC", help="source folder (hf: also a parquet glob or a hub id)")
    p.add_argument("out", metavar="OUT", help="output shard folder (created; re-running resumes)")
    g = p.add_argument_group("processing")
    g.add_argument(
        "--points",
        type=int,
        metavar="N",
        help="points per cloud: meshes are sampled with N points; larger point sets are reduced by FPS "
        "(a seeded random subset with --no-fps); smaller ones are kept as they are "
        "(default: 8192 for meshes and modelnet-resampled, all points otherwise)",
    )
    g.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="centre and scale to the unit sphere (default: on, off for kitti, las and scanobjectnn)",
    )
    g.add_argument(
        "--normals",
        action="store_true",
        help="estimate normals where the source has none, and curvature (open3d, k nearest neighbours)",
    )
    g.add_argument(
        "--fps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store points in farthest-point order (default: on, off for kitti and las)",
    )
    g.add_argument("--seed", type=int, default=0, help="base seed of sampling, splits and order (default 0)")
    g.add_argument(
        "--min-points", type=int, default=16, metavar="M", help="reject clouds with fewer points (default 16)"
    )
    g.add_argument(
        "--normal-k", type=int, default=16, metavar="K", help="neighbours for normals (default 16)"
    )
    g.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep the sorted source order in the shards (default: a seeded shuffle mixes classes)",
    )
    g.add_argument(
        "--shard-size", type=int, default=1000, metavar="S", help="samples per shard (default 1000)"
    )
    f = p.add_argument_group("format-specific")
    f.add_argument(
        "--variant",
        help="modelnet-resampled: modelnet40 (default) | modelnet10; "
        "scanobjectnn: obj_bg (default) | obj_only | pb_t50_rs",
    )
    f.add_argument(
        "--test-fraction",
        type=float,
        metavar="F",
        help="mesh-folder without train/test folders: seeded fraction of each class sent to test; "
        "shapenet-render without train.txt/test.txt: fraction of models sent to test by a hash of the model "
        "id (default 0.1)",
    )
    f.add_argument("--points-column", metavar="COL", help="hf: column with (N,3) or (N,6) points")
    f.add_argument("--label-column", metavar="COL", help="hf: column with the label (default: 'label')")
    f.add_argument(
        "--split-map",
        metavar="MAP",
        help="hf: source=output split pairs, e.g. train=train,validation=test (unlisted splits are skipped)",
    )
    f.add_argument(
        "--max-views",
        type=int,
        metavar="M",
        help="shapenet-render: store the first M renderings of each model (default: the count most models "
        "have, 24 for the release); models with fewer are rejected",
    )
    i = p.add_argument_group("image views")
    i.add_argument(
        "--render-views",
        type=int,
        metavar="K",
        help="render K views per sample (img.0.png ... img.K-1.png), headless on the CPU: meshes are "
        "ray-cast (modelnet-off, mesh-folder), point sets splatted (shaded by normals when stored, else by "
        "depth); cameras evenly spaced on a ring around the up axis, 20 degrees above the horizon, looking "
        "at the unit-sphere object; the manifest's 'images' entry records views, size, source and cameras "
        "(default 0: no images; not for kitti, las or shapenet-render, which has its own)",
    )
    i.add_argument(
        "--render-size",
        type=int,
        metavar="S",
        help="side of the rendered views in pixels (default 144, ViPFormer's image size)",
    )
    i.add_argument(
        "--render-up",
        choices=("x", "y", "z"),
        help="world axis pointing up in the rendered views (default: z for modelnet-off and npy-tree, "
        "y otherwise)",
    )
    e = p.add_argument_group("execution")
    e.add_argument(
        "--workers", type=int, default=1, metavar="N", help="local processes (default 1: in-process)"
    )
    e.add_argument(
        "--engine", default="local", metavar="{local,ray}", help="local processes (default) or Ray Data"
    )
    e.add_argument(
        "--ray-address",
        metavar="A",
        help="Ray cluster to run on: the head's HOST:PORT, or auto (default: start a local instance)",
    )
    e.add_argument("--strict", action="store_true", help="fail on the first rejected input (exit 2)")
    e.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _parse_split_map(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    pairs = []
    for part in text.split(","):
        source, sep, target = part.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise UserError(f"--split-map entry {part!r} is not source=output")
        pairs.append((source.strip(), target.strip()))
    return tuple(pairs)


def _resolve_src(fmt: str, src: str) -> str:
    path = Path(src)
    if path.exists():
        return str(path.resolve())
    if fmt == "hf":
        return os.path.abspath(src) if any(ch in src for ch in "*?[") else src  # a glob or a hub id
    raise UserError(f"{src}: no such file or directory")


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    """Builds and checks the conversion options from parsed ``convert`` arguments.

    Raises:
        UserError: unknown format, missing SRC, or an out-of-range or inapplicable option.
    """
    converter = get_converter(args.format)
    checks = [
        (args.points is not None and args.points < 1, f"--points must be >= 1, got {args.points}"),
        (args.shard_size < 1, f"--shard-size must be >= 1, got {args.shard_size}"),
        (args.min_points < 1, f"--min-points must be >= 1, got {args.min_points}"),
        (args.normal_k < 3, f"--normal-k must be >= 3, got {args.normal_k}"),
        (args.workers < 1, f"--workers must be >= 1, got {args.workers}"),
        (
            args.test_fraction is not None and not 0.0 <= args.test_fraction < 1.0,
            f"--test-fraction must be in [0, 1), got {args.test_fraction}",
        ),
        (args.ray_address is not None and args.engine != "ray", "--ray-address needs --engine ray"),
        (args.engine not in ("local", "ray"), f"--engine must be local or ray, got {args.engine!r}"),
    ]
    for bad, message in checks:
        if bad:
            raise UserError(message)
    base = ConvertOptions(
        format=converter.name,
        src=_resolve_src(converter.name, args.src),
        normals=bool(args.normals),
        seed=int(args.seed),
        min_points=int(args.min_points),
        shard_size=int(args.shard_size),
        normal_k=int(args.normal_k),
        test_fraction=float(args.test_fraction or 0.0),
        shuffle=not args.no_shuffle,
        points_column=args.points_column,
        label_column=args.label_column,
        split_map=_parse_split_map(args.split_map),
    )
    given = {
        "points": args.points,
        "normalize": args.normalize,
        "fps": args.fps,
        "variant": args.variant,
        "test_fraction": args.test_fraction,
        "points_column": args.points_column,
        "label_column": args.label_column,
        "split_map": args.split_map,
        "max_views": args.max_views,
        "render_views": args.render_views,
        "render_size": args.render_size,
        "render_up": args.render_up,
    }
    return resolve_options(converter, base, given)


def format_report(report: ConvertReport) -> str:
    """The human-readable summary."""
    lines = [f"converted {report.format} -> {report.out} in {report.elapsed_s:.1f} s"]
    lines += [f"  {split}: {n} samples" for split, n in sorted(report.samples.items())]
    lines.append(f"  classes: {len(report.classes)}")
    rejected = f"  rejected: {report.rejected}"
    if report.rejected:
        rejected += f" (reasons in {Path(report.out) / 'rejected.jsonl'})"
    lines.append(rejected)
    lines.append(
        f"  shards: {report.shards_written} written, {report.shards_resumed} kept from an earlier run"
    )
    if report.empty_classes:
        lines.append(
            f"  empty classes (no sample in any split; label kept): {len(report.empty_classes)}: "
            + ", ".join(report.empty_classes)
        )
    if any(node != "local" for node in report.nodes):
        lines.append(f"  nodes: {len(report.nodes)} (samples, rejected computed in this run)")
        lines += [
            f"    {entry['address']} {node[:12]}: {entry['samples']} samples, {entry['rejected']} rejected"
            for node, entry in report.nodes.items()
        ]
    return "\n".join(lines)


def run_convert(args: argparse.Namespace) -> int:
    """Handler of ``pcpt-data convert``: converts, prints the summary, returns the exit status."""
    options = options_from_args(args)
    converter = get_converter(options.format)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the summary only (Ray prints notices)
        engine = make_engine(args.engine, workers=args.workers, ray_address=args.ray_address)
        try:
            with Progress(None, f"convert {options.format}", "sample", disable=args.quiet) as bar:
                report = convert(
                    converter,
                    options,
                    Path(args.out),
                    engine,
                    strict=args.strict,
                    progress=bar.update,
                    on_total=bar.set_total,
                )
        finally:
            engine.close()
    print(dumps_report(report) if args.json else format_report(report))
    return 0
