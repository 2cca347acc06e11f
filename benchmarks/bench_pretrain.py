"""Point-MAE pre-training throughput: pcpt vs a naive implementation of the same model, in one run.

Measures training steps (forward + backward + AdamW step) of the official-size Point-MAE (384 × 12 encoder,
4-block decoder, 64 groups × 32 points, 1024 points, mask 0.6) and reports samples/s and peak memory.

The naive variant is the same model and weights with the research-code formulations of attention, grouping
and the mini-PointNet (``benchmarks/naive.py``).

Usage::

    python benchmarks/bench_pretrain.py --device cpu --batch-size 16 --steps 5
    python benchmarks/bench_pretrain.py --device cuda --batch-size 128 --steps 30 --precision bf16

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from typing import Any

import torch
from naive import make_naive
from step_timing import time_steps

from pretrain.encoders.spec import PointViTSpec
from pretrain.methods.point_mae import PointMAE


def make_model(variant: str, device: torch.device) -> PointMAE:
    torch.manual_seed(0)
    model = PointMAE(PointViTSpec(), mask_ratio=0.6, decoder_depth=4).to(device)
    if variant == "naive":
        make_naive(model)
    return model


def run(variant: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = make_model(variant, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    points = (
        torch.rand(args.batch_size, 1024, 3, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(i: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model.loss_for(points, generator=torch.Generator().manual_seed(i))
        loss.backward()
        optimizer.step()
        return float(loss)

    timing = time_steps(step, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, device=device)
    return {"variant": variant, **timing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--variants", default="pcpt,naive")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = args.variants.split(",")
    if len(variants) == 1:
        results = [run(variants[0], args, device)]
    else:  # one process per variant so peak memory is measured separately
        results = []
        for variant in variants:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variants", variant]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.extend(json.loads(out)["results"])
    by_name = {r["variant"]: r for r in results}
    report: dict[str, Any] = {
        "benchmark": "point_mae_pretrain_step",
        "model": "Point-MAE official size (384x12 enc, 4-block dec, 64x32 groups, 1024 points, mask 0.6)",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "precision": args.precision,
        "torch": torch.__version__,
        "results": results,
    }
    if "pcpt" in by_name and "naive" in by_name:
        report["speedup_vs_naive"] = by_name["pcpt"]["samples_per_s"] / by_name["naive"]["samples_per_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
