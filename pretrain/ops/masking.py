"""Patch masks for masked point modelling (Point-MAE random masks, Point-BERT block masks).

All masks are bool ``(B, G)`` with True = masked. Random numbers are drawn on the generator's device (CPU
unless a CUDA generator is passed) and then moved to the target device, so a seed gives the same mask on
CPU and CUDA. Counts follow the official code: ``int(ratio * G)`` (floor).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["block_group_mask", "random_group_mask", "random_segment_mask", "split_by_mask"]


def random_group_mask(
    batch: int,
    num_groups: int,
    ratio: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Uniformly random mask with exactly ``int(ratio * G)`` masked groups per row (Point-MAE "rand").

    Every subset of that size is equally likely, independently per row (the official code shuffles a 0/1
    vector with numpy; pcpt argsorts uniform noise drawn from ``generator``).

    Args:
        batch: B, rows (``>= 0``).
        num_groups: G, groups per row (``>= 1``).
        ratio: Masked fraction in ``[0, 1]``; Point-MAE uses 0.6 (38 of 64).
        device: Device of the returned mask (default CPU).
        generator: Random source; ``None`` uses torch's default generator.

    Shapes:
        returns: (B, G) bool.

    Raises:
        ValueError: If ``batch < 0``, ``num_groups < 1`` or ``ratio`` is not in ``[0, 1]``.
    """
    _check_count("batch", batch, minimum=0)
    _check_count("num_groups", num_groups, minimum=1)
    _check_ratio("ratio", ratio)
    num_masked = int(ratio * num_groups)
    draw_device = _draw_device(generator)
    noise = torch.rand(batch, num_groups, generator=generator, device=draw_device)
    order = noise.argsort(dim=1)[:, :num_masked]
    mask = torch.zeros(batch, num_groups, dtype=torch.bool, device=draw_device)
    return mask.scatter_(1, order, True).to(device if device is not None else "cpu")


