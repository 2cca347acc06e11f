"""``pcpt-finetune``: transfer tools that consume encoder artifacts.

Subcommands:

- ``embed ART --input CLOUDS.npy --out FEATURES.npz``: per-cloud features of a frozen encoder.

Subcommands that hand their arguments to another parser (LightningCLI ``fit``) go in :data:`PASSTHROUGH`;
argparse-based ones add a handler to :data:`COMMANDS` and a subparser in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from datapipes.cli_common import (
    CliParser,
    Handler,
    Passthrough,
    dispatch,
    positive_int,
    print_json,
    resolve_device,
)
from datapipes.errors import UserError, run_cli
from finetune.eval_cli import add_fewshot_parser, add_probe_parser

__all__ = ["COMMANDS", "PASSTHROUGH", "PROG", "CliParser", "build_parser", "main", "positive_int"]

PROG = "pcpt-finetune"

ModelT = TypeVar("ModelT")


def _cmd_embed(args: argparse.Namespace) -> int:
    """``embed``: features of an encoder artifact, or token ids (B, G) of a dVAE tokenizer artifact."""
    from finetune.embed import (
        check_features_destination,
        embed_clouds,
        load_clouds,
        tokenize_clouds,
        write_features,
    )
    from pretrain.checkpoint import load_encoder, read_artifact_meta
    from pretrain.tokenizers import TOKENIZER_KIND, load_tokenizer

    check_features_destination(args.out)  # before any work
    device = resolve_device(args.device)
    run: Callable[..., dict[str, np.ndarray]]
    if read_artifact_meta(args.artifact).get("kind") == TOKENIZER_KIND:
        tokenizer, meta = load_tokenizer(args.artifact)
        min_points = max(tokenizer.spec.num_groups, tokenizer.spec.group_size)
        run = partial(tokenize_clouds, tokenizer)
        trained_points = None  # the point-count note is about encoders
        extra: dict[str, Any] = {"kind": meta["kind"], "codebook_size": tokenizer.spec.codebook_size}
    else:
        encoder, meta = load_encoder(args.artifact)
        min_points = max(encoder.spec.num_groups, encoder.spec.group_size)
        run = partial(embed_clouds, encoder)
        trained_points = meta.get("data_contract", {}).get("num_points")
        extra = {"pooled": "concat[cls, max]" if encoder.spec.cls_token else "concat[max, mean]"}
    clouds = load_clouds(args.input, min_points=min_points)
    contract = meta.get("data_contract", {})
    normalize = args.normalize == "unit_sphere" or (
        args.normalize == "contract" and contract.get("normalization") == "unit_sphere"
    )
    if trained_points and clouds.shape[1] != trained_points and not args.quiet:
        print(
            f"{PROG}: note: clouds have {clouds.shape[1]} points; "
            f"the encoder was trained on {trained_points}",
            file=sys.stderr,
        )
    try:
        features = run(
            clouds,
            batch_size=args.batch_size,
            device=device,
            normalize=normalize,
            seed=args.seed,
            progress=not args.quiet,
        )
    except UserError as err:
        raise UserError(f"{args.input}: {err}") from err
    out = write_features(args.out, features)
    if args.json:
        summary = {
            "artifact": str(args.artifact),
            "input": str(args.input),
            "out": str(out),
            "num_clouds": int(clouds.shape[0]),
            "num_points": int(clouds.shape[1]),
            "normalized": normalize,
            "shapes": {name: list(array.shape) for name, array in features.items()},
            **extra,
        }
        print_json(summary)
    else:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in features.items())
        print(f"wrote {out}: {shapes}")
    return 0


#: argparse subcommand name -> handler.
COMMANDS: dict[str, Handler] = {"embed": _cmd_embed}


#: subcommands that receive the remaining argv untouched (e.g. ``fit`` -> LightningCLI).
def _fit(argv: list[str]) -> int:
    from finetune.lightning_cli import run_lightning_cli  # heavy: Lightning

    return run_lightning_cli(["fit", *argv])


PASSTHROUGH: dict[str, Passthrough] = {"fit": _fit}


def build_parser() -> CliParser:
    """The argparse parser for the argparse-based subcommands."""
    parser = CliParser(
        prog=PROG,
        description="pcpt transfer tools: use encoder artifacts (from pcpt-pretrain export/import).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser, required=True)
    sub.add_parser(
        "fit",
        help="finetune / linear-probe with LightningCLI: pcpt-finetune fit -c configs/finetune/classify.yaml "
        "--model.pretrained ART --data.data_root OUT",
        add_help=False,
    )
    add_probe_parser(sub)
    add_fewshot_parser(sub)

    p = sub.add_parser(
        "embed",
        help="per-cloud features of a frozen encoder",
        description="Encode point clouds with an encoder artifact (eval mode, no masking, no gradients) and "
        "write an .npz with: tokens (B, G, D) patch tokens after the final norm; centers (B, G, 3) patch "
        "centres; pooled (B, 2D) global feature = concat[CLS, max over tokens] when the encoder has a CLS "
        "token, else concat[max, mean]. D is the encoder width, G its number of patches. A single cloud "
        "(N, 3) gives B = 1. With a Point-BERT dVAE tokenizer artifact (kind dvae_tokenizer) the .npz holds "
        "token_ids (B, G) int64 codebook indices and centers (B, G, 3) instead.",
    )
    p.add_argument(
        "artifact", metavar="ART", type=Path, help="encoder (or dVAE tokenizer) artifact directory"
    )
    p.add_argument(
        "--input", required=True, type=Path, metavar="CLOUDS.npy", help="float32 points (B, N, 3) or (N, 3)"
    )
    p.add_argument("--out", required=True, type=Path, metavar="FEATURES.npz", help="output .npz file")
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="clouds per batch (default: %(default)s)"
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="cpu", help="where to run (default: %(default)s)"
    )
    p.add_argument(
        "--normalize",
        choices=("none", "unit_sphere", "contract"),
        default="none",
        help="normalise clouds first: none (use the points as given), unit_sphere, or whatever the "
        "artifact's data contract says (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random FPS starts, if the spec uses them")
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(handler=COMMANDS["embed"])
    return parser


def _main(argv: Sequence[str] | None) -> int:
    return dispatch(argv, build_parser, PASSTHROUGH)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcpt-finetune``; returns the exit status (0 ok, 2 user error)."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
