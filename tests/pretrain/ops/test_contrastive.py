"""NT-Xent against an explicit per-anchor softmax, closed forms, and a real 2-process gloo group."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pretrain.ops.contrastive import gather_with_grad, nt_xent


def slow_terms(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-anchor NT-Xent terms of the 2B rows [a; b]: an explicit softmax over the 2B − 1 other rows."""
    rows = torch.cat([a, b]).to(torch.float64)
    z = torch.stack([row / torch.sqrt((row * row).sum()) for row in rows])
    n, half = z.shape[0], a.shape[0]
    terms = []
    for i in range(n):
        positive = (i + half) % n
        others = [j for j in range(n) if j != i]
        sims = torch.stack([(z[i] * z[j]).sum() / temperature for j in others])
        probability = torch.exp(sims[others.index(positive)]) / torch.exp(sims).sum()
        terms.append(-torch.log(probability))
    return torch.stack(terms)


def pairs(batch: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, dim, generator=gen, dtype=dtype)
    b = a + 0.5 * torch.randn(batch, dim, generator=gen, dtype=dtype)
    return a, b


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_matches_slow_reference(batch: int, temperature: float) -> None:
    a, b = pairs(batch, 7, seed=batch)
    got = nt_xent(a, b, temperature=temperature)
    want = slow_terms(a, b, temperature).mean()
    assert got.dtype == torch.float64
    assert got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradients_match_slow_reference() -> None:
    a, b = pairs(4, 5, seed=3)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    nt_xent(a1, b1, temperature=0.2).backward()
    slow_terms(a2, b2, 0.2).mean().backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-12)


