"""All pairs of descriptors closer than a threshold, with faiss, in bounded memory (``pcpt-data dedup``).

Two indexes, same answer:

- ``exact``: ``IndexFlatL2`` range search, every query against every base vector. Cost ``M x K``
  distances; right for small sets.
- ``ivf``: ``IndexIVFFlat``: k-means (on a deterministic sample of the base) splits the base into ``nlist``
  cells, and each query scans only the cells near it. The cells are chosen per query: of the ``nprobe``
  nearest centroids, only those that can hold a partner are scanned. If ``y`` is within ``T`` of ``x`` and
  lies in cell ``c_y`` (its nearest centroid), then ``|x - c_y| <= |y - c_y| + T <= |y - c_1| + T <=
  |x - c_1| + 2T`` where ``c_1`` is the centroid nearest ``x``; cells farther than that are skipped, and a
  query whose ``nprobe + 1``-th centroid is still within that reach is counted as *unverified* (it may have
  missed a partner; raise ``nprobe``). With no unverified query the IVF pairs are exactly the exact
  search's pairs. Within one set a pair counts when either of its two clouds finds the other.

``auto`` picks ``exact`` while ``queries x base <= AUTO_EXACT_MAX ** 2`` (a self-comparison of 20,000
clouds, a few seconds on one core) and ``ivf`` above. Queries go through faiss in blocks of ``block`` rows,
so the memory is the descriptors, the index (for ``ivf`` a copy of the base) and one block's candidates:
nothing ``N x N``.
Distances of the candidates are recomputed in float64 and compared with the threshold, so both indexes
decide the boundary the same way.

With a GPU build of faiss (``faiss.get_num_gpus() > 0``) the ``ivf`` k-means and the centroid assignment of
the queries run on GPU 0; the range search itself stays on the CPU (faiss has no GPU range search for
IVF). This path is small and guarded, and it is not exercised by the CPU test suite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "AUTO_EXACT_MAX",
    "INDEX_KINDS",
    "NearPairs",
    "SearchInfo",
    "default_nlist",
    "default_nprobe",
    "resolve_index",
    "search_near_pairs",
]

INDEX_KINDS = ("auto", "exact", "ivf")
AUTO_EXACT_MAX = 20_000
"""``auto`` uses the exact index while ``queries x base <= AUTO_EXACT_MAX ** 2``."""
TRAIN_PER_LIST = 40
"""k-means training vectors per IVF cell (sampled from the base without replacement)."""
MIN_PER_LIST = 39
"""Fewest base vectors per cell the default ``nlist`` allows (faiss warns below it)."""
QUERY_BLOCK = 8192
"""Queries sent to faiss at once."""
_PAIR_CHUNK = 1 << 18  # candidate pairs whose float64 distance is computed at once


@dataclass(frozen=True)
class SearchInfo:
    """How the pairs were searched (the ``index`` entry of the dedup report).

    Attributes:
        index: ``"exact"`` or ``"ivf"``.
        queries: number of query vectors.
        base: number of base vectors.
        nlist: IVF cells (``None`` for exact).
        nprobe: most cells scanned per query (``None`` for exact).
        train_samples: base vectors the k-means ran on (``None`` for exact).
        cells_per_query: mean number of cells scanned per query (``None`` for exact).
        unverified: queries whose scanned cells do not provably hold all their partners (0 for exact).
        gpu: whether faiss ran the k-means and assignment on a GPU.
    """

    index: str
    queries: int
    base: int
    nlist: int | None = None
    nprobe: int | None = None
    train_samples: int | None = None
    cells_per_query: float | None = None
    unverified: int = 0
    gpu: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        out = asdict(self)
        if self.cells_per_query is not None:
            out["cells_per_query"] = round(self.cells_per_query, 3)
        return out


@dataclass(frozen=True)
class NearPairs:
    """Pairs closer than the threshold, sorted by distance, then ``a``, then ``b``.

    Attributes:
        a: ``(P,)`` int64 query indices (within one set: the smaller index of the pair).
        b: ``(P,)`` int64 base indices (within one set: the larger index).
        distance: ``(P,)`` float64 L2 distances.
        info: how they were found.
    """

    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray
    info: SearchInfo

    def as_tuples(self) -> list[tuple[int, int, float]]:
        """``[(a, b, distance), ...]`` as Python numbers."""
        return list(zip(self.a.tolist(), self.b.tolist(), self.distance.tolist()))


def default_nlist(num_base: int) -> int:
    """IVF cells for a base of ``num_base`` vectors: the power of two nearest ``2 sqrt(num_base)``.

    Balances the k-means (``TRAIN_PER_LIST * nlist ** 2`` distances), the centroid ranking (``nlist`` per
    vector) and the cell scan (about ``num_base / nlist`` vectors per scanned cell, more where k-means
    cells are uneven); at most ``num_base / 39`` so k-means has enough points per cell. E.g. 10k -> 256,
    100k -> 512, 1M -> 2048, 10M -> 8192.
    """
    if num_base < 1:
        raise ValueError(f"num_base must be >= 1, got {num_base}")
    nearest = 2 ** round(math.log2(2.0 * math.sqrt(num_base)))
    return max(1, min(nearest, num_base // MIN_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Most cells scanned per query: ``nlist / 64`` within ``[16, 128]``, at most ``nlist``.

    It is a cap: cells that cannot hold a partner are skipped, so most queries scan one or two cells
    whatever the cap; a larger cap costs a longer centroid ranking per query and leaves fewer queries
    unverified.
    """
    if nlist < 1:
        raise ValueError(f"nlist must be >= 1, got {nlist}")
    return min(nlist, max(16, min(128, nlist // 64)))


def resolve_index(index: str, num_queries: int, num_base: int) -> str:
    """``"exact"`` or ``"ivf"`` for ``index`` in :data:`INDEX_KINDS` (``auto``: :data:`AUTO_EXACT_MAX`)."""
    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
    if index != "auto":
        return index
    return "exact" if num_queries * num_base <= AUTO_EXACT_MAX**2 else "ivf"


def _gpu_resources() -> Any | None:
    """The faiss GPU resources when faiss was built with GPU support and sees a GPU, else ``None``."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    return faiss.StandardGpuResources()  # pragma: no cover - needs a GPU build of faiss


def _slack(*arrays: np.ndarray) -> float:
    """Bound on faiss's float32 rounding of a squared distance between rows of ``arrays``."""
    top = max((float(np.einsum("ij,ij->i", a, a).max()) for a in arrays if len(a)), default=1.0)
    return 1e-5 * (1.0 + 4.0 * top)


def search_near_pairs(
    queries: np.ndarray,
    base: np.ndarray | None = None,
    *,
    threshold: float,
    index: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    gpu: bool | None = None,
    block: int = QUERY_BLOCK,
    progress: Callable[[int], None] | None = None,
) -> NearPairs:
    """All pairs with L2 distance ``<= threshold`` (see the module docstring).

    Args:
        queries: ``(M, D)`` float32 descriptors.
        base: ``(K, D)`` descriptors to search; ``None`` searches ``queries`` against themselves (each
            unordered pair once, no self pairs).
        threshold: largest distance reported, ``>= 0``.
        index: ``"auto"``, ``"exact"`` or ``"ivf"``.
        nlist: IVF cells (default :func:`default_nlist` of ``K``), at most ``K``; unused when ``auto``
            picks the exact index.
        nprobe: most IVF cells scanned per query (default :func:`default_nprobe`); capped at ``nlist``.
        seed: seed of the k-means training sample and initialisation.
        gpu: run the IVF k-means and assignment on GPU 0; ``None``: when faiss has GPU support and a GPU.
        block: queries per faiss call.
        progress: called with the number of queries just searched.

    Returns:
        The pairs and how they were found.

    Raises:
        ValueError: a negative threshold, an unknown index, ``nlist``/``nprobe`` < 1 or ``nlist > K``,
            ``nlist``/``nprobe`` with ``index="exact"``, mismatched dimensions, or ``gpu=True`` without a GPU.
    """
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    for name, value in (("nlist", nlist), ("nprobe", nprobe)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    same = base is None
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    ref = queries if base is None else np.ascontiguousarray(base, dtype=np.float32)
    if queries.ndim != 2 or ref.ndim != 2 or queries.shape[1] != ref.shape[1]:
        raise ValueError(f"queries {queries.shape} and base {ref.shape} must be (M, D) and (K, D)")
    kind = resolve_index(index, len(queries), len(ref))
    if index == "exact" and (nlist is not None or nprobe is not None):
        raise ValueError("nlist and nprobe apply to the ivf index, not to the exact one")
    if nlist is not None and nlist > len(ref):
        raise ValueError(f"nlist ({nlist}) must be at most the number of base vectors ({len(ref)})")
    empty = np.zeros(0, np.int64)
    if len(queries) == 0 or len(ref) == 0:
        return NearPairs(empty, empty, np.zeros(0), SearchInfo(kind, len(queries), len(ref)))
    slack = _slack(queries, ref)
    if kind == "exact":
        searcher: _Searcher = _ExactSearcher(ref)
    else:
        use_gpu = _gpu_resources() if gpu is not False else None
        if gpu is True and use_gpu is None:
            raise ValueError("gpu=True but faiss has no GPU support or sees no GPU")
        cells = nlist if nlist is not None else default_nlist(len(ref))
        probes = min(cells, nprobe if nprobe is not None else default_nprobe(cells))
        searcher = _IvfSearcher(ref, cells, probes, threshold, slack, seed, use_gpu, block)
    radius2 = float(threshold) ** 2 + slack
    found_a, found_b, found_d = [], [], []
    for start in range(0, len(queries), block):
        chunk = queries[start : start + block]
        lims, ids = searcher.range_search(chunk, radius2)
        lims64 = np.asarray(lims, dtype=np.int64)
        counts = lims64[1:] - lims64[:-1]
        qi = np.repeat(np.arange(start, start + len(chunk), dtype=np.int64), counts)
        a, b = qi, ids.astype(np.int64, copy=False)
        if same:
            keep = a != b
            a, b = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
        dist = _distances(queries, ref, a, b)
        close = dist <= threshold
        found_a.append(a[close])
        found_b.append(b[close])
        found_d.append(dist[close])
        if progress is not None:
            progress(len(chunk))
    a, b, dist = (np.concatenate(x) for x in (found_a, found_b, found_d))
    if same and len(a):  # a pair found from both of its clouds
        _, first = np.unique(a * len(ref) + b, return_index=True)
        a, b, dist = a[first], b[first], dist[first]
    order = np.lexsort((b, a, dist))
    return NearPairs(a[order], b[order], dist[order], searcher.info(len(queries), len(ref)))


def _distances(queries: np.ndarray, ref: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|queries[a] - ref[b]|`` in float64, ``_PAIR_CHUNK`` pairs at a time. Shapes ``(P,)`` -> ``(P,)``."""
    out = np.empty(len(a), np.float64)
    for s in range(0, len(a), _PAIR_CHUNK):
        diff = queries[a[s : s + _PAIR_CHUNK]].astype(np.float64) - ref[b[s : s + _PAIR_CHUNK]]
        out[s : s + _PAIR_CHUNK] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


class _Searcher:
    """One index: candidate neighbours of a block of queries."""

    def range_search(self, chunk: np.ndarray, radius2: float) -> tuple[np.ndarray, np.ndarray]:
        """``(lims (B+1,), ids)`` of the base vectors within squared distance ``radius2`` (faiss layout)."""
        raise NotImplementedError

    def info(self, num_queries: int, num_base: int) -> SearchInfo:
        """What ran."""
        raise NotImplementedError


class _ExactSearcher(_Searcher):
    def __init__(self, ref: np.ndarray) -> None:
        import faiss

        self.index = faiss.IndexFlatL2(ref.shape[1])
        self.index.add(ref)

    def range_search(self, chunk: np.ndarray, radius2: float) -> tuple[np.ndarray, np.ndarray]:
        lims, _, ids = self.index.range_search(chunk, radius2)
        return lims, ids

    def info(self, num_queries: int, num_base: int) -> SearchInfo:
        return SearchInfo("exact", num_queries, num_base)


class _IvfSearcher(_Searcher):
    """``IndexIVFFlat`` with per-query cell pruning (see the module docstring)."""

    def __init__(
        self,
        ref: np.ndarray,
        nlist: int,
        nprobe: int,
        threshold: float,
        slack: float,
        seed: int,
        gpu_res: Any | None,
        block: int,
    ) -> None:
        import faiss

        dim = ref.shape[1]
        self.nlist, self.nprobe, self.threshold, self.slack = nlist, nprobe, float(threshold), slack
        self.quantizer = faiss.IndexFlatL2(dim)
        # Any: faiss's stubs describe the C++ signatures, not the numpy wrappers called below
        self.index: Any = faiss.IndexIVFFlat(self.quantizer, dim, nlist, faiss.METRIC_L2)
        self.index.cp.seed = int(seed)
        self.index.cp.min_points_per_centroid = 1  # few points per cell only cost speed here: no warning
        self.index.nprobe = nprobe
        size = min(len(ref), TRAIN_PER_LIST * nlist)
        sample = np.sort(np.random.default_rng(seed).choice(len(ref), size=size, replace=False))
        self.train_samples = size
        self.gpu = gpu_res is not None
        if gpu_res is not None:  # pragma: no cover - needs a GPU build of faiss
            self.index.clustering_index = faiss.index_cpu_to_gpu(gpu_res, 0, faiss.IndexFlatL2(dim))
        self.index.train(ref[sample])
        del sample
        for start in range(0, len(ref), block):
            self.index.add(ref[start : start + block])
        self.assign: Any = self.quantizer
        if gpu_res is not None:  # pragma: no cover - needs a GPU build of faiss
            self.assign = faiss.index_cpu_to_gpu(gpu_res, 0, self.quantizer)
        self.cells = 0
        self.unverified = 0

    def range_search(self, chunk: np.ndarray, radius2: float) -> tuple[np.ndarray, np.ndarray]:
        k = min(self.nlist, self.nprobe + 1)
        dq, iq = self.assign.search(chunk, k)  # squared distances, ascending
        reach2 = (np.sqrt(dq[:, :1] + self.slack) + 2.0 * self.threshold) ** 2 + self.slack
        scan = dq[:, : self.nprobe] <= reach2
        if k > self.nprobe:
            self.unverified += int(np.count_nonzero(dq[:, self.nprobe] <= reach2[:, 0]))
        self.cells += int(np.count_nonzero(scan))
        keys = np.where(scan, iq[:, : self.nprobe], -1)
        lims, _, ids = self.index.range_search_preassigned(chunk, radius2, keys, dq[:, : self.nprobe])
        return lims, ids

    def info(self, num_queries: int, num_base: int) -> SearchInfo:
        return SearchInfo(
            "ivf",
            num_queries,
            num_base,
            nlist=self.nlist,
            nprobe=self.nprobe,
            train_samples=self.train_samples,
            cells_per_query=self.cells / max(num_queries, 1),
            unverified=self.unverified,
            gpu=self.gpu,
        )
