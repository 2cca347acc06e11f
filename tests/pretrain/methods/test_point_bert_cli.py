"""PointBERT through the real CLI: the momentum queue under 2-process gloo DDP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from pretrain.artifacts import save_module_artifact
from pretrain.checkpoint import load_encoder
from pretrain.dvae import DiscreteVAE, DVAESpec
from pretrain.encoders.spec import DataContract
from tests.pretrain import dvae_reference as dref
from tests.pretrain.methods.record_callback import params_sha256
from tests.pretrain.methods.tiny_cli import RUNTIME, config, fit_two_ranks, tiny_encoder

TINY = [
    *config("point_bert_tiny.yaml"),
    *tiny_encoder(num_groups=16, tokenizer_dim=16),
    "--model.init_args.proj_dim=8",
    *RUNTIME,
]


class RecordQueue(pl.Callback):
    """Writes ``<out_dir>/rank<r>.json``: the queue, its pointer and a digest of all parameters."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        queue: Any = pl_module.queue
        record = {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "queue_ptr": int(pl_module.queue_ptr),  # type: ignore[arg-type]
            "queue": queue.tolist(),
            "params_sha256": params_sha256(pl_module),
        }
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dvae = dref.randomize_dvae(DiscreteVAE(DVAESpec(**dref.TINY_SPEC)), seed=1)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return save_module_artifact(out, dvae, data=DataContract(num_points=64), provenance={"method": "test"})


@pytest.mark.ddp
def test_two_process_gloo_ddp_queue(demo: Path, tokenizer: Path, tmp_path: Path) -> None:
    """Two CPU ranks: keys of both ranks enter the queue, which ends identical on both, as do the weights."""
    record = tmp_path / "record"
    args = [
        *TINY, f"--data.data_root={demo}", f"--model.init_args.dvae={tokenizer}",
        "--model.init_args.queue_size=24", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
        f"--export_dir={tmp_path / 'art'}",
    ]  # fmt: skip
    ranks = fit_two_ranks(
        args, callback="tests.pretrain.methods.test_point_bert_cli.RecordQueue", record=record
    )
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 32 samples / (batch 4 x 2 ranks) = 4 steps, 8 keys per step: 32 keys through a queue of 24 -> wraps to 8
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    assert ranks[0]["queue_ptr"] == ranks[1]["queue_ptr"] == 32 % 24
    assert ranks[0]["queue"] == ranks[1]["queue"]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    queue = torch.tensor(ranks[0]["queue"])
    torch.testing.assert_close(queue.norm(dim=0), torch.ones(24))
    assert len({tuple(column) for column in queue.T.tolist()}) == 24  # every slot holds a distinct key
    encoder, meta = load_encoder(tmp_path / "art")
    assert meta["provenance"]["method"] == "PointBERT"
    assert encoder.spec.cls_token
    assert encoder.spec.mask_token
