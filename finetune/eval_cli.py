"""Plumbing shared by the frozen-feature evaluation commands ``pcpt-finetune probe`` and ``fewshot``.

Both take an encoder artifact and a shard directory (:func:`add_eval_parser`), check the data against
the artifact's data contract and load the encoder (:func:`load_setup`), load labelled splits
(:func:`load_split`), extract pooled features with ``pretrain.features.extract_features``
(:func:`split_features`) and print a report, as a table or as JSON with ``--json`` (:func:`print_report`),
that starts with :func:`report_header`. The result's summary is then recorded in the artifact
(``encoder.json`` under ``evaluations``, and its model card) unless ``--no-record`` (:func:`record_result`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.cli_common import positive_int, print_json, resolve_device
from datapipes.errors import UserError
from datapipes.shards.remote import as_location

__all__ = [
    "PROG",
    "EvalSetup",
    "add_eval_parser",
    "emit_warnings",
    "load_setup",
    "load_split",
    "print_report",
    "record_result",
    "report_header",
    "split_features",
]

PROG = "pcpt-finetune"


# ----------------------------------------------------------------------------------------------- parsers


def add_eval_parser(
    subparsers: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str,
    num_points_help: str,
    artifact_help: str = "encoder artifact directory",
) -> argparse.ArgumentParser:
    """Adds an evaluation subcommand with the arguments every one takes; returns its parser.

    The common arguments: ``ART``, ``--data OUT`` and ``--verify`` (the inputs), ``--num-points``,
    ``--batch-size`` and ``--device`` (the feature extraction), ``--json`` and ``--no-record`` (``record``:
    whether to record the result in the artifact). ``handler`` (also as ``func``) becomes the parser's
    default.
    """
    p: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("artifact", metavar="ART", type=Path, help=artifact_help)
    p.add_argument(
        "--data",
        required=True,
        type=as_location,
        metavar="OUT",
        help="shard directory (with manifest.json): a local path or a URL (https://..., s3://...)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="hash every shard used against the manifest's sha256 before loading (reads the data twice); "
        "loading always checks sample counts, tar structure and finite points",
    )
    p.add_argument("--num-points", type=positive_int, default=None, metavar="N", help=num_points_help)
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="clouds per forward (default: %(default)s)"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--no-record",
        dest="record",
        action="store_false",
        help="do not record the result in the artifact (by default it is appended to encoder.json under "
        "'evaluations' and to the model card README.md, when the artifact is writable)",
    )
    p.set_defaults(handler=handler, func=handler)
    return p


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class EvalSetup:
    """The encoder and data of one evaluation command.

    Attributes:
        encoder: the frozen encoder (``pretrain.encoders.PointEncoder``).
        meta: artifact metadata (spec, data contract, provenance).
        manifest: the shard manifest.
        manifest_sha256: sha256 of ``manifest.json``, identifies the data in reports and episode files.
        num_points: points per cloud fed to the encoder.
        device: where the encoder runs.
        warnings: data-contract warnings to show.
    """

    encoder: Any
    meta: dict[str, Any]
    manifest: dict[str, Any]
    manifest_sha256: str
    num_points: int
    device: str
    warnings: list[str]


def load_setup(args: argparse.Namespace, spec: Any = None) -> EvalSetup:
    """Loads the artifact and the manifest of ``args`` and checks them against each other.

    Args:
        args: the parsed command line (``artifact``, ``data``, ``num_points``, ``device``).
        spec: an encoder spec (``pretrain.encoders.EncoderSpec``) to build instead of loading the artifact,
            for protocols that train a fresh encoder per fold from a config; it has no data contract, so
            only the data's own checks apply (``args.num_points``, default 1024).

    Raises:
        UserError: missing artifact or manifest, a data-contract mismatch, or too few points per cloud.
    """
    from datapipes.shards import is_url, manifest_sha256, read_manifest
    from finetune.contract import check_data_contract
    from finetune.data import manifest_normalization
    from pretrain.checkpoint import WeightsMismatchError, load_encoder

    artifact = Path(args.artifact)
    if spec is not None:
        from pretrain.encoders import build_encoder

        try:
            encoder = build_encoder(spec)
        except (OSError, ValueError) as err:
            raise UserError(f"{artifact}: cannot build its encoder: {err}") from err
        method = f"{spec.arch} (built from {artifact.name})"
        meta: dict[str, Any] = {"spec": spec.to_dict(), "provenance": {"method": method}}
    elif not artifact.exists():
        raise UserError(f"{artifact}: no such encoder artifact")
    else:
        try:
            encoder, meta = load_encoder(artifact)
        except WeightsMismatchError as err:
            raise UserError(str(err)) from err
    data: str | Path = args.data
    if not is_url(data) and not (Path(data) / "manifest.json").is_file():
        raise UserError(f"{data}: no manifest.json; not a pcpt shard directory (see pcpt-data convert/synth)")
    manifest = read_manifest(data)  # a URL's is fetched (unreachable or missing: a one-line error)
    contract = meta.get("data_contract") or {}
    requested = args.num_points
    num_points = int(requested if requested is not None else contract.get("num_points", 1024))
    warnings = (
        []
        if spec is not None
        else check_data_contract(
            meta, num_points, manifest_normalization(manifest), allow_num_points_change=requested is not None
        )
    )
    if num_points < encoder.min_points:
        raise UserError(
            f"--num-points {num_points}: the encoder needs at least {encoder.min_points} points per cloud"
        )
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
    return EvalSetup(
        encoder, meta, manifest, manifest_sha256(data), num_points, resolve_device(args.device), warnings
    )


def load_split(
    args: argparse.Namespace, setup: EvalSetup, split: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Clouds (S, num_points, 3), labels (S,) and keys of one labelled split of ``args.data``.

    Raises:
        UserError: a missing, empty, unreadable or unlabelled split (with ``--verify``: a hash mismatch).
    """
    from datapipes.memory import load_split_arrays

    splits = setup.manifest.get("splits", {})
    if split not in splits:
        raise UserError(f"{args.data}: no split {split!r}; the data has {sorted(splits)}")
    if getattr(args, "verify", False):
        from datapipes.shards import check_shard_hashes

        check_shard_hashes(args.data, [split], manifest=setup.manifest)
    try:
        xyz, labels, keys = load_split_arrays(args.data, split, setup.num_points)
    except (ValueError, OSError) as err:
        raise UserError(f"{args.data}: cannot load split {split!r}: {err}") from err
    if len(keys) == 0:
        raise UserError(f"{args.data}: split {split!r} is empty")
    if xyz.shape[1] != setup.num_points:
        raise UserError(
            f"{args.data}: split {split!r} has clouds of {xyz.shape[1]} points, {setup.num_points} requested"
        )
    if labels.size and labels.min() < 0:
        raise UserError(f"{args.data}: split {split!r} has unlabelled samples; probes need class labels")
    return xyz, labels, list(keys)


