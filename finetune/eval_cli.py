"""``pcpt-finetune probe`` and ``pcpt-finetune fewshot``: frozen-feature evaluation from the command line.

``probe ART --data OUT`` extracts pooled features of the train and test splits with the frozen encoder and
runs a linear-SVM probe (C chosen on a hold-out of train) or a kNN probe. ``fewshot ART --data OUT --way W
--shot S`` draws (or reads) seeded few-shot episodes and reports mean ± sample std over the folds. Both print
a table, or JSON with ``--json``, that states the protocol and the split used for selection.

:func:`add_probe_parser` and :func:`add_fewshot_parser` add the subcommands to a ``pcpt-finetune`` parser;
each sets ``handler`` (and ``func``) to a function ``(args) -> exit status``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.cli_common import positive_int, print_json, resolve_device
from datapipes.errors import UserError

__all__ = [
    "add_fewshot_parser",
    "add_probe_parser",
    "run_fewshot_command",
    "run_probe_command",
]

PROG = "pcpt-finetune"


# ------------------------------------------------------------------------------------------ argparse types


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _c_grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def _add_source_arguments(p: argparse.ArgumentParser) -> None:
    """``ART`` and ``--data OUT``, the inputs of every evaluation subcommand."""
    p.add_argument("artifact", metavar="ART", type=Path, help="encoder artifact directory")
    p.add_argument(
        "--data", required=True, type=Path, metavar="OUT", help="shard directory (with manifest.json)"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="hash every shard used against the manifest's sha256 before loading (reads the data twice); "
        "loading always checks sample counts, tar structure and finite points",
    )


def _add_num_points_argument(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--num-points", type=positive_int, default=None, metavar="N", help=help_text)


def _add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--batch-size`` and ``--device`` of the feature extraction."""
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="clouds per forward (default: %(default)s)"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default: %(default)s)",
    )


# ------------------------------------------------------------------------------------------ shared loading


@dataclass
class _Loaded:
    encoder: Any
    meta: dict[str, Any]
    manifest: dict[str, Any]
    manifest_sha256: str
    num_points: int
    device: str
    warnings: list[str]


def _load_common(args: argparse.Namespace) -> _Loaded:
    from datapipes.shards import read_manifest
    from finetune.data import manifest_normalization
    from finetune.features import check_data_contract
    from pretrain.checkpoint import WeightsMismatchError, load_encoder

    artifact = Path(args.artifact)
    if not artifact.exists():
        raise UserError(f"{artifact}: no such encoder artifact")
    try:
        encoder, meta = load_encoder(artifact)
    except WeightsMismatchError as err:
        raise UserError(str(err)) from err
    data = Path(args.data)
    manifest_path = data / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{data}: no manifest.json; not a pcpt shard directory (see pcpt-data convert/synth)")
    manifest = read_manifest(data)
    manifest_sha256 = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    contract = meta.get("data_contract") or {}
    requested = args.num_points
    num_points = int(requested if requested is not None else contract.get("num_points", 1024))
    warnings = check_data_contract(
        meta, num_points, manifest_normalization(manifest), allow_num_points_change=requested is not None
    )
    spec = encoder.spec
    needed = max(spec.num_groups, spec.group_size)
    if num_points < needed:
        raise UserError(f"--num-points {num_points}: the encoder needs at least {needed} points per cloud")
    points = manifest.get("points")
    stored = points.get("min") if isinstance(points, Mapping) else None
    if stored is not None and int(stored) < num_points:
        raise UserError(
            f"{data}: the smallest cloud has {int(stored)} points, fewer than the {num_points} requested; "
            f"pass --num-points {int(stored)} to evaluate on fewer points"
        )
    if stored is not None and int(stored) > num_points and not manifest.get("fps_ordered", False):
        warnings.append(
            f"{data} is not stored in farthest-point order: the first {num_points} points of each cloud are "
            "not an FPS subsample"
        )
    return _Loaded(
        encoder, meta, manifest, manifest_sha256, num_points, resolve_device(args.device), warnings
    )


