"""Exact pairwise distances and kNN (torch and faiss backends) against brute-force Python loops."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
import torch

from pretrain.ops.neighbors import knn, pairwise_sqdist
from tests.pretrain.ops.reference import slow_knn, slow_sqdist

Backend = Literal["torch", "faiss"]


def lattice(seed: int, batch: int, n: int) -> np.ndarray:
    """Integer lattice points with duplicates: exact arithmetic and many tied distances."""
    rng = np.random.default_rng(seed)
    return rng.integers(-2, 3, size=(batch, n, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------ pairwise_sqdist


@pytest.mark.parametrize("channels", [1, 3, 12])
def test_pairwise_sqdist_matches_loops(channels: int) -> None:
    rng = np.random.default_rng(channels)
    a = rng.standard_normal((2, 7, channels)).astype(np.float32)
    b = rng.standard_normal((2, 9, channels)).astype(np.float32)
    got = pairwise_sqdist(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    want = np.array([[[slow_sqdist(a[i, m], b[i, n]) for n in range(9)] for m in range(7)] for i in range(2)])
    if channels <= 8:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6)
    with_grad = pairwise_sqdist(torch.from_numpy(a).requires_grad_(True), torch.from_numpy(b))
    np.testing.assert_array_equal(with_grad.detach().numpy(), got)  # autograd path: same values


def test_pairwise_sqdist_self_distance_is_exactly_zero_beyond_cdist_threshold() -> None:
    x = torch.randn(2, 100, 3) * 10 + 5
    assert torch.all(torch.diagonal(pairwise_sqdist(x, x), dim1=1, dim2=2) == 0)


def test_pairwise_sqdist_is_differentiable() -> None:
    a = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pairwise_sqdist, (a, b))


# ------------------------------------------------------------------------------------------------ knn


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_knn_matches_brute_force(backend: Backend, chunk_size: int | None) -> None:
    rng = np.random.default_rng(0)
    query = rng.standard_normal((3, 10, 3)).astype(np.float32)
    ref = rng.standard_normal((3, 40, 3)).astype(np.float32)
    dist, idx = knn(torch.from_numpy(query), torch.from_numpy(ref), 6, chunk_size=chunk_size, backend=backend)
    want_dist, want_idx = slow_knn(query, ref, 6)
    assert dist.shape == idx.shape == (3, 10, 6)
    assert idx.dtype == torch.long
    assert dist.dtype == torch.float32
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(dist.numpy(), want_dist, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_query_in_ref_is_its_own_first_neighbour_at_distance_zero(backend: Backend) -> None:
    ref = torch.randn(2, 200, 3) * 5 + 3
    picked = torch.tensor([[0, 17, 199, 50], [3, 3, 100, 42]])
    query = torch.gather(ref, 1, picked.unsqueeze(-1).expand(-1, -1, 3))
    dist, idx = knn(query, ref, 8, backend=backend)
    assert torch.equal(idx[..., 0], picked)
    assert torch.all(dist[..., 0] == 0)
    assert torch.all(dist[..., 1:] > 0)
    assert torch.all(dist[..., 1:] >= dist[..., :-1])


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("k", [1, 5, 13, 30])
def test_ties_are_broken_by_index_including_at_the_kth_neighbour(chunk_size: int | None, k: int) -> None:
    query, ref = lattice(1, 2, 6), lattice(2, 2, 30)
    dist, idx = knn(torch.from_numpy(query), torch.from_numpy(ref), k, chunk_size=chunk_size)
    want_dist, want_idx = slow_knn(query, ref, k)
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(dist.numpy(), want_dist, atol=1e-6, rtol=0)


def test_faiss_orders_ties_by_index() -> None:
    query, ref = lattice(3, 2, 6), lattice(4, 2, 30)
    dist, idx = knn(torch.from_numpy(query), torch.from_numpy(ref), 30, backend="faiss")  # k = N: no cut
    want_dist, want_idx = slow_knn(query, ref, 30)
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(dist.numpy(), want_dist, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_float64_input_gives_float64_distances(backend: Backend) -> None:
    rng = np.random.default_rng(5)
    query, ref = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 25, 3))
    dist, idx = knn(torch.from_numpy(query), torch.from_numpy(ref), 4, backend=backend)
    want_dist, want_idx = slow_knn(query, ref, 4)
    assert dist.dtype == torch.float64
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(dist.numpy(), want_dist, rtol=1e-12, atol=0)


def test_knn_carries_no_gradient_and_handles_empty_queries() -> None:
    ref = torch.randn(2, 10, 3, requires_grad=True)
    dist, _ = knn(ref[:, :3], ref, 3)
    assert not dist.requires_grad
    dist, idx = knn(torch.zeros(2, 0, 3), ref.detach(), 3)
    assert dist.shape == idx.shape == (2, 0, 3)


def test_default_chunk_bounds_memory_without_changing_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import pretrain.ops.neighbors as neighbors

    query, ref = torch.randn(2, 33, 3), torch.randn(2, 50, 3)
    full = knn(query, ref, 5)
    monkeypatch.setattr(neighbors, "_CHUNK_ELEMENTS", 2 * 50 * 4)  # 4 queries per chunk
    chunked = knn(query, ref, 5)
    assert torch.equal(full[0], chunked[0])
    assert torch.equal(full[1], chunked[1])


@pytest.mark.parametrize(
    ("query_shape", "ref_shape", "kwargs", "match"),
    [
        ((2, 4, 3), (2, 5, 3), {"k": 6}, "k must"),
        ((2, 4, 3), (2, 5, 3), {"k": 0}, "k must"),
        ((2, 4, 3), (3, 5, 3), {"k": 2}, "batch size"),
        ((2, 4, 3), (2, 5, 2), {"k": 2}, "channels"),
        ((4, 3), (2, 5, 3), {"k": 2}, "query"),
        ((2, 4, 3), (2, 5, 3), {"k": 2, "backend": "annoy"}, "backend"),
        ((2, 4, 3), (2, 5, 3), {"k": 2, "chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments_raise_value_error(
    query_shape: tuple, ref_shape: tuple, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        knn(torch.zeros(query_shape), torch.zeros(ref_shape), **kwargs)


def test_mixed_dtypes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="dtype"):
        pairwise_sqdist(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_cuda_matches_cpu(backend: Backend) -> None:
    query, ref = torch.randn(2, 64, 3), torch.randn(2, 1024, 3)
    cpu = knn(query, ref, 16, backend=backend)
    gpu = knn(query.cuda(), ref.cuda(), 16, backend=backend)
    assert gpu[1].device.type == "cuda"
    assert torch.equal(cpu[1], gpu[1].cpu())
    assert torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-6)
