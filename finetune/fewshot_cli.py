"""``pcpt-finetune fewshot``: few-shot episodes on an encoder artifact, mean ± sample std over the folds.

``fewshot ART --data OUT --way W --shot S`` draws seeded episodes (or reads them with ``--episodes FILE``),
evaluates each fold with the ``svm`` protocol (frozen pooled features) or the ``finetune`` protocol (full
finetuning per fold) and prints a table, or JSON with ``--json``, that states the protocol, the episodes'
checksum and the selection, and records it in the artifact (``encoder.json`` ``evaluations`` and the model
card; ``--no-record`` skips it). :func:`add_fewshot_parser` adds the subcommand to a ``pcpt-finetune``
parser and sets ``handler`` (and ``func``) to :func:`run_fewshot_command`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipes.cli_common import positive_int
from datapipes.errors import UserError
from finetune import eval_cli

OFFICIAL_EPOCHS, OFFICIAL_WARMUP_EPOCHS = 150, 10  # the few-shot finetune protocol of Point-BERT / Point-MAE

if TYPE_CHECKING:
    from finetune.fewshot import FewShotResult

__all__ = ["add_fewshot_parser", "run_fewshot_command"]


def add_fewshot_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``fewshot`` to a ``pcpt-finetune`` subparsers object and returns its parser."""
    p = eval_cli.add_eval_parser(
        subparsers,
        "fewshot",
        run_fewshot_command,
        help="few-shot episodes on frozen features, mean ± std over folds",
        description="Few-shot evaluation of an encoder artifact. Episodes: per fold, WAY classes, SHOT "
        "support clouds per class from the train split and QUERY clouds per class from the test split "
        "(Point-BERT/Point-MAE protocol; --query-split train gives the CrossPoint/ViPFormer variant), "
        "drawn from --seed and identified by sample keys; --write-episodes saves them as a versioned JSON "
        "file with a checksum and --episodes reruns exactly those episodes. Protocol 'svm': StandardScaler + "
        "linear SVC (C=1) fitted on each episode's support features, accuracy on its queries; nothing is "
        "tuned. Protocol 'finetune': the encoder is finetuned with a fresh head on each support set "
        "(--epochs, official 150) and the queries are evaluated once after the last epoch. Reports mean ± "
        "sample std (ddof=1) over the folds. With --protocol finetune, ART may also be a finetune config "
        "(YAML, e.g. configs/finetune/any2point_minilm.yaml): every fold then builds its model.encoder "
        "afresh (Any2Point: only the tokenizer, adapters, CLS, norm and head train on the frozen source) "
        "and nothing is recorded.",
        num_points_help="points per cloud (default: the artifact's data contract; 1024 for a config)",
        artifact_help="encoder artifact directory, or with --protocol finetune a finetune config YAML whose "
        "model.encoder is trained afresh in every fold",
    )
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
        "--warmup-epochs",
        type=float,
        default=None,
        help="linear warmup epochs of each fold for --protocol finetune (default: the official 10 of 150 "
        "scaled to --epochs, i.e. epochs / 15)",
    )
    p.add_argument(
        "--encoder-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="with a config as ART: replace a field of its model.encoder (VALUE read as YAML, e.g. "
        "tokenizer_k=16 or guided=false); repeatable",
    )
    p.add_argument(
        "--query-split",
        choices=("test", "train"),
        default="test",
        help="draw queries from the test split (default) or from train, disjoint from the support set",
    )
    p.add_argument("--train-split", default="train", help="support split (default: %(default)s)")
    p.add_argument("--test-split", default="test", help="query split (default: %(default)s)")
    return p


def run_fewshot_command(args: argparse.Namespace) -> int:
    """Handler of ``pcpt-finetune fewshot``; prints the result and returns the exit status."""
    from finetune.episodes import EpisodeSet, generate_episodes
    from finetune.fewshot import run_fewshot_svm

    if args.episodes is None and (args.way is None or args.shot is None):
        raise UserError("fewshot: --way and --shot are required unless --episodes FILE is given")
    warmup_epochs = _warmup_epochs(args) if args.protocol == "finetune" else 0.0
    spec, head = _config_spec(args)
    setup = eval_cli.load_setup(args, spec)
    classes = [str(c) for c in setup.manifest.get("classes", [])]
    if not classes:
        raise UserError(f"{args.data}: the manifest lists no classes; few-shot needs labelled data")
    warnings = list(setup.warnings)

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

    s_xyz, s_labels, s_keys = eval_cli.load_split(args, setup, support_split)
    if query_split == support_split:
        q_xyz, q_labels, q_keys = s_xyz, s_labels, s_keys
    else:
        q_xyz, q_labels, q_keys = eval_cli.load_split(args, setup, query_split)

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
                manifest_sha256=setup.manifest_sha256,
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
            manifest_sha256=setup.manifest_sha256,
        )
    if args.write_episodes is not None:
        episodes.save(args.write_episodes)
    eval_cli.emit_warnings(warnings)

    if args.protocol == "finetune":
        from finetune.fewshot_finetune import run_fewshot_finetune

        s_rows = {k: s_xyz[i] for i, k in enumerate(s_keys)}
        q_rows = {k: q_xyz[i] for i, k in enumerate(q_keys)}
        result = run_fewshot_finetune(
            None if spec is not None else args.artifact,
            episodes,
            encoder=spec,
            head=head,
            support_clouds=s_rows,
            query_clouds=q_rows,
            epochs=args.epochs,
            warmup_epochs=warmup_epochs,
            batch_size=min(args.batch_size, 32),
            accelerator="gpu" if setup.device == "cuda" else "cpu",
        )
        return _report(args, setup, result, warnings)

    # features only for the keys the episodes use
    def keyed(xyz: np.ndarray, keys: list[str], wanted: set[str]) -> dict[str, np.ndarray]:
        rows = [i for i, k in enumerate(keys) if k in wanted]
        feats = eval_cli.split_features(args, setup, xyz[rows])
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
    return _report(args, setup, result, warnings)


