"""GPU readiness suite: every method's training step, FPS / kNN and the data pipeline, in one JSON.

On a CUDA machine, in a few minutes (each item has a time budget, the whole run a total budget):

* ``steps``: samples/s and peak memory (``torch.cuda.max_memory_allocated``) of a full training step
  (``training_step`` -> backward -> AdamW step) of Point-MAE, the Point-BERT dVAE tokenizer, Point-BERT
  (with its frozen dVAE), GeoMAE (objects and scenes) and ViPFormer, each built from its shipped
  ``configs/pretrain/<method>.yaml`` (model size, batch size and points per cloud of the config), in fp32 and
  bf16 autocast, eager and with ``--compile`` also compiled (the methods' ``compile=True``);
* ``ops``: farthest point sampling and kNN at the training shapes (objects: 128 clouds, 1024 -> 64 centres,
  32 neighbours; ViPFormer: 2048 -> 128; scene-sized clouds: 8 x 16384 -> 2048, 16 neighbours);
* ``pipeline``: samples/s of the training dataloader (the config's batch size, workers, augmentation) over
  shards written by ``pcpt-data synth`` into a temporary folder, and its ratio to the fastest step rate of
  the methods that read such data (the pipeline must outrun the step).

Every item records its own ``status`` (``ok``, ``error`` with the message, or ``skipped`` when the total
budget is spent), so one failure does not lose the rest; the JSON is rewritten after every item.

Usage::

    python benchmarks/gpu_suite.py --out gpu_suite.json                 # CUDA, official sizes
    python benchmarks/gpu_suite.py --out gpu_suite.json --compile       # + compiled steps
    python benchmarks/gpu_suite.py --device cpu --tiny --out tiny.json  # tiny configs on CPU, in seconds

Prints the JSON document on stdout too (progress on stderr).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from method_configs import METHODS, batch_to, build_method, config_path, data_settings, synthetic_batch
from step_timing import peak_memory_mb, time_steps

#: FPS / kNN cases: (name, clouds, points, centres, neighbours); tiny mode divides the sizes.
OP_CASES = (
    ("object_1024_to_64_k32", 128, 1024, 64, 32),
    ("vipformer_2048_to_128_k32", 64, 2048, 128, 32),
    ("scene_16384_to_2048_k16", 8, 16384, 2048, 16),
)
#: data pipelines measured: (name, method whose data section is used, synth options).
PIPELINES = (
    ("objects", "point_mae", ()),
    ("objects_images", "vipformer", ("--images", "--image-size", "137")),
)


def log(message: str) -> None:
    print(f"[gpu_suite] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny configs and shapes (a CPU check in seconds)"
    )
    parser.add_argument("--compile", action="store_true", help="also time compiled steps (compile=True)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default all)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--sections", default="steps,ops,pipeline", help="comma-separated sections to run")
    parser.add_argument("--batch-size", type=int, default=0, help="override every config's batch size")
    parser.add_argument(
        "--item-budget-s", type=float, default=0, help="seconds per item (default 25; tiny 5)"
    )
    parser.add_argument("--total-budget-s", type=float, default=270, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (rewritten after every item)")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.sections = [s for s in args.sections.split(",") if s]
    if unknown := [m for m in args.methods if m not in METHODS]:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if unknown := [p for p in args.precisions if p not in ("fp32", "bf16")]:
        parser.error(f"--precisions: unknown {unknown}; known: fp32, bf16")
    if unknown := [s for s in args.sections if s not in ("steps", "ops", "pipeline")]:
        parser.error(f"--sections: unknown {unknown}; known: steps, ops, pipeline")
    if args.batch_size < 0 or args.item_budget_s < 0 or args.total_budget_s <= 0:
        parser.error("--batch-size and --item-budget-s must be >= 0, --total-budget-s > 0")
    if not args.item_budget_s:
        items = (
            len(args.methods) * len(args.precisions) * (2 if args.compile else 1) * ("steps" in args.sections)
            + len(OP_CASES) * ("ops" in args.sections)
            + len(PIPELINES) * ("pipeline" in args.sections)
        )
        args.item_budget_s = min(20.0, max(2.0, 0.8 * args.total_budget_s / max(items, 1)))
        if args.tiny:
            args.item_budget_s = min(args.item_budget_s, 2.0)
    return args


# ------------------------------------------------------------------------------------------ the run


class Suite:
    """Runs items under per-item and total time budgets and keeps the report up to date on disk."""

    def __init__(self, args: argparse.Namespace, device: torch.device, argv: list[str]) -> None:
        self.args, self.device = args, device
        cuda = torch.version.cuda
        self.deadline = time.perf_counter() + args.total_budget_s
        self.report: dict[str, Any] = {
            "benchmark": "pcpt GPU suite",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/gpu_suite.py " + " ".join(argv),
            "device": device_name(device),
            "device_type": device.type,
            "tiny": args.tiny,
            "compile": args.compile,
            "item_budget_s": args.item_budget_s,
            "total_budget_s": args.total_budget_s,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": cuda,
            },
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
            "steps": [],
            "ops": [],
            "pipeline": [],
        }

    def budget(self) -> float:
        """Seconds the next item may take: its own budget, or what is left of the total."""
        return max(0.0, min(self.args.item_budget_s, self.deadline - time.perf_counter()))

    def run(self, section: str, fields: dict[str, Any], item: Callable[[float], dict[str, Any]]) -> None:
        """Runs ``item(budget_s)``, records its result or its error under ``section``, saves the report."""
        name = " ".join(f"{k}={v}" for k, v in fields.items())
        budget = self.budget()
        row: dict[str, Any] = dict(fields)
        if budget <= 0:
            row.update(status="skipped", error="total time budget spent")
        else:
            log(f"{section}: {name} (budget {budget:.0f} s)")
            begin = time.perf_counter()
            try:
                row.update(item(budget))
                row["status"] = "ok"
            except Exception as error:  # one failing item must not end the suite
                row.update(status="error", error=f"{type(error).__name__}: {error}")
                row["traceback"] = traceback.format_exc(limit=4)[-2000:]
                log(f"{section}: {name} failed: {row['error']}")
            row["elapsed_s"] = round(time.perf_counter() - begin, 3)
            release_memory(self.device)
        self.report[section].append(row)
        self.save()

    def save(self) -> None:
        if self.args.out is not None:
            tmp = self.args.out.with_name(self.args.out.name + ".tmp")
            tmp.write_text(json.dumps(self.report, indent=2) + "\n")
            tmp.replace(self.args.out)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------- steps


def step_item(
    method: str, precision: str, compiled: bool, args: argparse.Namespace, device: torch.device, work: Path
) -> Callable[[float], dict[str, Any]]:
    """One method's training step at its config's size: samples/s, peak memory, first-step time."""

    def item(budget: float) -> dict[str, Any]:
        data = data_settings(method, tiny=args.tiny)
        batch_size = args.batch_size or int(data["batch_size"])
        num_points = int(data["num_points"])
        if args.tiny:
            batch_size, num_points = min(batch_size, 4), min(num_points, 2048)
        torch.manual_seed(0)
        module = build_method(method, tiny=args.tiny, workdir=work, lr_scheduler=None, compile=compiled)
        module = module.to(device)
        if compiled:
            module.configure_model()
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        batch = synthetic_batch(method, module, batch_size=batch_size, num_points=num_points, generator=gen)
        batch = batch_to(batch, device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        losses: list[float] = []

        def step(i: int) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = module.training_step(batch, i)
            loss.backward()
            optimizer.step()
            if i == 0:
                losses.append(float(loss.detach()))

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        begin = time.perf_counter()
        step(0)  # the first step: allocations, cuDNN / kernel selection, compilation
        sync(device)
        first_s = time.perf_counter() - begin
        timing = time_steps(step, batch_size=batch_size, steps=1, warmup=0, device=device)
        steps = int(min(50, (budget - (time.perf_counter() - begin)) * 0.8 / max(timing["s_per_step"], 1e-6)))
        if steps >= 2:  # what the budget allows after the first (warm-up) and the probe step
            timing = time_steps(step, batch_size=batch_size, steps=steps, warmup=0, device=device)
        steps = max(steps, 1)
        return {
            "config": str(config_path(method, args.tiny).relative_to(Path(__file__).resolve().parents[1])),
            "module": type(module).__name__,
            "batch_size": batch_size,
            "num_points": num_points,
            "params": sum(p.numel() for p in module.parameters()),
            "params_trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "compiled_modules": len(module.compile_targets()) if compiled else 0,
            "first_step_s": round(first_s, 3),
            "steps_timed": steps,
            "samples_per_s": round(timing["samples_per_s"], 2),
            "s_per_step": round(timing["s_per_step"], 5),
            "peak_memory_mb": round(timing["peak_memory_mb"], 1),
            "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
            "first_loss": losses[0] if losses else None,
        }

    return item


# ------------------------------------------------------------------------------------------- ops


def op_item(
    case: tuple[str, int, int, int, int], args: argparse.Namespace, device: torch.device
) -> Callable[[float], dict[str, Any]]:
    """FPS (``num_points`` -> ``centres``) and kNN (``neighbours`` of every centre) on a batch of clouds."""
    from pretrain.ops import farthest_point_sample, gather_points, knn

    name, clouds, points, centres, neighbours = case
    if args.tiny:
        clouds, points, centres = max(2, clouds // 32), max(64, points // 16), max(8, centres // 16)
        neighbours = min(neighbours, 8)

    def item(budget: float) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(0)
        xyz = (torch.rand(clouds, points, 3, generator=gen) * 2 - 1).to(device)
        idx = farthest_point_sample(xyz, centres)
        center_xyz = gather_points(xyz, idx)
        fps = timed_calls(lambda: farthest_point_sample(xyz, centres), budget / 2, device)
        near = timed_calls(lambda: knn(center_xyz, xyz, neighbours), budget / 2, device)
        return {
            "case": name,
            "clouds": clouds,
            "num_points": points,
            "centres": centres,
            "neighbours": neighbours,
            "fps_ms": fps["ms"],
            "fps_clouds_per_s": round(clouds / fps["ms"] * 1e3, 1),
            "knn_ms": near["ms"],
            "knn_clouds_per_s": round(clouds / near["ms"] * 1e3, 1),
            "calls_timed": {"fps": fps["calls"], "knn": near["calls"]},
        }

    return item


def timed_calls(fn: Callable[[], object], budget: float, device: torch.device) -> dict[str, Any]:
    """Median milliseconds per call of ``fn`` over as many calls as fit in ``budget`` (at most 50)."""
    fn()  # warm-up
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 50 and (not times or time.perf_counter() - start < budget):
        begin = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - begin)
    times.sort()
    return {"ms": round(times[len(times) // 2] * 1e3, 4), "calls": len(times)}


# -------------------------------------------------------------------------------------- pipeline


def pipeline_item(
    name: str, method: str, synth_options: tuple[str, ...], args: argparse.Namespace, work: Path
) -> Callable[[float], dict[str, Any]]:
    """Samples/s of the training dataloader of ``method``'s config over ``pcpt-data synth`` shards."""
    from datapipes.cli import main as data_main
    from datapipes.datamodule import PointCloudDataModule

    def item(budget: float) -> dict[str, Any]:
        data = data_settings(method, tiny=args.tiny)
        batch_size = args.batch_size or int(data["batch_size"])
        num_points = int(data["num_points"])
        workers = int(data["num_workers"])
        per_class = 8 if args.tiny else max(60, 4 * batch_size // 10)
        extra = synth_options
        if args.tiny:
            batch_size, num_points, workers = min(batch_size, 4), min(num_points, 2048), min(workers, 1)
            extra = tuple(o if o != "137" else "32" for o in synth_options)
        root = work / f"synth-{name}"
        if not (root / "manifest.json").exists():
            argv = ["synth", str(root), "--classes", "10", "--per-class", str(per_class),
                    "--test-per-class", "1", "--points", str(num_points), *extra]  # fmt: skip
            with quiet_stdout():
                status = data_main(argv)
            if status:
                raise RuntimeError(f"pcpt-data {' '.join(argv)} exited with {status}")
        skip = ("data_root", "batch_size", "num_workers", "num_points")
        options = {k: v for k, v in data.items() if k not in skip}
        batches = 10_000
        module = PointCloudDataModule(
            str(root), **options, batch_size=batch_size, num_workers=workers, num_points=num_points,
            batches_per_epoch=batches,
        )  # fmt: skip
        module.setup("fit")
        begin = time.perf_counter()
        loader = iter(module.train_dataloader())
        first = next(loader)
        first_s = time.perf_counter() - begin
        count, begin = 0, time.perf_counter()
        for _batch in loader:
            count += 1
            if time.perf_counter() - begin > max(budget - first_s, 0.5) * 0.8 or count >= batches - 1:
                break
        elapsed = time.perf_counter() - begin
        del loader
        return {
            "pipeline": name,
            "config": str(config_path(method, args.tiny).relative_to(Path(__file__).resolve().parents[1])),
            "batch_size": batch_size,
            "num_points": num_points,
            "num_workers": workers,
            "images": getattr(first, "images", None) is not None,
            "first_batch_s": round(first_s, 3),
            "batches_timed": count,
            "samples_per_s": round(count * batch_size / elapsed, 1) if count else None,
        }

    return item


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """Sends stdout to stderr (the suite's stdout holds only its JSON)."""
    saved = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = saved


def compare_pipeline_with_steps(report: dict[str, Any]) -> None:
    """Adds to each pipeline row the fastest step rate of the methods that read its data, and the ratio."""
    readers = {
        "objects": ("point_mae", "point_bert", "point_bert_dvae", "geomae"),
        "objects_images": ("vipformer",),
    }
    for row in report["pipeline"]:
        steps = [
            s for s in report["steps"]
            if s["status"] == "ok" and s["method"] in readers.get(row.get("pipeline", ""), ())
        ]  # fmt: skip
        if row["status"] != "ok" or not steps or not row.get("samples_per_s"):
            continue
        fastest = max(steps, key=lambda s: s["samples_per_s"])
        row["fastest_step"] = {k: fastest[k] for k in ("method", "precision", "compiled", "samples_per_s")}
        row["pipeline_over_step"] = round(row["samples_per_s"] / fastest["samples_per_s"], 3)
        row["pipeline_faster_than_step"] = row["samples_per_s"] > fastest["samples_per_s"]


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_suite.py: --device cuda, but torch sees no CUDA device (use --device cpu)")
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is skipped
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    suite = Suite(args, device, argv)
    with tempfile.TemporaryDirectory(prefix="pcpt-gpu-suite-") as tmp:
        work = Path(tmp)
        if "ops" in args.sections:
            for case in OP_CASES:
                suite.run("ops", {"op": "fps+knn", "case": case[0]}, op_item(case, args, device))
        if "pipeline" in args.sections:
            for name, method, options in PIPELINES:
                suite.run("pipeline", {"pipeline": name}, pipeline_item(name, method, options, args, work))
        if "steps" in args.sections:  # compiled last: when the budget runs out, the eager rows are complete
            for compiled in (False, True) if args.compile else (False,):
                for method in args.methods:
                    for precision in args.precisions:
                        fields = {"method": method, "precision": precision, "compiled": compiled}
                        suite.run("steps", fields, step_item(method, precision, compiled, args, device, work))
    compare_pipeline_with_steps(suite.report)
    suite.report["peak_memory_mb_process"] = round(peak_memory_mb(torch.device("cpu")), 1)
    rows = [r for section in ("steps", "ops", "pipeline") for r in suite.report[section]]
    suite.report["summary"] = {
        status: sum(r["status"] == status for r in rows) for status in ("ok", "error", "skipped")
    }
    suite.report["elapsed_s"] = round(args.total_budget_s - (suite.deadline - time.perf_counter()), 1)
    suite.save()
    print(json.dumps(suite.report, indent=2))
    return 0 if suite.report["summary"]["error"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
