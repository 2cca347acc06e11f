"""scripts/step_curve.py: every kept checkpoint of a run through the probe and few-shot, in step order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.cli import main as pretrain_main
from tests.cli_helpers import REPO
from tests.finetune.shape_shards import write_shape_shards

sys.path.insert(0, str(REPO / "scripts"))
from quickstart import random_init_artifact

POINTS = 64
TINY_FIT = [
    "-c", str(REPO / "configs" / "pretrain" / "point_mae_tiny.yaml"),
    "--model.init_args.encoder.embed_dim=32",
    "--model.init_args.encoder.depth=1",
    "--model.init_args.encoder.num_heads=2",
    "--model.init_args.encoder.num_groups=8",
    "--model.init_args.encoder.group_size=8",
    "--model.init_args.encoder.tokenizer_dim=32",
    "--model.init_args.decoder_depth=1",
    f"--data.num_points={POINTS}",
    "--data.batch_size=4",
    "--data.num_workers=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.max_epochs=2",
    "--trainer.logger=false",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)  # a dozen command-line runs, each importing torch
def test_curve_of_kept_checkpoints_in_step_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shards = write_shape_shards(tmp_path / "shards", 3, {"train": 6, "test": 3}, POINTS, rng)
    ckpts = tmp_path / "ckpts"
    checkpoint = (
        '{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
        f'{{"dirpath": "{ckpts}", "save_top_k": -1, "every_n_train_steps": 4, "every_n_epochs": 0, '
        '"filename": "s{step}"}}'
    )
    status = pretrain_main(
        ["fit", *TINY_FIT, f"--data.data_root={shards}", f"--trainer.default_root_dir={tmp_path / 'run'}",
         f"--trainer.callbacks=[{checkpoint}]", f"--export_dir={tmp_path / 'art'}"]
    )  # fmt: skip
    assert status == 0
    steps = sorted({int(torch.load(p, weights_only=True)["global_step"]) for p in ckpts.glob("*.ckpt")})
    assert len(steps) >= 2
    random_init_artifact(tmp_path / "art", tmp_path / "random", seed=0)
    episodes = tmp_path / "episodes.json"
    subprocess.run(
        ["pcpt-finetune", "fewshot", str(tmp_path / "random"), "--data", str(shards), "--way", "2",
         "--shot", "2", "--query", "1", "--folds", "2", "--write-episodes", str(episodes), "--json",
         "--no-record"],
        check=True, capture_output=True,
    )  # fmt: skip
    out, png = tmp_path / "curve.json", tmp_path / "curve.png"
    cmd = [sys.executable, str(REPO / "scripts/step_curve.py"), str(ckpts), "--data", str(shards)]
    cmd += ["--episodes", str(episodes), "--random-init", str(tmp_path / "random"), "--out", str(out)]
    subprocess.run([*cmd, "--plot", str(png)], check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert [row["step"] for row in report["rows"]] == steps
    for row in [*report["rows"], report["random_init"]]:
        assert 0.0 <= row["svm_test_accuracy"] <= 1.0
        assert 0.0 <= row["fewshot_mean"] <= 1.0
    # each row is the probe of that step's encoder: rerun the last one by hand
    last = report["rows"][-1]
    artifact = tmp_path / "curve_artifacts" / f"step-{last['step']}"
    probe = subprocess.run(
        ["pcpt-finetune", "probe", str(artifact), "--data", str(shards), "--method", "svm", "--json",
         "--no-record"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert json.loads(probe.stdout)["accuracy"] == last["svm_test_accuracy"]
    assert png.stat().st_size > 1000


def test_missing_episode_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.ckpt").write_bytes(b"")
    cmd = [sys.executable, str(REPO / "scripts/step_curve.py"), str(tmp_path), "--data", "x"]
    done = subprocess.run(
        [*cmd, "--episodes", str(tmp_path / "none.json"), "--out", str(tmp_path / "o.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert "none.json" in done.stderr


def test_a_step_without_checkpoint_is_named(tmp_path: Path) -> None:
    for step in (2, 4):
        torch.save({"global_step": step}, tmp_path / f"s{step}.ckpt")
    (tmp_path / "episodes.json").write_text("{}")
    cmd = [sys.executable, str(REPO / "scripts/step_curve.py"), str(tmp_path), "--data", "x"]
    cmd += ["--steps", "2,3"]
    done = subprocess.run(
        [*cmd, "--episodes", str(tmp_path / "episodes.json"), "--out", str(tmp_path / "o.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert "[3]" in done.stderr


def test_rows_already_in_the_report_are_not_evaluated_again(tmp_path: Path) -> None:
    torch.save({"global_step": 2}, tmp_path / "s2.ckpt")
    (tmp_path / "episodes.json").write_text("{}")
    out = tmp_path / "o.json"
    row = {"step": 2, "svm_test_accuracy": 0.5, "fewshot_mean": 0.6}
    report = {"data": "x", "episodes": str(tmp_path / "episodes.json"), "rows": [row], "random_init": None}
    out.write_text(json.dumps(report))
    cmd = [sys.executable, str(REPO / "scripts/step_curve.py"), str(tmp_path), "--data", "x"]
    # "x" is no shard folder: any evaluation would fail, so a zero exit means nothing was re-evaluated
    subprocess.run([*cmd, "--episodes", str(tmp_path / "episodes.json"), "--out", str(out)], check=True)
    assert json.loads(out.read_text())["rows"] == [row]