def test_float32_and_low_precision_inputs_compute_in_float32() -> None:
    a, b = pairs(6, 8, seed=1)
    want = slow_terms(a, b, 0.1).mean()
    got32 = nt_xent(a.float(), b.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)
    got_bf16 = nt_xent(a.bfloat16(), b.bfloat16())
    assert got_bf16.dtype == torch.float32
    want_bf16 = slow_terms(a.bfloat16().double(), b.bfloat16().double(), 0.1).mean()
    torch.testing.assert_close(got_bf16.double(), want_bf16, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("temperature", [0.1, 0.07, 1.0])
def test_identical_pairs_orthogonal_to_the_rest(batch: int, temperature: float) -> None:
    """Pair i is (c·e_i, c'·e_i): one similarity 1/T, 2B − 2 similarities 0 for every anchor."""
    scales = torch.linspace(0.5, 3.0, batch, dtype=torch.float64)[:, None]
    a = torch.eye(batch, 8, dtype=torch.float64) * scales
    b = torch.eye(batch, 8, dtype=torch.float64) * scales.flip(0)
    want = math.log(1.0 + (2 * batch - 2) * math.exp(-1.0 / temperature))
    assert nt_xent(a, b, temperature=temperature).item() == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("temperature", [1.0, 1e-3])
def test_all_vectors_identical_is_log_of_the_candidates(temperature: float) -> None:
    """Every similarity equals 1/T: −log(1 / (2B − 1)); stable even where exp(1/T) overflows."""
    a = torch.ones(5, 3, dtype=torch.float64)
    got = nt_xent(a, 2.0 * a, temperature=temperature)
    assert got.item() == pytest.approx(math.log(9.0), rel=1e-12)


def test_tiny_temperature_is_finite_with_finite_gradients() -> None:
    a, b = pairs(4, 3, seed=2, dtype=torch.float32)
    a.requires_grad_()
    loss = nt_xent(a, b, temperature=1e-4)
    loss.backward()
    assert torch.isfinite(loss)
    assert a.grad is not None
    assert torch.isfinite(a.grad).all()


def test_symmetric_and_invariant_to_pair_order_and_scale() -> None:
    a, b = pairs(5, 4, seed=4)
    base = nt_xent(a, b)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(nt_xent(b, a), base, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(nt_xent(a[perm], b[perm]), base, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(nt_xent(3.0 * a, 0.1 * b), base, rtol=1e-12, atol=0.0)


def test_gather_is_the_local_loss_on_one_process() -> None:
    assert not dist.is_initialized()
    a, b = pairs(4, 6, seed=5)
    torch.testing.assert_close(nt_xent(a, b, gather=True), nt_xent(a, b, gather=False), rtol=0.0, atol=0.0)
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        (torch.zeros(3, 4), torch.zeros(3, 5), {}, "a and b"),
        (torch.zeros(3), torch.zeros(3), {}, "a and b"),
        (torch.zeros(0, 4), torch.zeros(0, 4), {}, "at least one"),
        (torch.ones(2, 4), torch.ones(2, 4), {"temperature": 0.0}, "temperature"),
    ],
)
def test_rejects_bad_arguments(a, b, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        nt_xent(a, b, **kwargs)


def test_autocast_does_not_lower_the_precision() -> None:
    a, b = pairs(6, 8, seed=6, dtype=torch.float32)
    want = nt_xent(a, b)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = nt_xent(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --- two real processes (gloo on CPU) ---------------------------------------------------------------------

WORLD = 2
ROWS = 3  # pairs per rank in the equal-size case
UNEQUAL = (3, 1)  # pairs per rank in the unequal-size case


def problem() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A float64 linear projection and the full batch of WORLD·ROWS input pairs (same on every process)."""
    gen = torch.Generator().manual_seed(11)
    model = torch.nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 6, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    x_a = torch.randn(WORLD * ROWS, 6, generator=gen, dtype=torch.float64)
    x_b = x_a + 0.3 * torch.randn(WORLD * ROWS, 6, generator=gen, dtype=torch.float64)
    return model, x_a, x_b


def project(
    model: torch.nn.Module, x_a: torch.Tensor, x_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over both views (as a training step does), split back into the two views."""
    z = model(torch.cat([x_a, x_b]))
    return z[: x_a.shape[0]], z[x_a.shape[0] :]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        record: dict[str, object] = {}
        model, x_a, x_b = problem()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)

        ddp = DistributedDataParallel(model)  # averages the gradients over the ranks
        loss = nt_xent(*project(ddp, x_a[rows], x_b[rows]), temperature=0.2)
        loss.backward()
        record["loss"] = loss.detach()
        record["ddp_grads"] = grads(ddp.module)

        raw, _, _ = problem()  # no DDP: this rank's own gradients, summed over the ranks here
        nt_xent(*project(raw, x_a[rows], x_b[rows]), temperature=0.2).backward()
        summed = grads(raw)
        for tensor in summed.values():
            dist.all_reduce(tensor)
        record["summed_grads"] = summed

        with torch.no_grad():
            record["local_loss"] = nt_xent(*project(raw, x_a[rows], x_b[rows]), temperature=0.2, gather=False)

        # unequal batches: the gather, its backward and the per-rank loss
        start = sum(UNEQUAL[:rank])
        mine = slice(start, start + UNEQUAL[rank])
        x = x_a[: sum(UNEQUAL)].clone().requires_grad_()  # a leaf holding every row
        own = x[mine]
        gathered = gather_with_grad(own)
        weights = torch.arange(gathered.numel(), dtype=torch.float64).view_as(gathered) * (rank + 1)
        (gathered * weights).sum().backward()
        record["gathered"] = gathered.detach()
        record["gather_grad"] = x.grad[mine].clone()
        with torch.no_grad():
            za, zb = project(raw, x_a[: sum(UNEQUAL)][mine], x_b[: sum(UNEQUAL)][mine])
            record["unequal_loss"] = nt_xent(za, zb, temperature=0.2)
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def check_loss_is_the_single_process_loss(ranks: list[dict]) -> None:
    model, x_a, x_b = problem()
    with torch.no_grad():
        za, zb = project(model, x_a, x_b)
        single = nt_xent(za, zb, temperature=0.2)
        terms = slow_terms(za, zb, 0.2)
    n = WORLD * ROWS
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(single.item(), rel=1e-12)
    for rank, record in enumerate(ranks):
        own = list(range(rank * ROWS, (rank + 1) * ROWS))
        want = terms[own + [n + i for i in own]].mean()
        torch.testing.assert_close(record["loss"], want, rtol=1e-12, atol=1e-12)


def check_ddp_gradients_are_the_single_process_gradients(ranks: list[dict]) -> None:
    model, x_a, x_b = problem()
    nt_xent(*project(model, x_a, x_b), temperature=0.2).backward()
    single = grads(model)
    assert set(single) == {"weight", "bias"}
    for record in ranks:
        for name, grad in single.items():
            # DDP averages: (1/W) Σ_r ∂L_r/∂θ = (1/W) ∂(W·L)/∂θ = ∂L/∂θ
            torch.testing.assert_close(record["ddp_grads"][name], grad, rtol=1e-10, atol=1e-12)
            # without DDP's averaging the ranks' gradients sum to W times the single-process gradient
            torch.testing.assert_close(record["summed_grads"][name], WORLD * grad, rtol=1e-10, atol=1e-12)


def check_without_gather_is_the_per_rank_loss(ranks: list[dict]) -> None:
    model, x_a, x_b = problem()
    for rank, record in enumerate(ranks):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        with torch.no_grad():
            want = nt_xent(*project(model, x_a[rows], x_b[rows]), temperature=0.2, gather=False)
        torch.testing.assert_close(record["local_loss"], want, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(record["local_loss"], record["loss"])


def check_gather_of_unequal_batches(ranks: list[dict]) -> None:
    model, x_a, x_b = problem()
    total = sum(UNEQUAL)
    rows = x_a[:total]
    for record in ranks:
        torch.testing.assert_close(record["gathered"], rows, rtol=0.0, atol=0.0)
    # rank r's loss is (gathered · w_r).sum() with w_r = (r + 1)·arange: each rank receives, for its own rows,
    # the sum over both ranks of those weights
    weights = torch.arange(rows.numel(), dtype=torch.float64).view_as(rows)
    summed = sum((r + 1) * weights for r in range(WORLD))
    start = 0
    for rank, record in enumerate(ranks):
        torch.testing.assert_close(record["gather_grad"], summed[start : start + UNEQUAL[rank]])
        start += UNEQUAL[rank]
    with torch.no_grad():
        za, zb = project(model, x_a[:total], x_b[:total])
        terms = slow_terms(za, zb, 0.2)
    start = 0
    for rank, record in enumerate(ranks):
        own = list(range(start, start + UNEQUAL[rank]))
        want = terms[own + [total + i for i in own]].mean()
        torch.testing.assert_close(record["unequal_loss"], want, rtol=1e-12, atol=1e-12)
        start += UNEQUAL[rank]


@pytest.mark.ddp
def test_two_process_gloo_nt_xent(tmp_path: Path) -> None:
    """Two spawned CPU ranks (gloo): one spawn, every check (a single test, so xdist spawns only once)."""
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    check_loss_is_the_single_process_loss(ranks)
    check_ddp_gradients_are_the_single_process_gradients(ranks)
    check_without_gather_is_the_per_rank_loss(ranks)
    check_gather_of_unequal_batches(ranks)
