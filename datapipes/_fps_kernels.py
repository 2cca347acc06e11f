"""Numba kernels of farthest point sampling (imported lazily by :mod:`datapipes.fps_numba`; needs numba).

One cloud's FPS loop is sequential, so each kernel runs one cloud at a time on the calling thread; the
kernels release the GIL (``nogil=True``) so that Python threads can run different clouds at once. Compiled
code is cached in ``__pycache__`` (``cache=True``): only the first call of each dtype in a fresh install
pays the compile time (a few seconds per dtype).

Arithmetic is exactly that of pcpt's torch and numpy FPS: the squared distance is
``((d0*d0 + d1*d1) + d2*d2) + ...`` in the array dtype, each operation rounded (no fast-math, no fused
multiply-add), and the running minimum and the block maxima use LLVM's ``minnum`` / ``maxnum``, which are
exact selections (the caller guarantees finite input, so no NaN appears). Per step every block of ``blk``
points is updated and reduced to its maximum in one vectorised pass; the first block holding the overall
maximum is then scanned for the first index holding it, which is ``argmax``'s first-index rule.

Layout: ``planes (B, C, P)`` with ``P`` a multiple of ``blk``; padding points have running distance
``-inf`` and are never chosen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit
from numba.extending import intrinsic


def _binary_intrinsic(name: str) -> Any:
    """A numba intrinsic ``f(a, b)`` calling the LLVM intrinsic ``name`` on two floats of the same type."""

    @intrinsic
    def call(typingctx: Any, a: Any, b: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            kind = args[0].type
            fn = builder.module.declare_intrinsic(name, [kind], ir.FunctionType(kind, [kind, kind]))
            return builder.call(fn, args, fastmath=("nnan", "nsz"))

        return a(a, b), codegen

    return call


_minnum = _binary_intrinsic("llvm.minnum")
_maxnum = _binary_intrinsic("llvm.maxnum")


@njit(cache=True, nogil=True)
def _fps_cloud_xyz(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    mind: np.ndarray,
    out: np.ndarray,
    first: int,
    blk: int,
    exclude_chosen: bool,
) -> None:  # pragma: no cover - compiled
    """FPS of one 3-channel cloud: ``x, y, z, mind`` of shape (P,), ``out`` (S,) filled in place."""
    lowest = mind.dtype.type(-np.inf)
    num_blocks = x.shape[0] // blk
    cur = first
    out[0] = cur
    for step in range(1, out.shape[0]):
        if exclude_chosen:
            mind[cur] = -1.0
        cx = x[cur]
        cy = y[cur]
        cz = z[cur]
        best = lowest
        best_block = 0
        for b in range(num_blocks):
            lo = b * blk
            xb = x[lo : lo + blk]
            yb = y[lo : lo + blk]
            zb = z[lo : lo + blk]
            mb = mind[lo : lo + blk]
            block_max = lowest
            for j in range(blk):
                dx = xb[j] - cx
                dy = yb[j] - cy
                dz = zb[j] - cz
                m = _minnum(mb[j], (dx * dx + dy * dy) + dz * dz)
                mb[j] = m
                block_max = _maxnum(block_max, m)
            if block_max > best:
                best = block_max
                best_block = b
        cur = _first_index_of(mind, best, best_block * blk, blk)
        out[step] = cur


@njit(cache=True, nogil=True)
def _fps_cloud_any(
    planes: np.ndarray,
    mind: np.ndarray,
    out: np.ndarray,
    first: int,
    blk: int,
    exclude_chosen: bool,
) -> None:  # pragma: no cover - compiled
    """FPS of one cloud with any channel count: ``planes`` (C, P), ``mind`` (P,), ``out`` (S,)."""
    lowest = mind.dtype.type(-np.inf)
    channels = planes.shape[0]
    num_blocks = planes.shape[1] // blk
    sqdist = np.empty(blk, planes.dtype)
    cur = first
    out[0] = cur
    for step in range(1, out.shape[0]):
        if exclude_chosen:
            mind[cur] = -1.0
        best = lowest
        best_block = 0
        for b in range(num_blocks):
            lo = b * blk
            row = planes[0, lo : lo + blk]
            centre = planes[0, cur]
            for j in range(blk):
                d = row[j] - centre
                sqdist[j] = d * d
            for c in range(1, channels):
                row = planes[c, lo : lo + blk]
                centre = planes[c, cur]
                for j in range(blk):
                    d = row[j] - centre
                    sqdist[j] = sqdist[j] + d * d
            mb = mind[lo : lo + blk]
            block_max = lowest
            for j in range(blk):
                m = _minnum(mb[j], sqdist[j])
                mb[j] = m
                block_max = _maxnum(block_max, m)
            if block_max > best:
                best = block_max
                best_block = b
        cur = _first_index_of(mind, best, best_block * blk, blk)
        out[step] = cur


@njit(cache=True, nogil=True)
def _first_index_of(values: np.ndarray, target: Any, lo: int, count: int) -> int:  # pragma: no cover
    """First ``j`` in ``[lo, lo + count)`` with ``values[j] == target`` (``lo`` when none)."""
    for j in range(lo, lo + count):
        if values[j] == target:
            return j
    return lo


@njit(cache=True, nogil=True)
def fps_clouds(
    planes: np.ndarray,
    mind: np.ndarray,
    out: np.ndarray,
    first: np.ndarray,
    blk: int,
    exclude_chosen: bool,
    lo: int,
    hi: int,
) -> None:  # pragma: no cover - compiled
    """FPS of clouds ``lo .. hi-1``, one after the other, on the calling thread (GIL released).

    Args:
        planes: (B, C, P) coordinates, float32 or float64, C-contiguous, ``P % blk == 0``.
        mind: (B, P) running squared distances of the same dtype, initialised by the caller (``-inf`` for
            padding and never-chosen points); updated in place.
        out: (B, S) int64, filled in place with selection-order indices into P.
        first: (B,) int64 start indices.
        blk: block length of the two-level maximum search.
        exclude_chosen: set a chosen point's running distance to -1 so it is never chosen again.
        lo: first cloud to process.
        hi: one past the last cloud to process.
    """
    for b in range(lo, hi):
        if planes.shape[1] == 3:
            _fps_cloud_xyz(
                planes[b, 0], planes[b, 1], planes[b, 2], mind[b], out[b], first[b], blk, exclude_chosen
            )
        else:
            _fps_cloud_any(planes[b], mind[b], out[b], first[b], blk, exclude_chosen)
