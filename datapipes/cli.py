"""``pcpt-data``: write, convert, inspect and deduplicate pcpt shard folders.

Subcommands: ``synth`` (the embedded demo dataset), ``inspect`` (summary + full verification), and, when their
modules are installed, ``convert`` (``datapipes.converters.cli``) and ``dedup`` (``datapipes.dedup``). A user
mistake prints one ``pcpt-data: error: ...`` line and exits with status 2; ``inspect`` exits with 1 when it
finds damage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from datapipes._version import __version__
from datapipes.cli_common import add_command
from datapipes.errors import UserError, run_cli
from datapipes.progress import Progress

__all__ = ["build_parser", "main"]

PROG = "pcpt-data"
#: ``synth`` options passed to :func:`~datapipes.synthetic.write_synthetic` under the same names.
_SYNTH_OPTIONS = (
    "classes",
    "per_class",
    "test_per_class",
    "points",
    "seed",
    "images",
    "shard_size",
    "image_size",
)
_OPTIONAL_PARSERS = (
    ("datapipes.converters.cli", "add_convert_parser", "convert"),
    ("datapipes.dedup", "add_dedup_parser", "dedup"),
    ("datapipes.export_hf", "add_export_hf_parser", "export-hf"),
)


def _progress(total: int, desc: str) -> Progress:
    return Progress(total, desc, "shard")


def _cmd_synth(args: argparse.Namespace) -> int:
    from datapipes.inspect import format_report, inspect_shards
    from datapipes.synthetic import CLASS_NAMES, write_synthetic

    checks = [
        (2 <= args.classes <= len(CLASS_NAMES), f"--classes must be in [2, {len(CLASS_NAMES)}]"),
        (args.per_class >= 1, "--per-class must be >= 1"),
        (args.test_per_class >= 0, "--test-per-class must be >= 0"),
        (args.points >= 16, "--points must be >= 16"),
        (args.shard_size >= 1, "--shard-size must be >= 1"),
        (args.image_size >= 8, "--image-size must be >= 8"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    shards = math.ceil(args.classes * args.per_class / args.shard_size)
    shards += math.ceil(args.classes * args.test_per_class / args.shard_size)
    with _progress(shards, "synth") as bar:
        options = {name: getattr(args, name) for name in _SYNTH_OPTIONS}
        write_synthetic(args.out, **options, on_shard=lambda name, n: bar.update(1))
    report = inspect_shards(args.out, verify=False)
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True))
    else:
        print(format_report(report).rsplit("\n", 1)[0])
        print(f"wrote {args.out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from datapipes.inspect import format_report, inspect_shards
    from datapipes.shards import read_manifest

    manifest = read_manifest(args.out)  # a missing or invalid manifest is a user error (exit 2)
    total = sum(len(info["shards"]) for info in manifest["splits"].values())
    with _progress(total if not args.no_verify else 0, "verify") as bar:
        report = inspect_shards(args.out, verify=not args.no_verify, on_shard=lambda name: bar.update(1))
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True))
    else:
        print(format_report(report))
    return 0 if report.ok or (args.no_verify and not report.problems) else 1


def _add_optional(subparsers: Any) -> None:
    """Registers the convert / dedup subcommands when their modules exist."""
    for module_name, function, command in _OPTIONAL_PARSERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                continue  # that part of pcpt is not installed
            _add_unavailable(subparsers, command, f"{type(err).__name__}: {err}")
            continue
        except ImportError as err:
            _add_unavailable(subparsers, command, f"{type(err).__name__}: {err}")
            continue
        register = getattr(module, function, None)
        if callable(register):
            register(subparsers)


def _add_unavailable(subparsers: Any, command: str, reason: str) -> None:
    parser = subparsers.add_parser(command, help=f"(unavailable: {reason})", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def fail(args: argparse.Namespace) -> int:
        raise UserError(f"'{command}' is unavailable in this installation ({reason})")

    parser.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    """The ``pcpt-data`` argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build, convert, inspect and deduplicate pcpt point cloud shard folders.",
    )
    parser.add_argument("--version", action="version", version=f"pcpt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    synth = add_command(
        subparsers,
        "synth",
        _cmd_synth,
        raw=False,
        help="write the embedded demo dataset (procedural labelled shapes) as shards",
        description=(
            "Writes deterministic procedural shapes (sphere, ellipsoid, cube, cuboid, cylinder, capsule, "
            "cone, pyramid, torus, table, helix, dumbbell), deformed, rotated, noisy, with normals, in FPS "
            "order, split into train and test. The same arguments give byte-identical shards; an interrupted "
            "run resumes."
        ),
    )
    synth.add_argument("out", metavar="OUT", help="output shard folder")
    synth.add_argument("--classes", type=int, default=10, help="number of classes, 2-12 (default 10)")
    synth.add_argument("--per-class", type=int, default=60, help="training samples per class (default 60)")
    synth.add_argument("--test-per-class", type=int, default=20, help="test samples per class (default 20)")
    synth.add_argument("--points", type=int, default=1024, help="points per cloud (default 1024)")
    synth.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    synth.add_argument("--images", action="store_true", help="add one PNG depth view per sample")
    synth.add_argument("--image-size", type=int, default=32, help="depth view side in pixels (default 32)")
    synth.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    synth.add_argument("--json", action="store_true", help="print the dataset summary as JSON")

    inspect = add_command(
        subparsers,
        "inspect",
        _cmd_inspect,
        raw=False,
        help="summarise a shard folder and verify every shard against its manifest",
        description=(
            "Prints splits, classes, per-class counts, fields and point counts, then hashes and decodes "
            "every shard against manifest.json. Exits with 1 on any mismatch or damage (naming the shard), 2 "
            "when OUT is not a finished shard folder."
        ),
    )
    inspect.add_argument("out", metavar="OUT", help="shard folder (with manifest.json)")
    inspect.add_argument("--json", action="store_true", help="print the summary and problems as JSON")
    inspect.add_argument("--no-verify", action="store_true", help="summary only: skip hashing and decoding")

    _add_optional(subparsers)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    return int(args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcpt-data``; returns the exit status (the console script exits with it).

    Args:
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).
    """
    return run_cli(PROG, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
