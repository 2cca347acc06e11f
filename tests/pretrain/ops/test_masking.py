"""Random and block patch masks (exact counts, nearest sets) and split_by_mask, with slow references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.ops.masking import block_group_mask, random_group_mask, split_by_mask

ratios = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


# ------------------------------------------------------------------------------------- random mask


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(0, 6), num_groups=st.integers(1, 80), ratio=ratios, seed=st.integers(0, 2**31))
def test_random_mask_has_exactly_floor_ratio_g_per_row(
    batch: int, num_groups: int, ratio: float, seed: int
) -> None:
    mask = random_group_mask(batch, num_groups, ratio, generator=torch.Generator().manual_seed(seed))
    assert mask.dtype == torch.bool
    assert mask.shape == (batch, num_groups)
    assert mask.sum(dim=1).tolist() == [int(ratio * num_groups)] * batch


def test_point_mae_count_is_floor() -> None:
    assert random_group_mask(3, 64, 0.6).sum(dim=1).tolist() == [38, 38, 38]
    assert random_group_mask(1, 100, 0.29).sum().item() == int(0.29 * 100) == 28


def test_random_mask_is_reproducible_and_roughly_uniform() -> None:
    a = random_group_mask(4000, 10, 0.3, generator=torch.Generator().manual_seed(0))
    b = random_group_mask(4000, 10, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    freq = a.float().mean(dim=0)
    assert torch.all((freq - 0.3).abs() < 0.03)  # each position masked ~30% of the time
    assert len({tuple(row.tolist()) for row in a}) == math.comb(10, 3)  # every subset occurs


def test_random_mask_device_argument() -> None:
    assert random_group_mask(2, 8, 0.5, device="cpu").device.type == "cpu"


# -------------------------------------------------------------------------------------- block mask


def slow_block_mask(centers: torch.Tensor, picked: list[int], counts: list[int]) -> torch.Tensor:
    """Per row: sort centres by (distance to the picked one, index), the picked one first; mask a prefix."""
    batch, num_groups, _ = centers.shape
    mask = torch.zeros(batch, num_groups, dtype=torch.bool)
    for b in range(batch):
        c = centers[b].tolist()
        p = c[picked[b]]

        def key(j: int, c: list = c, p: list = p, b: int = b) -> tuple[float, int]:
            d = sum((c[j][i] - p[i]) ** 2 for i in range(len(p)))
            return (-1.0 if j == picked[b] else d, j)

        for j in sorted(range(num_groups), key=key)[: counts[b]]:
            mask[b, j] = True
    return mask


def test_block_mask_is_the_nearest_set_fixed_ratio() -> None:
    centers = torch.randn(5, 32, 3, dtype=torch.float64)
    mask = block_group_mask(centers, 0.4, generator=torch.Generator().manual_seed(2))
    picked = torch.randint(32, (5,), generator=torch.Generator().manual_seed(2)).tolist()
    assert torch.equal(mask, slow_block_mask(centers, picked, [int(0.4 * 32)] * 5))


def test_block_mask_ratio_range_draws_one_ratio_per_row() -> None:
    centers = torch.randn(50, 64, 3)
    mask = block_group_mask(centers, (0.25, 0.45), generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    picked = torch.randint(64, (50,), generator=gen).tolist()
    rates = (0.25 + (0.45 - 0.25) * torch.rand(50, generator=gen, dtype=torch.float64)).tolist()
    counts = [int(r * 64) for r in rates]
    assert torch.equal(mask, slow_block_mask(centers, picked, counts))
    assert min(counts) >= int(0.25 * 64)
    assert max(counts) <= int(0.45 * 64)
    assert len(set(counts)) > 1


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), num_groups=st.integers(1, 40), ratio=ratios, seed=st.integers(0, 2**31))
def test_block_mask_property_counts_and_nearest(batch: int, num_groups: int, ratio: float, seed: int) -> None:
    centers = torch.randn(batch, num_groups, 3, generator=torch.Generator().manual_seed(seed))
    mask = block_group_mask(centers, ratio, generator=torch.Generator().manual_seed(seed))
    assert mask.sum(dim=1).tolist() == [int(ratio * num_groups)] * batch
    picked = torch.randint(num_groups, (batch,), generator=torch.Generator().manual_seed(seed))
    for b in range(batch):
        d = (centers[b] - centers[b, picked[b]]).square().sum(-1)
        if 0 < mask[b].sum() < num_groups:
            assert mask[b, picked[b]]
            assert d[mask[b]].max() <= d[~mask[b]].min()


def test_block_mask_picked_centre_comes_first_among_duplicates() -> None:
    centers = torch.zeros(1, 6, 3)  # all coincide
    mask = block_group_mask(centers, 1 / 6, generator=torch.Generator().manual_seed(0))
    picked = int(torch.randint(6, (1,), generator=torch.Generator().manual_seed(0)).item())
    assert mask.sum() == 1
    assert mask[0, picked]


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), (0.5, 0.2), (0.1, 1.2), (0.1,)])
def test_bad_ratio_raises_value_error(ratio: object) -> None:
    with pytest.raises(ValueError, match="ratio"):
        block_group_mask(torch.zeros(1, 4, 3), ratio)  # type: ignore[arg-type]
    if not isinstance(ratio, tuple):
        with pytest.raises(ValueError, match="ratio"):
            random_group_mask(1, 4, ratio)  # type: ignore[arg-type]


def test_bad_sizes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="batch"):
        random_group_mask(-1, 4, 0.5)
    with pytest.raises(ValueError, match="num_groups"):
        random_group_mask(1, 0, 0.5)
    with pytest.raises(ValueError, match="centers"):
        block_group_mask(torch.zeros(4, 3), 0.5)


# ---------------------------------------------------------------------------------- split_by_mask


def test_split_by_mask_keeps_order() -> None:
    tokens = torch.randn(3, 7, 5)
    mask = random_group_mask(3, 7, 0.5, generator=torch.Generator().manual_seed(1))
    kept, masked = split_by_mask(tokens, mask)
    assert kept.shape == (3, 4, 5)
    assert masked.shape == (3, 3, 5)
    for b in range(3):
        assert torch.equal(kept[b], torch.stack([tokens[b, g] for g in range(7) if not mask[b, g]]))
        assert torch.equal(masked[b], torch.stack([tokens[b, g] for g in range(7) if mask[b, g]]))


def test_split_by_mask_carries_trailing_axes_and_gradients() -> None:
    patches = torch.randn(2, 6, 4, 3, requires_grad=True)
    mask = random_group_mask(2, 6, 0.5, generator=torch.Generator().manual_seed(0))
    kept, masked = split_by_mask(patches, mask)
    assert kept.shape == (2, 3, 4, 3)
    assert masked.shape == (2, 3, 4, 3)
    masked.sum().backward()
    assert patches.grad is not None
    assert torch.equal(patches.grad[..., 0, 0] == 1, mask)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_split_by_mask_extremes(ratio: float) -> None:
    tokens = torch.randn(2, 5, 3)
    kept, masked = split_by_mask(tokens, random_group_mask(2, 5, ratio))
    assert kept.shape[1] + masked.shape[1] == 5
    assert torch.equal(kept if ratio == 0 else masked, tokens)
    kept, masked = split_by_mask(torch.zeros(0, 5, 3), torch.zeros(0, 5, dtype=torch.bool))
    assert kept.shape == (0, 5, 3)
    assert masked.shape == (0, 0, 3)


def test_split_by_mask_unequal_counts_names_them() -> None:
    mask = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        split_by_mask(torch.zeros(2, 3, 4), mask)


def test_split_by_mask_bad_mask() -> None:
    with pytest.raises(ValueError, match="bool"):
        split_by_mask(torch.zeros(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask"):
        split_by_mask(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.gpu
def test_masks_are_the_same_on_cuda() -> None:
    cpu = random_group_mask(4, 64, 0.6, generator=torch.Generator().manual_seed(0))
    gpu = random_group_mask(4, 64, 0.6, device="cuda", generator=torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu, gpu.cpu())
    centers = torch.randn(4, 64, 3)
    cpu = block_group_mask(centers, (0.25, 0.45), generator=torch.Generator().manual_seed(0))
    gpu = block_group_mask(centers.cuda(), (0.25, 0.45), generator=torch.Generator().manual_seed(0))
    assert torch.equal(cpu, gpu.cpu())


# ------------------------------------------------------------------------------------ random_segment_mask
def test_random_segment_mask_masks_the_floor_of_each_segments_share() -> None:
    from pretrain.ops.masking import random_segment_mask

    gen = torch.Generator().manual_seed(3)
    sizes = [1, 2, 7, 100, 0, 33]
    segment = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(sizes)])
    segment = segment[torch.randperm(segment.numel(), generator=gen)]  # any order
    mask = random_segment_mask(segment, 0.7, num_segments=len(sizes), generator=gen)
    for s, n in enumerate(sizes):
        assert int(mask[segment == s].sum()) == int(0.7 * n)


def test_random_segment_mask_is_seeded_and_uniform() -> None:
    from pretrain.ops.masking import random_segment_mask

    segment = torch.tensor([0] * 4 + [1] * 6)
    first = random_segment_mask(segment, 0.5, generator=torch.Generator().manual_seed(0))
    again = random_segment_mask(segment, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    counts = torch.zeros(10)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2000):
        counts += random_segment_mask(segment, 0.5, generator=gen).float()
    # every token of segment 0 is masked with probability 2/4, of segment 1 with 3/6
    assert torch.allclose(counts / 2000, torch.full((10,), 0.5), atol=0.05)


def test_random_segment_mask_rejects_bad_segments() -> None:
    from pretrain.ops.masking import random_segment_mask

    with pytest.raises(ValueError, match="1-D integer"):
        random_segment_mask(torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        random_segment_mask(torch.tensor([0, -1]), 0.5)
