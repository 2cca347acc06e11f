"""The batched torch transforms equal the per-sample numpy transforms of datapipes for the same draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datapipes.geometry import normalize_unit_sphere as normalize_numpy
from datapipes.transforms import ScaleAndTranslate, TakePoints
from pretrain.ops import normalize_unit_sphere, random_point_subset, scale_and_translate


def clouds(batch: int = 4, points: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, points, 3)) * rng.uniform(0.1, 5.0, size=(batch, 1, 3)) + 3.0).astype(
        np.float32
    )


def test_normalize_unit_sphere_equals_numpy():
    xyz = clouds()
    xyz[2] = 1.5  # one cloud of identical points: centred, scale 1
    got = normalize_unit_sphere(torch.from_numpy(xyz)).numpy()
    for cloud, out in zip(xyz, got):
        np.testing.assert_allclose(out, normalize_numpy(cloud)[0], atol=1e-6)
    assert np.abs(got[2]).max() == 0.0
    np.testing.assert_allclose(np.linalg.norm(got[[0, 1, 3]], axis=-1).max(axis=1), 1.0, rtol=1e-6)


def test_scale_and_translate_equals_numpy_for_the_same_draws():
    xyz = clouds()
    draws = np.random.default_rng(7).random((4, 6))
    transform = ScaleAndTranslate(scale_low=0.5, scale_high=2.0, translate=0.3)
    got = scale_and_translate(
        torch.from_numpy(xyz), scale_low=0.5, scale_high=2.0, translate=0.3, draws=torch.from_numpy(draws)
    )
    rng = np.random.default_rng(7)  # the same doubles, consumed rng.random(6) per cloud
    want = np.stack([transform({"xyz": cloud}, rng)["xyz"] for cloud in xyz])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_scale_and_translate_draws_from_the_generator():
    xyz = torch.from_numpy(clouds())
    a = scale_and_translate(xyz, generator=torch.Generator().manual_seed(3))
    uniform = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(3))  # scales, then shifts
    b = scale_and_translate(xyz, draws=torch.cat([uniform[0], uniform[1]], dim=1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="draws"):
        scale_and_translate(xyz, draws=torch.zeros(4, 3))


class FixedPermutation:
    """An ``rng`` stand-in whose permutation is given (the draw TakePoints makes)."""

    def __init__(self, order: np.ndarray) -> None:
        self.order = order

    def permutation(self, n: int) -> np.ndarray:
        assert n == self.order.size
        return self.order


def test_random_point_subset_equals_take_points_for_the_same_permutation():
    xyz = clouds(points=40)
    got = random_point_subset(torch.from_numpy(xyz), 16, generator=torch.Generator().manual_seed(5))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(5)).numpy()
    take = TakePoints(16, mode="random")
    for cloud, out in zip(xyz, got.numpy()):
        np.testing.assert_array_equal(out, take({"xyz": cloud}, FixedPermutation(order))["xyz"])
    with pytest.raises(ValueError, match="num_points"):
        random_point_subset(torch.from_numpy(xyz), 41)
