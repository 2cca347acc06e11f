"""``pcpt-finetune``: transfer tools that consume encoder artifacts.

Subcommands:

- ``fit -c CONFIG --model.pretrained ART``: finetuning / linear probing with LightningCLI.
- ``probe ART --data OUT``: SVM or kNN probe on frozen features (:mod:`finetune.probe_cli`).
- ``fewshot ART --data OUT --way W --shot S``: few-shot episodes, mean ± std (:mod:`finetune.fewshot_cli`).
- ``embed ART --input CLOUDS.npy --out FEATURES.npz``: per-cloud features (:mod:`finetune.embed_cli`).
- ``visualize reconstruction|embedding|curves|results``: PNG figures (:mod:`finetune.visualize_cli`).

Subcommands that hand their arguments to another parser (LightningCLI ``fit``) go in :data:`PASSTHROUGH`;
argparse-based ones add a subparser (whose ``handler`` default runs them) in :func:`build_parser`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from datapipes.cli_common import CliParser, Passthrough, run_subcommands
from finetune.embed_cli import add_embed_parser
from finetune.fewshot_cli import add_fewshot_parser
from finetune.probe_cli import add_probe_parser
from finetune.visualize_cli import add_visualize_parser

__all__ = ["PASSTHROUGH", "PROG", "build_parser", "main"]

PROG = "pcpt-finetune"


def _fit(argv: list[str]) -> int:
    from finetune.lightning_cli import run_lightning_cli  # heavy: Lightning

    return run_lightning_cli(["fit", *argv])


#: subcommands that receive the remaining argv untouched (e.g. ``fit`` -> LightningCLI).
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
    add_embed_parser(sub)
    add_visualize_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcpt-finetune``; returns the exit status (0 ok, 2 user error)."""
    return run_subcommands(PROG, argv, build_parser, PASSTHROUGH)


if __name__ == "__main__":
    sys.exit(main())
