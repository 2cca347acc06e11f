"""Exact pairwise squared distances and k-nearest-neighbour search, batched and channels-last.

Distances are always computed from coordinate differences, ``sum_c (a_c - b_c)**2`` accumulated channel by
channel in order, never with the ``|a|² - 2a·b + |b|²`` matrix-multiply formula that ``torch.cdist`` switches
to above 25 points (which leaves self-distances around 1e-8 instead of 0). So a query that is also a
reference point has distance exactly 0 and is its own first neighbour, as with KNN_CUDA (Point-MAE's
grouping op).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["knn", "pairwise_sqdist"]

_SEQUENTIAL_CHANNELS = 8
"""Up to this many channels, distances are accumulated one channel at a time (no (…, C) temporary)."""
_CHUNK_ELEMENTS = 1 << 23
"""Default kNN chunk: at most this many (batch x query x reference) distances in memory at once."""


def pairwise_sqdist(a: Tensor, b: Tensor) -> Tensor:
    """Exact squared Euclidean distance between every point of ``a`` and every point of ``b``.

    Differentiable. Computed from differences, channel by channel (``(d0² + d1²) + d2²`` for xyz), so
    ``pairwise_sqdist(x, x)`` has an exactly zero diagonal.

    Shapes:
        a: (B, M, C), b: (B, N, C), same dtype and device.
        returns: (B, M, N).

    Raises:
        ValueError: If the shapes are not (B, M, C) and (B, N, C) with equal B and C.
    """
    _check_pair(a, b, names=("a", "b"))
    return _paired_sqdist(a.unsqueeze(2), b.unsqueeze(1))


def knn(
    query: Tensor,
    ref: Tensor,
    k: int,
    *,
    chunk_size: int | None = None,
    backend: Literal["torch", "faiss"] = "torch",
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest reference points of every query point, sorted by distance.

    Like KNN_CUDA (``transpose_mode=True``): Euclidean distances (square-rooted), sorted ascending, 0-based
    indices; a query that is also in ``ref`` is its own first neighbour at distance exactly 0. Ties are
    broken by the smaller reference index, so the result is fully determined: it is the first ``k`` entries
    of the reference points sorted by ``(squared distance, index)``. Not differentiable (the outputs carry
    no gradient); gather the neighbours and recompute distances where a gradient is needed.

    Args:
        query: Query points.
        ref: Reference points, same dtype, device and ``C`` as ``query``.
        k: Neighbours per query, ``1 <= k <= N``.
        chunk_size: Queries processed at once (torch backend); bounds memory at about
            ``B * chunk_size * N`` distances. ``None`` picks it from the sizes (about 2**23 distances).
        backend: ``"torch"`` (exact, any device) or ``"faiss"`` (faiss ``IndexFlatL2`` on CPU, imported
            lazily). faiss finds the candidates with its own float32 arithmetic; pcpt then recomputes their
            distances exactly in the input dtype and orders them by ``(distance, index)``. The two backends
            agree except when two candidates are within float32 rounding of the k-th distance.

    Returns:
        ``(distances, indices)``: Euclidean distances in the input dtype and long indices into ``N``, on the
        input's device.

    Shapes:
        query: (B, M, C), ref: (B, N, C).
        returns: (B, M, k), (B, M, k).

    Raises:
        ValueError: On mismatched shapes, ``k`` outside ``[1, N]``, a non-positive ``chunk_size`` or an
            unknown backend.
    """
    _check_pair(query, ref, names=("query", "ref"))
    num_ref = ref.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_ref:
        raise ValueError(f"k must be an int in [1, N={num_ref}], got {k!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if backend == "faiss":
        return _knn_faiss(query, ref, k)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")

    batch, num_query, _ = query.shape
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, batch * num_ref))
    with torch.no_grad():
        sqdists, indices = [], []
        for begin in range(0, num_query, chunk_size):
            sqdist = pairwise_sqdist(query[:, begin : begin + chunk_size], ref)
            values, idx = _smallest_k(sqdist, k)
            sqdists.append(values)
            indices.append(idx)
        if not sqdists:  # no queries
            empty = query.new_empty(batch, 0, k)
            return empty, empty.long()
        sqdist = torch.cat(sqdists, dim=1)
        return sqdist.sqrt(), torch.cat(indices, dim=1)