def _load_split(
    args: argparse.Namespace, loaded: _Loaded, split: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from datapipes.memory import load_split_arrays

    splits = loaded.manifest.get("splits", {})
    if split not in splits:
        raise UserError(f"{args.data}: no split {split!r}; the data has {sorted(splits)}")
    if getattr(args, "verify", False):
        from datapipes.shards import check_shard_hashes

        check_shard_hashes(args.data, [split], manifest=loaded.manifest)
    try:
        xyz, labels, keys = load_split_arrays(args.data, split, loaded.num_points)
    except (ValueError, OSError) as err:
        raise UserError(f"{args.data}: cannot load split {split!r}: {err}") from err
    if len(keys) == 0:
        raise UserError(f"{args.data}: split {split!r} is empty")
    if xyz.shape[1] != loaded.num_points:
        raise UserError(
            f"{args.data}: split {split!r} has clouds of {xyz.shape[1]} points, {loaded.num_points} requested"
        )
    if labels.size and labels.min() < 0:
        raise UserError(f"{args.data}: split {split!r} has unlabelled samples; probes need class labels")
    return xyz, labels, list(keys)


def _features(args: argparse.Namespace, loaded: _Loaded, xyz: np.ndarray) -> np.ndarray:
    from finetune.features import extract_features

    return extract_features(
        loaded.encoder,
        xyz,
        batch_size=args.batch_size,
        device=loaded.device,
        progress=True,
    )


def _emit_warnings(warnings: Sequence[str]) -> None:
    for text in warnings:
        print(f"{PROG}: warning: {text}", file=sys.stderr)


def _table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _report_header(command: str, args: argparse.Namespace, loaded: _Loaded) -> dict[str, Any]:
    """The fields every evaluation report starts with: the command, the encoder and the data evaluated."""
    provenance = loaded.meta.get("provenance") or {}
    return {
        "command": command,
        "artifact": str(args.artifact),
        "method": str(provenance.get("method") or "unknown"),
        "data": str(args.data),
        "manifest_sha256": loaded.manifest_sha256,
        "num_points": loaded.num_points,
    }


# --------------------------------------------------------------------------------------------------- probe


def run_probe_command(args: argparse.Namespace) -> int:
    """Handler of ``pcpt-finetune probe``; prints the result and returns the exit status."""
    from finetune.probes import knn_probe, svm_probe

    loaded = _load_common(args)
    _emit_warnings(loaded.warnings)
    train_xyz, train_y, _ = _load_split(args, loaded, args.train_split)
    test_xyz, test_y, _ = _load_split(args, loaded, args.test_split)
    train_x = _features(args, loaded, train_xyz)
    test_x = _features(args, loaded, test_xyz)
    try:
        if args.method == "svm":
            result = svm_probe(
                train_x,
                train_y,
                test_x,
                test_y,
                c_grid=args.c_grid,
                val_fraction=args.val_fraction,
                seed=args.seed,
                progress=True,
            )
        else:
            result = knn_probe(train_x, train_y, test_x, test_y, k=args.k)
    except ValueError as err:
        raise UserError(f"{args.method} probe: {err}") from err
    report = {
        **_report_header("probe", args, loaded),
        "train_split": args.train_split,
        "test_split": args.test_split,
        "feature_dim": int(train_x.shape[1]),
        "warnings": loaded.warnings,
        **result.to_dict(),
    }
    if args.json:
        print_json(report)
        return 0
    rows = [
        ("protocol", f"{result.protocol} probe on frozen pooled features ({report['feature_dim']}-d)"),
        ("encoder", f"{args.artifact} ({report['method']})"),
        (
            "data",
            f"{args.data}: train {args.train_split!r}, test {args.test_split!r}, {loaded.num_points} points",
        ),
        (
            "samples",
            f"train {result.n_train} (val {result.n_val} held out for selection), test {result.n_test}",
        ),
        ("selection", result.selection),
        ("params", ", ".join(f"{k}={v}" for k, v in result.params.items())),
    ]
    if result.val_accuracy:
        rows.append(("val acc", ", ".join(f"C={c}: {100 * a:.2f}" for c, a in result.val_accuracy.items())))
    rows.append(("test acc", f"{100 * result.accuracy:.2f} % (single pass)"))
    print(_table(rows))
    return 0


def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``probe`` to a ``pcpt-finetune`` subparsers object and returns its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "probe",
        help="SVM or kNN probe on frozen features",
        description="Frozen-feature evaluation of an encoder artifact. Pooled features (concat[CLS, max] or "
        "concat[max, mean]) of the train and test splits are extracted in eval mode. 'svm': StandardScaler + "
        "LinearSVC; C is chosen on a stratified hold-out of the TRAIN split, then refitted on all of train; "
        "the test split is evaluated once. 'knn': cosine k-nearest neighbours (faiss), majority vote; "
        "nothing is tuned. The report states the protocol, the selection split and the single-pass test "
        "accuracy.",
    )
    _add_source_arguments(p)
    p.add_argument("--method", choices=("svm", "knn"), default="svm", help="probe (default: %(default)s)")
    _add_num_points_argument(
        p, "points per cloud (first N of the FPS-ordered points; default: the artifact's data contract)"
    )
    p.add_argument(
        "--train-split", default="train", help="split the probe is fitted on (default: %(default)s)"
    )
    p.add_argument("--test-split", default="test", help="split reported once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and the SVM solver")
    _add_runtime_arguments(p)
    p.add_argument(
        "--c-grid",
        type=_c_grid,
        default=(0.001, 0.01, 0.1, 1.0, 10.0),
        metavar="C1,C2,...",
        help="SVM regularisation candidates (default: 0.001,0.01,0.1,1,10)",
    )
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.2,
        help="fraction of each train class held out to choose C (default: %(default)s)",
    )
    p.add_argument("--k", type=positive_int, default=20, help="kNN neighbours (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run_probe_command, func=run_probe_command)
    return p


# ------------------------------------------------------------------------------------------------- fewshot


def run_fewshot_command(args: argparse.Namespace) -> int:
    """Handler of ``pcpt-finetune fewshot``; prints the result and returns the exit status."""
    from finetune.fewshot import EpisodeSet, generate_episodes, run_fewshot_svm

    if args.episodes is None and (args.way is None or args.shot is None):
        raise UserError("fewshot: --way and --shot are required unless --episodes FILE is given")
    loaded = _load_common(args)
    classes = [str(c) for c in loaded.manifest.get("classes", [])]
    if not classes:
        raise UserError(f"{args.data}: the manifest lists no classes; few-shot needs labelled data")
    warnings = list(loaded.warnings)

    if args.episodes is not None:
        episodes = EpisodeSet.load(args.episodes)
        for name in ("way", "shot", "query", "folds"):
            given = getattr(args, name)
            if given is not None and given != getattr(episodes, name):
                raise UserError(
                    f"--{name} {given} conflicts with {args.episodes} ({name}={getattr(episodes, name)})"
                )
        support_split, query_split = episodes.support_split, episodes.query_split
    else:
        support_split = args.train_split
        query_split = args.train_split if args.query_split == "train" else args.test_split

    s_xyz, s_labels, s_keys = _load_split(args, loaded, support_split)
    if query_split == support_split:
        q_xyz, q_labels, q_keys = s_xyz, s_labels, s_keys
    else:
        q_xyz, q_labels, q_keys = _load_split(args, loaded, query_split)

    if args.episodes is None:
        try:
            episodes = generate_episodes(
                classes=classes,
                support_keys=s_keys,
                support_labels=s_labels,
                query_keys=None if query_split == support_split else q_keys,
                query_labels=None if query_split == support_split else q_labels,
                way=args.way,
                shot=args.shot,
                query=args.query if args.query is not None else 20,
                folds=args.folds if args.folds is not None else 10,
                seed=args.seed,
                manifest_sha256=loaded.manifest_sha256,
                support_split=support_split,
                query_split=query_split,
            )
        except ValueError as err:
            raise UserError(f"fewshot: {err}") from err
    else:
        warnings += episodes.verify_data(
            classes=classes,
            support_keys=s_keys,
            support_labels=s_labels,
            query_keys=q_keys,
            query_labels=q_labels,
            manifest_sha256=loaded.manifest_sha256,
        )
    if args.write_episodes is not None:
        episodes.save(args.write_episodes)
    _emit_warnings(warnings)

    if args.protocol == "finetune":
        from finetune.fewshot_finetune import run_fewshot_finetune

        s_rows = {k: s_xyz[i] for i, k in enumerate(s_keys)}
        q_rows = {k: q_xyz[i] for i, k in enumerate(q_keys)}
        result = run_fewshot_finetune(
            args.artifact,
            episodes,
            support_clouds=s_rows,
            query_clouds=q_rows,
            epochs=args.epochs,
            batch_size=min(args.batch_size, 32),
            accelerator="gpu" if loaded.device == "cuda" else "cpu",
        )
        return _report_fewshot(args, loaded, episodes, result, warnings)

    # features only for the keys the episodes use
    def keyed(xyz: np.ndarray, keys: list[str], wanted: set[str]) -> dict[str, np.ndarray]:
        rows = [i for i, k in enumerate(keys) if k in wanted]
        feats = _features(args, loaded, xyz[rows])
        return {keys[i]: feats[j] for j, i in enumerate(rows)}

    support_wanted = {k for ep in episodes.episodes for k in ep.support}
    query_wanted = {k for ep in episodes.episodes for k in ep.query}
    if query_split == support_split:
        support_features = keyed(s_xyz, s_keys, support_wanted | query_wanted)
        query_features = None
    else:
        support_features = keyed(s_xyz, s_keys, support_wanted)
        query_features = keyed(q_xyz, q_keys, query_wanted)
    result = run_fewshot_svm(episodes, support_features=support_features, query_features=query_features)
    return _report_fewshot(args, loaded, episodes, result, warnings)


def _report_fewshot(
    args: argparse.Namespace, loaded: _Loaded, episodes: Any, result: Any, warnings: Sequence[str]
) -> int:
    report = {
        **_report_header("fewshot", args, loaded),
        "episodes_file": None if args.episodes is None else str(args.episodes),
        "episodes_written": None if args.write_episodes is None else str(args.write_episodes),
        "warnings": list(warnings),
        "summary": result.summary(),
        **result.to_dict(),
    }
    if args.json:
        print_json(report)
        return 0
    if result.protocol == "finetune":
        protocol = f"finetune: full finetuning per fold, {result.params}"
    else:
        protocol = (
            f"{result.protocol}: {result.params.get('classifier')} C={result.params.get('C')} "
            f"on frozen pooled features, {result.params.get('scaler')}"
        )
    rows = [
        ("protocol", protocol),
        ("encoder", f"{args.artifact} ({report['method']})"),
        (
            "episodes",
            f"{result.way}-way {result.shot}-shot, {result.query} queries/class, {result.folds} folds, "
            f"seed {result.seed}, support {result.support_split!r}, query {result.query_split!r}",
        ),
        ("episodes sha256", result.episodes_sha256),
        ("selection", result.selection),
    ]
    rows += [(f"fold {i}", f"{100 * a:.2f}") for i, a in enumerate(result.fold_accuracies)]
    rows.append(("mean ± std", f"{result.summary()} % (sample std, ddof=1)"))
    print(_table(rows))
    return 0


def add_fewshot_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``fewshot`` to a ``pcpt-finetune`` subparsers object and returns its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "fewshot",
        help="few-shot episodes on frozen features, mean ± std over folds",
        description="Few-shot evaluation of an encoder artifact. Episodes: per fold, WAY classes, SHOT "
        "support clouds per class from the train split and QUERY clouds per class from the test split "
        "(Point-BERT/Point-MAE protocol; --query-split train gives the CrossPoint/ViPFormer variant), "
        "drawn from --seed and identified by sample keys; --write-episodes saves them as a versioned JSON "
        "file with a checksum and --episodes reruns exactly those episodes. Protocol 'svm': StandardScaler + "
        "linear SVC (C=1) fitted on each episode's support features, accuracy on its queries; nothing is "
        "tuned. Protocol 'finetune': the encoder is finetuned with a fresh head on each support set "
        "(--epochs, official 150) and the queries are evaluated once after the last epoch. Reports mean ± "
        "sample std "
        "(ddof=1) over the folds.",
    )
    _add_source_arguments(p)
    p.add_argument("--way", type=positive_int, default=None, metavar="W", help="classes per episode")
    p.add_argument("--shot", type=positive_int, default=None, metavar="S", help="support clouds per class")
    p.add_argument("--query", type=positive_int, default=None, help="query clouds per class (default: 20)")
    p.add_argument("--folds", type=positive_int, default=None, help="number of episodes (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="episode seed (default: %(default)s)")
    p.add_argument("--episodes", type=Path, default=None, metavar="FILE", help="read episodes from this file")
    p.add_argument("--write-episodes", type=Path, default=None, metavar="FILE", help="save the episodes used")
    p.add_argument(
        "--protocol",
        choices=("svm", "finetune"),
        default="svm",
        help="svm: linear SVC on frozen features; finetune: full finetuning of the encoder on each support "
        "set (Point-BERT/Point-MAE protocol), queries evaluated once after the last epoch (default: svm)",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=150,
        help="training epochs per fold for --protocol finetune (default: %(default)s)",
    )
    p.add_argument(
        "--query-split",
        choices=("test", "train"),
        default="test",
        help="draw queries from the test split (default) or from train, disjoint from the support set",
    )
    p.add_argument("--train-split", default="train", help="support split (default: %(default)s)")
    p.add_argument("--test-split", default="test", help="query split (default: %(default)s)")
    _add_num_points_argument(p, "points per cloud (default: the artifact's data contract)")
    _add_runtime_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run_fewshot_command, func=run_fewshot_command)
    return p
