"""``pcpt-finetune embed``: per-cloud features of a frozen encoder (or dVAE token ids, or scan pillars).

A dVAE tokenizer artifact gives token ids; a scene encoder artifact gives per-pillar features of one scan.

:func:`add_embed_parser` adds the subcommand to a ``pcpt-finetune`` parser and sets ``handler`` to
:func:`run_embed_command`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from datapipes.cli_common import positive_int, print_json, resolve_device
from datapipes.errors import UserError

__all__ = ["add_embed_parser", "run_embed_command"]

PROG = "pcpt-finetune"


def run_embed_command(args: argparse.Namespace) -> int:
    """Handler of ``pcpt-finetune embed``; writes the features file and returns the exit status."""
    from finetune.embed import check_features_destination, embed_clouds, load_clouds, write_features
    from pretrain.checkpoint import load_encoder, read_artifact_meta
    from pretrain.dvae import DVAE_KIND, DiscreteVAE, load_dvae
    from pretrain.encoders import PointEncoder
    from pretrain.scene_encoder import SCENE_ENCODER_KIND

    check_features_destination(args.out)  # before any work
    device = resolve_device(args.device)
    model: PointEncoder | DiscreteVAE
    kind = read_artifact_meta(args.artifact).get("kind")
    if kind == SCENE_ENCODER_KIND:
        return run_scene_embed(args, device)
    if kind == DVAE_KIND:
        model, meta = load_dvae(args.artifact)
        min_points = max(model.spec.num_groups, model.spec.group_size)
        trained_points = None  # the point-count note is about encoders
        extra: dict[str, Any] = {"kind": meta["kind"], "codebook_size": model.spec.codebook_size}
    else:
        model, meta = load_encoder(args.artifact)
        min_points = model.min_points
        trained_points = meta.get("data_contract", {}).get("num_points")
        extra = {"pooled": "concat[cls, max]" if model.has_cls_token else "concat[max, mean]"}
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
        features = embed_clouds(
            model,
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
        print_json(
            {
                "artifact": str(args.artifact),
                "input": str(args.input),
                "out": str(out),
                "num_clouds": int(clouds.shape[0]),
                "num_points": int(clouds.shape[1]),
                "normalized": normalize,
                "shapes": {name: list(array.shape) for name, array in features.items()},
                **extra,
            }
        )
    else:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in features.items())
        print(f"wrote {out}: {shapes}")
    return 0


def run_scene_embed(args: argparse.Namespace, device: str) -> int:
    """``pcpt-finetune embed`` with a ``scene_encoder`` artifact: per-pillar features of one scan."""
    from finetune.embed import write_features
    from finetune.scene_embed import embed_scan, load_scan
    from pretrain.scene_encoder import load_scene_encoder

    encoder, meta = load_scene_encoder(args.artifact)
    xyz, feats = load_scan(args.input, tuple(encoder.spec.point_channels))
    try:
        features = embed_scan(encoder, xyz, feats, device=device)
    except UserError as err:
        raise UserError(f"{args.input}: {err}") from err
    out = write_features(args.out, features)
    if args.json:
        print_json(
            {
                "artifact": str(args.artifact),
                "input": str(args.input),
                "out": str(out),
                "kind": meta["kind"],
                "num_points": int(xyz.shape[0]),
                "num_pillars": int(features["features"].shape[0]),
                "point_channels": list(encoder.spec.point_channels),
                "shapes": {name: list(array.shape) for name, array in features.items()},
            }
        )
    else:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in features.items())
        print(f"wrote {out}: {shapes}")
    return 0


def add_embed_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``embed`` to a ``pcpt-finetune`` subparsers object and returns its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "embed",
        help="per-cloud features of a frozen encoder",
        description="Encode point clouds with an encoder artifact (eval mode, no masking, no gradients) and "
        "write an .npz with: tokens (B, G, D) patch tokens after the final norm; centers (B, G, 3) patch "
        "centres; pooled (B, 2D) global feature = concat[CLS, max over tokens] when the encoder has a CLS "
        "token, else concat[max, mean]. D is the encoder width, G its number of patches. A single cloud "
        "(N, 3) gives B = 1. With a Point-BERT dVAE tokenizer artifact (kind dvae_tokenizer) the .npz holds "
        "token_ids (B, G) int64 codebook indices and centers (B, G, 3) instead. With a scene encoder "
        "artifact (kind scene_encoder, from GeoMAE scene pre-training) the input is one LiDAR scan, a "
        ".las/.laz file or a .npy (N, 3 + C) of x, y, z and the encoder's point channels, and the .npz holds "
        "features (P, D) of the P non-empty pillars, cells (P, 2) their grid indices and centers (P, 2) "
        "their metric xy centres.",
    )
    p.add_argument(
        "artifact", metavar="ART", type=Path, help="encoder (or dVAE tokenizer) artifact directory"
    )
    p.add_argument(
        "--input",
        required=True,
        type=Path,
        metavar="CLOUDS.npy",
        help="float32 points (B, N, 3) or (N, 3); for a scene encoder one scan: .las/.laz or .npy (N, 3 + C)",
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
    p.set_defaults(handler=run_embed_command, func=run_embed_command)
    return p
