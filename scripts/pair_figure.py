"""A figure of (image, cloud) training pairs from shards with image views: one PNG, pairs side by side.

For each of the first ``--pairs`` samples of a split: its stored image view 0 (what the image encoder sees)
and, next to it, its cloud splatted from the same camera ring the converter recorded in the manifest (or the
default ring), so a reader can check that images and clouds belong together.

Run::

    python scripts/pair_figure.py data/modelnet10-img docs/figures/vipformer_pairs.png --pairs 6
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from datapipes.render import CameraRing, splat_points
from datapipes.shards import iter_split_samples, read_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shards", type=Path, help="shard folder with image views")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--split", default="train")
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args(argv)
    manifest = read_manifest(args.shards)
    camera = (manifest.get("images") or {}).get("camera") or {}
    ring = CameraRing(**{k: v for k, v in camera.items() if k in CameraRing.__dataclass_fields__})
    tiles: list[np.ndarray] = []
    for sample in iter_split_samples(args.shards, args.split, fields=("xyz", "images")):
        if len(tiles) == 2 * args.pairs:
            break
        view = np.asarray(Image.open(io.BytesIO(sample["images"][0])).convert("RGB"))
        cloud = splat_points(sample["xyz"], views=1, size=view.shape[0], ring=ring)[0]
        tiles += [view, cloud]
    if not tiles:
        raise SystemExit(f"{args.shards}: no samples with image views in split {args.split!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(args.out, optimize=True)
    print(f"wrote {args.out}: {len(tiles) // 2} (image, cloud) pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
