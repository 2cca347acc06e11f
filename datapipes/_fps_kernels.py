"""Numba kernels of farthest point sampling (imported lazily by :mod:`datapipes.fps_numba`; needs numba).

One cloud's FPS loop is sequential, so each kernel runs one cloud at a time on the calling thread; the
kernels release the GIL (``nogil=True``) so that Python threads can run different clouds at once. Compiled
code is cached in ``__pycache__`` (``cache=True``): only the first call of each dtype in a fresh install
pays the compile time (about 4 s per dtype for the plain kernels, 10 s for the pruned one).

Arithmetic is exactly that of pcpt's torch and numpy FPS: the squared distance is
``((d0*d0 + d1*d1) + d2*d2) + ...`` in the array dtype, each operation rounded (no fast-math, no fused
multiply-add), and the running minimum and the block maxima use LLVM's ``minnum`` / ``maxnum``, which are
exact selections (the caller guarantees finite input, so no NaN appears). Per step every block of ``blk``
points is updated and reduced to its maximum in one vectorised pass; the first block holding the overall
maximum is then scanned for the first index holding it, which is ``argmax``'s first-index rule.

Layout: ``planes (B, C, P)`` with ``P`` a multiple of ``blk``; padding points have running distance
``-inf`` and are never chosen.

:func:`fps_clouds_pruned` (3 channels) first permutes each cloud's points into Z-order so that every block is
spatially compact, keeps each block's bounding box, and at each step updates only the blocks whose box is
closer to the new centre than their maximum running distance; the others provably keep every value. Its
arithmetic per point and its tie-break (smallest original index) are those of the plain kernels.
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


@njit(cache=True, nogil=True, inline="always")
def _update_block(
    xb: np.ndarray, yb: np.ndarray, zb: np.ndarray, mb: np.ndarray, cx: Any, cy: Any, cz: Any, lowest: Any
) -> Any:  # pragma: no cover - compiled
    """Lowers one block's running distances ``mb`` to the new centre (3 channels); returns their maximum.

    ``xb, yb, zb, mb`` have the block's length; the squared distance is ``(dx*dx + dy*dy) + dz*dz``.
    """
    block_max = lowest
    for j in range(mb.shape[0]):
        dx = xb[j] - cx
        dy = yb[j] - cy
        dz = zb[j] - cz
        m = _minnum(mb[j], (dx * dx + dy * dy) + dz * dz)
        mb[j] = m
        block_max = _maxnum(block_max, m)
    return block_max


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
            block_max = _update_block(
                x[lo : lo + blk], y[lo : lo + blk], z[lo : lo + blk], mind[lo : lo + blk], cx, cy, cz, lowest
            )
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


_MORTON_BITS = 5
"""Bits per axis of the Morton code that orders the points into blocks (32768 cells: ~0.25 points a cell
for 8192 points; finer cells only reorder points inside one block)."""


@njit(cache=True, nogil=True)
def _spread_bits(v: int) -> int:  # pragma: no cover - compiled
    """The low 5 bits of ``v`` moved to bits 0, 3, 6, 9, 12 (one axis of a 15-bit Morton code)."""
    v &= 0x1F
    v = (v | (v << 8)) & 0x100F
    v = (v | (v << 4)) & 0x10C3
    return (v | (v << 2)) & 0x1249


@njit(cache=True, nogil=True)
def _morton_order(x: np.ndarray, y: np.ndarray, z: np.ndarray, count: int) -> np.ndarray:  # pragma: no cover
    """(count,) int64 order of the first ``count`` points along a Z-order curve over their bounding box.

    Each axis of the box is cut into ``2**_MORTON_BITS`` cells; a counting sort orders the points by cell
    code, keeping index order inside a cell (deterministic, O(count)).
    """
    cells = 1 << _MORTON_BITS
    axes = (x, y, z)
    codes = np.zeros(count, np.int64)
    for a in range(3):
        v = axes[a]
        lo = np.float64(v[0])
        hi = lo
        for j in range(count):
            lo = min(lo, np.float64(v[j]))
            hi = max(hi, np.float64(v[j]))
        scale = cells / (hi - lo) if hi > lo else 0.0
        for j in range(count):
            q = min(cells - 1, max(0, int((np.float64(v[j]) - lo) * scale)))
            codes[j] |= _spread_bits(q) << a
    starts = np.zeros(cells**3 + 1, np.int64)
    for j in range(count):
        starts[codes[j] + 1] += 1
    for c in range(cells**3):
        starts[c + 1] += starts[c]
    order = np.empty(count, np.int64)
    for j in range(count):
        c = codes[j]
        order[starts[c]] = j
        starts[c] += 1
    return order


@njit(cache=True, nogil=True)
def _fps_cloud_pruned(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    mind: np.ndarray,
    out: np.ndarray,
    first: int,
    blk: int,
    exclude_chosen: bool,
    count: int,
) -> None:  # pragma: no cover - compiled
    """FPS of one 3-channel cloud that skips blocks too far from the new centre to change.

    The ``count`` real points are permuted into Morton order, so that each block of ``blk`` consecutive
    slots is spatially compact, and each block keeps its bounding box and the maximum of its running
    distances. A block whose box is at squared distance ``lower >= block max`` from the new centre cannot
    change: ``lower`` is computed with the same rounded operations as a point's distance, from box
    coordinates that bound the point's differences, and every rounded operation involved is monotone, so
    ``lower`` is at most every point's float distance, which is then ``>=`` the point's running minimum.
    Updated blocks use the arithmetic of :func:`_fps_cloud_xyz`. The next point is the smallest original
    index holding the overall maximum, found among the blocks whose maximum equals it.

    Args: as :func:`_fps_cloud_xyz`, plus ``count``: the number of real points (the rest is padding).
    """
    dtype = mind.dtype
    lowest = dtype.type(-np.inf)
    zero = dtype.type(0)
    size = x.shape[0]
    num_blocks = size // blk
    orig = np.empty(size, np.int64)
    orig[:count] = _morton_order(x, y, z, count)
    for j in range(count, size):
        orig[j] = j
    xp = x[orig]
    yp = y[orig]
    zp = z[orig]
    mp = mind[orig]
    box = np.empty((6, num_blocks), dtype)  # x lo, x hi, y lo, y hi, z lo, z hi of the real points
    bmax = np.empty(num_blocks, dtype)
    for b in range(num_blocks):
        lo = b * blk
        hi = min(lo + blk, count)
        block_max = lowest
        for j in range(lo, lo + blk):
            block_max = _maxnum(block_max, mp[j])
        bmax[b] = block_max
        box[0, b] = xp[lo]
        box[1, b] = xp[lo]
        box[2, b] = yp[lo]
        box[3, b] = yp[lo]
        box[4, b] = zp[lo]
        box[5, b] = zp[lo]
        for j in range(lo + 1, hi):
            box[0, b] = min(box[0, b], xp[j])
            box[1, b] = max(box[1, b], xp[j])
            box[2, b] = min(box[2, b], yp[j])
            box[3, b] = max(box[3, b], yp[j])
            box[4, b] = min(box[4, b], zp[j])
            box[5, b] = max(box[5, b], zp[j])
    xlo = box[0]
    xhi = box[1]
    ylo = box[2]
    yhi = box[3]
    zlo = box[4]
    zhi = box[5]
    lower = np.empty(num_blocks, dtype)
    cur = 0
    for j in range(count):
        if orig[j] == first:
            cur = j
    out[0] = first
    for step in range(1, out.shape[0]):
        forced = -1
        if exclude_chosen:
            mp[cur] = -1.0
            forced = cur // blk  # its block maximum may drop: recompute it
        cx = xp[cur]
        cy = yp[cur]
        cz = zp[cur]
        for b in range(num_blocks):
            ex = _maxnum(_maxnum(xlo[b] - cx, cx - xhi[b]), zero)
            ey = _maxnum(_maxnum(ylo[b] - cy, cy - yhi[b]), zero)
            ez = _maxnum(_maxnum(zlo[b] - cz, cz - zhi[b]), zero)
            lower[b] = (ex * ex + ey * ey) + ez * ez
        best = lowest
        for b in range(num_blocks):
            if b != forced and lower[b] >= bmax[b]:
                best = _maxnum(best, bmax[b])
                continue
            lo = b * blk
            block_max = _update_block(
                xp[lo : lo + blk], yp[lo : lo + blk], zp[lo : lo + blk], mp[lo : lo + blk], cx, cy, cz, lowest
            )
            bmax[b] = block_max
            best = _maxnum(best, block_max)
        chosen = size
        for b in range(num_blocks):
            if bmax[b] == best:
                for j in range(b * blk, b * blk + blk):
                    if mp[j] == best and orig[j] < chosen:
                        chosen = orig[j]
                        cur = j
        out[step] = chosen


@njit(cache=True, nogil=True)
def fps_clouds_pruned(
    planes: np.ndarray,
    mind: np.ndarray,
    out: np.ndarray,
    first: np.ndarray,
    blk: int,
    exclude_chosen: bool,
    count: int,
    lo: int,
    hi: int,
) -> None:  # pragma: no cover - compiled
    """:func:`fps_clouds` for 3-channel clouds with block skipping (:func:`_fps_cloud_pruned`).

    Args: as :func:`fps_clouds` with ``planes`` of shape (B, 3, P), plus ``count``: the number of real
    points of every cloud (``count <= P``; slots from ``count`` on are padding).
    """
    for b in range(lo, hi):
        _fps_cloud_pruned(
            planes[b, 0], planes[b, 1], planes[b, 2], mind[b], out[b], first[b], blk, exclude_chosen, count
        )
