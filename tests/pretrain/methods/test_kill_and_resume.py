"""Fault injection: a pre-training run killed (SIGKILL) at random moments and resumed ends as if never killed.

The reference run and the interrupted one run as separate processes with the same environment; the
interrupted one keeps a checkpoint after every step and is restarted from its ``last.ckpt`` after each kill.
Kills are placed by progress, not by wall time (a fast machine would otherwise finish before the kill): the
first comes before any checkpoint exists, the others after a given number of new checkpoints plus a seeded
random delay, so they land mid-step, mid-save or at epoch ends. The final weights must be identical, bit for
bit.
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


def _stamp(path: Path) -> tuple[int, int] | None:
    """Modification time and size of ``path``, or None while it does not exist."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _run(
    cmd: list[str], *, kill_after_saves: int | None = None, delay: float = 0.0, watch: Path | None = None
) -> int:
    """Runs ``cmd``; with ``kill_after_saves``, SIGKILLs it ``delay`` s after that many writes of ``watch``.

    Returns the exit status (negative: killed). ``kill_after_saves=0`` kills ``delay`` s after the start.
    """
    process = subprocess.Popen(
        cmd, cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if kill_after_saves is None:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-3000:]
        return 0
    assert watch is not None
    saves, last = 0, _stamp(watch)
    deadline = time.monotonic() + 600
    while saves < kill_after_saves and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
        stamp = _stamp(watch)
        if stamp is not None and stamp != last:
            saves, last = saves + 1, stamp
    time.sleep(delay)
    process.kill()
    _, err = process.communicate(timeout=60)
    assert process.returncode in (0, -9), err.decode()[-3000:]
    return int(process.returncode)


@pytest.mark.slow
def test_killed_and_resumed_training_ends_with_the_uninterrupted_weights(demo: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    _run(_command(demo, reference, resume=False))
    interrupted = tmp_path / "interrupted"
    rng = random.Random(0)
    watch = interrupted / "steps" / "last.ckpt"
    kills = 0
    # Before any checkpoint (still importing); at the end of epoch 0 (8 batches per epoch); inside epoch 1
    # (a resume after a resume at an epoch end, where Lightning restarts its batch count); at the end of
    # epoch 1 (Lightning, counting from the resume, does not know the epoch ended); inside epoch 2.
    for saves in (0, 8, 3, 2, 3, 2):
        cmd = _command(demo, interrupted, resume=True)
        if _run(cmd, kill_after_saves=saves, delay=rng.uniform(0.0, 0.1), watch=watch) != 0:
            kills += 1
    assert kills == 6  # every run really was cut short
    partial = torch.load(watch, map_location="cpu", weights_only=True)["global_step"]
    assert 18 <= partial < 24
    _run(_command(demo, interrupted, resume=True))
    want = torch.load(reference / "steps" / "last.ckpt", map_location="cpu", weights_only=True)
    got = torch.load(interrupted / "steps" / "last.ckpt", map_location="cpu", weights_only=True)
    assert got["global_step"] == want["global_step"] == 24
    different = [
        k for k in want["state_dict"] if not torch.equal(want["state_dict"][k], got["state_dict"][k])
    ]
    assert not different, different[:5]
