from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pretrain.dvae import DVAE_KIND, DVAESpec, load_dvae
from pretrain.dvae_eval import code_perplexity
from pretrain.methods.dvae import PointDVAE
from pretrain.ops import chamfer_distance
from tests.pretrain import dvae_reference as dref


def official_temperature(
    niter: int, start: float = 1.0, target: float = 0.0625, ntime: int = 100_000
) -> float:
    """``tools/runner.py:get_temp`` as written."""
    if niter > ntime:
        return target
    return target + (start - target) * (1.0 + math.cos(math.pi * float(niter) / ntime)) / 2.0


def official_kl_weight(niter: int, start: float = 0.0, target: float = 0.1, ntime: int = 100_000) -> float:
    """The KL weight of ``tools/runner.py:compute_loss`` as written."""
    _niter = niter - 10000
    if _niter > ntime:
        return target
    if _niter < 0:
        return 0.0
    return target + (start - target) * (1.0 + math.cos(math.pi * float(_niter) / ntime)) / 2.0


@pytest.fixture
def module() -> PointDVAE:
    torch.manual_seed(0)
    return PointDVAE(DVAESpec(**dref.TINY_SPEC), num_points=64)


@pytest.mark.parametrize(
    "it", [0, 1, 999, 10_000, 10_001, 50_000, 99_999, 100_000, 100_001, 110_000, 250_000]
)
def test_schedules_match_official_closed_forms(module: PointDVAE, it: int) -> None:
    assert module.temperature_at(it) == pytest.approx(official_temperature(it), rel=1e-12)
    assert module.kl_weight_at(it) == pytest.approx(official_kl_weight(it), rel=1e-12, abs=1e-15)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_step_loss_is_recon_plus_weighted_kl(
    module: PointDVAE, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PointDVAE, "global_step", property(lambda self: 60_000))
    points = torch.rand(3, 64, 3) * 2 - 1
    loss = module.training_step(points, batch_idx=2)
    groups = module.dvae.group(points)
    out = module.dvae(
        groups.neighborhoods,
        groups.centers,
        temperature=official_temperature(60_000),
        generator=module._noise(60_000, 0),  # micro-batch 0: no accumulation
    )
    target = groups.neighborhoods.flatten(0, 1)
    recon = chamfer_distance(out.coarse.flatten(0, 1), target, variant="l1") + chamfer_distance(
        out.fine.flatten(0, 1), target, variant="l1"
    )
    expected = recon + official_kl_weight(60_000) * dref.kl_official(out.logits)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    loss.backward()
    missing = [name for name, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert int(module._code_counts.sum()) == 3 * 16  # type: ignore[union-attr]


def test_code_perplexity() -> None:
    assert float(code_perplexity(torch.ones(8))) == pytest.approx(8.0)
    assert float(code_perplexity(torch.tensor([0, 5, 0, 0]))) == pytest.approx(1.0)
    assert float(code_perplexity(torch.tensor([1, 1, 2, 0]))) == pytest.approx(math.exp(1.5 * math.log(2)))


def test_module_trains_no_transformer_and_exports_a_tokenizer(module: PointDVAE, tmp_path: Path) -> None:
    assert not hasattr(module, "encoder")
    assert all(name.startswith("dvae.") for name, _ in module.named_parameters())
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    meta = checkpoint["pcpt"]
    assert meta["kind"] == DVAE_KIND
    assert meta["prefix"] == "dvae."
    assert DVAESpec.from_dict(meta["spec"]) == module.dvae_spec
    path = module.export_encoder(tmp_path / "tok")
    loaded, info = load_dvae(path)
    assert info["provenance"]["method"] == "PointDVAE"
    assert info["data_contract"]["num_points"] == 64
    for key, value in module.dvae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_rejects_bad_schedules() -> None:
    with pytest.raises(ValueError, match="temperatures"):
        PointDVAE(DVAESpec(**dref.TINY_SPEC), temperature_end=0.0)
    with pytest.raises(ValueError, match="kl_weight_max"):
        PointDVAE(DVAESpec(**dref.TINY_SPEC), kl_weight_max=-1.0)
