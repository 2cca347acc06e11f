"""Classification finetuning step of every transfer variant, side by side with full finetuning in one run.

Variants (each in its own process, so peak memory is its own):

* ``full``: full finetuning of a ``point_vit`` encoder (the baseline; ``configs/finetune/classify.yaml``);
* ``linear``: the same encoder frozen, the head alone trains (``--model.freeze_encoder true``);
* ``point_adapter``: Any2Point's adapters on the frozen encoder (``configs/finetune/point_adapter.yaml``);
* ``any2point_1d`` / ``any2point_2d``: Any2Point on the frozen all-MiniLM-L6-v2 / DINOv2-S/14 sources
  (``configs/finetune/any2point_minilm.yaml`` / ``any2point_vit.yaml``; the source packages must be
  installed), with ``--tokenizer-k`` neighbours per Point-PN group.

A step is what ``pcpt-finetune fit`` does per batch: forward of the classifier on ``--batch-size`` clouds of
1024 points, cross-entropy, backward, AdamW over the trainable parameters. The encoder is ``--base ART`` or,
without it, a random ``point_vit`` of the ModelNet CPU size (96 × 4); random weights time the same as trained
ones. ``epoch_s_modelnet40`` extrapolates the step time to one epoch of ModelNet40's training split less the
10 % held out (8,859 clouds).

Usage::

    python benchmarks/bench_finetune.py --threads 2 --steps 3
    python benchmarks/bench_finetune.py --variants full,any2point_1d --tokenizer-k 64

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from step_timing import time_steps

from finetune.classification import PointClassifier
from pretrain.checkpoint import save_encoder
from pretrain.encoders import PointViTSpec, build_encoder, spec_from_dict
from pretrain.encoders.spec import DataContract

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("full", "linear", "point_adapter", "any2point_1d", "any2point_2d")
CONFIGS = {
    "point_adapter": "point_adapter.yaml",
    "any2point_1d": "any2point_minilm.yaml",
    "any2point_2d": "any2point_vit.yaml",
}
MODELNET40_TRAIN = 8859  # 9,843 training clouds less the 10 % held out for model selection
NUM_CLASSES = 40


def default_base(folder: Path) -> Path:
    """A random point_vit encoder of the ModelNet CPU size written as an artifact (the timed encoder)."""
    torch.manual_seed(0)
    spec = PointViTSpec(embed_dim=96, depth=4, num_heads=4, tokenizer_dim=96)
    return save_encoder(folder / "base", build_encoder(spec), data=DataContract(), provenance={})


def make_classifier(variant: str, base: Path, tokenizer_k: int) -> PointClassifier:
    if variant in ("full", "linear"):
        return PointClassifier(NUM_CLASSES, pretrained=str(base), freeze_encoder=variant == "linear")
    fields = yaml.safe_load((ROOT / "configs/finetune" / CONFIGS[variant]).read_text())["model"]["encoder"]
    if variant == "point_adapter":
        fields["base_path"] = str(base)
    else:
        fields["tokenizer_k"] = tokenizer_k
    return PointClassifier(NUM_CLASSES, encoder=spec_from_dict(fields))


def run(variant: str, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = make_classifier(variant, base, args.tokenizer_k).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    gen = torch.Generator().manual_seed(1)
    points = torch.rand(args.batch_size, 1024, 3, generator=gen) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen)

    def step(i: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(points), labels)
        loss.backward()
        optimizer.step()
        return float(loss)

    timing = time_steps(
        step, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, device=points.device
    )
    steps_per_epoch = math.ceil(MODELNET40_TRAIN / args.batch_size)
    return {"variant": variant, **model.parameter_counts(), **timing,
            "epoch_s_modelnet40": timing["s_per_step"] * steps_per_epoch}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--base", type=Path, default=None, help="point_vit encoder artifact (default: random)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tokenizer-k", type=int, default=16, help="Point-PN neighbours (configs: 64)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base if args.base is not None else default_base(Path(tmp))
        if len(variants) == 1:
            results = [run(variants[0], args, base)]
        else:  # one process per variant so peak memory is measured separately
            results = []
            for variant in variants:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--variants", variant, "--base", str(base)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results.extend(json.loads(out)["results"])
    baseline = next((r for r in results if r["variant"] == "full"), None)
    for r in results:
        r["speed_vs_full"] = r["samples_per_s"] / baseline["samples_per_s"] if baseline else None
    report: dict[str, Any] = {
        "benchmark": "finetune_step",
        "model": "PointClassifier (encoder + Point-MAE head), 40 classes, 1024 points, AdamW",
        "device": platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "tokenizer_k": args.tokenizer_k,
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
