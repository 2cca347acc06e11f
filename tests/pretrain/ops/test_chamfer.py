"""Chamfer distance (chamfer_dist conventions) against brute-force loops, closed forms and gradients."""

from __future__ import annotations

import math

import pytest
import torch

import pretrain.ops.chamfer as chamfer_module
from pretrain.ops.chamfer import chamfer_distance, nearest_sqdist


def slow_nearest(a: torch.Tensor, b: torch.Tensor) -> tuple[list, list]:
    """Per point of a: (squared distance, index) of its nearest point of b, first index on ties; float64."""
    out_d, out_i = [], []
    for b_idx in range(a.shape[0]):
        pa, pb = a[b_idx].double().tolist(), b[b_idx].double().tolist()
        ds, js = [], []
        for p in pa:
            dists = [sum((p[c] - q[c]) ** 2 for c in range(len(p))) for q in pb]
            j = min(range(len(pb)), key=lambda j: (dists[j], j))
            ds.append(dists[j])
            js.append(j)
        out_d.append(ds)
        out_i.append(js)
    return out_d, out_i


def slow_chamfer(a: torch.Tensor, b: torch.Tensor, variant: str) -> float:
    d_ab, _ = slow_nearest(a, b)
    d_ba, _ = slow_nearest(b, a)
    flat_ab = [d for row in d_ab for d in row]
    flat_ba = [d for row in d_ba for d in row]
    if variant == "l2":
        return sum(flat_ab) / len(flat_ab) + sum(flat_ba) / len(flat_ba)
    return (
        sum(math.sqrt(d) for d in flat_ab) / len(flat_ab) + sum(math.sqrt(d) for d in flat_ba) / len(flat_ba)
    ) / 2


@pytest.mark.parametrize("variant", ["l1", "l2"])
def test_matches_brute_force(variant: str) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 20, 3, generator=gen), torch.randn(3, 15, 3, generator=gen)
    got = chamfer_distance(a, b, variant=variant)  # type: ignore[arg-type]
    assert got.shape == ()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(slow_chamfer(a, b, variant), rel=1e-6, abs=1e-6)


