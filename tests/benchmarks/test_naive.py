"""The benchmarks' naive baseline computes the same function as pcpt: its timings compare like with like."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from pretrain.artifacts import save_module_artifact
from pretrain.dvae import DiscreteVAE, DVAESpec
from pretrain.encoders.spec import DataContract, PointViTSpec
from pretrain.methods.point_bert import PointBERT
from pretrain.methods.point_mae import PointMAE
from tests.cli_helpers import REPO
from tests.pretrain import dvae_reference as dref

sys.path.insert(0, str(REPO / "benchmarks"))
from naive import make_naive, naive_fps

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def _clouds(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 96, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_naive_fps_is_farthest_point_order() -> None:
    xyz = _clouds(2)
    idx = naive_fps(xyz, 5)
    for cloud, chosen in zip(xyz, idx):
        assert int(chosen[0]) == 0
        for i in range(1, 5):  # each pick is the point farthest from the ones before it
            dist = torch.cdist(cloud, cloud[chosen[:i]]).amin(dim=1)
            assert float(dist[chosen[i]]) == pytest.approx(float(dist.max()))


def test_naive_point_mae_computes_the_same_loss_and_gradients() -> None:
    torch.manual_seed(0)
    spec = PointViTSpec.named("tiny", num_groups=16, group_size=8, tokenizer_dim=16, drop_path=0.0)
    model = PointMAE(spec, mask_ratio=0.6, decoder_depth=1).train()
    naive = make_naive(copy.deepcopy(model))
    points = _clouds(3)
    losses = []
    for module in (model, naive):
        loss = module.loss_for(points, generator=torch.Generator().manual_seed(1))  # type: ignore[operator]
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(model.named_parameters(), naive.named_parameters(), strict=True):
        if a.grad is not None:
            assert b.grad is not None, name
            torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_naive_point_bert_patches_every_encoder_and_tokenizer(tmp_path: Path) -> None:
    dvae = dref.randomize_dvae(DiscreteVAE(DVAESpec(**dref.TINY_SPEC)), seed=1)
    tokenizer = save_module_artifact(tmp_path / "tok", dvae, data=DataContract(num_points=64), provenance={})
    torch.manual_seed(0)
    spec = PointViTSpec.named("tiny", num_groups=16, group_size=8, tokenizer_dim=16, cls_token=True,
                             mask_token=True, drop_path=0.0)  # fmt: skip
    model = PointBERT(spec, str(tokenizer), queue_size=10, proj_dim=8).train()
    naive = make_naive(copy.deepcopy(model))
    patched = [name for name, m in naive.named_modules() if "forward" in vars(m) or "group" in vars(m)]
    assert any(name.startswith("dvae") for name in patched)
    assert any(name.startswith("momentum_encoder") for name in patched)
    points = _clouds(4, seed=2)[:, :64]
    a, b = model.training_step(points, 0), naive.training_step(points, 0)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
