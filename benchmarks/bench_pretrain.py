"""Point-MAE pre-training throughput: pcpt against the official model, in one run.

Measures training steps (forward + backward + AdamW step) of Point-MAE (64 groups × 32 points of 1024-point
clouds, mask 0.6) at the official size (384 × 12 encoder, 4-block decoder) or at the size of
``configs/pretrain/point_mae_modelnet_cpu.yaml`` (96 × 4, 2-block decoder), and reports samples/s and peak
memory per variant:

* ``pcpt``: ``pretrain.methods.point_mae.PointMAE`` with pcpt's optimiser (``pretrain.optim.AdamW`` over
  ``param_groups``);
* ``official``: the official model and training step restated with pure-torch stand-ins for its CUDA ops
  (``benchmarks/official_point_mae.py``; a test checks it computes pcpt's loss on the same weights and mask);
* ``naive``: pcpt's model with research-code attention, grouping and mini-PointNet (``benchmarks/naive.py``).

Each variant runs in its own process (peak memory separately), ``--rounds`` times in alternation; the
report gives each variant's median and range over the rounds and the ratio of medians.

Usage::

    python benchmarks/bench_pretrain.py --size official --batch-size 32 --steps 3 --threads 2
    python benchmarks/bench_pretrain.py --size modelnet_cpu --batch-size 32 --steps 5 --threads 2
    python benchmarks/bench_pretrain.py --device cuda --batch-size 128 --steps 30 --precision bf16

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from machine import machine_info
from naive import make_naive
from official_point_mae import OfficialPointMAE, official_optimizer
from step_timing import time_steps

from pretrain.encoders.spec import PointViTSpec
from pretrain.methods.point_mae import PointMAE
from pretrain.optim import AdamW, param_groups

# (embed_dim, depth, num_heads, decoder_depth, drop_path): the official model and the 2-core CPU config.
SIZES = {"official": (384, 12, 6, 4, 0.1), "modelnet_cpu": (96, 4, 4, 2, 0.1)}


def make_step(variant: str, args: argparse.Namespace, device: torch.device) -> Callable[[int], float]:
    """One training step of ``variant`` on a fixed batch of random clouds: ``step(i) -> loss``."""
    dim, depth, heads, decoder_depth, drop_path = SIZES[args.size]
    points = (
        torch.rand(args.batch_size, 1024, 3, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    torch.manual_seed(0)
    if variant == "official":
        official = (
            OfficialPointMAE(dim, depth, heads, decoder_depth, drop_path_rate=drop_path).to(device).train()
        )
        official_opt = official_optimizer(official)
        rng = np.random.default_rng(0)
        if args.profile:
            label_phases(variant, official)

        def official_step(i: int) -> float:
            with autocast:
                loss = official(points, rng)
            loss.backward()
            official_opt.step()
            official.zero_grad()
            return float(loss)

        return official_step
    spec = PointViTSpec(embed_dim=dim, depth=depth, num_heads=heads, tokenizer_dim=dim, drop_path=drop_path)
    model = PointMAE(spec, mask_ratio=0.6, decoder_depth=decoder_depth, decoder_drop_path=drop_path).to(
        device
    )
    model.train()
    if variant == "naive":
        make_naive(model)
    if args.profile:
        label_phases(variant, model)
    optimizer = AdamW(param_groups(model))

    def step(i: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model.loss_for(points, generator=torch.Generator().manual_seed(i))
        loss.backward()
        optimizer.step()
        return float(loss)

    return step


FORWARD_PHASES = ("grouping", "mini_pointnet", "encoder_blocks", "decoder", "loss")


def _labelled(owner: Any, attr: str, label: str) -> None:
    """Runs ``owner.attr`` (a method or module forward) inside a profiler range named ``label``."""
    inner = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            return inner(*args, **kwargs)

    setattr(owner, attr, wrapper)


def label_phases(variant: str, model: Any) -> None:
    """Names the forward phases of either model for the profiler (grouping, mini-PointNet, ...)."""
    if variant == "official":
        import official_point_mae

        _labelled(model.group_divider, "forward", "grouping")
        _labelled(model.MAE_encoder.encoder, "forward", "mini_pointnet")
        _labelled(model.MAE_encoder.blocks, "forward", "encoder_blocks")
        _labelled(model.MAE_decoder, "forward", "decoder")
        _labelled(official_point_mae, "chamfer_l2_standin", "loss")
    else:
        import pretrain.methods.point_mae as point_mae

        _labelled(model.encoder, "group", "grouping")
        _labelled(model.encoder.tokenizer, "forward", "mini_pointnet")
        _labelled(model.encoder, "forward", "encoder_blocks")
        _labelled(model.decoder, "forward", "decoder")
        _labelled(point_mae, "chamfer_distance", "loss")


def profile_steps(step: Callable[[int], float], steps: int, first: int) -> dict[str, Any]:
    """torch.profiler over ``steps`` steps: forward phases, optimiser, the rest (backward), top ops.

    Times are CPU totals per step in ms; ``backward_and_rest`` is the step's wall time minus the forward
    phases and the optimiser (autograd, zeroing, glue).
    """
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(first + i)
    wall_ms = (time.perf_counter() - start) * 1000 / steps
    events = prof.key_averages()
    totals = {e.key: e.cpu_time_total / 1000 / steps for e in events}
    phases = {name: totals.get(name, 0.0) for name in FORWARD_PHASES}
    optimizer = sum(v for k, v in totals.items() if k.startswith("Optimizer.step#"))
    zero_grad = sum(v for k, v in totals.items() if k.startswith("Optimizer.zero_grad#"))
    rest = wall_ms - sum(phases.values()) - optimizer - zero_grad
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    self_total = sum(e.self_cpu_time_total for e in events)
    return {
        "step_ms": wall_ms,
        "forward_phases_ms": phases,
        "optimizer_step_ms": optimizer,
        "zero_grad_ms": zero_grad,
        "backward_and_rest_ms": rest,
        "top_ops_by_self_cpu": [
            {
                "op": e.key,
                "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                "share": e.self_cpu_time_total / self_total,
                "calls_per_step": e.count / steps,
            }
            for e in top
        ],
    }


def run(variant: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    step = make_step(variant, args, device)

    timing = time_steps(step, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, device=device)
    result: dict[str, Any] = {"variant": variant, **timing}
    if args.profile:
        result["profile"] = profile_steps(step, args.profile, args.warmup + args.steps)
    return result


def summarise(rounds: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Median and range of samples/s per variant over the rounds, and each variant's ratio of medians."""
    summary: dict[str, Any] = {}
    for variant in variants:
        rates = [r["samples_per_s"] for r in rounds if r["variant"] == variant]
        memory = [r["peak_memory_mb"] for r in rounds if r["variant"] == variant]
        summary[variant] = {
            "samples_per_s_median": statistics.median(rates),
            "samples_per_s_min": min(rates),
            "samples_per_s_max": max(rates),
            "peak_memory_mb": max(memory),
        }
    if "pcpt" in summary:
        for variant in variants:
            if variant != "pcpt":
                summary[f"pcpt_over_{variant}"] = (
                    summary["pcpt"]["samples_per_s_median"] / summary[variant]["samples_per_s_median"]
                )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="official")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--variants", default="pcpt,official")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of all variants")
    parser.add_argument("--profile", type=int, default=0, help="then profile this many steps (0: no profile)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = args.variants.split(",")
    load_before = os.getloadavg()[0]
    if len(variants) == 1 and args.rounds == 1:
        results = [run(variants[0], args, device)]
    else:  # one process per variant and round: peak memory is measured separately
        results = []
        for round_index in range(args.rounds):
            for variant in variants:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--variants", variant, "--rounds", "1"]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results.extend({**r, "round": round_index} for r in json.loads(out)["results"])
    dim, depth, heads, decoder_depth, _ = SIZES[args.size]
    report: dict[str, Any] = {
        "benchmark": "point_mae_pretrain_step",
        "model": f"Point-MAE {args.size} size ({dim}x{depth} encoder, {heads} heads, {decoder_depth}-block "
        "decoder, 64x32 groups, 1024 points, mask 0.6)",
        "machine": machine_info(load_before),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "precision": args.precision,
        "torch": torch.__version__,
        "results": results,
        "summary": summarise(results, variants),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
