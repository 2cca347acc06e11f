from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datapipes.datamodule import PointCloudDataModule
from datapipes.errors import UserError
from datapipes.types import PointBatch
from tests.datapipes._shard_helpers import write_tiny


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_tiny(tmp_path / "ds", shards={"train": 4, "test": 1}, per_shard=12, points=40, fps_ordered=True)
    return str(tmp_path / "ds")


def test_setup_loaders_and_metadata(root):
    dm = PointCloudDataModule(root, num_points=32, batch_size=8, num_workers=0, normals=True)
    dm.setup("fit")
    assert dm.num_classes == 3
    assert dm.data_contract == {"num_points": 32, "normalization": "unit_sphere", "fps_order": True}
    train = dm.train_dataloader()
    assert len(train) == 48 // 8
    batches = list(train)
    assert len(batches) == 6
    batch = batches[0]
    assert isinstance(batch, PointBatch)
    assert batch.points.shape == (8, 32, 3)
    assert batch.normals is not None
    assert batch.label is not None
    val = list(dm.val_dataloader())
    assert sum(len(b) for b in val) == 12
    assert val[0].points.shape[1:] == (32, 3)
    assert torch.linalg.norm(val[0].points, dim=-1).amax().item() == pytest.approx(1.0, abs=1e-5)
    assert len(dm.state_dict()["manifest_sha256"]) == 64


def test_batches_per_epoch_default_follows_world_size(root, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = PointCloudDataModule(root, batch_size=8, num_points=16, num_workers=0)
    assert dm.default_batches_per_epoch() == 48 // (8 * 2)
    assert len(list(dm.train_dataloader())) == 3
    dm = PointCloudDataModule(root, batch_size=100, num_points=16)
    with pytest.raises(UserError, match="fewer than one global batch"):
        dm.default_batches_per_epoch()


def test_no_validation_split_and_bad_split(root):
    dm = PointCloudDataModule(root, val_split=None, num_points=16)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    with pytest.raises(UserError, match="no split 'nope'"):
        PointCloudDataModule(root, train_split="nope").setup("fit")
    with pytest.raises(UserError, match="no such shard folder"):
        _ = PointCloudDataModule(root + "-missing").num_classes


def test_map_style_training_is_epoch_seeded(root):
    dm = PointCloudDataModule(
        root, streaming=False, batch_size=8, num_points=16, num_workers=0, augment="none"
    )
    loader = dm.train_dataloader()
    assert len(loader) == 6
    epoch0 = [k for b in loader for k in b.key]
    epoch1 = [k for b in loader for k in b.key]
    assert sorted(epoch0) == sorted(epoch1)
    assert epoch0 != epoch1
    assert len(set(epoch0)) == 48
    loader.set_epoch(0)
    assert [k for b in loader for k in b.key] == epoch0


def test_augment_configs_and_validation(root):
    dm = PointCloudDataModule(
        root, augment=[{"name": "rotate", "axis": "z"}, {"name": "jitter"}], num_points=16
    )
    assert len(dm.augment.transforms) == 2
    with pytest.raises(ValueError, match="fps_pool"):
        PointCloudDataModule(root, num_points=32, fps_pool=16)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        PointCloudDataModule(root, batches_per_epoch=0)


class Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: dict[int, list[str]] = {}
        self.val_batches = 0

    def training_step(self, batch: PointBatch, batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).extend(batch.key)
        return self.layer(batch.points).mean()

    def validation_step(self, batch: PointBatch, batch_idx: int) -> None:
        self.val_batches += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(root: str, tmp, *, val_split: str | None, ckpt_path: str | None = None) -> Recorder:
    model = Recorder()
    dm = PointCloudDataModule(
        root, val_split=val_split, num_points=16, batch_size=8, num_workers=0, batches_per_epoch=3, seed=5
    )
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=tmp, save_top_k=-1, filename="{epoch}")],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(
    "val_split", ["test", None]
)  # checkpoints saved after validation / at train epoch end
def test_lightning_fit_uses_trainer_epochs_and_resumes_the_data_position(root, tmp_path, val_split):
    full = _fit(root, tmp_path / "full", val_split=val_split)
    assert sorted(full.seen) == [0, 1, 2]
    assert all(len(v) == 24 for v in full.seen.values())
    assert full.seen[0] != full.seen[1] != full.seen[2]
    assert full.val_batches == (3 * 2 if val_split else 0)  # 12 test samples in batches of 8, every epoch
    ckpt = str(tmp_path / "full" / "epoch=0.ckpt")
    resumed = _fit(root, tmp_path / "resumed", val_split=val_split, ckpt_path=ckpt)
    assert sorted(resumed.seen) == [1, 2]
    assert resumed.seen[1] == full.seen[1]
    assert resumed.seen[2] == full.seen[2]


def test_the_datamodule_state_carries_the_training_position_to_a_new_loader(root):
    def make() -> PointCloudDataModule:
        return PointCloudDataModule(
            root, num_points=16, batch_size=8, num_workers=0, batches_per_epoch=3, seed=5
        )

    first = make()
    first.setup("fit")
    assert "train_position" not in first.state_dict()  # nothing trained yet
    full = [batch.key for batch in first.train_dataloader()]
    state = first.state_dict()
    assert state["train_position"]["epoch"] == 0
    state["train_position"] = {"epoch": 0, "batches_done": 2}  # as a checkpoint after two batches holds it
    resumed = make()
    resumed.load_state_dict(state)
    resumed.setup("fit")
    assert [batch.key for batch in resumed.train_dataloader()] == full[2:]
