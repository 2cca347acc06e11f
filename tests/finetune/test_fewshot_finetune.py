"""Few-shot ``--protocol finetune`` through the CLI on tiny shards and a tiny encoder artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from datapipes.synthetic import write_synthetic
from finetune.cli import main as finetune_main
from pretrain.checkpoint import save_encoder
from pretrain.encoders import build_encoder
from pretrain.encoders.spec import DataContract, PointViTSpec
from pretrain.sources import load_source
from pretrain.sources.synthetic import write_random_source

TINY_A2P = Path(__file__).resolve().parents[2] / "configs" / "finetune" / "any2point_tiny.yaml"


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
    assert report["params"]["warmup_epochs"] == pytest.approx(2 / 15)  # 10 of 150, scaled to 2 epochs
    # the same episodes rerun from the file give the same folds
    assert finetune_main([*args, "--episodes", str(episodes)]) == 0
    rerun = json.loads(_json(capsys))
    assert rerun["episodes_sha256"] == report["episodes_sha256"]
    assert rerun["fold_accuracies"] == report["fold_accuracies"]  # seeded per fold


def _json(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr().out
    return out[out.index("{") :]


def _any2point_config(tmp_path: Path) -> Path:
    """A finetune config whose encoder is a tiny Any2Point spec on a random BERT-layout source."""
    source = write_random_source(
        tmp_path / "source.safetensors", "bert", embed_dim=32, depth=2, num_heads=4, positions=80
    )
    config = yaml.safe_load(TINY_A2P.read_text())
    config["model"]["encoder"].update(
        source_path=str(source), num_tokens=8, tokenizer_k=4, attn_dim=6, voxel_size=0.5
    )
    config["data"]["num_points"] = 64  # the default --num-points of a config run
    path = tmp_path / "a2p.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_finetune_protocol_from_an_any2point_config_trains_a_fresh_adapted_model_per_fold(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = setup
    config = _any2point_config(tmp_path)
    source_bytes = (tmp_path / "source.safetensors").read_bytes()
    args = ["fewshot", str(config), "--data", str(data), "--way", "2", "--shot", "2", "--query", "3"]
    args += ["--folds", "2", "--protocol", "finetune", "--epochs", "2", "--json", "--device", "cpu"]
    assert finetune_main(args) == 0
    report = json.loads(_json(capsys))
    assert report["method"] == "any2point (built from a2p.yaml)"
    params = report["params"]
    assert params["trains"].startswith("any2point (frozen source;")
    counts = params["parameters"]
    # the frozen part is the whole source: embeddings + 2 layers (nothing of it trains)
    frozen = sum(p.numel() for p in load_source(tmp_path / "source.safetensors", "bert").parameters())
    assert counts["frozen"] == frozen
    assert counts["trainable"] > 0  # the Point-PN tokenizer, adapters, CLS, norm and head
    assert len(report["fold_accuracies"]) == 2
    assert all(0.0 <= a <= 1.0 for a in report["fold_accuracies"])
    assert (tmp_path / "source.safetensors").read_bytes() == source_bytes
    assert finetune_main(args) == 0  # seeded per fold: the same folds again
    assert json.loads(_json(capsys))["fold_accuracies"] == report["fold_accuracies"]
    # a field of the config's encoder replaced from the command line: no guided adapters, fewer parameters
    assert finetune_main([*args, "--encoder-set", "guided=false", "--warmup-epochs", "0.5"]) == 0
    bottleneck = json.loads(_json(capsys))["params"]
    assert bottleneck["warmup_epochs"] == 0.5
    assert 0 < bottleneck["parameters"]["trainable"] < counts["trainable"]
    assert bottleneck["parameters"]["frozen"] == frozen


def test_a_config_is_refused_by_the_svm_protocol_and_needs_an_encoder_spec(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = setup
    config = _any2point_config(tmp_path)
    base = ["--data", str(data), "--way", "2", "--shot", "2", "--query", "3", "--folds", "1"]
    assert finetune_main(["fewshot", str(config), *base]) != 0
    assert "use an encoder artifact, or --protocol finetune" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("trainer:\n  max_epochs: 1\nmodel:\n  head: mae\n")
    assert finetune_main(["fewshot", str(empty), *base, "--protocol", "finetune", "--epochs", "1"]) != 0
    assert "empty.yaml: the config has no model.encoder spec" in capsys.readouterr().err
    finetune = [*base, "--protocol", "finetune", "--epochs", "1"]
    assert finetune_main(["fewshot", str(config), *finetune, "--encoder-set", "tokenizer_k"]) != 0
    assert "expected FIELD=VALUE" in capsys.readouterr().err
    assert finetune_main(["fewshot", str(config), *finetune, "--encoder-set", "no_such_field=1"]) != 0
    assert "a2p.yaml: invalid encoder spec" in capsys.readouterr().err
    for warmup in ("1", "-0.5"):  # not shorter than --epochs 1, negative
        assert finetune_main(["fewshot", str(config), *finetune, "--warmup-epochs", warmup]) != 0
        assert f"--warmup-epochs {warmup} must be >= 0 and shorter than --epochs 1" in capsys.readouterr().err
    _, art = setup
    assert finetune_main(["fewshot", str(art), *finetune, "--encoder-set", "guided=false"]) != 0
    assert "--encoder-set needs a finetune config as ART" in capsys.readouterr().err
