"""``pcpt-finetune visualize``: PNG figures of reconstructions, embeddings, training curves and results.

Subcommands (each writes one PNG, ``--out FILE.png``):

- ``reconstruction CKPT --data OUT``: masked input, reconstruction and ground truth of a few clouds for a
  Point-MAE or GeoMAE pre-training run (:mod:`finetune.visualize_recon`). Needs the run's Lightning
  checkpoint: an encoder artifact holds the encoder only, not the decoder.
- ``embedding ART --data OUT [--method tsne|pca]``: pooled features of one split in 2-D, coloured by class.
- ``curves RUN_DIR``: one panel per logged metric from ``metrics.csv`` (CSVLogger) and, when tensorboard is
  installed, TensorBoard event files.
- ``results ART_OR_JSON...``: probe and few-shot accuracies recorded in artifacts or written by
  ``probe``/``fewshot --json``, as bar charts with the std over folds as error bars.

:func:`add_visualize_parser` adds the subcommand to a ``pcpt-finetune`` parser; every leaf parser sets
``handler``. Drawing needs matplotlib (:mod:`finetune.visualize_plot`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.cli_common import CliParser, positive_int, print_json
from datapipes.errors import UserError

__all__ = ["add_visualize_parser"]

PROG = "pcpt-finetune"


def add_visualize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``visualize`` (with its four subcommands) to a ``pcpt-finetune`` subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "visualize",
        help="PNG figures: reconstructions, embeddings, training curves, evaluation results",
        description="Draws PNG figures (matplotlib) of pre-trained models and their runs.",
    )
    sub = parser.add_subparsers(dest="figure", metavar="FIGURE", parser_class=CliParser, required=True)
    _add_reconstruction(sub)
    _add_embedding(sub)
    _add_curves(sub)
    _add_results(sub)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", required=True, type=Path, metavar="FILE.png", help="PNG file to write")
    p.add_argument("--title", default=None, help="figure title (default: describes the figure)")
    p.add_argument("--json", action="store_true", help="print a JSON summary of what was drawn")


def _add_reconstruction(sub: Any) -> None:
    p = sub.add_parser(
        "reconstruction",
        help="masked input / reconstruction / ground truth of a Point-MAE or GeoMAE run",
        description="Masks a few clouds, reconstructs them with a Point-MAE or GeoMAE model and draws, side "
        "by side, the masked input (points of the visible patches), the reconstruction (visible points plus "
        "the predicted points of the masked patches placed at their centres, in red) and the ground truth, "
        "as 3-D scatters from a fixed view. The decoder is not part of an encoder artifact: pass the "
        "Lightning checkpoint of the pre-training run (<run dir>/checkpoints/last.ckpt, or "
        "runs/<name>/version_N/checkpoints/*.ckpt with a CSVLogger). GeoMAE predicts geometric targets, not "
        "points: the centroids of the sub-cells it predicts occupied are drawn, in cells sized like the "
        "true patches (or its Chamfer head's points when the run trained one).",
    )
    p.add_argument("checkpoint", metavar="CKPT", type=Path, help="Lightning .ckpt of a Point-MAE/GeoMAE run")
    p.add_argument("--data", required=True, type=Path, metavar="OUT", help="shard directory")
    p.add_argument("--split", default="test", help="split to draw clouds from (default: %(default)s)")
    p.add_argument("--samples", type=positive_int, default=3, help="clouds drawn (default: %(default)s)")
    p.add_argument("--keys", default=None, metavar="K1,K2", help="draw these sample keys instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample choice and the masks")
    p.add_argument("--point-size", type=float, default=2.0, help="marker size (default: %(default)s)")
    _common(p)
    p.set_defaults(handler=_run_reconstruction)


def _add_embedding(sub: Any) -> None:
    p = sub.add_parser(
        "embedding",
        help="t-SNE or PCA of pooled features, coloured by class",
        description="Pooled features (as for probe/fewshot) of one split, standardised, projected to 2-D by "
        "t-SNE (on the first 50 principal components) or PCA, coloured by class with a legend.",
    )
    p.add_argument("artifact", metavar="ART", type=Path, help="encoder artifact directory")
    p.add_argument("--data", required=True, type=Path, metavar="OUT", help="shard directory")
    p.add_argument("--split", default="test", help="split to embed (default: %(default)s)")
    p.add_argument("--method", choices=("tsne", "pca"), default="tsne", help="projection (default: tsne)")
    p.add_argument(
        "--max-samples",
        type=positive_int,
        default=None,
        metavar="S",
        help="embed a stratified subset of about S clouds (default: the whole split)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and t-SNE")
    p.add_argument("--num-points", type=positive_int, default=None, metavar="N", help="points per cloud")
    p.add_argument("--batch-size", type=positive_int, default=64, help="clouds per forward")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    _common(p)
    p.set_defaults(handler=_run_embedding, verify=False)


def _add_curves(sub: Any) -> None:
    p = sub.add_parser(
        "curves",
        help="training curves of a run (metrics.csv, TensorBoard events)",
        description="One panel per logged metric, x = step, one line per log found under RUN_DIR: "
        "Lightning CSVLogger files (metrics.csv) and, when tensorboard is installed, TensorBoard event "
        "files. Runs configured with 'logger: false' keep no curves.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="run folder (or one metrics.csv)")
    p.add_argument(
        "--metrics", default=None, metavar="M1,M2", help="only these metrics (default: every logged one)"
    )
    _common(p)
    p.set_defaults(handler=_run_curves)


def _add_results(sub: Any) -> None:
    p = sub.add_parser(
        "results",
        help="probe / few-shot accuracies as bar charts with error bars",
        description="Bar charts of the probe and few-shot results recorded in artifacts (encoder.json "
        "'evaluations', written by probe/fewshot) or of the reports of 'probe/fewshot --json'. One panel per "
        "protocol and setting; few-shot error bars are the std over folds; probes are single-pass. An "
        "artifact contributes its latest result of each kind.",
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="ART_OR_JSON", help="artifacts or JSON reports")
    _common(p)
    p.set_defaults(handler=_run_results)


# --------------------------------------------------------------------------------------------- handlers


def _finish(args: argparse.Namespace, summary: dict[str, Any]) -> int:
    if args.json:
        print_json(summary)
    else:
        print(f"{PROG}: wrote {summary['out']}")
    return 0


def _run_reconstruction(args: argparse.Namespace) -> int:
    from datapipes.memory import load_split_arrays
    from datapipes.shards import read_manifest
    from finetune.visualize_plot import reconstruction_figure, save_png
    from finetune.visualize_recon import load_masked_model, reconstruct, sample_panels

    _check_out(args.out)
    model = load_masked_model(args.checkpoint)
    manifest = _manifest(args.data, read_manifest)
    num_points = int(model.data_contract.get("num_points", 1024))
    if args.split not in manifest.get("splits", {}):
        raise UserError(f"{args.data}: no split {args.split!r}; the data has {sorted(manifest['splits'])}")
    xyz, labels, keys = load_split_arrays(args.data, args.split, num_points)
    index = _pick(keys, args.keys, args.samples, args.seed, args.data, args.split)
    clouds = xyz[index]
    if model.data_contract.get("normalization", "unit_sphere") == "unit_sphere":
        from datapipes.geometry import normalize_unit_sphere

        clouds = np.stack([normalize_unit_sphere(c)[0] for c in clouds]).astype(np.float32)
    rec = reconstruct(model, clouds, seed=args.seed)
    classes = list(manifest.get("classes") or [])
    names = [_sample_name(keys[i], int(labels[i]), classes) for i in index]
    panels = [sample_panels(rec, i) for i in range(len(index))]
    masked = int(rec.mask[0].sum())
    title = args.title or (
        f"{model.method} reconstruction, {masked} of {rec.mask.shape[1]} patches masked\n"
        f"{model.source} (step {model.step})"
    )
    out = save_png(reconstruction_figure(panels, names, title, point_size=args.point_size), args.out)
    return _finish(
        args,
        {
            "out": str(out),
            "method": model.method,
            "checkpoint": str(model.source),
            "step": model.step,
            "split": args.split,
            "keys": [keys[i] for i in index],
            "masked_patches": masked,
            "patches": int(rec.mask.shape[1]),
        },
    )


def _run_embedding(args: argparse.Namespace) -> int:
    from finetune import eval_cli
    from finetune.visualize_data import per_class_subset, project_2d
    from finetune.visualize_plot import embedding_figure, save_png

    _check_out(args.out)
    setup = eval_cli.load_setup(args)
    eval_cli.emit_warnings(setup.warnings)
    xyz, labels, _ = eval_cli.load_split(args, setup, args.split)
    index = per_class_subset(labels, args.max_samples, seed=args.seed)
    if index.size < 3:
        raise UserError(f"{args.data}: split {args.split!r} has {index.size} clouds; an embedding needs 3")
    features = eval_cli.split_features(args, setup, xyz[index])
    labels = labels[index]
    print(f"{PROG}: projecting {index.size} clouds with {args.method}", file=sys.stderr)
    coords = project_2d(features, args.method, seed=args.seed)
    classes = list(setup.manifest.get("classes") or [])
    method = (setup.meta.get("provenance") or {}).get("method") or "encoder"
    title = args.title or (
        f"{args.artifact.name} ({method}): {args.method.upper() if args.method == 'pca' else 't-SNE'} of "
        f"pooled features, {index.size} clouds of {args.data.name}/{args.split}"
    )
    out = save_png(embedding_figure(coords, labels, classes, title), args.out)
    return _finish(
        args,
        {
            "out": str(out),
            "artifact": str(args.artifact),
            "method": args.method,
            "split": args.split,
            "samples": int(index.size),
            "classes": len(np.unique(labels)),
            "feature_dim": int(features.shape[1]),
        },
    )


def _run_curves(args: argparse.Namespace) -> int:
    from finetune.visualize_data import (
        find_log_sources,
        read_csv_metrics,
        read_tensorboard_metrics,
        tensorboard_available,
    )
    from finetune.visualize_plot import curves_figure, save_png

    _check_out(args.out)
    found = find_log_sources(args.run_dir)
    root = args.run_dir if args.run_dir.is_dir() else args.run_dir.parent
    sources: dict[str, Any] = {}
    for path in found.csv:
        sources[_relative(path, root)] = read_csv_metrics(path)
    if found.tensorboard and not tensorboard_available():
        print(
            f"{PROG}: note: {len(found.tensorboard)} TensorBoard log folder(s) skipped: "
            "pip install tensorboard to read them",
            file=sys.stderr,
        )
    elif found.tensorboard:
        for folder in found.tensorboard:
            sources[_relative(folder, root) + " (tensorboard)"] = read_tensorboard_metrics(folder)
    if args.metrics:
        wanted = {m.strip() for m in args.metrics.split(",") if m.strip()}
        sources = {k: {m: s for m, s in v.items() if m in wanted} for k, v in sources.items()}
    sources = {k: v for k, v in sources.items() if v}
    if not sources:
        what = f" (none of {args.metrics})" if args.metrics else ""
        raise UserError(
            f"{args.run_dir}: no logged metrics{what} in metrics.csv or TensorBoard event files "
            "(a run with 'logger: false' keeps none)"
        )
    metrics = sorted({m for v in sources.values() for m in v})
    out = save_png(curves_figure(sources, args.title or f"training curves: {args.run_dir}"), args.out)
    return _finish(args, {"out": str(out), "sources": sorted(sources), "metrics": metrics})


def _run_results(args: argparse.Namespace) -> int:
    from finetune.visualize_data import collect_results, group_results
    from finetune.visualize_plot import results_figure, save_png

    _check_out(args.out)
    rows = collect_results(args.inputs)
    if not rows:
        raise UserError(
            "no probe or few-shot results in "
            + ", ".join(str(p) for p in args.inputs)
            + " (run pcpt-finetune probe/fewshot first)"
        )
    groups = group_results(rows)
    out = save_png(results_figure(groups, args.title or "frozen-feature evaluations"), args.out)
    panels = {
        panel: [{"label": r.label, "mean": r.mean, "std": r.std, "folds": r.folds} for r in members]
        for panel, members in groups.items()
    }
    return _finish(args, {"out": str(out), "panels": panels})


# ----------------------------------------------------------------------------------------------- helpers


def _check_out(out: Path) -> None:
    """Refuses a bad ``--out`` before any work."""
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: --out must name a .png file")
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --out takes a file name such as figure.png")


def _manifest(data: Path, reader: Any) -> dict[str, Any]:
    if not (data / "manifest.json").is_file():
        raise UserError(f"{data}: no manifest.json; not a pcpt shard directory (see pcpt-data convert/synth)")
    manifest: dict[str, Any] = reader(data)
    return manifest


def _pick(keys: list[str], wanted: str | None, samples: int, seed: int, data: Path, split: str) -> list[int]:
    """Indices of the clouds to draw: the named keys, or ``samples`` chosen at random (sorted)."""
    if wanted:
        position = {k: i for i, k in enumerate(keys)}
        names = [k.strip() for k in wanted.split(",") if k.strip()]
        missing = [k for k in names if k not in position]
        if missing:
            raise UserError(f"{data}: split {split!r} has no sample key(s) {missing}")
        return [position[k] for k in names]
    count = min(samples, len(keys))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(len(keys), size=count, replace=False))


def _sample_name(key: str, label: int, classes: list[str]) -> str:
    return f"{key} ({classes[label]})" if 0 <= label < len(classes) and classes[label] not in key else key


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or path.name
    except ValueError:
        return str(path)
