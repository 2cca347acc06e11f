from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pretrain.callbacks import KNNMonitor
from pretrain.encoders import DataContract, PointViTSpec, build_encoder
from pretrain.knn import knn_predict

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
    """BoringModel-style module with the attributes the kNN monitor expects."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder_spec = PointViTSpec.named("tiny", drop_path=0.1)
        self.encoder = build_encoder(self.encoder_spec)
        self.data_contract = DataContract(num_points=NUM_POINTS, normalization="unit_sphere", fps_order=True)
        self.num_points = NUM_POINTS
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


def make_trainer(tmp_path, callbacks, max_epochs=1, **options) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **options,
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


class RecordRank(pl.Callback):
    """Runs after KNNMonitor; each rank writes what it logged and its final encoder state to ``out``.

    The monitor computes on rank 0, so rank 0's state (with its own BatchNorm statistics) is the reference.
    """

    def __init__(self, out) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        logged = float(trainer.callback_metrics["val/knn_acc"])
        (self.out / f"rank{rank}.txt").write_text(f"{logged!r}\n")
        torch.save(pl_module.encoder.state_dict(), self.out / f"rank{rank}.pt")


@pytest.mark.ddp
def test_callbacks_under_two_process_ddp(tmp_path):
    data = monitor_data()
    callbacks = [KNNMonitor.from_arrays(*data, k=5), RecordRank(tmp_path)]
    trainer = make_trainer(tmp_path, callbacks, devices=2, strategy="ddp_spawn")
    trainer.fit(TinyModule(), loader())
    logged = [float((tmp_path / f"rank{rank}.txt").read_text()) for rank in (0, 1)]
    weights = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, _ in TinyModule().encoder.named_parameters():  # DDP keeps the parameters identical
        assert torch.equal(weights[1][name], weights[0][name]), name
    single = TinyModule()
    single.encoder.load_state_dict(weights[0])
    expected = reference_accuracy(single.encoder, data, k=5)  # one process, no DDP
    assert logged[0] == logged[1]
    assert logged[0] == pytest.approx(expected)
