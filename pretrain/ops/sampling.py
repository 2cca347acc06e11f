"""Farthest point sampling (FPS): exact, batched, pure torch, with a pointnet2_ops parity mode.

FPS picks a first point, then repeatedly the point whose distance to the nearest already chosen point is
largest (Qi et al., "PointNet++", NeurIPS 2017). Point-BERT and Point-MAE choose their patch centres with it.

Semantics (both modes):

* The running minimum squared distance of every candidate to the chosen set is kept; the squared distance
  is computed from coordinate differences as ``(dx*dx + dy*dy) + dz*dz`` (each operation rounded in the
  compute dtype, no fused multiply-add, no ``|p|² - 2p·q + |q|²`` formula), so a point's distance to itself
  is exactly 0.
* The compute dtype is float64 for float64 input and float32 for every other float dtype.
* Indices are returned in selection order: ``idx[:, 0]`` is the start point.

Default mode (``skip_near_origin=False``): the running minimum starts at +inf and the next point is the
*first* index holding the maximum (``torch.argmax`` semantics). open3d's
``PointCloud.farthest_point_down_sample`` follows the same rule in float64, so on float64 input both select
the same points from the same start index (open3d reports them in index order, not selection order).

Parity mode (``skip_near_origin=True``) reproduces ``furthest_point_sample`` of pointnet2_ops (the CUDA
kernel used by Point-BERT, Point-MAE and Any2Point) index for index:

* computation in float32, running distances initialised to ``1e10`` (the kernel's ``temp`` buffer);
* a candidate with ``(x*x + y*y) + z*z <= 1e-3`` (float32 magnitude compared with the double constant
  ``1e-3``) is never chosen after the first pick and its running distance is never updated; the first pick
  itself is unconditional (index 0 in the kernel);
* ties between equal running distances are broken like the kernel's block reduction. The kernel runs
  ``T = max(min(2**floor(log2(N)), 512), 1)`` threads; thread ``t`` scans ``k = t, t + T, ...`` and keeps
  its first strict maximum (``d2 > best``, ``best = -1``, ``besti = 0``); a shared-memory tree reduction
  then merges slot ``i`` with slot ``i + s`` for ``s = T/2, ..., 1``, keeping the lower slot on ties. The
  lower slot wins at every level, so among tied maxima the winner is the point with the smallest
  ``(bitreverse(k mod T), k // T)``: the thread index compared bit by bit from its *lowest* bit, then the
  first point in that thread (see :func:`pointnet2_priority_order`);
* if every candidate is skipped, the kernel picks index 0.

The kernel's source writes each squared distance as a sum of products; nvcc's default ``--fmad=true`` may
contract those into fused multiply-adds, which can change the last bit of a distance. pcpt follows the
written (uncontracted) order, so the parity holds exactly whenever no two candidates are within one rounding
error of each other at a step, i.e. always for exact ties and for generic data.

Backends (same indices from both; :func:`fps_backend` says which one a call uses):

* ``"numba"``, for CPU tensors when numba is installed: the compiled kernels of
  :mod:`datapipes.fps_numba`, one cloud per thread with ``torch.get_num_threads()`` threads sharing the
  clouds of a batch, and no synchronisation inside a cloud's loop, so it stays fast on a busy machine. The
  first call of each dtype in a fresh install compiles the kernels (a few seconds) and caches them on disk.
  Clouds with NaN or infinite coordinates go to the torch backend.
* ``"torch"``, for every other device, for traced/compiled graphs, without numba, or with the environment
  variable ``PCPT_DISABLE_NUMBA=1``: all clouds advance together; the loop body is a handful of torch ops on
  preallocated, contiguous buffers (coordinates as ``(C, B, N)`` planes) and nothing synchronises with the
  host. On CPU the ``argmax`` is a two-level search (block maxima, then one block) because torch's CPU
  ``argmax`` is a scalar loop about 20x slower than ``amax``; elsewhere it is one ``argmax``. Each large op is
  one OpenMP parallel region, so on an oversubscribed CPU use ``torch.set_num_threads(1)``.

The parity tie-break costs nothing per step in either backend: the points are permuted once so that the
kernel's winner is the first maximum. ``benchmarks/bench_fps.py`` compares both backends with open3d.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from datapipes import fps_numba

__all__ = [
    "POINTNET2_INIT_SQDIST",
    "POINTNET2_MAX_THREADS",
    "POINTNET2_NEAR_ORIGIN_SQNORM",
    "farthest_point_sample",
    "fps_backend",
    "pointnet2_priority_order",
    "pointnet2_thread_count",
]

POINTNET2_MAX_THREADS = 512
"""``TOTAL_THREADS`` of pointnet2_ops: the largest thread block the FPS kernel is launched with."""
POINTNET2_INIT_SQDIST = 1e10
"""Initial running squared distance of pointnet2_ops' FPS (the ``temp`` buffer)."""
POINTNET2_NEAR_ORIGIN_SQNORM = 1e-3
"""Candidates with squared norm at most this are skipped by pointnet2_ops' FPS."""


