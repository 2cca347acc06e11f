"""``pcpt-pretrain fit`` overrides shared by the method CLI tests: tiny models, one CPU, seconds per epoch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.cli_helpers import REPO, repo_env, run_command

#: data and trainer overrides: 64 points per cloud, batches of 4, no loader workers, no progress bar.
RUNTIME = [
    "--data.num_points=64",
    "--data.batch_size=4",
    "--data.num_workers=0",
    "--trainer.enable_progress_bar=false",
]


def config(name: str) -> list[str]:
    """``-c configs/pretrain/<name>``."""
    return ["-c", str(REPO / "configs" / "pretrain" / name)]


def tiny_encoder(*, num_groups: int, tokenizer_dim: int) -> list[str]:
    """A 32-wide, 2-block, 2-head encoder over ``num_groups`` patches of 8 points."""
    return [
        "--model.init_args.encoder.embed_dim=32",
        "--model.init_args.encoder.depth=2",
        "--model.init_args.encoder.num_heads=2",
        f"--model.init_args.encoder.num_groups={num_groups}",
        "--model.init_args.encoder.group_size=8",
        f"--model.init_args.encoder.tokenizer_dim={tokenizer_dim}",
    ]


def fit_two_ranks(args: list[str], *, callback: str, record: Path) -> list[dict[str, Any]]:
    """Runs ``pcpt-pretrain fit ARGS`` as two CPU ranks (gloo DDP) in a subprocess.

    Args:
        args: fit arguments (config, overrides, data root, output folders).
        callback: import path of a callback taking ``out_dir`` that writes ``<out_dir>/rank<r>.json``.
        record: the callback's ``out_dir``.

    Returns:
        The JSON records of rank 0 and rank 1.
    """
    cmd = [
        sys.executable, "-m", "pretrain.cli", "fit", *args,
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        f"--trainer.callbacks+={callback}", f"--trainer.callbacks.out_dir={record}",
    ]  # fmt: skip
    result = run_command(cmd, cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