def _check_pair(a: Tensor, b: Tensor, *, names: tuple[str, str]) -> None:
    for name, x in zip(names, (a, b)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a (B, N, C) tensor, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"{names[0]} and {names[1]} must share batch size and channels, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[2] < 1:
        raise ValueError(f"{names[0]} must have at least one channel, got {tuple(a.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"{names[0]} and {names[1]} must share dtype and device, "
            f"got {a.dtype}/{a.device} and {b.dtype}/{b.device}"
        )


def _paired_sqdist(x: Tensor, y: Tensor) -> Tensor:
    """``sum_c (x_c - y_c)**2`` over the last axis of broadcastable ``x`` and ``y``.

    Up to ``_SEQUENTIAL_CHANNELS`` channels the sum runs channel by channel in order (``(d0² + d1²) + d2²``)
    and never materialises the broadcast ``(..., C)`` difference; beyond that one broadcast ``sum`` is used.
    """
    channels = x.shape[-1]
    if channels > _SEQUENTIAL_CHANNELS:
        return (x - y).square().sum(dim=-1)
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        out = (x[..., 0] - y[..., 0]).square()
        for channel in range(1, channels):
            out = out + (x[..., channel] - y[..., channel]).square()
        return out
    # No autograd: contiguous channel planes (vectorised inner loops) and in-place updates (no new buffers).
    xs, ys = x.movedim(-1, 0).contiguous(), y.movedim(-1, 0).contiguous()
    out = xs[0] - ys[0]
    out.mul_(out)
    if channels > 1:
        diff = torch.empty_like(out)
        for channel in range(1, channels):
            torch.sub(xs[channel], ys[channel], out=diff)
            out.add_(diff.mul_(diff))
    return out


def _smallest_k(sqdist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest entries of the last axis in ``(value, index)`` order (exact, deterministic ties).

    ``topk`` leaves the order of equal values unspecified, and which of several entries tied with the k-th
    value it keeps; rows with a tie at the k-th value fall back to a stable full sort, and ties inside the
    result are re-ordered by index.
    """
    values, idx = sqdist.topk(k, dim=-1, largest=False, sorted=True)
    kth = values[..., -1:]
    boundary_tie = (sqdist <= kth).sum(dim=-1) > k
    if bool(boundary_tie.any()):
        rows = boundary_tie.nonzero(as_tuple=True)
        tied_values, tied_idx = sqdist[rows].sort(dim=-1, stable=True)
        values[rows] = tied_values[..., :k]
        idx[rows] = tied_idx[..., :k]
    return _order_ties_by_index(values, idx)


def _order_ties_by_index(values: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sorts ``(values, idx)`` along the last axis by value, then index (both tensors reordered)."""
    if values.shape[-1] < 2 or not bool((values[..., 1:] == values[..., :-1]).any()):
        return values, idx
    idx, by_index = idx.sort(dim=-1)
    values = values.gather(-1, by_index)
    values, by_value = values.sort(dim=-1, stable=True)
    return values, idx.gather(-1, by_value)


def _knn_faiss(query: Tensor, ref: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Candidates from a faiss ``IndexFlatL2`` (one index per cloud), exact distances recomputed in torch."""
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a declared dependency
        raise ImportError("knn(backend='faiss') needs the faiss-cpu package") from err
    import numpy as np

    batch, num_query, channels = query.shape
    query_np = query.detach().to("cpu", torch.float32).contiguous().numpy()
    ref_np = ref.detach().to("cpu", torch.float32).contiguous().numpy()
    found = np.empty((batch, num_query, k), dtype=np.int64)
    for b in range(batch):
        index = faiss.IndexFlatL2(channels)
        index.add(ref_np[b])
        _, found[b] = index.search(query_np[b], k)
    idx = torch.from_numpy(found).to(query.device)
    with torch.no_grad():
        neighbours = torch.gather(
            ref.unsqueeze(1).expand(-1, num_query, -1, -1),
            2,
            idx.unsqueeze(-1).expand(-1, -1, -1, channels),
        )
        sqdist = _paired_sqdist(query.unsqueeze(2), neighbours)  # (B, M, k)
        by_index = idx.argsort(dim=-1)
        idx = idx.gather(-1, by_index)
        sqdist, by_value = sqdist.gather(-1, by_index).sort(dim=-1, stable=True)
        idx = idx.gather(-1, by_value)
    return sqdist.sqrt(), idx