def farthest_point_sample(
    xyz: Tensor,
    num_samples: int,
    *,
    start: int | Literal["random"] = 0,
    generator: torch.Generator | None = None,
    skip_near_origin: bool = False,
) -> Tensor:
    """Selects ``num_samples`` well-spread points per cloud by farthest point sampling.

    Args:
        xyz: Point coordinates, any float dtype, any device. Usually ``C = 3``; the default mode accepts any
            ``C >= 1`` (FPS in feature space), the parity mode needs ``C = 3``.
        num_samples: Points to select per cloud, ``1 <= num_samples <= N``.
        start: Index of the first point of every cloud (``0`` like pointnet2_ops, or any index in
            ``[0, N)``), or ``"random"`` for an independent uniform start per cloud drawn from ``generator``.
        generator: Random source for ``start="random"``; the draw happens on the generator's device (CPU by
            default) and is then moved to ``xyz.device``, so a seed gives the same samples on CPU and CUDA.
            ``None`` uses torch's default generator.
        skip_near_origin: Reproduce pointnet2_ops' ``furthest_point_sample`` exactly (near-origin skip,
            ``1e10`` initial distance, the kernel's tie-break); see the module docstring.

    Returns:
        Long indices into ``N`` in selection order, on ``xyz.device``. Not differentiable (indices).

    Shapes:
        xyz: (B, N, C).
        returns: (B, S), S = num_samples.

    Raises:
        ValueError: If ``xyz`` is not a 3-D float tensor, ``num_samples`` is not in ``[1, N]``, ``start`` is
            not a valid index or ``"random"``, or the parity mode gets ``C != 3``.
    """
    batch, num_points = _check_points(xyz, skip_near_origin=skip_near_origin)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise ValueError(f"num_samples must be an int, got {num_samples!r}")
    if not 1 <= num_samples <= num_points:
        raise ValueError(f"num_samples must be in [1, N={num_points}], got {num_samples}")
    first = _start_indices(start, batch, num_points, generator=generator, device=xyz.device)
    if fps_backend(xyz) == "numba":
        return _fps_numba(xyz.detach(), num_samples, first, skip_near_origin=skip_near_origin)
    with torch.inference_mode():
        if skip_near_origin:
            idx = _fps_pointnet2(xyz, num_samples, first)
        else:
            dtype = torch.float64 if xyz.dtype == torch.float64 else torch.float32
            idx = _fps_loop(xyz.to(dtype), num_samples, first, excluded=None, init_sqdist=math.inf)
    # A clone made outside inference mode is an ordinary tensor that autograd may save (e.g. for gather).
    return idx.clone()


def fps_backend(xyz: Tensor) -> Literal["numba", "torch"]:
    """The backend :func:`farthest_point_sample` uses for ``xyz`` (both give the same indices).

    ``"numba"`` for finite CPU tensors outside tracing / ``torch.compile`` when numba is installed and
    ``PCPT_DISABLE_NUMBA`` is unset (or ``"0"``); ``"torch"`` otherwise.

    Shapes:
        xyz: (B, N, C).
    """
    if xyz.device.type != "cpu" or not fps_numba.numba_enabled():
        return "torch"
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return "torch"
    return "numba" if bool(torch.isfinite(xyz).all()) else "torch"


def pointnet2_thread_count(num_points: int) -> int:
    """Thread-block size pointnet2_ops launches its FPS kernel with for clouds of ``num_points`` points.

    ``opt_n_threads`` computes ``max(min(1 << int(log(N) / log(2)), 512), 1)``; for every ``N`` up to the
    cap this equals ``2**floor(log2(N))``.

    Raises:
        ValueError: If ``num_points < 1``.
    """
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    return max(min(1 << (num_points.bit_length() - 1), POINTNET2_MAX_THREADS), 1)


