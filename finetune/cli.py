"""``pcpt-finetune``: transfer tools that consume encoder artifacts.

Subcommands:

- ``embed ART --input CLOUDS.npy --out FEATURES.npz``: per-cloud features of a frozen encoder.

Subcommands that hand their arguments to another parser (LightningCLI ``fit``) go in :data:`PASSTHROUGH`;
argparse-based ones add a handler to :data:`COMMANDS` and a subparser in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from datapipes.errors import UserError, run_cli
from finetune.eval_cli import add_fewshot_parser, add_probe_parser

__all__ = ["COMMANDS", "PASSTHROUGH", "PROG", "CliParser", "build_parser", "main", "positive_int"]

PROG = "pcpt-finetune"

Handler = Callable[[argparse.Namespace], int]


class CliParser(argparse.ArgumentParser):
    """ArgumentParser whose errors become one-line :class:`UserError` messages (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    """Parses an integer >= 1 (an argparse ``type``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _resolve_device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return name


def _normalize_flag(args: argparse.Namespace, contract: dict[str, object]) -> bool:
    return bool(
        args.normalize == "unit_sphere"
        or (args.normalize == "contract" and contract.get("normalization") == "unit_sphere")
    )


def _cmd_tokenize(args: argparse.Namespace, device: str) -> int:
    """``embed`` with a dVAE tokenizer artifact: token ids (B, G) and centres (B, G, 3)."""
    from finetune.embed import load_clouds, tokenize_clouds, write_features
    from pretrain.checkpoint import WeightsMismatchError
    from pretrain.tokenizers import load_tokenizer

    try:
        tokenizer, meta = load_tokenizer(args.artifact)
    except WeightsMismatchError as err:
        raise UserError(str(err)) from err
    spec = tokenizer.spec
    clouds = load_clouds(args.input, min_points=max(spec.num_groups, spec.group_size))
    normalize = _normalize_flag(args, meta.get("data_contract", {}))
    features = tokenize_clouds(
        tokenizer,
        clouds,
        batch_size=args.batch_size,
        device=device,
        normalize=normalize,
        seed=args.seed,
        progress=not args.quiet,
    )
    out = write_features(args.out, features)
    if args.json:
        summary = {
            "artifact": str(args.artifact),
            "kind": meta["kind"],
            "input": str(args.input),
            "out": str(out),
            "num_clouds": int(clouds.shape[0]),
            "num_points": int(clouds.shape[1]),
            "normalized": normalize,
            "codebook_size": spec.codebook_size,
            "shapes": {name: list(array.shape) for name, array in features.items()},
        }
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in features.items())
        print(f"wrote {out}: {shapes}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from finetune.embed import embed_clouds, load_clouds, write_features
    from pretrain.checkpoint import WeightsMismatchError, load_encoder, read_artifact_meta
    from pretrain.tokenizers import TOKENIZER_KIND

    device = _resolve_device(args.device)
    if read_artifact_meta(args.artifact).get("kind") == TOKENIZER_KIND:
        return _cmd_tokenize(args, device)
    try:
        encoder, meta = load_encoder(args.artifact)
    except WeightsMismatchError as err:
        raise UserError(str(err)) from err
    spec = encoder.spec
    clouds = load_clouds(args.input, min_points=max(spec.num_groups, spec.group_size))
    contract = meta.get("data_contract", {})
    normalize = args.normalize == "unit_sphere" or (
        args.normalize == "contract" and contract.get("normalization") == "unit_sphere"
    )
    expected_points = contract.get("num_points")
    if expected_points and clouds.shape[1] != expected_points and not args.quiet:
        print(
            f"{PROG}: note: clouds have {clouds.shape[1]} points; "
            f"the encoder was trained on {expected_points}",
            file=sys.stderr,
        )
    features = embed_clouds(
        encoder,
        clouds,
        batch_size=args.batch_size,
        device=device,
        normalize=normalize,
        seed=args.seed,
        progress=not args.quiet,
    )
    out = write_features(args.out, features)
    summary = {
        "artifact": str(args.artifact),
        "input": str(args.input),
        "out": str(out),
        "num_clouds": int(clouds.shape[0]),
        "num_points": int(clouds.shape[1]),
        "normalized": normalize,
        "shapes": {name: list(array.shape) for name, array in features.items()},
        "pooled": "concat[cls, max]" if spec.cls_token else "concat[max, mean]",
    }
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
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


PASSTHROUGH: dict[str, Callable[[list[str]], int]] = {"fit": _fit}


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
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in PASSTHROUGH:
        return PASSTHROUGH[args[0]](args[1:])
    try:
        namespace = build_parser().parse_args(args)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    handler: Handler = namespace.handler
    return handler(namespace)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcpt-finetune``; returns the exit status (0 ok, 2 user error)."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
