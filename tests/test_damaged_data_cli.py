"""The console scripts stop on a truncated shard, naming it, instead of training or evaluating on less."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from datapipes.synthetic import write_synthetic
from pretrain.checkpoint import save_encoder
from pretrain.encoders import build_encoder
from pretrain.encoders.spec import DataContract, PointViTSpec
from tests.cli_helpers import REPO, assert_one_error_line, console_script, repo_env, run_command
from tests.datapipes._shard_helpers import truncate_at_member

BAD = "train-000001.tar"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good shard folder, a copy with ``train-000001.tar`` cut at a member boundary, and an encoder."""
    root = tmp_path_factory.mktemp("damaged")
    good = root / "good"
    write_synthetic(good, classes=3, per_class=8, test_per_class=4, points=64, shard_size=4)
    bad = root / "bad"
    shutil.copytree(good, bad)
    truncate_at_member(bad / BAD, 8)  # cut between samples: two of its four samples remain, no tar end
    encoder = build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8))
    art = save_encoder(root / "art", encoder, data=DataContract(num_points=64), provenance={"method": "test"})
    return {"good": good, "bad": bad, "art": art, "root": root}


def test_probe_refuses_a_truncated_shard(data: dict[str, Path]) -> None:
    exe = console_script("pcpt-finetune")
    done = run_command([exe, "probe", str(data["art"]), "--data", str(data["good"]), "--method", "knn"])
    assert done.returncode == 0, done.stderr
    bad = run_command([exe, "probe", str(data["art"]), "--data", str(data["bad"]), "--method", "knn"])
    assert bad.returncode == 2
    assert_one_error_line("pcpt-finetune", bad.stderr, BAD, "truncated")


def test_probe_verify_hashes_before_loading(data: dict[str, Path], tmp_path: Path) -> None:
    exe = console_script("pcpt-finetune")
    changed = tmp_path / "changed"
    shutil.copytree(data["good"], changed)
    raw = bytearray((changed / BAD).read_bytes())
    raw[700] ^= 0x01  # inside the first xyz payload: still decodes, so only the hash tells
    (changed / BAD).write_bytes(bytes(raw))
    args = [exe, "probe", str(data["art"]), "--data", str(changed), "--method", "knn"]
    assert run_command(args).returncode == 0
    bad = run_command([*args, "--verify"])
    assert bad.returncode == 2
    assert_one_error_line("pcpt-finetune", bad.stderr, BAD, "sha256")
    fewshot = [exe, "fewshot", str(data["art"]), "--data", str(changed), "--way", "2", "--shot", "2"]
    fewshot += ["--query", "2", "--folds", "2", "--verify"]
    bad = run_command(fewshot)
    assert bad.returncode == 2
    assert_one_error_line("pcpt-finetune", bad.stderr, BAD, "sha256")


def test_pretrain_fit_refuses_a_truncated_shard(data: dict[str, Path], tmp_path: Path) -> None:
    exe = console_script("pcpt-pretrain")
    cmd = [
        exe, "fit", "-c", str(REPO / "configs/pretrain/point_mae_tiny.yaml"),
        "-c", str(REPO / "configs/trainer/cpu_smoke.yaml"),
        "--model.init_args.encoder.embed_dim=32", "--model.init_args.encoder.depth=1",
        "--model.init_args.encoder.num_heads=2", "--model.init_args.encoder.num_groups=8",
        "--model.init_args.encoder.group_size=8", "--model.init_args.encoder.tokenizer_dim=32",
        "--model.init_args.decoder_depth=1", "--data.num_points=64", "--data.batch_size=4",
        "--trainer.enable_progress_bar=false", f"--data.data_root={data['bad']}",
        f"--trainer.default_root_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'art'}",
    ]  # fmt: skip
    result = run_command(cmd, cwd=tmp_path, env=repo_env(OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode != 0, result.stderr[-2000:]
    assert BAD in result.stderr, result.stderr[-2000:]  # raised in a DataLoader worker (num_workers: 1)
    assert not (tmp_path / "art").exists()


def test_finetune_fit_refuses_a_truncated_shard(data: dict[str, Path], tmp_path: Path) -> None:
    exe = console_script("pcpt-finetune")
    cmd = [
        exe, "fit", "-c", str(REPO / "configs/finetune/classify.yaml"),
        f"--model.pretrained={data['art']}", f"--data.data_root={data['bad']}",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--data.num_points=64", "--data.pool_points=64",
        "--data.batch_size=8", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        "--trainer.logger=false", "--model.vote_views=1",
    ]  # fmt: skip
    result = run_command(cmd, cwd=tmp_path, env=repo_env(OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode != 0, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pcpt-finetune: error: "), result.stderr[-2000:]
    assert BAD in last, result.stderr[-2000:]
    assert not (tmp_path / "run" / "results.json").exists()
