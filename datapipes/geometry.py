"""Numpy geometry for preprocessing: unit-sphere normalisation and farthest-point ordering.

Farthest point sampling (FPS) follows the reference semantics of ``pointnet2_ops.furthest_point_sample``
used by Point-BERT / Point-MAE: start at a given index (0 by default), then repeatedly pick the point
farthest (squared Euclidean distance, float32) from everything picked so far, ties to the lowest index.
Storing clouds in this order makes the first ``n`` points an FPS subsample of size ``n``. Unlike the CUDA
kernel there is no near-origin skip, and chosen points are never chosen again (clouds with duplicate points
still yield a permutation).

FPS runs on the compiled kernels of :mod:`datapipes.fps_numba` when numba is installed (one thread, same
indices), else as a vectorised numpy loop; ``PCPT_DISABLE_NUMBA=1`` forces the numpy loop. Clouds with NaN
or infinite coordinates always take the numpy loop.

This is the data layer's one home for numpy point geometry: converters, the in-memory datasets, the demo
data and the transforms all use these functions (the model packages have their own torch versions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from datapipes import fps_numba

__all__ = ["FPS_BATCH_POINTS", "fps_order", "fps_order_batch", "fps_orders", "normalize_unit_sphere"]


def normalize_unit_sphere(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centres a cloud on its centroid and scales it so the farthest point has norm 1.

    Computes in float64 for float64 input and in float32 otherwise (reductions as matrix products, which
    is several times faster than numpy's axis reductions on ``(N, 3)`` arrays). Finite clouds whose squared
    distances overflow that precision are normalised in float64 after dividing by their largest magnitude.

    Args:
        xyz: ``(N, 3)`` points.

    Returns:
        ``(points (N, 3) float32, centre (3,) float32, scale)`` with ``points = (xyz - centre) / scale``; a
        cloud of identical points keeps ``scale = 1``.

    Raises:
        ValueError: wrong shape, NaN or infinite values, or a centre beyond the float32 range.
    """
    pts = np.asarray(xyz)
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] == 0:
        raise ValueError(f"xyz must have shape (N, 3) with N >= 1, got {np.shape(xyz)}")
    dtype = np.float64 if pts.dtype == np.float64 else np.float32
    pts = pts.astype(dtype, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is handled below
        centre = (np.ones(pts.shape[0], dtype) @ pts) / pts.shape[0]
        centred = pts - centre
        scale = float(np.sqrt(((centred * centred) @ np.ones(3, dtype)).max()))
    if not np.isfinite(scale):
        if not np.isfinite(pts).all():
            raise ValueError("xyz contains NaN or infinite values")
        return _normalize_large(pts)
    if scale <= 1e-12:
        scale = 1.0
    return (centred / scale).astype(np.float32, copy=False), centre.astype(np.float32), scale


def _normalize_large(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`normalize_unit_sphere` for a finite cloud whose squared distances overflow (in float64)."""
    big = float(np.abs(pts).max())
    unit = pts.astype(np.float64) / big
    centre = unit.mean(axis=0)
    centred = unit - centre
    radius = float(np.sqrt(np.max(np.sum(centred * centred, axis=1))))
    if radius <= 1e-12 / big:
        radius = 1.0 / big
    with np.errstate(over="raise"):
        try:
            centre32 = (centre * big).astype(np.float32)
        except FloatingPointError:
            raise ValueError("xyz centre is beyond the float32 range") from None
    return (centred / radius).astype(np.float32), centre32, radius * big


def fps_order_batch(xyz: np.ndarray, n: int | None = None, start: int = 0) -> np.ndarray:
    """Farthest-point order of several clouds of equal size at once (one vectorised loop for all).

    Args:
        xyz: ``(B, N, 3)`` points.
        n: number of indices per cloud (default ``N``: a full ordering).
        start: index of the first pick in every cloud.

    Returns:
        ``(B, n)`` int64 indices into ``N``, in selection order.
    """
    pts = np.asarray(xyz, dtype=np.float32)
    if pts.ndim != 3 or pts.shape[2] != 3 or pts.shape[1] == 0:
        raise ValueError(f"xyz must have shape (B, N, 3) with N >= 1, got {np.shape(xyz)}")
    batch, count = pts.shape[:2]
    n = count if n is None else int(n)
    if not 1 <= n <= count:
        raise ValueError(f"n must be in [1, {count}], got {n}")
    if not 0 <= start < count:
        raise ValueError(f"start must be in [0, {count}), got {start}")
    if fps_numba.numba_enabled() and bool(np.isfinite(pts).all()):
        first = np.full(batch, start, dtype=np.int64)
        return fps_numba.fps_indices(pts, n, first, exclude_chosen=True)
    if batch > _CHUNK:  # bounded working set: faster than one huge batch
        return np.concatenate([_fps(pts[i : i + _CHUNK], n, start) for i in range(0, batch, _CHUNK)])
    return _fps(pts, n, start)


_CHUNK = 32


def _fps(pts: np.ndarray, n: int, start: int) -> np.ndarray:
    """The numpy loop: (B, N, 3) float32 -> (B, n) int64, all clouds advancing together."""
    batch, count = pts.shape[:2]
    cols = [np.ascontiguousarray(pts[:, :, k]) for k in range(3)]  # (B, N) each: contiguous, fast ufuncs
    rows = np.arange(batch)
    order = np.empty((batch, n), dtype=np.int64)
    order[:, 0] = start
    dist = np.full((batch, count), np.inf, dtype=np.float32)
    diff = np.empty((batch, count), dtype=np.float32)
    acc = np.empty((batch, count), dtype=np.float32)
    last = np.full(batch, start, dtype=np.int64)
    for i in range(1, n):
        acc.fill(0.0)
        for col in cols:
            np.subtract(col, col[rows, last][:, None], out=diff)
            np.multiply(diff, diff, out=diff)
            np.add(acc, diff, out=acc)
        np.minimum(dist, acc, out=dist)
        dist[rows, last] = -1.0  # chosen points are never chosen again
        last = dist.argmax(axis=1)
        order[:, i] = last
    return order


def fps_order(xyz: np.ndarray, n: int | None = None, start: int = 0) -> np.ndarray:
    """Farthest-point order of one cloud.

    Args:
        xyz: ``(N, 3)`` points.
        n: number of indices (default ``N``: a full ordering, i.e. a permutation).
        start: index of the first pick (0 matches ``pointnet2_ops``).

    Returns:
        ``(n,)`` int64 indices in selection order; ``xyz[fps_order(xyz)[:m]]`` is an FPS subsample of size m.
    """
    pts = np.asarray(xyz)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"xyz must have shape (N, 3), got {pts.shape}")
    return fps_order_batch(pts[None], n=n, start=start)[0]


FPS_BATCH_POINTS = 32768
"""Points per batched FPS loop in :func:`fps_orders`: larger batches stop fitting in cache and get slower."""


def fps_orders(clouds: Sequence[np.ndarray], n: int | None = None) -> list[np.ndarray]:
    """Farthest-point orders of clouds of any sizes, batching clouds of equal size into vectorised loops.

    Always goes through :func:`fps_order_batch`, whose per-cloud result does not depend on the batch it is
    in, so any grouping of the clouds (engine, worker, chunk) gives the same orders. Batches hold up to
    :data:`FPS_BATCH_POINTS` points (at least one cloud).

    Args:
        clouds: ``(N_i, 3)`` point sets.
        n: indices per cloud, capped at each cloud's size (``None``: a full permutation).

    Returns:
        One int64 index array per cloud, ``(min(n, N_i),)``, in input order.
    """
    out: list[np.ndarray | None] = [None] * len(clouds)
    groups: dict[int, list[int]] = {}
    for i, xyz in enumerate(clouds):
        groups.setdefault(len(xyz), []).append(i)
    for size, members in groups.items():
        step = max(1, FPS_BATCH_POINTS // max(size, 1))
        count = None if n is None else min(n, size)
        for start in range(0, len(members), step):
            part = members[start : start + step]
            batch = np.stack([np.asarray(clouds[i], dtype=np.float32) for i in part])
            orders = np.asarray(fps_order_batch(batch, count), dtype=np.int64)
            for row, i in enumerate(part):
                out[i] = orders[row]
    return [o for o in out if o is not None]
