"""ViPFormer pre-training throughput at the released sizes, side by side in one run.

Measures training steps of the whole method (two augmented point views through the point encoder, one
augmented image through the image encoder, both projection heads, IMID + CMID NT-Xent, backward, AdamW step)
at E1CL8SL-H4D256-L128-MR2 and E1CL8SL-H6D384-L128-MR4 (2048 points, 144-pixel images), and reports
samples/s and peak memory. Each size runs in its own process so peak memory is its own.

Usage::

    python benchmarks/bench_vipformer.py --device cpu --batch-size 16 --steps 3 --threads 2
    python benchmarks/bench_vipformer.py --device cuda --batch-size 128 --steps 20 --precision bf16

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import torch
from step_timing import time_steps

from pretrain.encoders import ViPFormerImageSpec, ViPFormerPointSpec
from pretrain.methods.vipformer import ViPFormer

SIZES = ("h4d256", "h6d384")


def make_model(size: str, device: torch.device) -> ViPFormer:
    torch.manual_seed(0)
    return ViPFormer(ViPFormerPointSpec.named(size), ViPFormerImageSpec.named(size)).to(device)


def run(size: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = make_model(size, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    batch = SimpleNamespace(
        points=(torch.rand(args.batch_size, args.num_points, 3, generator=gen) * 2 - 1).to(device),
        images=torch.rand(args.batch_size, 1, 3, 137, 137, generator=gen).to(device),  # 3D-R2N2 renders
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(i: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model.total_loss(model.loss_terms(batch, torch.Generator().manual_seed(i)))
        loss.backward()
        optimizer.step()
        return float(loss)

    timing = time_steps(step, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, device=device)
    return {
        "size": size,
        "parameters_point_encoder": sum(p.numel() for p in model.encoder.parameters()),
        "parameters_image_encoder": sum(p.numel() for p in model.image_encoder.parameters()),
        **timing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-points", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--sizes", default=",".join(SIZES))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = args.sizes.split(",")
    if len(sizes) == 1:
        results = [run(sizes[0], args, device)]
    else:  # one process per size so peak memory is measured separately
        results = []
        for size in sizes:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--sizes", size]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.extend(json.loads(out)["results"])
    report: dict[str, Any] = {
        "benchmark": "vipformer_pretrain_step",
        "model": "ViPFormer point + image encoders, heads, IMID + CMID (2 point views, 1 image view)",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "num_points": args.num_points,
        "steps": args.steps,
        "precision": args.precision,
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
