"""Point-MAE through the real CLI: fit → artifact (strict load), resume, export, and 2-process gloo DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_encoder
from pretrain.cli import main as pretrain_main
from tests.pretrain.methods.tiny_cli import RUNTIME, config, fit_two_ranks, tiny_encoder

TINY = [
    *config("point_mae_tiny.yaml"),
    *tiny_encoder(num_groups=8, tokenizer_dim=32),
    "--model.init_args.decoder_depth=1",
    *RUNTIME,
]


def test_fit_writes_artifact_that_loads_strictly(demo: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    status = pretrain_main(
        ["fit", *TINY, f"--data.data_root={demo}", f"--trainer.default_root_dir={tmp_path}",
         "--trainer.max_epochs=1", f"--export_dir={art}"]
    )  # fmt: skip
    assert status == 0
    encoder, meta = load_encoder(art)
    assert meta["provenance"]["method"] == "PointMAE"
    assert meta["provenance"]["step"] == 8  # 32 samples / batch 4
    assert meta["data_contract"]["num_points"] == 64
    assert meta["provenance"]["data_manifest_sha256"]
    out = encoder.eval().encode(torch.rand(2, 64, 3))
    assert out.tokens.shape == (2, 8, 32)

    # export from the Lightning checkpoint gives the same weights
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert pretrain_main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    exported, _ = load_encoder(tmp_path / "exported")
    for (k, a), (_, b) in zip(encoder.state_dict().items(), exported.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_resume_continues_step_count_and_schedule(demo: Path, tmp_path: Path) -> None:
    common = [*TINY, f"--data.data_root={demo}", "--model.init_args.lr_scheduler.init_args.warmup_epochs=1"]
    first = tmp_path / "a"
    assert (
        pretrain_main(["fit", *common, f"--trainer.default_root_dir={first}", "--trainer.max_epochs=1"]) == 0
    )
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    assert ckpt["pcpt"]["method"] == "PointMAE"
    resumed = tmp_path / "b"
    assert pretrain_main(
        ["fit", *common, f"--trainer.default_root_dir={resumed}", "--trainer.max_epochs=2",
         f"--ckpt_path={first / 'checkpoints' / 'last.ckpt'}"]
    ) == 0  # fmt: skip
    straight = tmp_path / "c"
    assert (
        pretrain_main(["fit", *common, f"--trainer.default_root_dir={straight}", "--trainer.max_epochs=2"])
        == 0
    )
    a = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16
    assert a["epoch"] == b["epoch"]
    sched_a, sched_b = a["lr_schedulers"][0], b["lr_schedulers"][0]
    assert sched_a["last_epoch"] == sched_b["last_epoch"] == 16
    assert sched_a["_last_lr"] == pytest.approx(sched_b["_last_lr"])


def test_bad_config_value_is_a_clear_error(demo: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        pretrain_main(["fit", *TINY, f"--data.data_root={demo}", "--model.init_args.mask_ratio=oops"])


@pytest.mark.ddp
def test_two_process_gloo_ddp(demo: Path, tmp_path: Path) -> None:
    """Two CPU ranks (gloo): different data per rank, identical weights, the artifact in its default place."""
    record = tmp_path / "record"
    args = [
        *TINY,
        f"--data.data_root={demo}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=2",
    ]
    ranks = fit_two_ranks(args, callback="tests.pretrain.methods.record_callback.RecordRank", record=record)
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 32 train samples / (batch 4 x 2 ranks) = 4 batches per rank and epoch, the same on both ranks
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 8
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    assert ranks[0]["keys"] != ranks[1]["keys"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # the artifact goes to the default place (<log dir>/encoder) with any number of devices
    _, meta = load_encoder(tmp_path / "encoder")
    assert meta["provenance"]["step"] == 8


@pytest.mark.ddp
def test_in_memory_ddp_ranks_split_the_single_process_epoch(demo: Path, tmp_path: Path) -> None:
    """With in-memory data, the two ranks' batches of an epoch are the single-process epoch, split in two."""
    callback = "tests.pretrain.methods.record_callback.RecordRank"
    common = [*TINY, f"--data.data_root={demo}", "--data.streaming=false", "--trainer.max_epochs=1"]
    ranks = fit_two_ranks(
        [*common, f"--trainer.default_root_dir={tmp_path / 'ddp'}"],
        callback=callback,
        record=tmp_path / "ddp",
    )
    single = tmp_path / "single"
    assert pretrain_main(
        ["fit", *common, f"--trainer.default_root_dir={single}", f"--trainer.callbacks+={callback}",
         f"--trainer.callbacks.out_dir={single}"]
    ) == 0  # fmt: skip
    alone = json.loads((single / "rank0.json").read_text())
    per_rank = [[key for batch in r["keys"] for key in batch] for r in ranks]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(key for batch in alone["keys"] for key in batch)
    assert len(per_rank[0]) == len(per_rank[1]) == 16  # 32 clouds / 2 ranks
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
