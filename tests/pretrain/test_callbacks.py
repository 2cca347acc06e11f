from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pretrain.callbacks import EncoderExport, KNNMonitor, knn_predict
from pretrain.checkpoint import load_encoder
from pretrain.encoders import DataContract, EncoderSpec, build_encoder

NUM_POINTS = 64


def shape_clouds(gen: torch.Generator, per_class: int) -> tuple[torch.Tensor, np.ndarray]:
    """Three easy classes: points on a sphere, on a flat disc, on a line segment (unit-sphere scale)."""
    clouds, labels = [], []
    for label in range(3):
        for _ in range(per_class):
            p = torch.randn(NUM_POINTS, 3, generator=gen)
            if label == 0:
                p = p / p.norm(dim=1, keepdim=True)
            elif label == 1:
                p[:, 2] = 0.01 * p[:, 2]
                p = p / p.norm(dim=1).max()
            else:
                p = torch.rand(NUM_POINTS, 1, generator=gen) * torch.tensor([[2.0, 0.0, 0.0]]) - 1.0
                p = p + 0.01 * torch.randn(NUM_POINTS, 3, generator=gen)
            clouds.append(p)
            labels.append(label)
    return torch.stack(clouds), np.array(labels)


class TinyModule(pl.LightningModule):
    """BoringModel-style module with the attributes the callbacks expect."""

    method_name = "tiny-test"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder_spec = EncoderSpec.named("tiny", drop_path=0.1)
        self.encoder = build_encoder(self.encoder_spec)
        self.data_contract = DataContract(num_points=NUM_POINTS, normalization="unit_sphere", fps_order=True)
        self.num_points = NUM_POINTS
        self.provenance_extra = {"config_sha256": "c0ffee"}
        self.modes_seen: list[bool] = []

    def training_step(self, batch, batch_idx):
        (xyz,) = batch
        return self.encoder.pool(self.encoder.encode(xyz)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ModeProbe(pl.Callback):
    """Runs after KNNMonitor at epoch end and records whether the encoder is back in train mode."""

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.modes_seen.append(pl_module.encoder.training)


def loader() -> DataLoader:
    xyz, _ = shape_clouds(torch.Generator().manual_seed(1), 4)
    return DataLoader(TensorDataset(xyz), batch_size=4)


def make_trainer(tmp_path, callbacks, max_epochs=1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )


def monitor_data():
    gen = torch.Generator().manual_seed(2)
    train_xyz, train_y = shape_clouds(gen, 6)
    test_xyz, test_y = shape_clouds(gen, 3)
    return train_xyz, train_y, test_xyz, test_y


def reference_accuracy(encoder, data, *, k):
    train_xyz, train_y, test_xyz, test_y = data
    encoder.eval()
    with torch.no_grad():
        train_x = encoder.pool(encoder.encode(train_xyz)).numpy()
        test_x = encoder.pool(encoder.encode(test_xyz)).numpy()
    pred = knn_predict(train_x, train_y, test_x, k=k, backend="torch")
    return float(np.mean(pred == test_y))


def test_knn_monitor_logs_accuracy_and_restores_train_mode(tmp_path):
    data = monitor_data()
    monitor = KNNMonitor.from_arrays(*data, k=5, batch_size=7)
    module = TinyModule()
    trainer = make_trainer(tmp_path, [monitor, ModeProbe()], max_epochs=2)
    trainer.fit(module, loader())
    assert len(monitor.history) == 2
    assert module.modes_seen == [True, True]
    logged = float(trainer.callback_metrics["val/knn_acc"])
    assert logged == pytest.approx(monitor.last_accuracy)
    assert 0.0 <= logged <= 1.0
    # the last evaluation used the final weights: recompute independently
    assert monitor.last_accuracy == pytest.approx(reference_accuracy(module.encoder, data, k=5))


def test_knn_monitor_every_n_epochs(tmp_path):
    monitor = KNNMonitor.from_arrays(*monitor_data(), k=5, every_n_epochs=2)
    trainer = make_trainer(tmp_path, [monitor], max_epochs=3)
    trainer.fit(TinyModule(), loader())
    assert [epoch for epoch, _ in monitor.history] == [1]


def test_knn_monitor_failure_is_raised_not_hung(tmp_path):
    monitor = KNNMonitor(None)  # no data source
    trainer = make_trainer(tmp_path, [monitor])
    with pytest.raises(RuntimeError, match="KNNMonitor failed on rank 0"):
        trainer.fit(TinyModule(), loader())


def test_knn_monitor_validates_arguments():
    with pytest.raises(ValueError, match="every_n_epochs"):
        KNNMonitor(None, every_n_epochs=0)
    with pytest.raises(ValueError, match="backend"):
        KNNMonitor(None, backend="annoy")  # type: ignore[arg-type]
    xyz = torch.zeros(2, NUM_POINTS, 3)
    with pytest.raises(ValueError, match="train_labels"):
        KNNMonitor.from_arrays(xyz, np.zeros(3), xyz, np.zeros(2))


def test_encoder_export_on_train_end(tmp_path):
    module = TinyModule()
    export = EncoderExport(tmp_path / "run")
    trainer = make_trainer(tmp_path, [export])
    trainer.fit(module, loader())
    path = tmp_path / "run" / "encoder"
    assert export.last_path == path
    encoder, meta = load_encoder(path)
    for name, value in module.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], value), name
    assert meta["data_contract"]["num_points"] == NUM_POINTS
    assert meta["provenance"]["method"] == "tiny-test"
    assert meta["provenance"]["step"] == trainer.global_step == 3
    assert meta["provenance"]["config_sha256"] == "c0ffee"
    assert meta["spec"] == module.encoder_spec.to_dict()


def test_encoder_export_default_dir_and_on_demand(tmp_path):
    module = TinyModule()
    export = EncoderExport(subdir="artifact", on_train_end=False)
    trainer = make_trainer(tmp_path, [export])
    trainer.fit(module, loader())
    assert export.last_path is None
    assert export.export(trainer, module) == tmp_path / "artifact"
    assert (tmp_path / "artifact" / "encoder.json").is_file()


def test_encoder_export_requires_contract(tmp_path):
    module = TinyModule()
    module.data_contract = None  # type: ignore[assignment]
    trainer = make_trainer(tmp_path, [EncoderExport(tmp_path)])
    with pytest.raises(ValueError, match="data_contract"):
        trainer.fit(module, loader())


@pytest.mark.ddp
def test_callbacks_under_two_process_ddp(tmp_path):
    data = monitor_data()
    monitor = KNNMonitor.from_arrays(*data, k=5)
    export = EncoderExport(tmp_path / "run")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[monitor, export],
    )
    module = TinyModule()
    trainer.fit(module, loader())
    logged = float(trainer.callback_metrics["val/knn_acc"])
    encoder, _ = load_encoder(tmp_path / "run" / "encoder")
    assert logged == pytest.approx(reference_accuracy(encoder, data, k=5))
