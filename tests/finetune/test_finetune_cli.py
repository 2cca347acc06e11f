"""pcpt-finetune fit through the CLI: strict artifact load, held-out selection, single-pass and voting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datapipes.errors import UserError
from datapipes.synthetic import write_synthetic
from finetune.cli import main as finetune_main
from pretrain.checkpoint import save_encoder
from pretrain.encoders import build_encoder
from pretrain.encoders.spec import DataContract, PointViTSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_synthetic(root, classes=3, per_class=10, test_per_class=4, points=80, shard_size=16)
    return root


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    encoder = build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8))
    out = tmp_path_factory.mktemp("art") / "encoder"
    return save_encoder(out, encoder, data=DataContract(num_points=64), provenance={"method": "test"})


def _fit_args(demo: Path, art: Path, root: Path) -> list[str]:
    return [
        "fit", "-c", str(REPO / "configs/finetune/classify.yaml"),
        f"--model.pretrained={art}", f"--data.data_root={demo}", f"--trainer.default_root_dir={root}",
        "--data.num_points=64", "--data.pool_points=72", "--data.batch_size=8", "--data.val_fraction=0.2",
        "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        "--model.vote_views=2", "--model.lr_scheduler.init_args.warmup_epochs=1",
    ]  # fmt: skip


@pytest.mark.parametrize("freeze", [False, True])
def test_finetune_fit_reports_honest_results(
    demo: Path, artifact: Path, tmp_path: Path, freeze: bool
) -> None:
    args = [*_fit_args(demo, artifact, tmp_path), f"--model.freeze_encoder={str(freeze).lower()}"]
    assert finetune_main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["protocol"] == ("linear probe (frozen encoder)" if freeze else "full finetuning")
    assert result["model_selection"]["split"] == "train hold-out"
    assert result["model_selection"]["checkpoint"].startswith("best val/acc")
    assert result["test_split"] == "test"
    assert 0.0 <= result["metrics"]["test/acc"] <= 1.0
    assert "test/acc_vote2" in result["metrics"]
    assert result["model_selection"]["num_val"] == 6  # 20 % of 10 per class, 3 classes


def test_finetune_and_probe_a_vipformer_point_encoder(demo: Path, tmp_path: Path) -> None:
    """Another encoder family (no CLS token, no drop-path): finetuned and probed through the same commands."""
    from pretrain.encoders import ViPFormerPointSpec

    torch.manual_seed(0)
    spec = ViPFormerPointSpec(embed_dim=32, num_latents=8, group_size=8, num_sa_layers=1, num_heads=2)
    art = save_encoder(tmp_path / "vip", build_encoder(spec), data=DataContract(num_points=64), provenance={})
    assert finetune_main(_fit_args(demo, art, tmp_path / "run")) == 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= result["metrics"]["test/acc"] <= 1.0
    assert finetune_main(["probe", str(art), "--data", str(demo), "--json"]) == 0


def test_finetune_rejects_contract_mismatch(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    encoder = build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8))
    art = save_encoder(
        tmp_path / "art", encoder, data=DataContract(num_points=64, normalization="none"), provenance={}
    )
    status = finetune_main(_fit_args(demo, art, tmp_path / "run"))
    assert status == 2
    assert "the encoder expects normalization 'none'" in capsys.readouterr().err


def test_val_split_equal_to_test_split_is_refused(demo: Path) -> None:
    from finetune.data import ClassificationDataModule

    with pytest.raises(UserError, match="test split"):
        ClassificationDataModule(str(demo), val_split="test")


def test_resumed_finetuning_ends_with_the_weights_of_an_uninterrupted_run(
    demo: Path, artifact: Path, tmp_path: Path
) -> None:
    """Head dropout, drop-path, the training order and the augmentations all come from checkpointed state."""
    every_epoch = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'epochs'}",
        "--trainer.callbacks.every_n_epochs=1",
        "--trainer.callbacks.save_top_k=-1",
        "--skip_test=true",
    ]
    assert finetune_main([*_fit_args(demo, artifact, tmp_path / "straight"), *every_epoch]) == 0
    (first,) = (tmp_path / "epochs").glob("epoch=0-*.ckpt")
    resumed = tmp_path / "resumed"
    assert (
        finetune_main([*_fit_args(demo, artifact, resumed), "--skip_test=true", f"--ckpt_path={first}"]) == 0
    )
    (second,) = (tmp_path / "epochs").glob("epoch=1-*.ckpt")
    want = torch.load(second, map_location="cpu", weights_only=True)["state_dict"]
    got = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, different[:5]


def test_finetune_without_a_logger_logs_with_the_default_logger(
    demo: Path, artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``trainer.logger`` in the config: CSV when tensorboard is missing, in lightning_logs/version_0."""
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "tensorboard" else real_find_spec(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    args = [a for a in _fit_args(demo, artifact, tmp_path) if a != "--trainer.logger=false"]
    assert finetune_main([*args, "--trainer.max_epochs=1", "--model.vote_views=0"]) == 0
    metrics = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    header = metrics.read_text().splitlines()[0].split(",")
    assert "val/acc" in header
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
