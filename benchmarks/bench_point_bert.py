"""Point-BERT training steps, dVAE tokenizer (stage 1) and masked point modelling (stage 2): pcpt vs naive.

Prints one JSON document to stdout. For each stage and variant it builds the model and times full training
steps (``training_step`` -> backward -> AdamW step) on random unit-sphere clouds of 1024 points.

Sizes (``--size``):

* ``official``: dVAE 64 groups x 32 points, 8192-entry codebook, DGCNN widths 128-1024 (27.6 M parameters);
  MPM 384 x 12 blocks x 6 heads with CLS and mask tokens, lm_head over 8192 codes, momentum encoder,
  16,384-key queue and the frozen dVAE.
* ``modelnet_cpu``: the models of ``configs/pretrain/point_bert_dvae_modelnet_cpu.yaml`` and
  ``configs/pretrain/point_bert_modelnet_cpu.yaml`` (the ModelNet40 CPU run of docs/results.md), read from
  those files.

Variants (``--variants``): ``pcpt``, and ``naive``: the same models and weights with the research-code
formulations of attention, grouping and the mini-PointNet (``benchmarks/naive.py``), in every encoder, the
momentum copy and the tokenizer.

Reported per stage and variant: ``samples_per_s`` (batch size / median step time; ``step_s_min`` too) and
``peak_rss_mib``, the peak resident memory of the process that ran it (each stage and variant runs in its own
subprocess, so the numbers do not mix), plus ``cuda_max_allocated_mib`` on a GPU.

Run: ``python benchmarks/bench_point_bert.py --batch 8 --steps 3 --threads 2`` (``--device cuda`` on a GPU;
``--size modelnet_cpu --batch 32`` for the CPU run's models). One warm-up step precedes the timed ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

STAGES = ("dvae", "mpm")
VARIANTS = ("pcpt", "naive")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="clouds per step (default 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="stage to run (default all)")
    parser.add_argument("--size", choices=("official", "modelnet_cpu"), default="official", help="models")
    parser.add_argument("--variants", default="pcpt,naive", help="comma-separated: pcpt, naive")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.threads < 1:
        parser.error("--batch must be >= 2, --steps and --threads >= 1")
    args.variants = args.variants.split(",")
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        parser.error(f"--variants must name some of {', '.join(VARIANTS)}")
    return args


def model_init_args(config: str) -> dict[str, Any]:
    """``model.init_args`` of a pcpt pre-training config."""
    import yaml

    with (CONFIGS / config).open() as f:
        init_args: dict[str, Any] = yaml.safe_load(f)["model"]["init_args"]
    return init_args


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_stage(stage: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Builds one stage's module and times its training steps (in this process)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from naive import make_naive

    from pretrain.artifacts import save_module_artifact
    from pretrain.dvae import DiscreteVAE, DVAESpec
    from pretrain.encoders.spec import DataContract, PointViTSpec
    from pretrain.methods.dvae import PointDVAE
    from pretrain.methods.point_bert import PointBERT
    from pretrain.ops import normalize_unit_sphere
    from pretrain.optim import param_groups

    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is skipped
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.size == "official":
        dvae_args: dict[str, Any] = {"dvae": DVAESpec()}
        encoder = PointViTSpec(tokenizer_dim=256, cls_token=True, mask_token=True)
        mpm_args: dict[str, Any] = {"encoder": encoder}
    else:
        dvae_args = model_init_args("point_bert_dvae_modelnet_cpu.yaml")
        dvae_args["dvae"] = DVAESpec(**dvae_args["dvae"])
        mpm_args = model_init_args("point_bert_modelnet_cpu.yaml")
        mpm_args["encoder"] = PointViTSpec(**mpm_args["encoder"])
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "dvae":
            module: Any = PointDVAE(**dvae_args)
        else:
            tokenizer = save_module_artifact(
                Path(tmp) / "tokenizer", DiscreteVAE(dvae_args["dvae"]), data=DataContract(), provenance={}
            )
            module = PointBERT(**{**mpm_args, "tokenizer": str(tokenizer)})
    if variant == "naive":
        make_naive(module)
    module = module.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(module, 0.05), lr=5e-4)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    gen = torch.Generator().manual_seed(0)
    clouds = normalize_unit_sphere(torch.randn((args.steps + 1) * args.batch, 1024, 3, generator=gen))
    clouds = clouds.view(args.steps + 1, args.batch, 1024, 3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(args.steps + 1):
        points = clouds[step].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        loss = module.training_step(points, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:
            times.append(time.perf_counter() - begin)
        losses.append(float(loss))
    median = statistics.median(times)
    result: dict[str, Any] = {
        "stage": stage,
        "variant": variant,
        "module": type(module).__name__,
        "params_total": total,
        "params_trainable": trainable,
        "batch": args.batch,
        "num_points": 1024,
        "steps_timed": len(times),
        "step_s_median": round(median, 4),
        "step_s_min": round(min(times), 4),
        "samples_per_s": round(args.batch / median, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "loss_first_last": [round(losses[0], 5), round(losses[-1], 5)],
    }
    if device.type == "cuda":
        result["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.stage != "all" and len(args.variants) == 1:
        json.dump(run_stage(args.stage, args.variants[0], args), sys.stdout)
        return
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for stage in STAGES if args.stage == "all" else (args.stage,):
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--stage", stage, "--variants", variant, "--size", args.size,
                   "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--device", args.device]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out))
    speedups = {}
    for stage in STAGES:
        by_variant = {r["variant"]: r for r in results if r["stage"] == stage}
        if {"pcpt", "naive"} <= set(by_variant):
            ratio = by_variant["pcpt"]["samples_per_s"] / by_variant["naive"]["samples_per_s"]
            speedups[stage] = round(ratio, 3)
    import torch

    report = {
        "benchmark": f"Point-BERT training steps ({args.size} size)",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_point_bert.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "device": args.device,
        "threads": args.threads,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "results": results,
        "speedup_pcpt_vs_naive": speedups,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