def _warmup_epochs(args: argparse.Namespace) -> float:
    """``--warmup-epochs``, or the official share of the run (10 of 150 epochs) when not given.

    Raises:
        UserError: a negative warmup, or one that is not shorter than ``--epochs``.
    """
    if args.warmup_epochs is None:
        return args.epochs * OFFICIAL_WARMUP_EPOCHS / OFFICIAL_EPOCHS
    if not 0 <= args.warmup_epochs < args.epochs:
        raise UserError(
            f"--warmup-epochs {args.warmup_epochs:g} must be >= 0 and shorter than --epochs {args.epochs}"
        )
    return float(args.warmup_epochs)


def _config_spec(args: argparse.Namespace) -> tuple[Any, str]:
    """The encoder spec and head of ART when it is a config file, else ``(None, "mae")``.

    A config is accepted with the finetune protocol only, and nothing is recorded (there is no artifact).

    A config's ``data.num_points`` becomes the default of ``--num-points``.

    Raises:
        UserError: a config with the svm protocol, or a config without a valid encoder spec.
    """
    from finetune.fewshot_finetune import encoder_spec_from_config

    path = Path(args.artifact)
    if not (path.is_file() and path.suffix in (".yaml", ".yml")):
        if args.encoder_set:
            raise UserError("--encoder-set needs a finetune config as ART, not an encoder artifact")
        return None, "mae"
    if args.protocol != "finetune":
        raise UserError(
            f"{path}: a config has no trained encoder to take features from; use an encoder artifact, "
            "or --protocol finetune to train the config's encoder in every fold"
        )
    try:
        config = encoder_spec_from_config(path, _encoder_overrides(args.encoder_set))
    except ValueError as err:
        raise UserError(str(err)) from err
    args.record = False  # no artifact to record in
    if args.num_points is None:
        args.num_points = config.num_points
    return config.spec, config.head


def _encoder_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs of ``--encoder-set`` as a mapping (values read as YAML scalars or lists).

    Raises:
        UserError: a pair without ``=`` or with a value that is not valid YAML.
    """
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep or not field.strip():
            raise UserError(f"--encoder-set {pair!r}: expected FIELD=VALUE, e.g. tokenizer_k=16")
        try:
            out[field.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UserError(f"--encoder-set {pair!r}: the value is not valid YAML: {err}") from err
    return out


def _report(
    args: argparse.Namespace, setup: eval_cli.EvalSetup, result: FewShotResult, warnings: Sequence[str]
) -> int:
    report = {
        **eval_cli.report_header("fewshot", args, setup),
        "episodes_file": None if args.episodes is None else str(args.episodes),
        "episodes_written": None if args.write_episodes is None else str(args.write_episodes),
        "warnings": list(warnings),
        "summary": result.summary(),
        **result.to_dict(),
    }
    if result.protocol == "finetune":
        protocol = f"finetune: {result.params.get('trains', 'full finetuning')} per fold, {result.params}"
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
    status = eval_cli.print_report(report, rows, args.json)
    eval_cli.record_result("fewshot", args, setup, _summary(report))
    return status


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the artifact records of a few-shot report: the protocol, the episodes and mean ± std."""
    keys = ("protocol", "way", "shot", "query", "folds", "seed", "support_split", "query_split", "mean")
    out = {key: report[key] for key in (*keys, "std", "std_kind", "summary", "episodes_sha256")}
    out.update(fold_accuracies=report["fold_accuracies"], selection=report["selection"])
    if isinstance(out["std"], float) and math.isnan(out["std"]):
        out["std"] = None  # one fold: no sample std (encoder.json stays strict JSON)
    return out
