"""Batched scene augmentation and range filter against per-scene / per-point loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.ops.scene_augment import augment_scenes, range_filter, scene_transforms


def scenes(batch: int = 4, points: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scenes with a few NaN padding rows per scene (and a zero padding row in scene 0)."""
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.randn(batch, points, 3, generator=gen) * torch.tensor([20.0, 20.0, 2.0])
    valid = torch.ones(batch, points, dtype=torch.bool)
    for b in range(batch):
        valid[b, points - 1 - b :] = False
    xyz[~valid] = float("nan")
    xyz[0, -1] = 0.0  # invalid but not NaN
    return xyz, valid


def slow_augment(points: np.ndarray, valid: np.ndarray, draws: np.ndarray, rotation, scale, flip_x, flip_y):
    out = points.astype(np.float64).copy()
    for b in range(len(points)):
        theta = rotation * (2 * draws[b, 0] - 1)
        s = scale[0] + (scale[1] - scale[0]) * draws[b, 1]
        for n in range(points.shape[1]):
            if not valid[b, n]:
                continue
            x, y, z = points[b, n].astype(np.float64)
            x, y = x * math.cos(theta) - y * math.sin(theta), x * math.sin(theta) + y * math.cos(theta)
            x, y, z = x * s, y * s, z * s
            if draws[b, 2] < flip_x:
                x = -x
            if draws[b, 3] < flip_y:
                y = -y
            out[b, n] = (x, y, z)
    return out


@pytest.mark.parametrize(
    ("rotation", "scale", "flip_x", "flip_y"),
    [(0.3925, (0.95, 1.05), 0.5, 0.5), (math.pi, (0.5, 2.0), 0.2, 0.9), (0.0, (1.0, 1.0), 0.0, 0.0)],
)
def test_augment_scenes_matches_loops(rotation, scale, flip_x, flip_y) -> None:
    xyz, valid = scenes(batch=8)
    gen = torch.Generator().manual_seed(4)
    got = augment_scenes(
        xyz, valid, generator=gen, rotation=rotation, scale=scale, flip_x=flip_x, flip_y=flip_y
    )
    draws = torch.rand(8, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64).numpy()
    want = slow_augment(xyz.numpy(), valid.numpy(), draws, rotation, scale, flip_x, flip_y)
    np.testing.assert_allclose(got[valid].numpy(), want[valid.numpy()], rtol=1e-5, atol=1e-4)
    assert got.dtype == xyz.dtype
    assert got.shape == xyz.shape


def test_rotation_preserves_xy_norms_and_z() -> None:
    xyz, valid = scenes()
    got = augment_scenes(
        xyz, valid, generator=torch.Generator().manual_seed(0), scale=(1.0, 1.0), flip_x=0.0, flip_y=0.0
    )
    torch.testing.assert_close(
        got[valid][:, :2].norm(dim=-1), xyz[valid][:, :2].norm(dim=-1), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(got[valid][:, 2], xyz[valid][:, 2])
    angle = torch.atan2(got[..., 1], got[..., 0]) - torch.atan2(xyz[..., 1], xyz[..., 0])
    angle = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
    for b in range(len(xyz)):  # one angle per scene, within the range
        spread = angle[b][valid[b]]
        assert spread.abs().max() <= 0.3925 + 1e-5
        torch.testing.assert_close(spread, spread[:1].expand_as(spread), atol=1e-4, rtol=0)


def test_flips_negate_the_documented_axis() -> None:
    xyz, valid = scenes()
    fixed = {"rotation": 0.0, "scale": (1.0, 1.0), "generator": torch.Generator().manual_seed(0)}
    x_only = augment_scenes(xyz, valid, flip_x=1.0, flip_y=0.0, **fixed)  # type: ignore[arg-type]
    assert torch.equal(x_only[valid], xyz[valid] * torch.tensor([-1.0, 1.0, 1.0]))
    y_only = augment_scenes(xyz, valid, flip_x=0.0, flip_y=1.0, **fixed)  # type: ignore[arg-type]
    assert torch.equal(y_only[valid], xyz[valid] * torch.tensor([1.0, -1.0, 1.0]))
    draws = torch.tensor([[0.5, 0.0, 0.3, 0.7], [0.5, 0.0, 0.7, 0.3]], dtype=torch.float64)
    maps = scene_transforms(draws, scale=(1.0, 1.0), flip_x=0.5, flip_y=0.5)
    torch.testing.assert_close(maps[0], torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)))
    torch.testing.assert_close(maps[1], torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)))


