"""Accuracy against pre-training steps: every checkpoint of a run through the SVM probe and few-shot.

For each Lightning checkpoint of a pre-training run (``ModelCheckpoint`` with ``every_n_train_steps`` and
``save_top_k: -1`` keeps one per interval), exports the encoder (``pcpt-pretrain export``), runs
``pcpt-finetune probe --method svm`` and ``pcpt-finetune fewshot --episodes`` on it, and writes one JSON
(a row per step) and a plot of both accuracies against the step, with a random-init artifact of the same
architecture as the baseline.
The checkpoints' own step counters (``global_step``) order the rows. Usage::

    python scripts/step_curve.py runs/curve/checkpoints --data data/modelnet40 \\
        --episodes runs/mn40-5w10s.json --random-init runs/mn40-random-init \\
        --out runs/curve/curve.json --plot docs/figures/point_mae_steps.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def checkpoint_step(path: Path) -> int:
    """The optimiser step a Lightning checkpoint was written at (its ``global_step``)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return int(ckpt["global_step"])


def run_json(cmd: list[str]) -> dict[str, Any]:
    """Runs a pcpt command that prints one JSON document (its ``--json`` output) and parses it."""
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout))


def evaluate(artifact: Path, data: str, episodes: Path) -> dict[str, Any]:
    """SVM probe (test accuracy, chosen C) and few-shot (mean, std) of one encoder artifact."""
    probe = run_json(
        ["pcpt-finetune", "probe", str(artifact), "--data", data, "--method", "svm", "--json", "--no-record"]
    )
    fewshot_cmd = ["pcpt-finetune", "fewshot", str(artifact), "--data", data, "--episodes", str(episodes)]
    fewshot = run_json([*fewshot_cmd, "--json", "--no-record"])
    return {
        "svm_test_accuracy": probe["accuracy"],
        "svm_selection": probe["selection"],
        "fewshot_mean": fewshot["mean"],
        "fewshot_std": fewshot["std"],
        "episodes_sha256": fewshot["episodes_sha256"],
    }


def plot(rows: list[dict[str, Any]], baseline: dict[str, Any] | None, path: Path) -> None:
    """Both accuracies (%) against the step; the random-init values as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for key, label, colour in (
        ("svm_test_accuracy", "SVM linear probe, test", "tab:blue"),
        ("fewshot_mean", "5-way 10-shot (svm protocol)", "tab:orange"),
    ):
        ax.plot(steps, [100 * r[key] for r in rows], "o-", color=colour, label=f"pre-trained: {label}")
        if baseline is not None:
            ax.axhline(100 * baseline[key], color=colour, ls="--", lw=1, label=f"random init: {label}")
    ax.set_xlabel("pre-training steps (batch 32)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, help="folder of the run's .ckpt files")
    parser.add_argument("--data", required=True, help="shard folder or URL with the train and test splits")
    parser.add_argument("--episodes", type=Path, required=True, help="few-shot episode file")
    parser.add_argument("--random-init", type=Path, help="random-init artifact of the same architecture")
    parser.add_argument("--out", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--plot", type=Path, help="PNG to write")
    parser.add_argument("--skip-last", action="store_true", help="ignore last.ckpt (a copy of a step's)")
    parser.add_argument("--steps", help="comma-separated steps to evaluate (default: every checkpoint's)")
    args = parser.parse_args(argv)
    paths = sorted(args.checkpoints.glob("*.ckpt"))
    if args.skip_last:
        paths = [p for p in paths if p.name != "last.ckpt"]
    if not paths:
        print(f"error: no .ckpt file in {args.checkpoints}", file=sys.stderr)
        return 2
    if not args.episodes.is_file():
        print(f"error: episode file {args.episodes} does not exist", file=sys.stderr)
        return 2
    by_step = {checkpoint_step(p): p for p in paths}
    if args.steps:
        wanted = {int(step) for step in args.steps.split(",")}
        missing = sorted(wanted - set(by_step))
        if missing:
            print(f"error: no checkpoint of step(s) {missing} in {args.checkpoints}", file=sys.stderr)
            return 2
        by_step = {step: path for step, path in by_step.items() if step in wanted}
    # Rows already in --out (same data and episodes) are kept: an interrupted curve goes on where it stopped.
    report: dict[str, Any] = {"data": args.data, "episodes": str(args.episodes), "rows": []}
    report["random_init"] = None
    if args.out.is_file():
        previous = json.loads(args.out.read_text())
        if (previous.get("data"), previous.get("episodes")) == (report["data"], report["episodes"]):
            report = previous
    done = {row["step"] for row in report["rows"]}
    work = args.out.parent / (args.out.stem + "_artifacts")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for step in sorted(set(by_step) - done):
        artifact = work / f"step-{step}"
        if artifact.exists():
            shutil.rmtree(artifact)
        subprocess.run(["pcpt-pretrain", "export", str(by_step[step]), str(artifact)], check=True)
        row = {"step": step, "checkpoint": str(by_step[step]), **evaluate(artifact, args.data, args.episodes)}
        print(json.dumps(row), file=sys.stderr)
        report["rows"] = sorted([*report["rows"], row], key=lambda r: r["step"])
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.random_init and report["random_init"] is None:
        report["random_init"] = evaluate(args.random_init, args.data, args.episodes)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    rows, baseline = report["rows"], report["random_init"]
    if args.plot:
        plot(rows, baseline, args.plot)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
