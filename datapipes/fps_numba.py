"""Compiled farthest point sampling on CPU arrays (numba), shared by datapipes and the torch ops.

:func:`fps_indices` runs the numba kernels of :mod:`datapipes._fps_kernels` over a batch of clouds and
returns the same indices as the pure torch / numpy loops it replaces (same float arithmetic, same
first-index tie-break). Long runs on large 3-channel clouds (:func:`use_pruning`) go through a kernel that
keeps the points in spatially compact blocks and skips, at each step, the blocks that provably cannot change
(see :func:`datapipes._fps_kernels._fps_cloud_pruned`); it returns the same indices, 4-5x faster for a full
ordering of 8192 points (3x for 8192 -> 1024). A cloud's FPS is sequential, so each cloud runs on one
thread; with ``threads > 1`` the clouds of a batch are shared out among that many Python threads (the
kernels release the GIL), which take small chunks of clouds from a common counter so that a thread slowed
by another process on the same core does not hold up the batch. Nothing synchronises between threads
inside a cloud's loop.

numba is optional: :func:`numba_enabled` is false when it is not installed or when the environment variable
``PCPT_DISABLE_NUMBA`` is set to anything but ``""`` or ``"0"``; callers then use their pure torch / numpy
code. numba is imported on the first call, not when this module is imported, and the kernels are compiled
for each dtype on first use and cached in ``datapipes/__pycache__`` (or numba's user cache directory when
that is read-only).
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import warnings
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["DISABLE_NUMBA_ENV", "fps_indices", "numba_enabled"]

DISABLE_NUMBA_ENV = "PCPT_DISABLE_NUMBA"
"""Environment variable that, set to anything but ``""`` or ``"0"``, turns the numba FPS path off."""


@functools.cache
def _kernels() -> ModuleType | None:
    """The compiled-kernel module, or None when numba is missing or cannot build it here."""
    try:
        from datapipes import _fps_kernels
    except ImportError:  # numba not installed, or built for another numpy
        return None
    except RuntimeError as err:  # e.g. no writable cache directory for cache=True
        warnings.warn(f"numba FPS kernels unavailable, using the torch/numpy loops: {err}", stacklevel=2)
        return None
    return _fps_kernels


def numba_enabled() -> bool:
    """Whether :func:`fps_indices` can run: numba importable and not disabled by ``PCPT_DISABLE_NUMBA``."""
    if os.environ.get(DISABLE_NUMBA_ENV, "") not in ("", "0"):
        return False
    return _kernels() is not None


def block_length(num_points: int) -> int:
    """Block length of the kernels' two-level maximum search for clouds of ``num_points`` points."""
    if num_points >= 2048:
        return 256
    if num_points >= 256:
        return 64
    return 16


PRUNE_MIN_POINTS = 1024
"""Smallest cloud size for which :func:`fps_indices` skips far blocks by default (3-channel clouds)."""

PRUNE_MIN_SAMPLES = 256
"""Smallest number of samples for which :func:`fps_indices` skips far blocks by default: sorting the points
into blocks costs about as much as 100 steps of the plain kernel, so short runs do not pay for it."""

PRUNE_BLOCK = 64
"""Block length of the block-skipping kernel (blocks of spatially close points, each with a bounding box)."""


def use_pruning(num_points: int, num_samples: int, channels: int) -> bool:
    """Whether :func:`fps_indices` runs the block-skipping kernel by default for clouds of this shape."""
    return channels == 3 and num_points >= PRUNE_MIN_POINTS and num_samples >= PRUNE_MIN_SAMPLES


def fps_indices(
    points: np.ndarray,
    num_samples: int,
    first: np.ndarray,
    *,
    init_sqdist: float = np.inf,
    excluded: np.ndarray | None = None,
    exclude_chosen: bool = False,
    threads: int = 1,
    prune: bool | None = None,
) -> np.ndarray:
    """Farthest point sampling of a batch of clouds with the compiled kernels.

    Semantics: every candidate keeps its running minimum squared distance to the chosen points, computed as
    ``((d0*d0 + d1*d1) + d2*d2) + ...`` in the points' dtype and started at ``init_sqdist``; the next point
    is the first index holding the largest running distance.

    Args:
        points: (B, N, C) finite float32 or float64 coordinates (other dtypes are converted to float32).
        num_samples: S, ``1 <= S``; with ``exclude_chosen`` also ``S <= N``.
        first: (B,) start indices in ``[0, N)``.
        init_sqdist: initial running distance of every candidate.
        excluded: (B, N) bool, candidates never chosen after the start and never updated, or None.
        exclude_chosen: never choose a point twice (its running distance drops to -1 once chosen).
        threads: Python threads sharing the clouds (the kernels release the GIL); 1 runs on the caller.
        prune: run the kernel that sorts the points into spatially compact blocks (Morton order) and skips
            the blocks too far from each new centre to change (3-channel clouds only; same indices, faster
            for long runs on large clouds); None decides by :func:`use_pruning`.

    Returns:
        (B, S) int64 indices into N in selection order.

    Raises:
        RuntimeError: if numba is not available (check :func:`numba_enabled` first).
        ValueError: if ``prune`` is True for clouds with other than 3 channels.
    """
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("numba is not installed: pip install numba, or use the torch/numpy FPS")
    pts = np.asarray(points)
    dtype = np.float64 if pts.dtype == np.float64 else np.float32
    batch, num_points, channels = pts.shape
    if prune is None:
        prune = use_pruning(num_points, num_samples, channels)
    elif prune and channels != 3:
        raise ValueError(f"fps_indices: prune=True needs 3-channel points, got {channels} channels")
    blk = PRUNE_BLOCK if prune else block_length(num_points)
    padded = -(-num_points // blk) * blk
    planes = np.zeros((batch, channels, padded), dtype)
    planes[:, :, :num_points] = pts.transpose(0, 2, 1)
    mind = np.full((batch, padded), -np.inf, dtype)
    mind[:, :num_points] = init_sqdist
    if excluded is not None:
        mind[:, :num_points][excluded] = -np.inf
    out = np.empty((batch, num_samples), np.int64)
    starts = np.ascontiguousarray(first, dtype=np.int64)
    if prune:
        args = (planes, mind, out, starts, blk, bool(exclude_chosen), num_points)
        _run(kernels.fps_clouds_pruned, args, batch, threads)
    else:
        _run(kernels.fps_clouds, (planes, mind, out, starts, blk, bool(exclude_chosen)), batch, threads)
    return out


def _run(kernel: Any, args: tuple[Any, ...], batch: int, threads: int) -> None:
    """Calls ``kernel(*args, lo, hi)`` over ``[0, batch)``, on ``threads`` threads taking chunks of clouds."""
    workers = max(1, min(int(threads), batch))
    if workers == 1:
        kernel(*args, 0, batch)
        return
    chunk = max(1, batch // (4 * workers))  # ~4 chunks a thread: balances a thread slowed by other load
    starts = itertools.count(0, chunk)  # next() on it is atomic under the GIL
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for lo in starts:
                if lo >= batch:
                    return
                kernel(*args, lo, min(lo + chunk, batch))
        except BaseException as err:  # re-raised in the calling thread
            errors.append(err)

    pool = [threading.Thread(target=work, daemon=True) for _ in range(workers - 1)]
    for thread in pool:
        thread.start()
    work()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
