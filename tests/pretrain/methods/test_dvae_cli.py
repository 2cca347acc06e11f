"""PointDVAE through the real CLI: fit -> tokenizer artifact, export from the checkpoint, exact resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from datapipes.datamodule import PointCloudDataModule
from pretrain.cli import main as pretrain_main
from pretrain.dvae import load_dvae
from pretrain.dvae_eval import code_perplexity
from tests.pretrain.methods.tiny_cli import RUNTIME, config

TINY = [
    *config("point_bert_dvae_tiny.yaml"),
    "--model.init_args.dvae.num_groups=8",
    "--model.init_args.dvae.group_size=8",
    "--model.init_args.dvae.tokenizer_dim=16",
    "--model.init_args.dvae.codebook_size=16",
    "--model.init_args.dvae.token_dim=8",
    "--model.init_args.dvae.decoder_dim=8",
    "--model.init_args.dvae.dgcnn_dims=[8, 8, 16]",
    "--model.init_args.dvae.decoder_hidden_dim=16",
    "--model.init_args.dvae.fold_dim=16",
    "--model.init_args.temperature_iters=10",
    "--model.init_args.kl_start_it=2",
    "--model.init_args.kl_ramp_iters=10",
    *RUNTIME,
]


def test_fit_exports_tokenizer_and_export_command_agrees(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = tmp_path / "tok"
    argv = ["fit", *TINY, f"--data.data_root={demo}", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1", f"--export_dir={art}", "--data.val_split=test"]  # fmt: skip
    assert pretrain_main(argv) == 0
    tokenizer, meta = load_dvae(art)
    assert meta["kind"] == "dvae_tokenizer"
    assert meta["provenance"]["method"] == "PointDVAE"
    assert meta["provenance"]["step"] == 8
    assert meta["spec"]["codebook_size"] == 16
    assert meta["data_contract"]["num_points"] == 64
    assert meta["provenance"]["data_manifest_sha256"]
    _, ids = tokenizer.discrete_tokens(torch.rand(2, 64, 3))
    assert ids.shape == (2, 8)
    assert int(ids.max()) < 16

    capsys.readouterr()
    assert (
        pretrain_main(["export", str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "exported")])
        == 0
    )
    assert "dVAE tokenizer, 16 codes of width 8, 8 groups of 8" in capsys.readouterr().out
    exported, _ = load_dvae(tmp_path / "exported")
    for key, value in tokenizer.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, msg=key)


def test_resume_continues_the_schedules_exactly(demo: Path, tmp_path: Path) -> None:
    common = [*TINY, f"--data.data_root={demo}", "--trainer.max_epochs=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    keep_all = "--trainer.callbacks.save_top_k=-1"  # the config's ModelCheckpoint keeps every epoch
    assert pretrain_main(["fit", *common, f"--trainer.default_root_dir={straight}", keep_all]) == 0
    first_epoch = straight / "checkpoints" / "epoch=0-step=8.ckpt"
    assert (
        pretrain_main(["fit", *common, f"--trainer.default_root_dir={resumed}", f"--ckpt_path={first_epoch}"])
        == 0
    )
    a = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16
    assert a["pcpt"]["kind"] == "dvae_tokenizer"
    for key, value in b["state_dict"].items():  # same data, Gumbel noise and schedules after resuming
        torch.testing.assert_close(a["state_dict"][key], value, msg=key)


def test_validation_logs_reconstruction_and_codebook_usage(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """val/code_perplexity and val/dead_codes equal a histogram of the exported tokenizer's ids."""
    art = tmp_path / "tok"
    argv = ["fit", *TINY, f"--data.data_root={demo}", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1", f"--export_dir={art}", "--data.val_split=test",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.logger.name=csv"]  # fmt: skip
    assert pretrain_main(argv) == 0
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/code_perplexity")]
    assert len(rows) == 1
    logged = rows[0]

    tokenizer, _ = load_dvae(art)
    tokenizer.eval()
    data = PointCloudDataModule(str(demo), num_points=64, batch_size=4, num_workers=0, val_split="test")
    data.setup("validate")
    ids = torch.cat([tokenizer.discrete_tokens(batch.points)[1].flatten() for batch in data.val_dataloader()])
    counts = torch.bincount(ids, minlength=16)
    assert float(logged["val/dead_codes"]) == float((counts == 0).sum())
    assert float(logged["val/code_perplexity"]) == pytest.approx(float(code_perplexity(counts)), rel=1e-5)
    assert 1.0 <= float(logged["val/code_perplexity"]) <= 16 - float(logged["val/dead_codes"]) + 1e-4
    assert float(logged["val/cdl1"]) > 0

    # The artifact-side evaluation reports the same numbers for the same split, batches and noise seed.
    capsys.readouterr()
    argv = ["eval-tokenizer", str(art), "--data", str(demo), "--split", "test", "--batch-size", "4", "--json"]
    assert pretrain_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_clouds"] == 8
    assert report["dead_codes"] == int(float(logged["val/dead_codes"]))
    for name in ("code_perplexity", "cdl1", "cdl2", "loss_recon"):
        assert report[name] == pytest.approx(float(logged[f"val/{name}"]), rel=1e-5), name


def test_eval_tokenizer_reports_in_words_and_rejects_bad_input(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = tmp_path / "tok"
    argv = ["fit", *TINY, f"--data.data_root={demo}", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1", f"--export_dir={art}"]  # fmt: skip
    assert pretrain_main(argv) == 0
    capsys.readouterr()
    assert pretrain_main(["eval-tokenizer", str(art), "--data", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "8 clouds" in out
    assert "codebook perplexity" in out
    assert pretrain_main(["eval-tokenizer", str(art), "--data", str(demo), "--split", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert pretrain_main(["eval-tokenizer", str(tmp_path), "--data", str(demo)]) == 2
