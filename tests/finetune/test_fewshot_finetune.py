"""Few-shot ``--protocol finetune`` through the CLI on tiny shards and a tiny encoder artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datapipes.synthetic import write_synthetic
from finetune.cli import main as finetune_main
from pretrain.checkpoint import save_encoder
from pretrain.encoders import build_encoder
from pretrain.encoders.spec import DataContract, PointViTSpec


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    write_synthetic(data, classes=3, per_class=4, test_per_class=3, points=64, shard_size=8)
    torch.manual_seed(0)
    encoder = build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8))
    art = save_encoder(
        tmp_path / "art", encoder, data=DataContract(num_points=64), provenance={"method": "t"}
    )
    return data, art


def test_fewshot_finetune_protocol(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, art = setup
    episodes = tmp_path / "episodes.json"
    args = ["fewshot", str(art), "--data", str(data), "--way", "2", "--shot", "2", "--query", "3"]
    args += ["--folds", "2", "--protocol", "finetune", "--epochs", "2", "--json", "--device", "cpu"]
    assert finetune_main([*args, "--write-episodes", str(episodes)]) == 0
    report = json.loads(_json(capsys))
    assert report["protocol"] == "finetune"
    assert len(report["fold_accuracies"]) == 2
    assert all(0.0 <= a <= 1.0 for a in report["fold_accuracies"])
    assert "last epoch" in report["selection"]
    # the same episodes rerun from the file give the same folds
    assert finetune_main([*args, "--episodes", str(episodes)]) == 0
    rerun = json.loads(_json(capsys))
    assert rerun["episodes_sha256"] == report["episodes_sha256"]
    assert rerun["fold_accuracies"] == report["fold_accuracies"]  # seeded per fold


def _json(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr().out
    return out[out.index("{") :]