def pointnet2_priority_order(num_points: int, *, device: torch.device | str | None = None) -> Tensor:
    """Point indices ordered by how pointnet2_ops' FPS kernel breaks ties, winner first.

    With ``T = pointnet2_thread_count(N)``, point ``k`` is scanned by thread ``k mod T`` in round
    ``k // T``. Each thread keeps its first strict maximum and the tree reduction keeps the lower slot on
    ties, so the priority is ``(bitreverse(k mod T), k // T)`` with the thread index reversed over
    ``log2(T)`` bits. For ``T = 4`` the thread order is 0, 2, 1, 3.

    Shapes:
        returns: (N,) long, a permutation of ``range(N)``.
    """
    threads = pointnet2_thread_count(num_points)
    bits = threads.bit_length() - 1
    tid = torch.arange(threads, device=device)
    reversed_tid = torch.zeros_like(tid)
    for bit in range(bits):
        reversed_tid |= ((tid >> bit) & 1) << (bits - 1 - bit)
    thread_order = torch.argsort(reversed_tid)
    rounds = -(-num_points // threads)
    order = thread_order[:, None] + threads * torch.arange(rounds, device=device)[None, :]
    order = order.reshape(-1)
    return order[order < num_points]


def _check_points(xyz: Tensor, *, skip_near_origin: bool) -> tuple[int, int]:
    if not isinstance(xyz, Tensor) or xyz.dim() != 3:
        shape = tuple(xyz.shape) if isinstance(xyz, Tensor) else type(xyz).__name__
        raise ValueError(f"xyz must be a (B, N, C) tensor, got {shape}")
    if not xyz.is_floating_point():
        raise ValueError(f"xyz must be a floating-point tensor, got dtype {xyz.dtype}")
    batch, num_points, channels = xyz.shape
    if channels < 1:
        raise ValueError(f"xyz must have at least one coordinate channel, got shape {tuple(xyz.shape)}")
    if skip_near_origin and channels != 3:
        raise ValueError(f"skip_near_origin=True needs xyz of shape (B, N, 3), got {tuple(xyz.shape)}")
    return batch, num_points


def _start_indices(
    start: int | Literal["random"],
    batch: int,
    num_points: int,
    *,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    if isinstance(start, str):
        if start != "random":
            raise ValueError(f"start must be an int index or 'random', got {start!r}")
        draw_device = generator.device if generator is not None else torch.device("cpu")
        first = torch.randint(num_points, (batch,), generator=generator, device=draw_device)
        return first.to(device)
    if isinstance(start, bool) or not isinstance(start, int):
        raise ValueError(f"start must be an int index or 'random', got {start!r}")
    if not 0 <= start < num_points:
        raise ValueError(f"start must be in [0, N={num_points}), got {start}")
    return torch.full((batch,), start, dtype=torch.long, device=device)


def _pointnet2_layout(xyz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The parity mode's float32 points in the kernel's tie priority, and which of them are skipped.

    Returns:
        ``order`` (N,) long (permuted position -> point index), ``permuted`` (B, N, 3) float32,
        ``excluded`` (B, N) bool: near-origin candidates, in permuted positions.
    """
    points = xyz.to(torch.float32)
    order = pointnet2_priority_order(points.shape[1], device=points.device)
    permuted = points[:, order]
    x, y, z = permuted.unbind(dim=-1)
    sqnorm = (x * x + y * y) + z * z  # float32, like the kernel's `mag`
    excluded = sqnorm.to(torch.float64) <= POINTNET2_NEAR_ORIGIN_SQNORM  # `mag <= 1e-3` compares as double
    return order, permuted, excluded


def _inverse(order: Tensor) -> Tensor:
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return position


def _fps_pointnet2(xyz: Tensor, num_samples: int, first: Tensor) -> Tensor:
    """Parity mode: permute to the kernel's tie priority, skip near-origin points, start at 1e10."""
    order, permuted, excluded = _pointnet2_layout(xyz)
    chosen = _fps_loop(
        permuted, num_samples, _inverse(order)[first], excluded=excluded, init_sqdist=POINTNET2_INIT_SQDIST
    )
    return order[chosen]


def _fps_numba(xyz: Tensor, num_samples: int, first: Tensor, *, skip_near_origin: bool) -> Tensor:
    """Both modes on the numba kernels (CPU); the parity mode permutes and skips exactly as the torch loop."""
    threads = torch.get_num_threads()
    if not skip_near_origin:
        dtype = torch.float64 if xyz.dtype == torch.float64 else torch.float32
        idx = fps_numba.fps_indices(xyz.to(dtype).numpy(), num_samples, first.numpy(), threads=threads)
        return torch.from_numpy(idx)
    order, permuted, excluded = _pointnet2_layout(xyz)
    chosen = fps_numba.fps_indices(
        permuted.numpy(),
        num_samples,
        _inverse(order)[first].numpy(),
        init_sqdist=float(np.float32(POINTNET2_INIT_SQDIST)),  # the torch loop's float32 buffer holds this
        excluded=excluded.numpy(),
        threads=threads,
    )
    return order[torch.from_numpy(chosen)]


def _block_size(num_points: int) -> int:
    """Block length of the two-level argmax: about sqrt(N), a power of two in [4, 256]."""
    return max(4, min(256, 1 << math.ceil(math.log2(math.sqrt(num_points)))))


def _fps_loop(
    points: Tensor,
    num_samples: int,
    first: Tensor,
    *,
    excluded: Tensor | None,
    init_sqdist: float,
    two_level_argmax: bool | None = None,
) -> Tensor:
    """Batched FPS core: running minimum squared distance, first maximum wins.

    Args:
        points: (B, N, C) coordinates in the compute dtype.
        num_samples: S.
        first: (B,) long start positions.
        excluded: (B, N) bool, candidates that are never chosen and never updated, or None.
        init_sqdist: Initial running distance of every candidate.
        two_level_argmax: find the first maximum through block maxima (fast on CPU; 11 ops a step for
            C = 3) rather than with one ``argmax`` (7 ops a step, best where each op is a kernel launch, e.g.
            CUDA); None picks the former on CPU only. Both give the same indices.

    Returns:
        (B, S) long positions into N.
    """
    batch, num_points, channels = points.shape
    device = points.device
    if two_level_argmax is None:
        two_level_argmax = device.type == "cpu"
    block = _block_size(num_points) if two_level_argmax else 1
    num_blocks = -(-num_points // block)
    padded = num_blocks * block

    # (C, B, N) planes: every op below runs over contiguous memory; padding is never chosen.
    planes = points.new_zeros(channels, batch, padded)
    planes[:, :, :num_points] = points.permute(2, 0, 1)
    min_sqdist = points.new_full((batch, padded), init_sqdist)
    min_sqdist[:, num_points:] = -math.inf
    if excluded is not None:
        min_sqdist[:, :num_points].masked_fill_(excluded, -math.inf)  # minimum(-inf, d) stays -inf
    diff = torch.empty_like(planes)
    sqdist = points.new_empty(batch, padded)

    def update(center: Tensor) -> None:
        """``min_sqdist = minimum(min_sqdist, ((d0*d0 + d1*d1) + d2*d2) + ...)``, d = planes - center."""
        torch.sub(planes, center, out=diff)
        diff.mul_(diff)
        if channels == 1:
            sqdist.copy_(diff[0])
        else:
            torch.add(diff[0], diff[1], out=sqdist)
            for channel in range(2, channels):
                sqdist.add_(diff[channel])
        torch.minimum(min_sqdist, sqdist, out=min_sqdist)

    if not two_level_argmax:
        current = first
        chosen = [current]
        for _ in range(num_samples - 1):
            update(planes.gather(2, current.view(1, batch, 1).expand(channels, batch, 1)))  # center (C, B, 1)
            current = min_sqdist.argmax(dim=1)  # documented: the first maximal index
            chosen.append(current)
        return torch.stack(chosen, dim=1)

    rows = points.new_zeros(batch, padded, channels)
    rows[:, :num_points] = points
    rows = rows.view(batch * padded, channels)
    blocks = min_sqdist.view(batch * num_blocks, block)
    block_view = min_sqdist.view(batch, num_blocks, block)
    row_start = torch.arange(batch, device=device) * padded
    block_start = torch.arange(batch, device=device) * num_blocks

    current = first + row_start  # flat positions into (B * padded)
    chosen = [current]
    for _ in range(num_samples - 1):
        update(rows.index_select(0, current).t().unsqueeze(2))  # center (C, B, 1)
        # First maximum: the first block holding the maximum, then the first maximum inside it.
        best_block = block_view.amax(dim=2).argmax(dim=1).add_(block_start)
        offset = blocks.index_select(0, best_block).argmax(dim=1)
        current = torch.add(offset, best_block, alpha=block)
        chosen.append(current)
    return torch.stack(chosen, dim=1).sub_(row_start.unsqueeze(1))
