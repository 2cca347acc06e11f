"""Command-line plumbing shared by ``pcpt-data``, ``pcpt-pretrain`` and ``pcpt-finetune``.

- :class:`CliParser`: an ``ArgumentParser`` whose errors become one-line :class:`~datapipes.errors.UserError`
  messages (``run_cli`` prints them and exits with status 2).
- :func:`add_command`: registers one ``pcpt-data`` subcommand (parser and handler).
- :func:`positive_int`: an argparse ``type`` for integers >= 1.
- :func:`dispatch`: runs one subcommand, either a passthrough one that receives the remaining argv untouched
  (e.g. ``fit`` -> LightningCLI) or an argparse one whose parser sets a ``handler`` default.
- :func:`run_subcommands`: the whole ``main`` of a subcommand CLI: :func:`dispatch` under
  :func:`~datapipes.errors.run_cli` (one-line user errors, exit status 2).
- :func:`print_json`: the indented, key-sorted JSON every ``--json`` summary of the model CLIs prints.
- :func:`resolve_device`: ``--device auto|cpu|cuda`` -> a torch device name, with a user error when CUDA
  is asked for and missing.

Nothing here imports heavy libraries at module level, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from datapipes.errors import UserError, run_cli

__all__ = [
    "CliParser",
    "Handler",
    "Passthrough",
    "dispatch",
    "positive_int",
    "print_json",
    "resolve_device",
    "run_subcommands",
]

#: an argparse subcommand: parsed arguments -> exit status.
Handler = Callable[[argparse.Namespace], int]
#: a passthrough subcommand: the remaining arguments, untouched -> exit status.
Passthrough = Callable[[list[str]], int]


class CliParser(argparse.ArgumentParser):
    """ArgumentParser whose errors become one-line :class:`UserError` messages (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see '{self.prog} --help')")


def add_command(
    subparsers: Any,
    name: str,
    handler: Handler,
    *,
    help: str,
    description: str,
    epilog: str | None = None,
    raw: bool = True,
) -> argparse.ArgumentParser:
    """Registers subcommand ``name`` on ``subparsers`` (from ``add_subparsers()``); ``handler`` runs it.

    With ``raw`` the description and epilog are printed as written (line breaks kept), otherwise rewrapped.
    """
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter,
    )
    parser.set_defaults(func=handler)
    return parser


def positive_int(text: str) -> int:
    """Parses an integer >= 1 (an argparse ``type``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def dispatch(
    argv: Sequence[str] | None,
    parser_factory: Callable[[], argparse.ArgumentParser],
    passthrough: Mapping[str, Passthrough],
) -> int:
    """Runs one subcommand: passthrough ones get the raw remaining argv, the others go through argparse.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
        parser_factory: builds the argparse parser; each subparser sets ``handler`` as its default.
        passthrough: subcommand name -> function of the remaining arguments.

    Returns:
        The exit status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in passthrough:
        return passthrough[args[0]](args[1:])
    try:
        namespace = parser_factory().parse_args(args)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    handler: Handler = namespace.handler
    return handler(namespace)


def run_subcommands(
    prog: str,
    argv: Sequence[str] | None,
    parser_factory: Callable[[], argparse.ArgumentParser],
    passthrough: Mapping[str, Passthrough],
) -> int:
    """Entry point of a subcommand CLI: :func:`dispatch` under :func:`~datapipes.errors.run_cli`.

    Args:
        prog: command name used as the error prefix, e.g. ``pcpt-finetune``.
        argv: arguments without the program name; None reads ``sys.argv``.
        parser_factory: builds the argparse parser (see :func:`dispatch`).
        passthrough: subcommand name -> function of the remaining arguments.

    Returns:
        The exit status (0 ok, 2 user error).
    """
    return run_cli(prog, lambda args: dispatch(args, parser_factory, passthrough), argv)


def print_json(data: Mapping[str, Any]) -> None:
    """Prints a ``--json`` summary: indented by 2, keys sorted."""
    print(json.dumps(data, indent=2, sort_keys=True))


def resolve_device(name: str) -> str:
    """Resolves a ``--device`` choice: ``auto`` -> ``cuda`` when available, else ``cpu``.

    Raises:
        UserError: ``cuda`` was asked for and is not available.
    """
    if name not in ("auto", "cuda"):
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return name
