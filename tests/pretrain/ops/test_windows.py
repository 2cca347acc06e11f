from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from pretrain.ops.windows import (
    Partition,
    flat_groups,
    in_window_position,
    padding_ratio,
    window_groups,
    window_sort_key,
)


def sparse_coords(
    gen: torch.Generator, counts: tuple[int, ...] = (37, 0, 150, 5), grid: tuple[int, int] = (20, 17)
) -> torch.Tensor:
    """Unique random (batch, ix, iy) rows, ``counts[b]`` per sample, in a shuffled order."""
    rows = []
    for b, n in enumerate(counts):
        cells = torch.randperm(grid[0] * grid[1], generator=gen)[:n]
        rows.append(torch.stack([torch.full((n,), b), cells // grid[1], cells % grid[1]], dim=1))
    coords = torch.cat(rows)
    return coords[torch.randperm(len(coords), generator=gen)]


def _slow_key(row: list[int], window: tuple[int, int], axis: str, shift: bool) -> tuple[int, ...]:
    b, ix, iy = row
    sx, sy = (window[0] // 2, window[1] // 2) if shift else (0, 0)
    wx, wy = (ix + sx) // window[0], (iy + sy) // window[1]
    cx, cy = (ix + sx) % window[0], (iy + sy) % window[1]
    return (b, wx, wy, cx, cy) if axis == "x" else (b, wy, wx, cy, cx)


def _check_covers_once(parts: list[Partition], coords: torch.Tensor) -> None:
    tokens = torch.cat([p.index[p.valid] for p in parts])
    assert torch.equal(tokens.sort().values, torch.arange(len(coords)))
    for part in parts:
        assert part.index.dtype == torch.int64
        assert part.valid.dtype == torch.bool
        if part.index.numel() == 0:
            continue
        assert part.valid[:, 0].all()
        assert ((part.index >= 0) & (part.index < len(coords))).all()
        # padding points at a token of its own group, and no group spans two samples
        batch = coords[part.index, 0]
        assert (batch == batch[:, :1]).all()
        assert torch.isin(part.index[~part.valid], part.index[part.valid]).all()


CASES = [(axis, shift) for axis in ("x", "y") for shift in (False, True)]


@pytest.mark.parametrize(("axis", "shift"), CASES)
def test_flat_groups_cover_every_token_once(gen: torch.Generator, axis: str, shift: bool) -> None:
    coords = sparse_coords(gen)
    part = flat_groups(coords, window=(4, 3), group_size=7, axis=axis, shift=shift)  # type: ignore[arg-type]
    _check_covers_once([part], coords)
    assert part.index.shape[1] == 7
    expected_groups = sum(math.ceil(n / 7) for n in (37, 0, 150, 5))
    assert part.index.shape[0] == expected_groups


@pytest.mark.parametrize(("axis", "shift"), CASES)
def test_flat_groups_match_slow_sorted_reference(gen: torch.Generator, axis: str, shift: bool) -> None:
    coords = sparse_coords(gen, counts=(30, 12, 0, 41))
    window, size = (5, 4), 8
    part = flat_groups(coords, window=window, group_size=size, axis=axis, shift=shift)  # type: ignore[arg-type]
    rows = coords.tolist()
    order = sorted(range(len(rows)), key=lambda i: _slow_key(rows[i], window, axis, shift))
    expected: list[list[int]] = []
    for b in sorted({r[0] for r in rows}):
        seq = [i for i in order if rows[i][0] == b]
        expected += [seq[i : i + size] for i in range(0, len(seq), size)]
    got = [part.index[g][part.valid[g]].tolist() for g in range(part.index.shape[0])]
    assert got == expected
    # equal-size groups: only the last group of each sample is padded
    sample = [rows[group[0]][0] for group in expected]
    for g, n in enumerate(part.valid.sum(1).tolist()):
        is_last = g == len(sample) - 1 or sample[g + 1] != sample[g]
        assert n == size or is_last, (g, n)


def test_window_sort_key_orders_as_reference(gen: torch.Generator) -> None:
    coords = sparse_coords(gen, counts=(25, 25))
    for axis, shift in CASES:
        key, window_key = window_sort_key(coords, window=(3, 6), axis=axis, shift=shift)  # type: ignore[arg-type]
        slow = [_slow_key(r, (3, 6), axis, shift) for r in coords.tolist()]
        assert key.argsort().tolist() == sorted(range(len(slow)), key=lambda i: slow[i])
        same_window = {
            (i, j) for i in range(len(slow)) for j in range(len(slow)) if slow[i][:3] == slow[j][:3]
        }
        same_key = {
            (i, j) for i in range(len(slow)) for j in range(len(slow)) if window_key[i] == window_key[j]
        }
        assert same_window == same_key
        assert len(set(key.tolist())) == len(slow)


@pytest.mark.parametrize("shift", [False, True])
def test_window_groups_cover_every_token_once(gen: torch.Generator, shift: bool) -> None:
    coords = sparse_coords(gen)
    parts = window_groups(coords, window=(4, 4), shift=shift, buckets=(4, 16))
    assert [p.index.shape[1] for p in parts] == [4, 16]
    _check_covers_once(parts, coords)
    # one group per window; each window in the smallest bucket that holds it
    windows: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, row in enumerate(coords.tolist()):
        windows[_slow_key(row, (4, 4), "x", shift)[:3]].append(i)
    got = sorted(sorted(p.index[g][p.valid[g]].tolist()) for p in parts for g in range(p.index.shape[0]))
    assert got == sorted(sorted(v) for v in windows.values())
    for part, (lo, hi) in zip(parts, [(1, 4), (5, 16)]):
        counts = part.valid.sum(1)
        assert ((counts >= lo) & (counts <= hi)).all()


def test_window_groups_split_oversized_windows_into_balanced_chunks() -> None:
    ix, iy = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    full = torch.stack([torch.zeros(16, dtype=torch.int64), ix.flatten(), iy.flatten()], 1)  # one full window
    coords = torch.cat(
        [full, torch.tensor([[1, 0, 0], [1, 1, 1], [1, 2, 2], [1, 3, 3], [1, 0, 3], [1, 3, 0]])]
    )
    parts = window_groups(coords, window=(4, 4), shift=False, buckets=(3, 5))
    _check_covers_once(parts, coords)
    sizes = sorted(int(n) for p in parts for n in p.valid.sum(1))
    assert sizes == [3, 3, 4, 4, 4, 4]  # 16 -> 4 chunks of 4 (ceil(16 / 5) = 4); 6 -> 2 chunks of 3
    chunks = [p.index[g][p.valid[g]].tolist() for p in parts for g in range(p.index.shape[0])]
    first_window = sorted(c for c in chunks if coords[c[0], 0] == 0)
    # chunks are runs of consecutive tokens in x-major cell order
    assert [sorted((int(coords[i, 1]), int(coords[i, 2])) for i in c) for c in first_window] == [
        [(x, y) for x in (k,) for y in range(4)] for k in range(4)
    ]


def test_flat_and_padded_agree_on_full_aligned_windows() -> None:
    ix, iy = torch.meshgrid(torch.arange(8), torch.arange(4), indexing="ij")
    one = torch.stack([ix.flatten(), iy.flatten()], 1)
    coords = torch.cat([torch.cat([torch.full((32, 1), b), one], 1) for b in range(2)])
    flat = flat_groups(coords, window=(4, 4), group_size=16, axis="x", shift=False)
    (padded,) = window_groups(coords, window=(4, 4), shift=False, buckets=(16,))
    assert flat.valid.all()
    assert padded.valid.all()
    assert sorted(map(sorted, flat.index.tolist())) == sorted(map(sorted, padded.index.tolist()))
    assert padding_ratio([flat]) == padding_ratio([padded]) == 0.0


def test_in_window_position() -> None:
    coords = torch.tensor([[0, 0, 0], [0, 5, 11], [3, 12, 7], [1, 17, 6]])
    torch.testing.assert_close(
        in_window_position(coords, window=(12, 12), shift=False),
        torch.tensor([[-6.0, -6.0], [-1.0, 5.0], [-6.0, 1.0], [-1.0, 0.0]]),
    )
    torch.testing.assert_close(
        in_window_position(coords, window=(12, 12), shift=True),
        torch.tensor([[0.0, 0.0], [5.0, -1.0], [0.0, -5.0], [5.0, -6.0]]),
    )
    pos = in_window_position(sparse_coords(torch.Generator().manual_seed(1)), window=(5, 4), shift=True)
    assert pos[:, 0].min() >= -2.5
    assert pos[:, 0].max() <= 1.5
    assert pos[:, 1].min() >= -2
    assert pos[:, 1].max() <= 1


def test_empty_token_set_and_padding_ratio() -> None:
    empty = torch.zeros(0, 3, dtype=torch.int64)
    part = flat_groups(empty, window=(4, 4), group_size=8, axis="y", shift=True)
    assert part.index.shape == part.valid.shape == (0, 8)
    assert [p.index.shape for p in window_groups(empty, window=(4, 4), shift=False)] == [(0, 56), (0, 144)]
    assert padding_ratio([part]) == 0.0
    coords = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 2, 0]])
    assert padding_ratio([flat_groups(coords, window=(4, 4), group_size=4, axis="x", shift=False)]) == 1 / 3


def test_bad_arguments() -> None:
    coords = torch.tensor([[0, 0, 0]])
    with pytest.raises(ValueError, match="window"):
        flat_groups(coords, window=(0, 4), group_size=4, axis="x", shift=False)
    with pytest.raises(ValueError, match="group_size"):
        flat_groups(coords, window=(4, 4), group_size=0, axis="x", shift=False)
    with pytest.raises(ValueError, match="axis"):
        flat_groups(coords, window=(4, 4), group_size=4, axis="z", shift=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="buckets"):
        window_groups(coords, window=(4, 4), shift=False, buckets=(16, 8))
    with pytest.raises(ValueError, match="buckets"):
        window_groups(coords, window=(4, 4), shift=False, buckets=())
    with pytest.raises(ValueError, match="integer"):
        in_window_position(coords.float(), window=(4, 4), shift=False)
    with pytest.raises(ValueError, match=r"\(P, 3\)"):
        in_window_position(coords[:, :2], window=(4, 4), shift=False)