def split_features(args: argparse.Namespace, setup: EvalSetup, xyz: np.ndarray) -> np.ndarray:
    """Pooled features (S, 2D) of clouds (S, N, 3) with the frozen encoder, with progress on stderr."""
    from pretrain.features import extract_features

    return extract_features(
        setup.encoder, xyz, batch_size=args.batch_size, device=setup.device, progress=True
    )


# ------------------------------------------------------------------------------------------------ reports


def emit_warnings(warnings: Sequence[str]) -> None:
    """Prints each warning on stderr as ``pcpt-finetune: warning: ...``."""
    for text in warnings:
        print(f"{PROG}: warning: {text}", file=sys.stderr)


def report_header(command: str, args: argparse.Namespace, setup: EvalSetup) -> dict[str, Any]:
    """The fields every evaluation report starts with: the command, the encoder and the data evaluated."""
    provenance = setup.meta.get("provenance") or {}
    return {
        "command": command,
        "artifact": str(args.artifact),
        "method": str(provenance.get("method") or "unknown"),
        "data": str(args.data),
        "manifest_sha256": setup.manifest_sha256,
        "num_points": setup.num_points,
    }


def print_report(report: Mapping[str, Any], rows: Sequence[tuple[str, str]], as_json: bool) -> int:
    """Prints ``report`` as JSON, or ``rows`` as a two-column table; returns the exit status 0."""
    if as_json:
        print_json(report)
        return 0
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0


# -------------------------------------------------------------------------------------------- recording


def record_result(
    command: str, args: argparse.Namespace, setup: EvalSetup, summary: Mapping[str, Any]
) -> bool:
    """Appends a result summary to the artifact's ``evaluations`` and model card, unless ``--no-record``.

    The entry is ``summary`` (protocol, splits, numbers) after the command, the data (path, manifest
    sha256, points per cloud), the date (UTC) and the pcpt git sha. ``encoder.json`` and ``README.md`` are
    replaced atomically, the weights are not touched. A read-only artifact (or one that changed since it was
    loaded) is not an error: a note on stderr says the result was not recorded.

    Returns:
        Whether the result was recorded.
    """
    if not getattr(args, "record", True):
        return False
    from pretrain.artifact_files import META_FILE, ArtifactError, record_evaluation
    from pretrain.provenance import git_sha

    artifact = Path(args.artifact)
    entry = {
        "command": command,
        "data": str(args.data),
        "manifest_sha256": setup.manifest_sha256,
        "num_points": setup.num_points,
        **summary,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
    }
    if not (os.access(artifact, os.W_OK) and os.access(artifact / META_FILE, os.W_OK)):
        return _not_recorded(artifact, "the artifact is read-only")
    try:
        record_evaluation(artifact, entry)
    except (OSError, ArtifactError, ValueError) as err:
        return _not_recorded(artifact, str(err))
    print(f"{PROG}: recorded the result in {artifact / META_FILE} and its model card", file=sys.stderr)
    return True


def _not_recorded(artifact: Path, why: str) -> bool:
    print(f"{PROG}: note: the result was not recorded in {artifact} ({why})", file=sys.stderr)
    return False
