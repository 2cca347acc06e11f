"""pcpt quickstart on the embedded demo dataset (CPU, 216 training steps).

Steps, each through the real command-line tools:
1. ``pcpt-data synth`` writes the procedural demo dataset as shards.
2. ``pcpt-pretrain fit -c configs/pretrain/point_mae_tiny.yaml`` pre-trains a tiny Point-MAE and exports the
   encoder artifact.
3. A random-init encoder of the same architecture is written as an artifact too (the honest baseline).
4. ``pcpt-finetune probe`` (linear SVM, C chosen on a split held out from train) and ``pcpt-finetune fewshot``
   (5-way 10-shot, 10 folds, the same episode file for both encoders) evaluate both, and a table is printed.

Usage: ``python scripts/quickstart.py [OUT_DIR]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain.checkpoint import load_encoder, save_encoder
from pretrain.encoders import build_encoder, spec_from_dict
from pretrain.encoders.spec import DataContract

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], *, capture: bool = False) -> str:
    print("\n$ " + " ".join(cmd), flush=True)
    result = subprocess.run(
        cmd, cwd=ROOT, check=False, text=True, stdout=subprocess.PIPE if capture else None
    )
    if result.returncode != 0:
        sys.exit(f"quickstart: step failed with exit status {result.returncode}: {' '.join(cmd)}")
    return result.stdout or ""


def last_json(text: str) -> dict:
    """The JSON document a ``--json`` command printed (from its first ``{`` to the end of its output)."""
    return json.loads(text[text.index("{") :])


def random_init_artifact(pretrained: Path, out: Path, seed: int = 0) -> Path:
    """An artifact with the architecture of `pretrained` (any encoder family) and a random initialisation."""
    _, meta = load_encoder(pretrained)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = build_encoder(spec_from_dict(meta["spec"]))
    contract = DataContract.from_dict(meta["data_contract"])
    return save_encoder(out, encoder, data=contract, provenance={"method": "random-init", "seed": seed})


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, run_dir = out / "data", out / "run"
    pretrained, random_init = out / "encoder-pretrained", out / "encoder-random-init"
    start = time.time()

    if not (data / "manifest.json").exists():
        run(["pcpt-data", "synth", str(data)])
    run(["pcpt-data", "inspect", str(data)])
    run(
        [
            "pcpt-pretrain", "fit",
            "-c", "configs/pretrain/point_mae_tiny.yaml",
            f"--data.data_root={data}",
            f"--trainer.default_root_dir={run_dir}",
            f"--export_dir={pretrained}",
        ]
    )  # fmt: skip
    random_init_artifact(pretrained, random_init)

    episodes = out / "episodes-5w10s.json"
    rows = []
    for name, art in (("pretrained (Point-MAE)", pretrained), ("random init", random_init)):
        probe = last_json(
            run(
                ["pcpt-finetune", "probe", str(art), "--data", str(data), "--method", "svm", "--json"],
                capture=True,
            )
        )
        fewshot_cmd = [
            "pcpt-finetune",
            "fewshot",
            str(art),
            "--data",
            str(data),
            "--way",
            "5",
            "--shot",
            "10",
        ]
        fewshot_cmd += ["--folds", "10", "--json"]
        fewshot_cmd += (
            ["--episodes", str(episodes)] if episodes.exists() else ["--write-episodes", str(episodes)]
        )
        fewshot = last_json(run(fewshot_cmd, capture=True))
        rows.append((name, probe, fewshot))

    print("\npcpt quickstart: demo dataset, tiny Point-MAE, CPU")
    print(f"{'encoder':<24} {'SVM probe acc (test)':>22} {'5-way 10-shot acc (10 folds)':>30}")
    for name, probe, fewshot in rows:
        svm = 100 * probe["accuracy"]
        fs = f"{100 * fewshot['mean']:.1f} ± {100 * fewshot['std']:.1f}"
        print(f"{name:<24} {svm:>21.1f}% {fs:>29}%")
    print(f"\nSVM C chosen on a split held out from train; few-shot episodes: {episodes}")
    print(f"artifacts: {pretrained} and {random_init}; total time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
