"""``pcpt-pretrain``: encoder artifacts from Lightning checkpoints and from official weights.

Subcommands:

- ``export CKPT OUT``: a pcpt Lightning checkpoint -> encoder artifact.
- ``import FORMAT SRC OUT``: an official Point-MAE / Point-BERT checkpoint -> encoder artifact.

Subcommands that hand their arguments to another parser (LightningCLI ``fit``/``validate``) are added to
:data:`PASSTHROUGH`; they bypass argparse entirely.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datapipes.cli_common import CliParser, Handler, Passthrough, dispatch, positive_int, print_json
from datapipes.errors import UserError, run_cli

__all__ = ["COMMANDS", "PASSTHROUGH", "PROG", "CliParser", "build_parser", "dispatch", "main", "positive_int"]

PROG = "pcpt-pretrain"


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    spec = summary.get("spec", {})
    if summary.get("kind") == "dvae_tokenizer":
        print(
            f"wrote {summary['artifact']}: dVAE tokenizer, {spec.get('codebook_size')} codes of width "
            f"{spec.get('token_dim')}, {spec.get('num_groups')} groups of {spec.get('group_size')}, "
            f"{summary['num_params']:,} parameters"
        )
        return
    arch = (
        f"{spec.get('arch')} {spec.get('embed_dim')}x{spec.get('depth')} ({spec.get('num_heads')} heads), "
        f"{spec.get('num_groups')} groups of {spec.get('group_size')}, cls_token={spec.get('cls_token')}"
    )
    print(f"wrote {summary['artifact']}: {arch}, {summary['num_params']:,} parameters")


def _cmd_export(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import WeightsMismatchError, export_from_lightning_ckpt, read_artifact_meta
    from pretrain.tokenizers import TOKENIZER_KIND, export_tokenizer_from_lightning_ckpt, lightning_ckpt_kind

    tokenizer = lightning_ckpt_kind(args.ckpt) == TOKENIZER_KIND
    exporter = export_tokenizer_from_lightning_ckpt if tokenizer else export_from_lightning_ckpt
    try:
        out = exporter(args.ckpt, args.out)
    except WeightsMismatchError as err:
        raise UserError(str(err)) from err
    meta = read_artifact_meta(out)
    summary = {
        "artifact": str(out),
        "kind": meta["kind"],
        "spec": meta["spec"],
        "num_params": meta["num_params"],
        "provenance": meta["provenance"],
        "data_contract": meta["data_contract"],
    }
    _print_summary(summary, args.json)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import WeightsMismatchError
    from pretrain.importers import import_official

    try:
        summary = import_official(
            args.format,
            args.src,
            args.out,
            num_heads=args.num_heads,
            num_groups=args.num_groups,
            group_size=args.group_size,
            num_points=args.num_points,
            drop_path=args.drop_path,
        )
    except WeightsMismatchError as err:
        raise UserError(str(err)) from err
    _print_summary(summary, args.json)
    return 0


#: argparse subcommand name -> handler.
COMMANDS: dict[str, Handler] = {"export": _cmd_export, "import": _cmd_import}


#: subcommands that receive the remaining argv untouched (e.g. ``fit`` -> LightningCLI).
def _lightning(subcommand: str) -> Passthrough:
    def run(argv: list[str]) -> int:
        from pretrain.lightning_cli import run_lightning_cli  # heavy: Lightning + methods

        return run_lightning_cli([subcommand, *argv])

    return run


PASSTHROUGH: dict[str, Passthrough] = {
    "fit": _lightning("fit"),
    "validate": _lightning("validate"),
}


def build_parser() -> CliParser:
    """The argparse parser for the argparse-based subcommands."""
    from pretrain.importers import REMAPS  # light: no Lightning import

    parser = CliParser(
        prog=PROG,
        description="pcpt pre-training tools: write encoder artifacts (encoder.safetensors + encoder.json) "
        "from pcpt Lightning checkpoints or from official Point-MAE / Point-BERT weights.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser, required=True)
    sub.add_parser(
        "fit",
        help="pre-train with LightningCLI: pcpt-pretrain fit -c configs/pretrain/<method>.yaml [overrides]",
        add_help=False,
    )
    sub.add_parser("validate", help="LightningCLI validate (same arguments as fit)", add_help=False)

    p = sub.add_parser(
        "export",
        help="Lightning checkpoint -> encoder (or dVAE tokenizer) artifact",
        description="Export the encoder of a pcpt Lightning checkpoint (.ckpt, read with weights_only=True) "
        "as an artifact directory (the dVAE tokenizer for a PointDVAE checkpoint); provenance records the "
        "method, step, epoch and git commit.",
    )
    p.add_argument(
        "ckpt", metavar="CKPT", type=Path, help="Lightning checkpoint written by pcpt-pretrain fit"
    )
    p.add_argument(
        "out", metavar="OUT", type=Path, help="artifact directory to write (replaced if it exists)"
    )
    p.add_argument("--json", action="store_true", help="print the artifact summary as JSON")
    p.set_defaults(handler=COMMANDS["export"])

    p = sub.add_parser(
        "import",
        help="official checkpoint -> encoder artifact",
        description="Convert an official checkpoint (a pickle, read with torch.load(weights_only=True) "
        "only) into an artifact. point-mae: pre-training (Point_MAE) or finetuned classifier; point-bert: "
        "masked point modelling (Point_BERT, transformer_q) or finetuned classifier; point-bert-dvae: the "
        "dVAE (DiscreteVAE, or dvae.* of a Point_BERT checkpoint) -> dvae_tokenizer artifact. The encoder "
        "width, "
        "depth, tokenizer width and CLS/mask tokens are read from the weights; heads and grouping are not "
        "stored there and come from the options (defaults = the official 1024-point setup).",
    )
    p.add_argument(
        "format", metavar="FORMAT", choices=sorted(REMAPS), help=f"one of {', '.join(sorted(REMAPS))}"
    )
    p.add_argument("src", metavar="SRC", type=Path, help="official checkpoint file (.pth)")
    p.add_argument(
        "out", metavar="OUT", type=Path, help="artifact directory to write (replaced if it exists)"
    )
    p.add_argument("--num-heads", type=positive_int, default=6, help="attention heads (default: %(default)s)")
    p.add_argument(
        "--num-groups", type=positive_int, default=64, help="patches per cloud (default: %(default)s)"
    )
    p.add_argument(
        "--group-size", type=positive_int, default=32, help="points per patch (default: %(default)s)"
    )
    p.add_argument(
        "--num-points",
        type=positive_int,
        default=1024,
        help="points per cloud (data contract; default: %(default)s)",
    )
    p.add_argument(
        "--drop-path",
        type=float,
        default=0.1,
        help="drop-path rate stored in the spec (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the artifact summary as JSON")
    p.set_defaults(handler=COMMANDS["import"])
    return parser


def _main(argv: Sequence[str] | None) -> int:
    return dispatch(argv, build_parser, PASSTHROUGH)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcpt-pretrain``; returns the exit status (0 ok, 2 user error)."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
