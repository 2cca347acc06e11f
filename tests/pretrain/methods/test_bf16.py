"""bf16 mixed precision: a Trainer step of every method's tiny config runs in bf16, attention through SDPA."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tests.cli_helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from method_configs import METHODS, build_method, data_settings, synthetic_batch

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)

#: methods without attention (the dVAE tokenizer is DGCNN + folding decoder).
NO_ATTENTION = {"point_bert_dvae"}


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_mixed_step_trains_every_method_with_sdpa_attention(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    module = build_method(method, tiny=True, workdir=tmp_path, lr_scheduler=None)
    points = min(int(data_settings(method, tiny=True)["num_points"]), 2048)
    batch = synthetic_batch(method, module, batch_size=4, num_points=points, generator=torch.Generator())
    exported = module.exported()
    before = {k: v.detach().clone() for k, v in exported.named_parameters() if v.requires_grad}

    attention: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        attention.append(query.dtype)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    linear_dtypes: list[torch.dtype] = []
    for layer in exported.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d)):
            layer.register_forward_hook(lambda _m, _i, out: linear_dtypes.append(out.dtype))

    trainer = pl.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))

    assert trainer.global_step == 1
    loss = trainer.callback_metrics.get("train/loss")
    assert loss is not None
    assert math.isfinite(float(loss)), loss
    assert torch.bfloat16 in linear_dtypes  # autocast was on in the step
    after = dict(exported.named_parameters())
    assert all(torch.isfinite(after[k]).all() for k in before)
    assert all(after[k].dtype == torch.float32 for k in before)  # mixed: the weights stay fp32
    changed = [k for k, v in before.items() if not torch.equal(v, after[k].detach())]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors trained"
    if method in NO_ATTENTION:
        assert not attention
    else:
        assert attention, f"{method}: no attention ran through F.scaled_dot_product_attention"
        assert set(attention) == {torch.bfloat16}
