from __future__ import annotations

import pytest
import torch

from pretrain.dvae import DiscreteVAE, DVAESpec
from pretrain.dvae_eval import code_perplexity, evaluate_dvae
from tests.pretrain import dvae_reference as dref


@pytest.fixture
def dvae() -> DiscreteVAE:
    return dref.randomize_dvae(DiscreteVAE(DVAESpec(**dref.TINY_SPEC)), seed=2)


def _clouds(n: int) -> torch.Tensor:
    return torch.rand(n, 64, 3, generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_codebook_usage_is_a_histogram_of_the_token_ids(dvae: DiscreteVAE) -> None:
    clouds = _clouds(5)
    dvae.train()
    report = evaluate_dvae(dvae, clouds, batch_size=2)
    assert dvae.training  # mode restored
    dvae.eval()
    ids = dvae.discrete_tokens(clouds)[1].flatten()
    counts = torch.bincount(ids, minlength=dvae.spec.codebook_size)
    assert report["dead_codes"] == int((counts == 0).sum())
    assert report["code_perplexity"] == pytest.approx(float(code_perplexity(counts)), rel=1e-6)
    assert report["num_clouds"] == 5
    assert report["codebook_size"] == dvae.spec.codebook_size
    same = evaluate_dvae(dvae, clouds, batch_size=5)  # ids do not depend on batching
    assert same["code_perplexity"] == pytest.approx(report["code_perplexity"], rel=1e-6)
    assert report["cdl1"] > 0
    assert report["cdl2"] > 0


def test_rejects_bad_input(dvae: DiscreteVAE) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_dvae(dvae, _clouds(2), batch_size=0)
    with pytest.raises(ValueError, match=r"\(S, N, 3\)"):
        evaluate_dvae(dvae, torch.zeros(0, 64, 3))
    with pytest.raises(ValueError, match=r"\(S, N, 3\)"):
        evaluate_dvae(dvae, torch.zeros(2, 64))
