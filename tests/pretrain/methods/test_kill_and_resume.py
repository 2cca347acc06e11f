"""Fault injection: a pre-training run killed (SIGKILL) at random moments and resumed ends as if never killed.

The reference run and the interrupted one run as separate processes with the same environment; the
interrupted one keeps a checkpoint after every step and is restarted from its ``last.ckpt`` after each kill,
at seeded random moments (before the first checkpoint, mid-epoch, at epoch ends). The final weights must be
identical, bit for bit.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import REPO, repo_env
from tests.pretrain.methods.tiny_cli import RUNTIME, config, tiny_encoder

ARGS = [
    *config("point_mae_tiny.yaml"),
    *tiny_encoder(num_groups=8, tokenizer_dim=32),
    "--model.init_args.decoder_depth=1",
    "--model.init_args.lr_scheduler.init_args.warmup_epochs=1",
    *RUNTIME,
    "--trainer.max_epochs=3",
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=1",
    "--trainer.callbacks.save_last=true",
    "--trainer.callbacks.save_top_k=0",
]


def _command(demo: Path, root: Path, resume: bool) -> list[str]:
    steps = root / "steps"
    cmd = [
        sys.executable, "-m", "pretrain.cli", "fit", *ARGS, f"--data.data_root={demo}",
        f"--trainer.default_root_dir={root}", f"--trainer.callbacks.dirpath={steps}",
    ]  # fmt: skip
    if resume and (steps / "last.ckpt").is_file():
        cmd.append(f"--ckpt_path={steps / 'last.ckpt'}")
    return cmd


def _run(cmd: list[str], *, kill_after: float | None = None) -> int:
    process = subprocess.Popen(
        cmd, cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if kill_after is None:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-3000:]
        return 0
    time.sleep(kill_after)
    process.kill()
    process.communicate(timeout=60)
    return int(process.returncode)


@pytest.mark.slow
def test_killed_and_resumed_training_ends_with_the_uninterrupted_weights(demo: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    _run(_command(demo, reference, resume=False))
    interrupted = tmp_path / "interrupted"
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        if _run(_command(demo, interrupted, resume=True), kill_after=rng.uniform(4.0, 14.0)) != 0:
            kills += 1
    assert kills >= 2  # the run really was cut short
    _run(_command(demo, interrupted, resume=True))
    want = torch.load(reference / "steps" / "last.ckpt", map_location="cpu", weights_only=True)
    got = torch.load(interrupted / "steps" / "last.ckpt", map_location="cpu", weights_only=True)
    assert got["global_step"] == want["global_step"] == 24
    different = [
        k for k in want["state_dict"] if not torch.equal(want["state_dict"][k], got["state_dict"][k])
    ]
    assert not different, different[:5]
