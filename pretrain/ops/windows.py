"""Partitions of a sparse BEV token set into attention groups: FlatFormer flat groups and SST padded windows.

Tokens are non-empty pillars with int coordinates ``(batch, ix, iy)`` (see ``pretrain.ops.pillars``). The grid
is cut into windows of ``window = (wx, wy)`` cells; a shifted partition offsets the coordinates by half a
window, ``(wx // 2, wy // 2)``, before cutting (SST's shifted windows: (6, 6) for 12 × 12 windows). A token's
window is ``(ix + s) // wx`` and its cell inside the window ``(ix + s) % wx`` (same for y).

Two partitions:

- :func:`flat_groups` (FlatFormer, Liu et al., CVPR 2023): sort the tokens by window and by position inside
  the window, then cut each sample's sorted sequence into groups of exactly ``group_size`` slots. Only the
  last group of a sample has padding. Groups never span two samples.
- :func:`window_groups` (SST, Fan et al., CVPR 2022): one group per window, padded to the smallest bucket
  size that holds it (SST's ``drop_info``). A window with more tokens than the largest bucket is split into
  balanced chunks instead of dropping tokens as SST does.

Both return :class:`Partition` objects: ``index (G, S)`` token of each slot and ``valid (G, S)``. Every token
is in exactly one valid slot, and padding slots point at a valid token of their own group (so gathering
never reads outside the token set). Slot 0 of every group is valid.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_BUCKETS",
    "Partition",
    "flat_groups",
    "in_window_position",
    "padding_ratio",
    "window_groups",
    "window_sort_key",
]

#: GeoMAE's training ``drop_info``: windows of at most 56 tokens, or at most 144 (a full 12 × 12 window).
DEFAULT_BUCKETS = (56, 144)


class Partition(NamedTuple):
    """Tokens grouped into equal-size attention groups.

    Attributes:
        index: (G, S) int64 token index of each slot; a padding slot points at a valid token of its group.
        valid: (G, S) bool, False for padding slots.
    """

    index: Tensor  # type: ignore[assignment]  # shadows tuple.index, as the interface names it
    valid: Tensor


def _check_window(window: Sequence[int]) -> tuple[int, int]:
    if len(window) != 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in window):
        raise ValueError(f"window must be two positive ints (wx, wy), got {window!r}")
    return int(window[0]), int(window[1])


def _check_coords(coords: Tensor) -> None:
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must be (P, 3) (batch, ix, iy), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool:
        raise ValueError(f"coords must be an integer tensor, got {coords.dtype}")


def _window_parts(coords: Tensor, window: tuple[int, int], shift: bool) -> tuple[Tensor, Tensor]:
    """(P, 2) window index and (P, 2) cell inside the window, x then y."""
    wx, wy = window
    size = torch.tensor([wx, wy], dtype=torch.int64, device=coords.device)
    offset = size // 2 if shift else torch.zeros_like(size)
    shifted = coords[:, 1:3].long() + offset
    return torch.div(shifted, size, rounding_mode="floor"), torch.remainder(shifted, size)


def in_window_position(coords: Tensor, *, window: Sequence[int], shift: bool) -> Tensor:
    """Position of each token inside its window, centred as in SST: ``cell - w / 2``, x then y.

    Values lie in ``[-w/2, w/2 - 1]`` (cell units, not normalised), the input of SST's sine embedding.

    Args:
        coords: (P, 3) int ``(batch, ix, iy)``.
        window: ``(wx, wy)`` cells.
        shift: use the shifted windows.

    Returns:
        (P, 2) float32.
    """
    _check_coords(coords)
    win = _check_window(window)
    _, cell = _window_parts(coords, win, shift)
    half = torch.tensor(win, dtype=torch.float32, device=coords.device) / 2
    return cell.float() - half


def window_sort_key(
    coords: Tensor, *, window: Sequence[int], axis: Literal["x", "y"], shift: bool
) -> tuple[Tensor, Tensor]:
    """An int64 key whose order is (batch, window, cell in window), x-major or y-major.

    ``axis="x"`` sorts lexicographically by ``(batch, window_x, window_y, cell_x, cell_y)``: x is the major
    (slowest-varying) index of both the window order and the order inside a window. ``axis="y"`` swaps x and
    y. Keys are unique when the coordinates are.

    Args:
        coords: (P, 3) int ``(batch, ix, iy)`` with ``ix, iy >= 0``.
        window: ``(wx, wy)`` cells.
        axis: the major axis.
        shift: use the shifted windows.

    Returns:
        ``(key (P,) int64, window_key (P,) int64)``: the full key and the part naming (batch, window).

    Raises:
        ValueError: malformed coords, window or axis.
    """
    _check_coords(coords)
    wx, wy = _check_window(window)
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    win, cell = _window_parts(coords, (wx, wy), shift)
    batch = coords[:, 0].long()
    if coords.shape[0]:
        nwx, nwy = (int(v) + 1 for v in win.amax(0).tolist())
    else:
        nwx = nwy = 1
    if axis == "x":
        window_key = (batch * nwx + win[:, 0]) * nwy + win[:, 1]
        inner = cell[:, 0] * wy + cell[:, 1]
    else:
        window_key = (batch * nwy + win[:, 1]) * nwx + win[:, 0]
        inner = cell[:, 1] * wx + cell[:, 0]
    return window_key * (wx * wy) + inner, window_key


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, 0) - x


def _fill_partition(num_groups: int, size: int, flat_slot: Tensor, token: Tensor) -> Partition:
    """Writes ``token`` at ``flat_slot`` (group * size + slot) and points padding at slot 0 of its group."""
    device = token.device
    index = torch.zeros(num_groups * size, dtype=torch.int64, device=device)
    valid = torch.zeros(num_groups * size, dtype=torch.bool, device=device)
    index[flat_slot] = token
    valid[flat_slot] = True
    index, valid = index.view(num_groups, size), valid.view(num_groups, size)
    index = torch.where(valid, index, index[:, :1])
    return Partition(index=index, valid=valid)


def flat_groups(
    coords: Tensor,
    *,
    window: Sequence[int],
    group_size: int,
    axis: Literal["x", "y"],
    shift: bool,
) -> Partition:
    """FlatFormer's equal-size groups of window-sorted tokens.

    Tokens are sorted by :func:`window_sort_key` (batch, window, cell in window; ``axis`` major), and each
    sample's sorted sequence is cut into ``ceil(n_b / group_size)`` consecutive groups of ``group_size``
    slots; the last group of a sample is padded (slots marked invalid). Groups never span two samples, and
    groups are ordered by sample, then by sorted position.

    FlatFormer orders windows and cells in a serpentine (boustrophedon) order and pads by repeating tokens;
    pcpt sorts lexicographically and masks the padding.

    Args:
        coords: (P, 3) int ``(batch, ix, iy)``, unique rows, ``ix, iy >= 0``.
        window: ``(wx, wy)`` cells.
        group_size: S, slots per group.
        axis: ``"x"`` or ``"y"`` major order.
        shift: shift the windows by half a window.

    Returns:
        :class:`Partition` with ``index``/``valid`` of shape (G, S), G = sum over samples of
        ``ceil(n_b / S)``.

    Raises:
        ValueError: malformed arguments.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    key, _ = window_sort_key(coords, window=window, axis=axis, shift=shift)
    order = torch.sort(key, stable=True).indices
    num = coords.shape[0]
    if num == 0:
        return _fill_partition(0, group_size, order, order)
    batch = coords[order, 0].long()
    per_sample = torch.bincount(batch)
    groups = torch.div(per_sample + group_size - 1, group_size, rounding_mode="floor")
    rank = torch.arange(num, device=coords.device) - _exclusive_cumsum(per_sample)[batch]
    group = _exclusive_cumsum(groups)[batch] + torch.div(rank, group_size, rounding_mode="floor")
    flat_slot = group * group_size + rank % group_size
    return _fill_partition(int(groups.sum()), group_size, flat_slot, order)


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    values = tuple(buckets)
    if (
        not values
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values)
        or any(a >= b for a, b in itertools.pairwise(values))
    ):
        raise ValueError(f"buckets must be strictly increasing positive ints, got {buckets!r}")
    return values


