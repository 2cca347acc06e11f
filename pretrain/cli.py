"""``pcpt-pretrain``: encoder artifacts from Lightning checkpoints and from official weights.

Subcommands:

- ``export CKPT OUT``: a pcpt Lightning checkpoint -> encoder artifact.
- ``import FORMAT SRC OUT``: an official Point-MAE / Point-BERT / ViPFormer checkpoint -> artifact.
- ``eval-tokenizer ART --data ROOT``: reconstruction Chamfer distances and codebook usage of a dVAE tokenizer
  artifact on one split of a shard folder.

Subcommands that hand their arguments to another parser (LightningCLI ``fit``/``validate``) are added to
:data:`PASSTHROUGH`; they bypass argparse entirely.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datapipes.cli_common import CliParser, Handler, Passthrough, positive_int, print_json, run_subcommands
from datapipes.errors import UserError

__all__ = ["COMMANDS", "PASSTHROUGH", "PROG", "CliParser", "build_parser", "main", "positive_int"]

PROG = "pcpt-pretrain"


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    from pretrain.artifacts import artifact_kind

    print(f"wrote {summary['artifact']}: {artifact_kind(summary['kind']).summary(summary)}")


def _cmd_export(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import export_from_lightning_ckpt, read_artifact_meta

    out = export_from_lightning_ckpt(args.ckpt, args.out)
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
    from pretrain.importers import import_official

    summary = import_official(
        args.format,
        args.src,
        args.out,
        num_heads=args.num_heads,
        num_groups=args.num_groups,
        group_size=args.group_size,
        num_points=args.num_points,
        drop_path=args.drop_path,
        num_cross_layers=args.num_cross_layers,
    )
    _print_summary(summary, args.json)
    return 0


def _cmd_eval_tokenizer(args: argparse.Namespace) -> int:
    import numpy as np

    from datapipes.cli_common import resolve_device
    from datapipes.geometry import normalize_unit_sphere
    from datapipes.memory import load_split_arrays
    from pretrain.dvae import load_dvae
    from pretrain.dvae_eval import evaluate_dvae

    dvae, meta = load_dvae(args.artifact)
    contract = meta.get("data_contract", {})
    num_points = int(contract.get("num_points", 1024))
    xyz, _, _ = load_split_arrays(args.data, args.split, num_points)  # FPS order: the first num_points
    if xyz.shape[1] != num_points:
        raise UserError(
            f"{args.data}: split {args.split!r} stores {xyz.shape[1]} points per cloud; the dVAE "
            f"{args.artifact} was trained on {num_points}"
        )
    if contract.get("normalization", "unit_sphere") == "unit_sphere":
        xyz = np.stack([normalize_unit_sphere(cloud)[0] for cloud in xyz])
    report = evaluate_dvae(
        dvae, xyz, batch_size=args.batch_size, device=resolve_device(args.device), seed=args.seed
    )
    summary = {
        "artifact": str(args.artifact),
        "data": str(args.data),
        "split": args.split,
        "num_points": num_points,
        "seed": args.seed,
        "protocol": "hard Gumbel codes at temperature 1, decoded (the official dVAE validation); "
        "codebook usage of the argmax token ids",
        **report,
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"{summary['num_clouds']} clouds of {args.data} ({args.split}): Chamfer-L1 {report['cdl1']:.5f}, "
            f"Chamfer-L2 {report['cdl2']:.6f}, patch reconstruction {report['loss_recon']:.5f}; codebook "
            f"perplexity {report['code_perplexity']:.1f}, {report['dead_codes']} of "
            f"{report['codebook_size']} codes unused"
        )
    return 0


#: argparse subcommand name -> handler.
COMMANDS: dict[str, Handler] = {
    "export": _cmd_export,
    "import": _cmd_import,
    "eval-tokenizer": _cmd_eval_tokenizer,
}


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
        description="pcpt pre-training tools: pre-train, write encoder artifacts (encoder.safetensors + "
        "encoder.json) from pcpt Lightning checkpoints or from official Point-MAE / Point-BERT / ViPFormer "
        "weights, and "
        "evaluate dVAE tokenizer artifacts.",
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
        "dVAE (DiscreteVAE, or dvae.* of a Point_BERT checkpoint) -> dvae_tokenizer artifact; vipformer: a "
        "bare ViPFormer state dict, the point model (pc_model_best.pth) -> vipformer_point encoder with the "
        "official partial patch centring, or the image model (img_model_best.pth) -> image_encoder artifact. "
        "Widths, depths, MLP ratios, tokenizer width and CLS/mask tokens are read from the weights; heads "
        "and grouping are not stored there and come from the options (defaults = the official 1024-point "
        "setup of each format).",
    )
    p.add_argument(
        "format", metavar="FORMAT", choices=sorted(REMAPS), help=f"one of {', '.join(sorted(REMAPS))}"
    )
    p.add_argument("src", metavar="SRC", type=Path, help="official checkpoint file (.pth)")
    p.add_argument(
        "out", metavar="OUT", type=Path, help="artifact directory to write (replaced if it exists)"
    )
    p.add_argument(
        "--num-heads",
        type=positive_int,
        default=None,
        help="attention heads (default: 6; vipformer: 4 at width 256, 6 at width 384)",
    )
    p.add_argument(
        "--num-groups",
        type=positive_int,
        default=None,
        help="patches per cloud, ViPFormer latents (default: 64; vipformer: 128)",
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
    p.add_argument(
        "--num-cross-layers",
        type=positive_int,
        default=None,
        help="vipformer: cross-attention layers, needed only for a checkpoint with more than one",
    )
    p.add_argument("--json", action="store_true", help="print the artifact summary as JSON")
    p.set_defaults(handler=COMMANDS["import"])

    p = sub.add_parser(
        "eval-tokenizer",
        help="reconstruction and codebook usage of a dVAE tokenizer artifact on a split",
        description="Evaluate a dvae_tokenizer artifact (trained by pcpt or imported from an official "
        "checkpoint) on one split of a shard folder, as the official dVAE validation does: hard Gumbel codes "
        "at temperature 1 are decoded and compared with the input clouds (whole-cloud Chamfer-L1 and -L2, "
        "patch reconstruction loss), and the argmax token ids give the codebook perplexity and the number of "
        "unused codes. Clouds: the first num_points stored points (FPS order) of the artifact's data "
        "contract, normalised as it says.",
    )
    p.add_argument("artifact", metavar="ART", type=Path, help="dvae_tokenizer artifact directory")
    p.add_argument("--data", type=Path, required=True, help="shard folder (written by pcpt-data)")
    p.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="clouds per batch (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Gumbel noise (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=COMMANDS["eval-tokenizer"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcpt-pretrain``; returns the exit status (0 ok, 2 user error)."""
    return run_subcommands(PROG, argv, build_parser, PASSTHROUGH)


if __name__ == "__main__":
    sys.exit(main())
