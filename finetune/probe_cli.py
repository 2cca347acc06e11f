"""``pcpt-finetune probe``: linear-SVM or kNN probe on frozen pooled features.

``probe ART --data OUT`` extracts pooled features of the train and test splits with the frozen encoder and
runs a linear-SVM probe (C chosen on a hold-out of train) or a kNN probe; it prints a table, or JSON with
``--json``, that states the protocol, the split used for selection and the single-pass test accuracy, and
records it in the artifact (``encoder.json`` ``evaluations`` and the model card; ``--no-record`` skips it).
:func:`add_probe_parser` adds the subcommand to a ``pcpt-finetune`` parser and sets ``handler`` (and
``func``) to :func:`run_probe_command`.
"""

from __future__ import annotations

import argparse
from typing import Any

from datapipes.cli_common import positive_int
from datapipes.errors import UserError
from finetune import eval_cli

__all__ = ["add_probe_parser", "run_probe_command"]


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


def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``probe`` to a ``pcpt-finetune`` subparsers object and returns its parser."""
    p = eval_cli.add_eval_parser(
        subparsers,
        "probe",
        run_probe_command,
        help="SVM or kNN probe on frozen features",
        description="Frozen-feature evaluation of an encoder artifact. Pooled features (concat[CLS, max] or "
        "concat[max, mean]) of the train and test splits are extracted in eval mode. 'svm': StandardScaler + "
        "LinearSVC; C is chosen on a stratified hold-out of the TRAIN split, then refitted on all of train; "
        "the test split is evaluated once. 'knn': cosine k-nearest neighbours (faiss), majority vote; "
        "nothing is tuned. The report states the protocol, the selection split and the single-pass test "
        "accuracy.",
        num_points_help="points per cloud (first N of the FPS-ordered points; default: the artifact's data "
        "contract)",
    )
    p.add_argument("--method", choices=("svm", "knn"), default="svm", help="probe (default: %(default)s)")
    p.add_argument(
        "--train-split", default="train", help="split the probe is fitted on (default: %(default)s)"
    )
    p.add_argument("--test-split", default="test", help="split reported once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and the SVM solver")
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
    return p


def run_probe_command(args: argparse.Namespace) -> int:
    """Handler of ``pcpt-finetune probe``; prints the result and returns the exit status."""
    from finetune.probes import knn_probe, svm_probe

    setup = eval_cli.load_setup(args)
    eval_cli.emit_warnings(setup.warnings)
    train_xyz, train_y, _ = eval_cli.load_split(args, setup, args.train_split)
    test_xyz, test_y, _ = eval_cli.load_split(args, setup, args.test_split)
    train_x = eval_cli.split_features(args, setup, train_xyz)
    test_x = eval_cli.split_features(args, setup, test_xyz)
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
        **eval_cli.report_header("probe", args, setup),
        "train_split": args.train_split,
        "test_split": args.test_split,
        "feature_dim": int(train_x.shape[1]),
        "warnings": setup.warnings,
        **result.to_dict(),
    }
    rows = [
        ("protocol", f"{result.protocol} probe on frozen pooled features ({report['feature_dim']}-d)"),
        ("encoder", f"{args.artifact} ({report['method']})"),
        (
            "data",
            f"{args.data}: train {args.train_split!r}, test {args.test_split!r}, {setup.num_points} points",
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
    status = eval_cli.print_report(report, rows, args.json)
    eval_cli.record_result("probe", args, setup, _summary(report))
    return status


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the artifact records of a probe report: the protocol, the splits and the accuracy."""
    keys = ("protocol", "train_split", "test_split", "accuracy", "selection", "params", "n_train", "n_val")
    return {key: report[key] for key in (*keys, "n_test", "seed", "feature_dim")}
