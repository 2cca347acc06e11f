"""Ordinary mistakes with the training and transfer commands: one error line naming the file, nothing written.

Each case is a mistake a user makes on a normal day (a typo in a checkpoint path, the wrong file, an output
folder that holds their own files, clouds with coordinates in the wrong unit). The commands must answer with
``PROG: error: ...`` on one line, a non-zero exit, and leave no run folder, artifact or features file behind.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from datapipes.errors import one_line
from datapipes.synthetic import write_synthetic
from finetune.cli import main as finetune_main
from pretrain.checkpoint import load_encoder, save_encoder
from pretrain.cli import main as pretrain_main
from pretrain.encoders import build_encoder
from pretrain.encoders.spec import DataContract, PointViTSpec
from tests.cli_helpers import REPO, assert_error_line_last, assert_one_error_line, console_script, run_command

PRETRAIN = [
    "-c", str(REPO / "configs/pretrain/point_mae_tiny.yaml"),
    "--model.init_args.encoder.embed_dim=32", "--model.init_args.encoder.depth=1",
    "--model.init_args.encoder.num_heads=2", "--model.init_args.encoder.num_groups=8",
    "--model.init_args.encoder.group_size=8", "--model.init_args.encoder.tokenizer_dim=32",
    "--model.init_args.decoder_depth=1", "--data.num_points=64", "--data.batch_size=4",
    "--data.num_workers=0", "--trainer.enable_progress_bar=false", "--trainer.max_steps=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_synthetic(root, classes=3, per_class=8, test_per_class=4, points=96, shard_size=8)
    return root


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    encoder = build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8))
    out = tmp_path_factory.mktemp("art") / "encoder"
    return save_encoder(out, encoder, data=DataContract(num_points=64), provenance={"method": "test"})


@pytest.fixture(scope="module")
def checkpoint(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    assert (
        pretrain_main(["fit", *PRETRAIN, f"--data.data_root={demo}", f"--trainer.default_root_dir={root}"])
        == 0
    )
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(autouse=True)
def _lightning_logs_to_captured_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's log handlers keep the stderr of the test that imported it; point them at this test's."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                monkeypatch.setattr(handler, "stream", sys.stderr)


def _error(capsys: pytest.CaptureFixture[str], prog: str, *needles: str) -> None:
    assert_error_line_last(prog, capsys.readouterr().err, *needles)


def _finetune_args(demo: Path, art: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "-c", str(REPO / "configs/finetune/classify.yaml"), f"--model.pretrained={art}",
        f"--data.data_root={demo}", f"--trainer.default_root_dir={root}", "--data.num_points=64",
        "--data.pool_points=72", "--data.batch_size=8", "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false", *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ pcpt-pretrain


def test_fit_with_a_missing_checkpoint(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    args = ["fit", *PRETRAIN, f"--data.data_root={demo}", f"--trainer.default_root_dir={root}"]
    assert pretrain_main([*args, f"--ckpt_path={tmp_path / 'missing.ckpt'}"]) == 2
    _error(capsys, "pcpt-pretrain", "missing.ckpt", "no such checkpoint file")
    assert not root.exists()


def test_fit_with_a_file_that_is_not_a_checkpoint(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    args = ["fit", *PRETRAIN, f"--data.data_root={demo}", f"--trainer.default_root_dir={root}"]
    assert pretrain_main([*args, f"--ckpt_path={demo / 'manifest.json'}"]) == 2
    _error(capsys, "pcpt-pretrain", "manifest.json", "cannot read checkpoint")
    assert not root.exists()


def test_fit_with_a_checkpoint_whose_weights_do_not_fit(
    demo: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Lightning rebuilds the model from a checkpoint's hyperparameters; one without them (written by other
    # code, or edited) is checked against the configured model before anything runs.
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del ckpt["hyper_parameters"]
    ckpt["state_dict"]["encoder.blocks.0.mlp.fc1.weight"] = torch.zeros(7, 7)
    foreign = tmp_path / "foreign.ckpt"
    torch.save(ckpt, foreign)
    root = tmp_path / "run"
    args = ["fit", *PRETRAIN, f"--data.data_root={demo}", f"--trainer.default_root_dir={root}"]
    assert pretrain_main([*args, f"--ckpt_path={foreign}"]) == 2
    _error(capsys, "pcpt-pretrain", "foreign.ckpt", "weights do not fit", "encoder.blocks.0.mlp.fc1.weight")
    assert not root.exists()


def test_fit_with_a_trainer_misconfiguration(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", *PRETRAIN, f"--data.data_root={demo}", f"--trainer.default_root_dir={tmp_path}"]
    assert (
        pretrain_main([*args, "--trainer.enable_checkpointing=false"]) == 2
    )  # the config has ModelCheckpoint
    _error(capsys, "pcpt-pretrain", "configuration error", "enable_checkpointing")


def test_fit_refuses_an_export_dir_holding_user_files_before_training(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    root = tmp_path / "run"
    args = ["fit", *PRETRAIN, f"--data.data_root={demo}", f"--trainer.default_root_dir={root}"]
    assert pretrain_main([*args, f"--export_dir={mine}"]) == 2
    _error(capsys, "pcpt-pretrain", str(mine), "not a pcpt artifact")
    assert not (root / "checkpoints").exists()
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_fit_without_a_root_dir_writes_under_runs(demo: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PCPT_RUN_DIR", raising=False)
    assert pretrain_main(["fit", *PRETRAIN, f"--data.data_root={demo}"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    (run,) = (tmp_path / "runs" / "pretrain").iterdir()
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    load_encoder(run / "encoder")


def test_export_of_a_file_that_is_not_a_checkpoint(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pretrain_main(["export", str(demo / "manifest.json"), str(tmp_path / "art")]) == 2
    _error(capsys, "pcpt-pretrain", "manifest.json", "cannot read checkpoint")
    assert not (tmp_path / "art").exists()


def test_export_keeps_the_users_other_files(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "art"
    assert pretrain_main(["export", str(checkpoint), str(out)]) == 0
    (out / "README.md").write_text("my notes on this encoder")
    assert pretrain_main(["export", str(checkpoint), str(out)]) == 0  # an update of the artifact
    assert (out / "README.md").read_text() == "my notes on this encoder"
    load_encoder(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "encoder.json", "encoder.safetensors"]

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.csv").write_text("1,2,3")
    capsys.readouterr()
    assert pretrain_main(["export", str(checkpoint), str(theirs)]) == 2
    _error(capsys, "pcpt-pretrain", str(theirs), "not a pcpt artifact")
    assert [p.name for p in theirs.iterdir()] == ["data.csv"]


# ------------------------------------------------------------------------------------------ pcpt-finetune


def test_finetune_with_weights_that_do_not_match(
    demo: Path, artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    save_encoder(
        broken,
        build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8)),
        data=DataContract(num_points=64),
        provenance={},
    )
    weights = load_file(str(broken / "encoder.safetensors"))
    weights["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    save_file(weights, str(broken / "encoder.safetensors"))
    root = tmp_path / "run"
    assert finetune_main(_finetune_args(demo, broken, root)) == 2
    _error(capsys, "pcpt-finetune", "encoder.safetensors", "blocks.0.attn.qkv.weight")
    assert not root.exists()


def test_finetune_with_fewer_points_than_the_contract(
    demo: Path, artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    assert finetune_main(_finetune_args(demo, artifact, root, "--data.num_points=48")) == 2
    _error(capsys, "pcpt-finetune", str(demo), "trained on 64 points", "got 48")
    assert not root.exists()


def test_finetune_at_another_point_count_on_purpose(demo: Path, artifact: Path, tmp_path: Path) -> None:
    args = _finetune_args(demo, artifact, tmp_path, "--data.num_points=48", "--model.strict_contract=false")
    assert finetune_main([*args, "--trainer.max_steps=1", "--skip_test=true"]) == 0


def test_embed_refuses_a_folder_or_a_foreign_file_as_output(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clouds = tmp_path / "clouds.npy"
    np.save(clouds, np.random.default_rng(0).random((2, 64, 3), dtype=np.float32))
    folder = tmp_path / "folder"
    folder.mkdir()
    assert (
        finetune_main(["embed", str(artifact), "--input", str(clouds), "--out", str(folder), "--quiet"]) == 2
    )
    _error(capsys, "pcpt-finetune", str(folder), "is a directory")
    foreign = tmp_path / "table.npz"
    np.savez(foreign, weights=np.zeros(3))
    assert (
        finetune_main(["embed", str(artifact), "--input", str(clouds), "--out", str(foreign), "--quiet"]) == 2
    )
    _error(capsys, "pcpt-finetune", str(foreign), "not a features file")
    assert set(np.load(foreign).files) == {"weights"}
    ours = tmp_path / "features.npz"
    for _ in range(2):  # the second run replaces its own output
        assert (
            finetune_main(["embed", str(artifact), "--input", str(clouds), "--out", str(ours), "--quiet"])
            == 0
        )


def test_embed_refuses_non_finite_features(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clouds = tmp_path / "huge.npy"
    np.save(clouds, np.random.default_rng(0).random((2, 64, 3), dtype=np.float32) * np.float32(1e30))
    out = tmp_path / "features.npz"
    args = [
        "embed",
        str(artifact),
        "--input",
        str(clouds),
        "--out",
        str(out),
        "--normalize",
        "none",
        "--quiet",
    ]
    assert finetune_main(args) == 2
    _error(capsys, "pcpt-finetune", "huge.npy", "non-finite")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- plumbing


def test_worker_errors_are_reported_by_their_original_line() -> None:
    folded = (
        "Caught ShardFormatError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise ShardFormatError(msg)\n'
        "datapipes.shards.ShardFormatError: train-000001.tar: truncated tar member\n"
    )
    assert one_line(folded) == "train-000001.tar: truncated tar member"
    assert one_line("first\n\nsecond") == "first"


def test_console_script_prints_one_line_for_a_missing_checkpoint(demo: Path, tmp_path: Path) -> None:
    exe = console_script("pcpt-pretrain")
    root = tmp_path / "run"
    result = run_command(
        [exe, "fit", *PRETRAIN, f"--data.data_root={demo}", f"--trainer.default_root_dir={root}",
         "--ckpt_path=missing.ckpt"], cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert_one_error_line("pcpt-pretrain", result.stderr, "missing.ckpt")
    assert not root.exists()
