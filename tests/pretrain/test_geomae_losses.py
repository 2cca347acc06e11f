"""GeoMAE loss terms against closed forms and slow references."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.losses import masked_mse, occupancy_bce


def test_masked_mse_matches_a_loop_over_valid_targets() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 16, 3, generator=gen), torch.randn(4, 16, 3, generator=gen)
    valid = torch.rand(4, 16, generator=gen) > 0.5
    terms = [
        sum((float(pred[b, s, c]) - float(target[b, s, c])) ** 2 for c in range(3)) / 3
        for b in range(4)
        for s in range(16)
        if valid[b, s]
    ]
    assert masked_mse(pred, target, valid).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert masked_mse(pred, target).item() == pytest.approx(float((pred - target).square().mean()), rel=1e-6)


def test_masked_mse_with_nothing_valid_is_zero_and_keeps_the_graph() -> None:
    pred = torch.randn(2, 5, 3, requires_grad=True)
    loss = masked_mse(pred, torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert pred.grad is not None


def test_occupancy_bce_closed_form() -> None:
    # logits (0, 0): every BCE term is log 2.
    assert occupancy_bce(torch.zeros(3, 2), torch.tensor([True, False, True])).item() == pytest.approx(
        math.log(2)
    )
    # one slot, occupied, logits (a, b): mean of -log(1 - s(a)) and -log s(b).
    a, b = 0.3, -1.2
    expected = (-math.log(1 - 1 / (1 + math.exp(-a))) - math.log(1 / (1 + math.exp(-b)))) / 2
    assert occupancy_bce(torch.tensor([[a, b]]), torch.tensor([True])).item() == pytest.approx(expected)


def test_loss_shape_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="same shape"):
        masked_mse(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="bool occupied"):
        occupancy_bce(torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool))