def test_scale_is_isotropic_and_in_range() -> None:
    xyz, valid = scenes()
    got = augment_scenes(
        xyz,
        valid,
        generator=torch.Generator().manual_seed(1),
        rotation=0.0,
        scale=(0.5, 2.0),
        flip_x=0,
        flip_y=0,
    )
    ratio = got[valid] / xyz[valid]
    assert ratio.min() >= 0.5 - 1e-6
    assert ratio.max() <= 2.0 + 1e-6
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5, atol=0)


def test_padding_rows_are_untouched() -> None:
    xyz, valid = scenes()
    got = augment_scenes(xyz, valid, generator=torch.Generator().manual_seed(2))
    assert torch.isnan(got[~valid]).sum() == torch.isnan(xyz[~valid]).sum() > 0
    assert torch.equal(got[0, -1], torch.zeros(3))  # the zero padding row stays zero
    assert not torch.isnan(got[valid]).any()


def test_same_seed_same_result_and_scenes_draw_differently() -> None:
    xyz, valid = scenes()
    a = augment_scenes(xyz, valid, generator=torch.Generator().manual_seed(9))
    b = augment_scenes(xyz, valid, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.nan_to_num(), b.nan_to_num())
    c = augment_scenes(xyz, valid, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(a.nan_to_num(), c.nan_to_num())
    same = xyz[:1].expand(4, -1, -1)  # four copies of one scene get four different transforms
    out = augment_scenes(same, valid[:1].expand(4, -1), generator=torch.Generator().manual_seed(9))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(out[i, :10], out[j, :10])


def test_generator_draws_equal_explicit_draws() -> None:
    xyz, valid = scenes()
    a = augment_scenes(xyz, valid, generator=torch.Generator().manual_seed(5))
    draws = torch.rand(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    b = augment_scenes(xyz, valid, draws=draws)
    assert torch.equal(a.nan_to_num(), b.nan_to_num())
    with pytest.raises(ValueError, match="draws"):
        augment_scenes(xyz, valid, draws=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="valid"):
        augment_scenes(xyz, valid[:, :-1])


def test_range_filter_matches_loops() -> None:
    point_range = (-2.0, -1.0, -0.5, 2.0, 1.0, 0.5)
    gen = torch.Generator().manual_seed(0)
    xyz = torch.rand(3, 50, 3, generator=gen) * 6 - 3
    xyz[0, 0] = torch.tensor([-2.0, -1.0, -0.5])  # min corner: inside
    xyz[0, 1] = torch.tensor([2.0, 0.0, 0.0])  # on x_max: outside
    xyz[0, 2] = torch.tensor([0.0, 0.0, 0.5])  # on z_max: outside
    xyz[1, 3] = float("nan")
    valid = torch.rand(3, 50, generator=gen) > 0.2
    valid[0, :3] = True
    got = range_filter(xyz, valid, point_range)
    assert got.dtype == torch.bool
    assert got.shape == (3, 50)
    for b in range(3):
        for n in range(50):
            p = xyz[b, n].tolist()
            inside = all(point_range[a] <= p[a] < point_range[a + 3] for a in range(3))
            assert bool(got[b, n]) == (inside and bool(valid[b, n]))
    assert got[0, :3].tolist() == [True, False, False]
    assert not got[1, 3]
    with pytest.raises(ValueError, match="point_range"):
        range_filter(xyz, valid, point_range[:4])


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    xyz, valid = scenes()
    cpu = augment_scenes(xyz, valid, generator=torch.Generator().manual_seed(3))
    gpu = augment_scenes(xyz.cuda(), valid.cuda(), generator=torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, equal_nan=True)
    point_range = (-10.0, -10.0, -1.0, 10.0, 10.0, 1.0)
    assert torch.equal(
        range_filter(xyz.cuda(), valid.cuda(), point_range).cpu(), range_filter(xyz, valid, point_range)
    )