def test_nearest_sqdist_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 11, 3, generator=gen), torch.randn(2, 7, 3, generator=gen)
    d_ab, idx_ab, d_ba, idx_ba = nearest_sqdist(a, b)
    want_d_ab, want_idx_ab = slow_nearest(a, b)
    want_d_ba, want_idx_ba = slow_nearest(b, a)
    assert idx_ab.tolist() == want_idx_ab
    assert idx_ba.tolist() == want_idx_ba
    assert torch.allclose(d_ab.double(), torch.tensor(want_d_ab, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert torch.allclose(d_ba.double(), torch.tensor(want_d_ba, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_chunked_search_matches_and_keeps_first_index_on_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(-2, 3, (2, 40, 3), generator=gen).float()  # lattice points: duplicates and exact ties
    b = torch.randint(-2, 3, (2, 9, 3), generator=gen).float()
    whole = nearest_sqdist(a, b)
    monkeypatch.setattr(chamfer_module, "_CHUNK_ELEMENTS", 2 * 9 * 3)  # 3 rows of a per chunk
    chunked = nearest_sqdist(a, b)
    for x, y in zip(whole, chunked):
        assert torch.equal(x, y)
    _, want_idx_ba = slow_nearest(b, a)
    _, want_idx_ab = slow_nearest(a, b)
    assert chunked[3].tolist() == want_idx_ba
    assert chunked[1].tolist() == want_idx_ab


@pytest.mark.parametrize("variant", ["l1", "l2"])
def test_identical_sets_give_exactly_zero(variant: str) -> None:
    x = torch.randn(4, 64, 3) * 3 + 1
    assert chamfer_distance(x, x.clone(), variant=variant).item() == 0.0  # type: ignore[arg-type]


def test_two_single_points_closed_form() -> None:
    a, b = torch.tensor([[[0.0, 0.0, 0.0]]]), torch.tensor([[[3.0, 4.0, 0.0]]])
    assert chamfer_distance(a, b, variant="l2").item() == 50.0  # 25 + 25, no 1/2
    assert chamfer_distance(a, b, variant="l1").item() == 5.0  # (5 + 5) / 2


def test_batch_mean_is_over_all_points() -> None:
    # Cloud 0 contributes 0, cloud 1 has distance² 4 both ways: mean over the batch = 2 per direction.
    a = torch.tensor([[[0.0, 0, 0]], [[0.0, 0, 0]]])
    b = torch.tensor([[[0.0, 0, 0]], [[2.0, 0, 0]]])
    assert chamfer_distance(a, b).item() == 4.0
    assert chamfer_distance(a, b, variant="l1").item() == 1.0


@pytest.mark.parametrize("variant", ["l1", "l2"])
def test_gradients_are_finite_at_zero_distance(variant: str) -> None:
    a = torch.randn(2, 16, 3, requires_grad=True)
    b = torch.cat([a.detach()[:, :8], torch.randn(2, 8, 3)], dim=1).requires_grad_(True)  # 8 exact matches
    chamfer_distance(a, b, variant=variant).backward()  # type: ignore[arg-type]
    assert a.grad is not None
    assert b.grad is not None
    assert torch.isfinite(a.grad).all()
    assert torch.isfinite(b.grad).all()
    x = torch.randn(1, 5, 3, requires_grad=True)
    chamfer_distance(x, x.detach().clone(), variant=variant).backward()  # type: ignore[arg-type]
    assert x.grad is not None
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("variant", ["l1", "l2"])
def test_gradient_flows_only_through_nearest_pairs(variant: str) -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    chamfer_distance(a, b, variant=variant).backward()  # type: ignore[arg-type]
    _, idx_ab = slow_nearest(a.detach(), b.detach())
    _, idx_ba = slow_nearest(b.detach(), a.detach())
    want_a, want_b = torch.zeros_like(a), torch.zeros_like(b)
    n_ab, n_ba = a.shape[0] * a.shape[1], b.shape[0] * b.shape[1]

    def add(pair_diff: torch.Tensor, count: int) -> torch.Tensor:
        # d/dp of |p - q|² is 2 (p - q); of |p - q| it is (p - q) / |p - q|, halved by the L1 average.
        if variant == "l2":
            return 2 * pair_diff / count
        return pair_diff / pair_diff.norm() / count / 2

    for s in range(2):
        for i, j in enumerate(idx_ab[s]):
            g = add(a[s, i].detach() - b[s, j].detach(), n_ab)
            want_a[s, i] += g
            want_b[s, j] -= g
        for j, i in enumerate(idx_ba[s]):
            g = add(b[s, j].detach() - a[s, i].detach(), n_ba)
            want_b[s, j] += g
            want_a[s, i] -= g
    assert a.grad is not None
    assert b.grad is not None
    assert torch.allclose(a.grad, want_a, atol=1e-12)
    assert torch.allclose(b.grad, want_b, atol=1e-12)


def test_float64_input_stays_float64() -> None:
    a, b = torch.randn(1, 5, 3, dtype=torch.float64), torch.randn(1, 4, 3, dtype=torch.float64)
    got = chamfer_distance(a, b)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(slow_chamfer(a, b, "l2"), rel=1e-12)


def test_bad_arguments_raise_value_error() -> None:
    a = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="variant"):
        chamfer_distance(a, a, variant="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch size"):
        chamfer_distance(a, torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="at least one point"):
        chamfer_distance(a, torch.zeros(2, 0, 3))
    with pytest.raises(ValueError, match="a must"):
        nearest_sqdist(torch.zeros(4, 3), a)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    a, b = torch.randn(8, 32, 3), torch.randn(8, 32, 3)
    for variant in ("l1", "l2"):
        cpu = chamfer_distance(a, b, variant=variant)  # type: ignore[arg-type]
        gpu = chamfer_distance(a.cuda(), b.cuda(), variant=variant)  # type: ignore[arg-type]
        assert torch.allclose(cpu, gpu.cpu(), rtol=1e-6)
