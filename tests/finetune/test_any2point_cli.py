"""Any2Point through pcpt-finetune: a frozen source adapted, exported, then probed, few-shot and embedded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datapipes.synthetic import write_synthetic
from finetune.cli import main as finetune_main
from finetune.lightning_cli import CLI_KWARGS, FinetuneCLI
from pretrain.artifacts import load_encoder, read_artifact_meta
from pretrain.encoders import Any2PointEncoder
from pretrain.sources import load_source
from pretrain.sources.synthetic import write_random_source

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "finetune" / "any2point_tiny.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_synthetic(root, classes=3, per_class=10, test_per_class=4, points=80, shard_size=16)
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random source in the BERT layout (the tiny config's MiniLM has the same layout)."""
    path = tmp_path_factory.mktemp("source") / "model.safetensors"
    return write_random_source(path, "bert", embed_dim=32, depth=2, num_heads=4, positions=80)


def _args(demo: Path, source: Path, root: Path, *extra: str) -> list[str]:
    return [
        "-c", str(TINY), f"--data.data_root={demo}", f"--trainer.default_root_dir={root}",
        f"--model.encoder.source_path={source}", "--model.encoder.num_tokens=16",
        "--model.encoder.tokenizer_k=8", "--model.encoder.attn_dim=6", "--model.encoder.voxel_size=0.5",
        "--data.num_points=64", "--data.pool_points=72", "--data.batch_size=8", "--data.val_fraction=0.2",
        "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--trainer.logger=false", *extra,
    ]  # fmt: skip


def test_fit_trains_only_the_adapted_parts_and_leaves_the_source_bit_identical(
    demo: Path, source: Path, tmp_path: Path
) -> None:
    cli: Any = FinetuneCLI(args=["fit", *_args(demo, source, tmp_path)], **CLI_KWARGS)
    encoder = cli.model.encoder
    assert isinstance(encoder, Any2PointEncoder)
    reference = load_source(source, "bert").state_dict()
    after = encoder.source_state()
    assert reference.keys() <= after.keys() | {"embeddings.position_ids"}
    for key, value in reference.items():
        assert torch.equal(after[key], value), key
    result = json.loads((tmp_path / "results.json").read_text())
    counts = result["parameters"]
    assert counts["frozen"] == sum(p.numel() for p in encoder.source.parameters() if not p.requires_grad)
    assert counts["trainable"] == sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    assert result["artifact_provenance"]["method"] == "any2point"
    assert result["protocol"].startswith("any2point (frozen source;")
    assert result["artifact_provenance"]["source"]["sha256"] == encoder.spec.source_sha256
    assert 0.0 <= result["metrics"]["test/acc"] <= 1.0


