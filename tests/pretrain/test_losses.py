from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import dvae_kl_uniform, masked_token_ce, mixup_contrastive_loss, moco_loss
from tests.pretrain.dvae_reference import kl_official


def test_dvae_kl_matches_official_kl_div(gen: torch.Generator) -> None:
    logits = torch.randn(3, 5, 7, generator=gen) * 2
    torch.testing.assert_close(dvae_kl_uniform(logits), kl_official(logits))
    # the direct definition KL(u || q_bar) = sum_v u (log u - log q_bar), averaged over the batch
    q_bar = logits.softmax(-1).mean(1)
    u = torch.full_like(q_bar, 1 / 7)
    direct = (u * (u.log() - q_bar.log())).sum(-1).mean()
    torch.testing.assert_close(dvae_kl_uniform(logits), direct)
    reverse = (q_bar * (q_bar.log() - u.log())).sum(-1).mean()  # KL(q_bar || u): the other direction
    assert not torch.allclose(dvae_kl_uniform(logits), reverse)


def test_dvae_kl_zero_for_uniform_usage_and_finite_when_collapsed() -> None:
    assert float(dvae_kl_uniform(torch.zeros(2, 4, 8))) == pytest.approx(0.0, abs=1e-6)
    # every patch picks code 0 with overwhelming confidence: q_bar underflows for other codes
    logits = torch.full((1, 4, 8), -200.0)
    logits[..., 0] = 200.0
    value = dvae_kl_uniform(logits)
    assert torch.isfinite(value)
    assert float(value) > 100
    # a permutation of the patches does not change q_bar
    x = torch.randn(2, 6, 5)
    torch.testing.assert_close(dvae_kl_uniform(x), dvae_kl_uniform(x[:, torch.randperm(6)]))


def test_dvae_kl_gradient_matches_official(gen: torch.Generator) -> None:
    a = torch.randn(2, 4, 6, generator=gen, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    dvae_kl_uniform(a).backward()
    kl_official(b).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_masked_token_ce_against_loop(gen: torch.Generator) -> None:
    logits = torch.randn(2, 5, 9, generator=gen)
    targets = torch.randint(9, (2, 5), generator=gen)
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    terms = [
        -F.log_softmax(logits[b, g], -1)[targets[b, g]] for b in range(2) for g in range(5) if mask[b, g]
    ]
    torch.testing.assert_close(masked_token_ce(logits, targets, mask), torch.stack(terms).mean())
    empty = masked_token_ce(logits.requires_grad_(True), targets, torch.zeros(2, 5, dtype=torch.bool))
    assert float(empty.detach()) == 0.0
    assert empty.requires_grad
    with pytest.raises(ValueError, match="bool"):
        masked_token_ce(logits, targets, mask.long())
    with pytest.raises(ValueError, match="targets"):
        masked_token_ce(logits, targets[:, :3], mask)


def _normalized(*shape: int, gen: torch.Generator, dim: int = -1) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen), dim=dim)


def test_mixup_contrastive_soft_labels_against_loop(gen: torch.Generator) -> None:
    batch, width, size, temp = 4, 6, 10, 0.07
    q, k = _normalized(batch, width, gen=gen), _normalized(batch, width, gen=gen)
    queue = _normalized(width, size, gen=gen, dim=0)
    ratio = torch.rand(batch, generator=gen)
    total = 0.0
    for i in range(batch):
        logits = [float(q[i] @ k[j]) / temp for j in range(batch)] + [
            float(q[i] @ queue[:, j]) / temp for j in range(size)
        ]
        log_z = math.log(sum(math.exp(v) for v in logits))
        partner = batch - 1 - i
        total += float(ratio[i]) * (log_z - logits[i]) + (1 - float(ratio[i])) * (log_z - logits[partner])
    expected = total / batch
    assert float(mixup_contrastive_loss(q, k, queue, ratio, temp)) == pytest.approx(expected, rel=1e-5)
    # ratio 1: plain InfoNCE against the own key; ratio 0: against the mirrored partner
    ones = mixup_contrastive_loss(q, k, queue, torch.ones(batch), temp)
    torch.testing.assert_close(
        ones, F.cross_entropy(torch.cat([q @ k.T, q @ queue], 1) / temp, torch.arange(batch))
    )
    zeros = mixup_contrastive_loss(q, k, queue, torch.zeros(batch), temp)
    torch.testing.assert_close(zeros, mixup_contrastive_loss(q, k.flip(0), queue, torch.ones(batch), temp))


def test_moco_loss_against_loop(gen: torch.Generator) -> None:
    q, k = _normalized(3, 4, gen=gen), _normalized(3, 4, gen=gen)
    queue = _normalized(4, 5, gen=gen, dim=0)
    terms = []
    for i in range(3):
        logits = torch.cat([(q[i] @ k[i]).view(1), q[i] @ queue]) / 0.2
        terms.append(-F.log_softmax(logits, 0)[0])
    torch.testing.assert_close(moco_loss(q, k, queue, 0.2), torch.stack(terms).mean())


def test_contrastive_losses_reject_bad_shapes(gen: torch.Generator) -> None:
    q, queue = _normalized(3, 4, gen=gen), _normalized(4, 5, gen=gen, dim=0)
    with pytest.raises(ValueError, match="queue"):
        mixup_contrastive_loss(q, q, queue.T, torch.rand(3), 0.07)
    with pytest.raises(ValueError, match="batch size"):
        mixup_contrastive_loss(q, q[:2], queue, torch.rand(3), 0.07)
    with pytest.raises(ValueError, match="temperature"):
        mixup_contrastive_loss(q, q, queue, torch.rand(3), 0.0)
    with pytest.raises(ValueError, match="q and k"):
        moco_loss(q, q[:2], queue, 0.07)
