"""The Point-BERT chain through the three CLIs: dVAE fit -> MPM fit -> classification finetuning."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from datapipes.synthetic import write_synthetic
from finetune.cli import main as finetune_main
from pretrain.checkpoint import load_encoder
from pretrain.cli import main as pretrain_main
from pretrain.dvae import load_dvae

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--data.num_points=64", "--data.batch_size=8", "--data.num_workers=0",
          "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1"]  # fmt: skip
DVAE = [
    "-c", str(REPO / "configs/pretrain/point_bert_dvae_tiny.yaml"),
    "--model.init_args.dvae.num_groups=8", "--model.init_args.dvae.group_size=8",
    "--model.init_args.dvae.tokenizer_dim=16", "--model.init_args.dvae.codebook_size=16",
    "--model.init_args.dvae.token_dim=8", "--model.init_args.dvae.decoder_dim=8",
    "--model.init_args.dvae.dgcnn_dims=[8, 8, 16]", "--model.init_args.dvae.decoder_hidden_dim=16",
    "--model.init_args.dvae.fold_dim=16",
]  # fmt: skip
MPM = [
    "-c", str(REPO / "configs/pretrain/point_bert_tiny.yaml"),
    "--model.init_args.encoder.embed_dim=32", "--model.init_args.encoder.depth=2",
    "--model.init_args.encoder.num_heads=2", "--model.init_args.encoder.num_groups=8",
    "--model.init_args.encoder.group_size=8", "--model.init_args.encoder.tokenizer_dim=16",
    "--model.init_args.proj_dim=8", "--model.init_args.queue_size=16",
]  # fmt: skip


def test_dvae_then_mpm_then_finetune(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    write_synthetic(demo, classes=3, per_class=8, test_per_class=2, points=80, shard_size=8)

    tokenizer_dir = tmp_path / "tokenizer"
    argv = ["fit", *DVAE, *COMMON, f"--data.data_root={demo}",
            f"--trainer.default_root_dir={tmp_path / 'dvae'}", f"--export_dir={tokenizer_dir}"]  # fmt: skip
    assert pretrain_main(argv) == 0
    dvae, _ = load_dvae(tokenizer_dir)  # strict

    encoder_dir = tmp_path / "encoder"
    argv = ["fit", *MPM, *COMMON, f"--data.data_root={demo}", f"--model.init_args.dvae={tokenizer_dir}",
            f"--trainer.default_root_dir={tmp_path / 'mpm'}", f"--export_dir={encoder_dir}"]  # fmt: skip
    assert pretrain_main(argv) == 0
    encoder, meta = load_encoder(encoder_dir)  # strict: CLS, CLS position and mask token included
    assert meta["provenance"]["method"] == "PointBERT"
    assert meta["provenance"]["step"] == 3
    names = set(encoder.state_dict())
    assert {"cls_token", "cls_pos", "mask_token", "reduce_dim.weight"} <= names
    ckpt = torch.load(tmp_path / "mpm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key, value in dvae.state_dict().items():  # the tokenizer stayed frozen (eval mode: BN stats too)
        assert torch.equal(ckpt["state_dict"][f"dvae.{key}"], value), key

    argv = ["fit", "-c", str(REPO / "configs/finetune/classify.yaml"), f"--model.pretrained={encoder_dir}",
            "--model.head=bert", f"--data.data_root={demo}", f"--trainer.default_root_dir={tmp_path / 'ft'}",
            "--data.num_points=64", "--data.pool_points=72", "--data.batch_size=4",
            "--data.val_fraction=0.25",
            "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
            "--model.vote_views=0", "--model.lr_scheduler.init_args.warmup_epochs=1"]  # fmt: skip
    assert finetune_main(argv) == 0
    result = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert result["protocol"] == "full finetuning"
    assert result["voting"] == "none (single pass only)"
    assert 0.0 <= result["metrics"]["test/acc"] <= 1.0
    checkpoint = next(iter(sorted((tmp_path / "ft" / "checkpoints").glob("*.ckpt"))))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    head = sorted({k.rsplit(".", 1)[0] for k in state if k.startswith("cls_head_finetune.")})
    assert head == ["cls_head_finetune.0", "cls_head_finetune.3"]  # the Point-BERT head (no BatchNorm)