def window_groups(
    coords: Tensor,
    *,
    window: Sequence[int],
    shift: bool,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> list[Partition]:
    """SST's padded windows: one group per window, padded to the smallest bucket that holds it.

    Tokens inside a window are in x-major cell order. A window with ``n`` tokens, more than the largest
    bucket ``S_max``, is split into ``k = ceil(n / S_max)`` balanced chunks of consecutive tokens (token of
    rank ``r`` goes to chunk ``floor(r * k / n)``; chunk sizes differ by at most one and are ``<= S_max``),
    each chunk attending on its own; SST drops those tokens instead. Every chunk (or whole window) then goes
    to the smallest bucket ``>= `` its size.

    Args:
        coords: (P, 3) int ``(batch, ix, iy)``, unique rows, ``ix, iy >= 0``.
        window: ``(wx, wy)`` cells.
        shift: shift the windows by half a window.
        buckets: strictly increasing slot counts (SST ``drop_info`` ``max_tokens``).

    Returns:
        One :class:`Partition` per bucket, in bucket order, of shape (G_k, buckets[k]); G_k may be 0.
        Groups inside a partition are ordered by (batch, window, chunk).

    Raises:
        ValueError: malformed arguments.
    """
    sizes = _check_buckets(buckets)
    key, window_key = window_sort_key(coords, window=window, axis="x", shift=shift)
    order = torch.sort(key, stable=True).indices
    device = coords.device
    num = coords.shape[0]
    if num == 0:
        return [_fill_partition(0, s, order, order) for s in sizes]
    _, win, per_window = torch.unique_consecutive(window_key[order], return_inverse=True, return_counts=True)
    rank = torch.arange(num, device=device) - _exclusive_cumsum(per_window)[win]
    largest = sizes[-1]
    chunks = torch.div(per_window + largest - 1, largest, rounding_mode="floor")  # k per window
    n, k = per_window[win], chunks[win]
    chunk = torch.div(rank * k, n, rounding_mode="floor")
    chunk_start = torch.div(chunk * n + k - 1, k, rounding_mode="floor")  # ceil(chunk * n / k)
    slot = rank - chunk_start
    chunk_id = _exclusive_cumsum(chunks)[win] + chunk
    chunk_size = torch.bincount(chunk_id, minlength=int(chunks.sum()))
    bucket = torch.searchsorted(torch.tensor(sizes, device=device), chunk_size)
    partitions = []
    for b, size in enumerate(sizes):
        in_bucket = bucket == b
        local = torch.cumsum(in_bucket.long(), 0) - 1  # group index of each chunk inside this bucket
        tokens = in_bucket[chunk_id]
        flat_slot = local[chunk_id[tokens]] * size + slot[tokens]
        partitions.append(_fill_partition(int(in_bucket.sum()), size, flat_slot, order[tokens]))
    return partitions


def padding_ratio(partitions: Sequence[Partition]) -> float:
    """Padding overhead of a partition: padded slots / tokens (0.0 without tokens)."""
    slots = sum(p.valid.numel() for p in partitions)
    tokens = sum(int(p.valid.sum()) for p in partitions)
    return (slots - tokens) / tokens if tokens else 0.0