def test_two_step_training_exports_an_artifact_that_probe_fewshot_and_embed_use(
    demo: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = tmp_path / "art"
    assert finetune_main(["fit", *_args(demo, source, tmp_path / "run"), f"--export_dir={art}"]) == 0
    meta = read_artifact_meta(art)
    assert meta["spec"]["arch"] == "any2point"
    assert meta["spec"]["source_sha256"] == load_source(source, "bert").sha256
    assert meta["provenance"]["method"] == "finetune (any2point)"
    encoder, _ = load_encoder(art)
    assert isinstance(encoder, Any2PointEncoder)
    # the artifact holds the trained parts only: no tensor of the frozen source
    from safetensors.torch import load_file

    stored = load_file(art / "encoder.safetensors")
    assert not any(k.startswith("source.") and ".adapters." not in k for k in stored)
    # step two: continue from the artifact (its spec, its weights), then the evaluation commands
    capsys.readouterr()
    assert finetune_main(["fit", *_args(demo, source, tmp_path / "two"), f"--model.pretrained={art}"]) == 0
    assert json.loads((tmp_path / "two" / "results.json").read_text())["pretrained"] == str(art)
    capsys.readouterr()
    assert finetune_main(["probe", str(art), "--data", str(demo), "--method", "knn", "--json"]) == 0
    probe = json.loads(capsys.readouterr().out)
    assert probe["feature_dim"] == 64
    assert 0.0 <= probe["accuracy"] <= 1.0
    args = ["fewshot", str(art), "--data", str(demo), "--way", "2", "--shot", "2", "--query", "2"]
    assert finetune_main([*args, "--folds", "2", "--json"]) == 0
    fewshot = json.loads(capsys.readouterr().out)
    assert len(fewshot["fold_accuracies"]) == 2
    # the finetune protocol trains the adapted parts on each support set, the source stays frozen
    assert finetune_main([*args, "--folds", "2", "--protocol", "finetune", "--epochs", "1", "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["protocol"] == "finetune"
    assert len(tuned["fold_accuracies"]) == 2
    clouds = tmp_path / "clouds.npy"
    np.save(clouds, np.random.default_rng(0).uniform(-1, 1, (3, 64, 3)).astype(np.float32))
    out = tmp_path / "features.npz"
    assert finetune_main(["embed", str(art), "--input", str(clouds), "--out", str(out), "--quiet"]) == 0
    with np.load(out) as features:
        assert features["pooled"].shape == (3, 64)
        assert features["tokens"].shape == (3, 16, 32)


def test_adapters_on_a_frozen_pcpt_artifact_train_and_export(demo: Path, tmp_path: Path) -> None:
    from pretrain.artifacts import save_encoder
    from pretrain.encoders import DataContract, PointAdapterEncoder, PointViTSpec, build_encoder

    torch.manual_seed(0)
    base_encoder = build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8, drop_path=0.5))
    base = save_encoder(tmp_path / "base", base_encoder, data=DataContract(num_points=64), provenance={})
    art = tmp_path / "adapted"
    args = [
        "fit", "-c", str(REPO / "configs/finetune/point_adapter.yaml"), f"--data.data_root={demo}",
        f"--trainer.default_root_dir={tmp_path}", f"--model.encoder.base_path={base}",
        "--model.encoder.attn_heads=2", "--model.encoder.voxel_size=0.5", "--data.num_points=64",
        "--data.pool_points=72", "--data.batch_size=8", "--data.val_fraction=0.2", "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false", f"--export_dir={art}",
    ]  # fmt: skip
    cli: Any = FinetuneCLI(args=args, **CLI_KWARGS)
    live = cli.model.encoder
    assert isinstance(live, PointAdapterEncoder)
    # the live model after training: every frozen tensor of the base (BatchNorm statistics included) as stored
    stored, _ = load_encoder(base)
    for key, value in stored.state_dict().items():
        if not key.startswith("norm."):
            assert torch.equal(live.frozen_state()[key], value), key
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["artifact_provenance"]["method"] == "point_adapter"
    assert result["protocol"].startswith("adapters on a frozen encoder")
    base_params = sum(p.numel() for p in base_encoder.parameters())
    norm_params = sum(p.numel() for p in base_encoder.norm.parameters())
    assert result["parameters"]["frozen"] == base_params - norm_params
    # the export holds the weights the test scored, and names the checkpoint they came from
    encoder, meta = load_encoder(art)
    assert isinstance(encoder, PointAdapterEncoder)
    assert meta["provenance"]["method"] == "finetune (point_adapter)"
    selected = result["model_selection"]["checkpoint"].rsplit(" at ", 1)[1]
    assert meta["provenance"]["checkpoint"] == selected
    assert f"step={meta['provenance']['step']}." in selected
    clouds = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        live.eval()
        torch.testing.assert_close(
            encoder.eval().pool(encoder.encode(clouds)), live.pool(live.encode(clouds))
        )
    assert finetune_main(["probe", str(art), "--data", str(demo), "--method", "knn"]) == 0


def test_a_checkpoint_refuses_another_source_file(demo: Path, tmp_path: Path) -> None:
    from datapipes.errors import UserError
    from finetune.classification import PointClassifier

    path = tmp_path / "src" / "model.safetensors"
    source = write_random_source(path, "bert", embed_dim=32, depth=2, positions=80)
    assert finetune_main(["fit", *_args(demo, source, tmp_path / "run"), "--skip_test=true"]) == 0
    last = next((tmp_path / "run").rglob("last.ckpt"))
    assert PointClassifier.load_from_checkpoint(last) is not None  # same file: loads
    write_random_source(source, "bert", embed_dim=32, depth=2, positions=80, seed=5)  # other weights
    with pytest.raises(UserError, match="source_sha256"):
        PointClassifier.load_from_checkpoint(last)
