"""Resume is exact: an interrupted and resumed run ends with the same weights as an uninterrupted one.

Point-MAE's tiny encoder has drop-path 0.1 (random draws in every block), masks and augmentations: all of
them must come from state the checkpoint restores. Checkpoints are taken inside epochs, after the last batch
of an epoch (every 4 of the 8 steps per epoch) and at the end of an epoch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_encoder
from pretrain.cli import main as pretrain_main
from tests.pretrain.methods.tiny_cli import RUNTIME, config, tiny_encoder

TINY = [
    *config("point_mae_tiny.yaml"),
    *tiny_encoder(num_groups=8, tokenizer_dim=32),
    "--model.init_args.decoder_depth=1",
    "--model.init_args.lr_scheduler.init_args.warmup_epochs=1",
    *RUNTIME,
]


def _fit(demo: Path, root: Path, *extra: str) -> None:
    args = ["fit", *TINY, f"--data.data_root={demo}", f"--trainer.default_root_dir={root}", *extra]
    assert pretrain_main(args) == 0


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def straight(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run (16 steps) that keeps a checkpoint every 4 steps."""
    root = tmp_path_factory.mktemp("straight")
    _fit(
        demo, root, "--trainer.max_epochs=2",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'steps'}",
        "--trainer.callbacks.every_n_train_steps=4",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'epochs'}",
        "--trainer.callbacks.every_n_epochs=1",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.mode=max",  # no metric: only makes its state key differ from the config's
    )  # fmt: skip
    return root


@pytest.mark.parametrize(
    "checkpoint",
    [
        "steps/epoch=0-step=4.ckpt",
        "steps/epoch=0-step=8.ckpt",
        "epochs/epoch=0-step=8.ckpt",
        "steps/epoch=1-step=12.ckpt",
    ],
    ids=["mid-epoch-0", "last-batch-of-epoch-0", "end-of-epoch-0", "mid-epoch-1"],
)
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(
    demo: Path, straight: Path, tmp_path: Path, checkpoint: str
) -> None:
    start = straight / checkpoint
    assert start.is_file(), sorted(p.name for p in straight.rglob("*.ckpt"))
    _fit(demo, tmp_path, "--trainer.max_epochs=2", f"--ckpt_path={start}")
    resumed = _weights(tmp_path / "checkpoints" / "last.ckpt")
    reference = _weights(straight / "checkpoints" / "last.ckpt")
    assert resumed.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not different, different[:5]


def test_fit_export_and_checkpoint_export_record_the_same_epoch_and_step(
    demo: Path, straight: Path, tmp_path: Path
) -> None:
    assert pretrain_main(["export", str(straight / "checkpoints" / "last.ckpt"), str(tmp_path / "art")]) == 0
    _, from_ckpt = load_encoder(tmp_path / "art")
    _, from_fit = load_encoder(straight / "encoder")
    for key in ("epoch", "step"):
        assert from_ckpt["provenance"][key] == from_fit["provenance"][key]
    assert from_fit["provenance"]["epoch"] == 2
    assert from_fit["provenance"]["step"] == 16
