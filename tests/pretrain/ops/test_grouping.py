"""gather_points and group_points against per-point loops (FPS + sorted kNN, Point-MAE's Group)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.ops.grouping import PatchGroups, gather_points, group_points
from pretrain.ops.sampling import farthest_point_sample
from tests.pretrain.ops.reference import slow_fps, slow_knn, sphere_cloud


def test_gather_points_matches_loops() -> None:
    x = torch.randn(2, 10, 4)
    idx = torch.randint(10, (2, 3, 5))
    out = gather_points(x, idx)
    assert out.shape == (2, 3, 5, 4)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                assert torch.equal(out[b, i, j], x[b, idx[b, i, j]])
    assert gather_points(x, idx[:, 0]).shape == (2, 5, 4)


def test_gather_points_is_differentiable() -> None:
    x = torch.randn(1, 4, 2, requires_grad=True)
    gather_points(x, torch.tensor([[1, 1, 3]])).sum().backward()
    assert x.grad is not None
    assert x.grad[0, :, 0].tolist() == [0.0, 2.0, 0.0, 1.0]


def test_group_points_matches_reference() -> None:
    clouds = np.stack([sphere_cloud(seed, 120) for seed in range(3)])
    xyz = torch.from_numpy(clouds)
    groups = group_points(xyz, 10, 8)
    assert isinstance(groups, PatchGroups)
    assert groups.centers.shape == (3, 10, 3)
    assert groups.neighborhoods.shape == (3, 10, 8, 3)
    assert groups.idx.shape == (3, 10, 8)
    assert groups.center_idx.shape == (3, 10)
    for b in range(3):
        center_idx = slow_fps(clouds[b], 10)
        centers = clouds[b, center_idx]
        _, idx = slow_knn(centers[None], clouds[b][None], 8)
        assert groups.center_idx[b].tolist() == center_idx
        np.testing.assert_array_equal(groups.centers[b].numpy(), centers)
        np.testing.assert_array_equal(groups.idx[b].numpy(), idx[0])
        np.testing.assert_array_equal(groups.neighborhoods[b].numpy(), clouds[b][idx[0]] - centers[:, None])


def test_slot_zero_is_the_centre() -> None:
    groups = group_points(torch.randn(4, 256, 3), 32, 16)
    assert torch.equal(groups.idx[..., 0], groups.center_idx)
    assert torch.all(groups.neighborhoods[:, :, 0] == 0)


def test_parity_flags_reach_fps() -> None:
    xyz = torch.from_numpy(np.stack([sphere_cloud(seed, 64, near_origin=8) for seed in range(2)]))
    groups = group_points(xyz, 12, 4, skip_near_origin=True)
    assert torch.equal(groups.center_idx, farthest_point_sample(xyz, 12, skip_near_origin=True))
    a = group_points(xyz, 12, 4, fps_start="random", generator=torch.Generator().manual_seed(7))
    b = farthest_point_sample(xyz, 12, start="random", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.center_idx, b)
    assert torch.equal(group_points(xyz, 12, 4, fps_start=5).center_idx[:, 0], torch.tensor([5, 5]))


def test_float64_and_gradients() -> None:
    xyz = torch.randn(2, 50, 3, dtype=torch.float64, requires_grad=True)
    groups = group_points(xyz, 5, 6)
    assert groups.centers.dtype == groups.neighborhoods.dtype == torch.float64
    (groups.neighborhoods.square().sum() + groups.centers.sum()).backward()
    assert xyz.grad is not None
    assert torch.isfinite(xyz.grad).all()


def test_patch_groups_is_frozen() -> None:
    groups = group_points(torch.randn(1, 8, 3), 2, 2)
    with pytest.raises(AttributeError):
        groups.idx = groups.idx  # type: ignore[misc]


@pytest.mark.parametrize(
    ("shape", "num_groups", "group_size", "match"),
    [
        ((2, 10, 3), 11, 4, "num_groups"),
        ((2, 10, 3), 0, 4, "num_groups"),
        ((2, 10, 3), 4, 11, "group_size"),
        ((2, 10, 2), 4, 4, "xyz"),
        ((10, 3), 4, 4, "xyz"),
    ],
)
def test_bad_arguments_raise_value_error(shape: tuple, num_groups: int, group_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        group_points(torch.zeros(shape), num_groups, group_size)