def random_segment_mask(
    segment: Tensor,
    ratio: float,
    *,
    num_segments: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Uniformly random mask of ``int(ratio * n_s)`` tokens in every segment of a packed token set.

    The sparse analogue of :func:`random_group_mask` for samples with different token counts, e.g. the
    non-empty pillars of LiDAR scans (GeoMAE's ``get_vanilla_mask_index``: 70 % of each scan's pillars).

    Args:
        segment: (P,) long sample index of every token (any order).
        ratio: masked fraction in ``[0, 1]``, floored per segment.
        num_segments: number of segments (default ``segment.max() + 1``).
        generator: random source (drawn on its device, then moved to ``segment``'s device).

    Shapes:
        returns: (P,) bool, True = masked.

    Raises:
        ValueError: ``segment`` is not 1-D integer, has negative entries, or ``ratio`` is not in ``[0, 1]``.
    """
    _check_ratio("ratio", ratio)
    if segment.ndim != 1 or segment.dtype.is_floating_point or segment.dtype == torch.bool:
        raise ValueError(f"segment must be a 1-D integer tensor, got {segment.dtype} {tuple(segment.shape)}")
    if segment.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=segment.device)
    if int(segment.min()) < 0:
        raise ValueError("segment indices must be >= 0")
    count = num_segments if num_segments is not None else int(segment.max()) + 1
    noise = torch.rand(segment.numel(), generator=generator, device=_draw_device(generator))
    seg = segment.to(noise.device)
    order = noise.argsort()
    order = order[seg[order].argsort(stable=True)]  # grouped by segment, random order inside each
    sizes = torch.bincount(seg, minlength=count)
    starts = sizes.cumsum(0) - sizes
    rank = torch.arange(seg.numel(), device=seg.device) - starts[seg[order]]
    quota = (sizes.double() * ratio).floor().long()
    mask = torch.zeros(seg.numel(), dtype=torch.bool, device=seg.device)
    mask[order] = rank < quota[seg[order]]
    return mask.to(segment.device)


def block_group_mask(
    centers: Tensor,
    ratio: float | tuple[float, float],
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Block mask: per row, the ``int(r * G)`` groups whose centres are nearest a random centre.

    Point-BERT's ``_mask_center_block`` (also Point-MAE's ``mask_type: block``): pick a centre uniformly at
    random, sort all centres by distance to it and mask the nearest ``int(r * G)``, the picked centre
    included (it always comes first, even if another centre coincides with it; other ties go to the lower
    index). ``r`` is fixed, or drawn per row from ``U(lo, hi)`` when a tuple is given (Point-BERT uses
    ``(0.25, 0.45)``), in which case the count varies between rows: use the mask to replace tokens, not with
    :func:`split_by_mask`.

    Random draws, in this order, from ``generator`` on its device: the picked centre per row
    (``randint``), then, for a tuple, ``r`` per row as ``lo + (hi - lo) * rand`` in float64.

    Args:
        centers: Patch centres, any float dtype and device.
        ratio: Masked fraction in ``[0, 1]``, or ``(lo, hi)`` with ``0 <= lo <= hi <= 1``.
        generator: Random source; ``None`` uses torch's default generator.

    Shapes:
        centers: (B, G, C).
        returns: (B, G) bool on ``centers.device``.

    Raises:
        ValueError: If ``centers`` is not 3-D with ``G >= 1`` or the ratio is out of range.
    """
    if not isinstance(centers, Tensor) or centers.dim() != 3 or centers.shape[1] < 1:
        shape = tuple(centers.shape) if isinstance(centers, Tensor) else type(centers).__name__
        raise ValueError(f"centers must be a (B, G, C) tensor with G >= 1, got {shape}")
    if isinstance(ratio, tuple):
        if len(ratio) != 2:
            raise ValueError(f"ratio must be a float or a (lo, hi) pair, got {ratio!r}")
        low, high = ratio
        _check_ratio("ratio[0]", low)
        _check_ratio("ratio[1]", high)
        if low > high:
            raise ValueError(f"ratio must satisfy lo <= hi, got {ratio!r}")
    else:
        _check_ratio("ratio", ratio)
    batch, num_groups, _ = centers.shape
    device = centers.device
    draw_device = _draw_device(generator)
    picked = torch.randint(num_groups, (batch,), generator=generator, device=draw_device)
    if isinstance(ratio, tuple):
        rates = low + (high - low) * torch.rand(
            batch, generator=generator, device=draw_device, dtype=torch.float64
        )
        counts = torch.floor(rates * num_groups).long()
    else:
        counts = torch.full((batch,), int(ratio * num_groups), dtype=torch.long, device=draw_device)
    picked, counts = picked.to(device), counts.to(device)

    with torch.no_grad():
        rows = torch.arange(batch, device=device)
        diff = centers - centers[rows, picked].unsqueeze(1)
        sqdist = diff[..., 0].square()
        for channel in range(1, diff.shape[-1]):
            sqdist = sqdist + diff[..., channel].square()
        sqdist[rows, picked] = -1.0  # the picked centre first, even among coincident centres
        order = sqdist.argsort(dim=1, stable=True)
    rank_masked = torch.arange(num_groups, device=device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.zeros(batch, num_groups, dtype=torch.bool, device=device).scatter_(1, order, rank_masked)


def split_by_mask(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Splits groups into kept (mask False) and masked (mask True) ones, keeping their order.

    Every row must mask the same number ``M`` of groups (as :func:`random_group_mask` and a fixed-ratio
    :func:`block_group_mask` do). Extra trailing axes are carried along, so per-patch points
    ``(B, G, K, 3)`` split the same way as tokens ``(B, G, D)``. Differentiable in ``tokens``.

    Shapes:
        tokens: (B, G, *F), e.g. (B, G, D).
        mask: (B, G) bool.
        returns: kept (B, G - M, *F), masked (B, M, *F).

    Raises:
        ValueError: If the shapes do not match, ``mask`` is not bool, or rows mask different numbers of
            groups (the counts are named).
    """
    if tokens.dim() < 2:
        raise ValueError(f"tokens must be (B, G, ...), got {tuple(tokens.shape)}")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"mask must be a bool tensor of shape (B, G) = {tuple(tokens.shape[:2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    batch, num_groups = mask.shape
    rest = tokens.shape[2:]
    if batch == 0:
        return tokens, tokens[:, :0]
    counts = mask.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            "split_by_mask needs the same number of masked groups in every row, "
            f"got per-row counts {counts.tolist()}"
        )
    num_masked = int(counts[0])
    kept = tokens[~mask].reshape(batch, num_groups - num_masked, *rest)
    masked = tokens[mask].reshape(batch, num_masked, *rest)
    return kept, masked


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _check_count(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
