"""The learning-rate schedule is sized from the data, never from max_steps / max_epochs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pretrain.optim import configure_optimization, training_steps
from pretrain.schedules import WarmupCosineLR


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.schedule: tuple[int, int] | None = None
        self.warmup_lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.warmup_lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        self.schedule = training_steps(self.trainer)
        return configure_optimization(
            self,
            lambda groups: torch.optim.AdamW(groups, lr=1.0, weight_decay=0.0),
            lambda opt, **run: WarmupCosineLR(opt, warmup_epochs=1, warmup_init_lr=0.0, **run),
        )


class _Data(pl.LightningDataModule):
    """4 batches per epoch, counted without building the loader (as pcpt's data modules do)."""

    def __init__(self, count_only: bool) -> None:
        super().__init__()
        self.count_only = count_only
        self.built = 0

    def train_batches_per_epoch(self) -> int:
        return 4

    def train_dataloader(self):
        self.built += 1
        return DataLoader(TensorDataset(torch.rand(8, 3)), batch_size=2)


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"max_steps": 10, "max_epochs": 100}, (10, 4)),  # the max_steps-bound run of the bug: 10 // 100 ≠ 4
        ({"max_epochs": 3}, (12, 4)),
        ({"max_epochs": 3, "accumulate_grad_batches": 3}, (6, 2)),
        ({"max_epochs": 5, "limit_train_batches": 2}, (10, 2)),
    ],
)
def test_schedule_counts_steps_per_epoch_from_the_data(limits, expected) -> None:
    module, data = _Module(), _Data(count_only=True)
    _trainer(**limits).fit(module, datamodule=data)
    assert module.schedule == expected
    warmup = expected[1]  # warmup_epochs=1: the learning rate rises linearly for one epoch of steps
    rising = module.warmup_lrs[: warmup * max(limits.get("accumulate_grad_batches", 1), 1)]
    rising = rising[:: limits.get("accumulate_grad_batches", 1)]
    assert rising == pytest.approx([i / warmup for i in range(warmup)])


def test_plain_loaders_are_counted_by_lightning() -> None:
    module = _Module()
    loader = DataLoader(TensorDataset(torch.rand(10, 3)), batch_size=2)  # 5 batches
    _trainer(max_steps=7, max_epochs=50).fit(module, train_dataloaders=loader)
    assert module.schedule == (7, 5)


def test_unbounded_run_is_refused() -> None:
    module = _Module()
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        _trainer(max_steps=-1, max_epochs=-1).fit(module, datamodule=_Data(count_only=True))
