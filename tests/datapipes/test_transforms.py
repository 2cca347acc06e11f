from __future__ import annotations

import numpy as np
import pytest

from datapipes.errors import UserError
from datapipes.transforms import (
    PRESETS,
    Compose,
    Jitter,
    NormalizeUnitSphere,
    PointDropout,
    RandomRotate,
    ScaleAndTranslate,
    TakePoints,
    build_augment,
)


def cloud(n: int = 64, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    normal = (xyz / np.linalg.norm(xyz, axis=1, keepdims=True)).astype(np.float32)
    return {
        "key": "k",
        "label": 3,
        "xyz": xyz,
        "normal": normal,
        "curv": np.arange(n, dtype=np.float32),  # row id: lets tests follow point selection
        "feat": np.stack([np.arange(n), -np.arange(n)], axis=1).astype(np.float32),
    }


ALL = [
    NormalizeUnitSphere(),
    TakePoints(32, mode="random"),
    TakePoints(32, mode="first"),
    ScaleAndTranslate(),
    RandomRotate(),
    Jitter(),
    PointDropout(),
]


@pytest.mark.parametrize("transform", ALL, ids=lambda t: type(t).__name__)
def test_seeded_determinism_and_no_mutation(transform):
    sample = cloud()
    before = {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in sample.items()}
    a = transform(sample, np.random.default_rng(7))
    b = transform(sample, np.random.default_rng(7))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    for key, value in before.items():
        np.testing.assert_array_equal(sample[key], value)  # input untouched
    assert a["key"] == "k"
    assert a["label"] == 3
    assert a["xyz"].dtype == np.float32


def test_different_seeds_differ():
    sample = cloud()
    for transform in (ScaleAndTranslate(), RandomRotate(), Jitter(), TakePoints(16, mode="random")):
        a = transform(sample, np.random.default_rng(1))["xyz"]
        b = transform(sample, np.random.default_rng(2))["xyz"]
        assert not np.array_equal(a, b)


def test_take_points_first_and_random_keep_rows_aligned():
    sample = cloud(100)
    first = TakePoints(10)(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(first["xyz"], sample["xyz"][:10])
    rand = TakePoints(30, mode="random", pool=40)(sample, np.random.default_rng(0))
    rows = rand["curv"].astype(int)
    assert len(set(rows.tolist())) == 30
    assert rows.max() < 40
    for name in ("xyz", "normal", "feat"):
        np.testing.assert_array_equal(rand[name], sample[name][rows])


def test_take_points_refuses_small_clouds_unless_asked_to_top_up():
    sample = cloud(5)
    for mode in ("first", "random"):
        with pytest.raises(UserError, match="sample 'k' has 5 points, fewer than the 12 requested"):
            TakePoints(12, mode=mode)(sample, np.random.default_rng(0))  # type: ignore[arg-type]
    out = TakePoints(12, mode="random", top_up=True)(sample, np.random.default_rng(0))
    rows = out["curv"].astype(int)
    assert out["xyz"].shape == (12, 3)
    assert rows[:5].tolist() == [0, 1, 2, 3, 4]
    assert rows.max() < 5


def test_scale_and_translate_ranges_and_normals():
    xyz = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    normal = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32) / [
        [np.sqrt(3)],
        [1],
        [1],
        [1],
    ]
    for seed in range(20):
        out = ScaleAndTranslate()(
            {"xyz": xyz, "normal": normal.astype(np.float32)}, np.random.default_rng(seed)
        )
        shift = out["xyz"][0]
        scale = np.diag(out["xyz"][1:] - shift)
        assert np.all((scale >= 2 / 3 - 1e-6) & (scale <= 1.5 + 1e-6))
        assert np.all(np.abs(shift) <= 0.2 + 1e-6)
        expected = normal[0] / scale
        np.testing.assert_allclose(out["normal"][0], expected / np.linalg.norm(expected), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(out["normal"], axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_rotation_preserves_geometry_and_rotates_normals(axis):
    sample = cloud()
    out = RandomRotate(axis=axis)(sample, np.random.default_rng(3))
    k = "xyz".index(axis)
    np.testing.assert_allclose(out["xyz"][:, k], sample["xyz"][:, k], atol=1e-6)  # axis coordinate fixed
    np.testing.assert_allclose(
        np.linalg.norm(out["xyz"], axis=1), np.linalg.norm(sample["xyz"], axis=1), atol=1e-5
    )
    # normals of this cloud are xyz / |xyz|; a rotation must keep that relation
    np.testing.assert_allclose(
        out["normal"], out["xyz"] / np.linalg.norm(out["xyz"], axis=1, keepdims=True), atol=1e-5
    )


def test_rotation_range():
    sample = cloud()
    same = RandomRotate(axis="z", degrees=(0.0, 0.0))(sample, np.random.default_rng(0))
    np.testing.assert_allclose(same["xyz"], sample["xyz"], atol=1e-6)
    point = {"xyz": np.array([[1.0, 0, 0]], np.float32)}
    quarter = RandomRotate(axis="z", degrees=(90.0, 90.0))(point, np.random.default_rng(0))
    np.testing.assert_allclose(quarter["xyz"], [[0.0, 1.0, 0.0]], atol=1e-6)


def test_jitter_is_clipped():
    sample = cloud(500)
    out = Jitter(sigma=1.0, clip=0.05)(sample, np.random.default_rng(0))
    delta = out["xyz"] - sample["xyz"]
    assert np.abs(delta).max() <= 0.05 + 1e-6
    assert np.abs(delta).max() > 0.04
    np.testing.assert_array_equal(out["normal"], sample["normal"])


def test_point_dropout_replaces_with_first_point():
    sample = cloud(200)
    out = PointDropout(max_ratio=0.8)(sample, np.random.default_rng(5))
    rows = out["curv"].astype(int)
    dropped = rows != np.arange(200)
    assert dropped.any()
    assert np.all(rows[dropped] == 0)
    for name in ("xyz", "normal", "feat"):
        np.testing.assert_array_equal(
            out[name][dropped], np.broadcast_to(sample[name][0], out[name][dropped].shape)
        )
    assert out["xyz"].shape == (200, 3)


def test_normalize_into_unit_sphere():
    out = NormalizeUnitSphere()(cloud(), np.random.default_rng(0))
    assert np.linalg.norm(out["xyz"], axis=1).max() == pytest.approx(1.0, abs=1e-6)


def test_build_augment_presets_and_lists():
    assert build_augment("none").transforms == ()
    assert build_augment("scale_translate").transforms == PRESETS["scale_translate"]
    built = build_augment(
        [{"name": "rotate", "axis": "z", "degrees": [-10, 10]}, {"name": "jitter", "sigma": 0.02}]
    )
    assert built == Compose((RandomRotate(axis="z", degrees=(-10, 10)), Jitter(sigma=0.02)))
    with pytest.raises(ValueError, match="augment must be one of"):
        build_augment("nope")
    with pytest.raises(ValueError, match="unknown transform 'spin'"):
        build_augment([{"name": "spin"}])
    with pytest.raises(ValueError, match="bad parameters for transform 'jitter'"):
        build_augment([{"name": "jitter", "amount": 3}])
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_augment([{"sigma": 1}])


def test_constructor_validation():
    with pytest.raises(ValueError, match="pool"):
        TakePoints(10, mode="random", pool=5)
    with pytest.raises(ValueError, match="scale_low"):
        ScaleAndTranslate(scale_low=2.0, scale_high=1.0)
    with pytest.raises(ValueError, match="axis"):
        RandomRotate(axis="w")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_ratio"):
        PointDropout(max_ratio=1.0)
