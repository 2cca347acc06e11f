"""ViPFormer's batched point and image views against per-sample loops of the official definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.ops.view_augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    augment_images,
    augment_point_views,
    axis_rotations,
    resize_shorter_and_crop,
)


def clouds(
    batch: int = 4, points: int = 50, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.randn(batch, points, 3, generator=gen, dtype=dtype) * torch.tensor(
        [1.0, 3.0, 0.5], dtype=dtype
    )
    return xyz + 5.0 * torch.randn(batch, 1, 3, generator=gen, dtype=dtype)


# --- point views -------------------------------------------------------------------------------------------


def crosspoint_view(pc: np.ndarray, u: np.ndarray, noise: np.ndarray, w: np.ndarray, **kw) -> np.ndarray:
    """CrossPoint's per-cloud transforms, one by one, in float64 (with the draws of one cloud)."""
    lo, hi = kw["scale"]
    pc = pc.astype(np.float64).copy()
    pc = pc - pc.mean(axis=0)  # PointcloudNormalize
    pc = pc / np.max(np.sqrt((pc**2).sum(axis=1)))
    pc = pc * (lo + (hi - lo) * u[0])  # PointcloudScale
    theta = u[1] * 2 * np.pi  # PointcloudRotate about y
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    pc = pc @ rot.T
    diff = pc.max(axis=0) - pc.min(axis=0)  # PointcloudTranslate
    r = kw["translate"]
    pc = pc + (-r + 2 * r * u[2:5]) * diff
    pc = pc + np.clip(noise * kw["jitter_sigma"], -kw["jitter_clip"], kw["jitter_clip"])  # PointcloudJitter
    ratio = u[5] * kw["max_dropout"]  # PointcloudRandomInputDropout
    for n in range(len(pc)):
        if w[n] <= ratio:
            pc[n] = pc[0]
    return pc


DEFAULTS = {
    "scale": (0.5, 2.0),
    "translate": 0.5,
    "jitter_sigma": 0.01,
    "jitter_clip": 0.05,
    "max_dropout": 0.875,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "params",
    [DEFAULTS, {**DEFAULTS, "jitter_sigma": 0.1, "max_dropout": 0.5, "scale": (0.8, 1.25), "translate": 0.1}],
)
def test_point_views_match_the_per_cloud_reference(dtype: torch.dtype, params: dict) -> None:
    xyz = clouds(batch=6, points=40, dtype=dtype)
    got = augment_point_views(xyz, generator=torch.Generator().manual_seed(7), **params)
    gen = torch.Generator().manual_seed(7)  # the documented draws, in order
    u = torch.rand(6, 6, generator=gen, dtype=torch.float64).numpy()
    noise = torch.randn(6, 40, 3, generator=gen, dtype=torch.float32).double().numpy()
    w = torch.rand(6, 40, generator=gen, dtype=torch.float32).double().numpy()
    assert got.dtype == dtype
    assert got.shape == xyz.shape
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for b in range(6):
        want = crosspoint_view(xyz[b].double().numpy(), u[b], noise[b], w[b], **params)
        np.testing.assert_allclose(got[b].double().numpy(), want, rtol=tol, atol=tol)


def quiet(**kw):
    """Parameters that switch every step off except the ones given."""
    return {"scale": (1.0, 1.0), "translate": 0.0, "jitter_sigma": 0.0, "max_dropout": 0.0, **kw}


def test_scale_is_isotropic_in_range_and_rotation_is_about_y() -> None:
    xyz = clouds(batch=64, points=30)
    unit = xyz - xyz.mean(dim=1, keepdim=True)
    unit = unit / unit.norm(dim=-1).amax(dim=1)[:, None, None]
    out = augment_point_views(xyz, generator=torch.Generator().manual_seed(1), **quiet(scale=(0.5, 2.0)))
    factor = out.norm(dim=-1).amax(dim=1)  # the largest norm of a unit cloud becomes the scale factor
    assert bool(((factor >= 0.5) & (factor <= 2.0)).all())
    assert factor.min() < 0.7
    assert factor.max() > 1.8
    # y only scales; the (x, z) radius only scales: a rotation about y
    torch.testing.assert_close(out[..., 1], unit[..., 1] * factor[:, None], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        out[..., [0, 2]].norm(dim=-1),
        unit[..., [0, 2]].norm(dim=-1) * factor[:, None],
        rtol=1e-10,
        atol=1e-12,
    )
    # the rotation angles cover the circle: the x axis goes everywhere in the x–z plane
    cos = (out[..., [0, 2]] * unit[..., [0, 2]]).sum(-1) / (
        unit[..., [0, 2]].norm(dim=-1) ** 2 * factor[:, None]
    )
    assert cos[:, 0].min() < -0.9
    assert cos[:, 0].max() > 0.9


def test_translation_is_bounded_by_the_extent() -> None:
    xyz = clouds(batch=64, points=30)
    out = augment_point_views(xyz, generator=torch.Generator().manual_seed(2), **quiet(translate=0.5))
    still = augment_point_views(xyz, generator=torch.Generator().manual_seed(2), **quiet())
    shift = out - still
    # one shift per cloud
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), rtol=0, atol=1e-12)
    extent = still.amax(dim=1) - still.amin(dim=1)
    fraction = shift[:, 0] / extent
    assert bool((fraction.abs() <= 0.5).all())
    assert fraction.abs().max() > 0.4


def test_jitter_is_clipped() -> None:
    xyz = clouds(batch=8, points=200)
    out = augment_point_views(xyz, generator=torch.Generator().manual_seed(3), **quiet(jitter_sigma=0.1))
    still = augment_point_views(xyz, generator=torch.Generator().manual_seed(3), **quiet())
    jitter = out - still
    assert jitter.abs().max().item() == pytest.approx(0.05, rel=1e-9)  # N(0, 0.1) is clipped often
    small = augment_point_views(xyz, generator=torch.Generator().manual_seed(3), **quiet(jitter_sigma=0.01))
    assert (small - still).std().item() == pytest.approx(0.01, rel=0.1)


def test_dropout_replaces_points_by_point_zero() -> None:
    xyz = clouds(batch=200, points=256)
    gen_draws = torch.Generator().manual_seed(4)
    u = torch.rand(200, 6, generator=gen_draws, dtype=torch.float64)
    out = augment_point_views(xyz, generator=torch.Generator().manual_seed(4), **quiet(max_dropout=0.875))
    still = augment_point_views(xyz, generator=torch.Generator().manual_seed(4), **quiet())
    changed = (out != still).any(dim=-1)
    assert bool((out[changed] == out[:, :1].expand_as(out)[changed]).all())  # a dropped point is point 0
    torch.testing.assert_close(out[:, 0], still[:, 0], rtol=0, atol=0)
    fraction = (out == out[:, :1]).all(dim=-1).float().mean(dim=1)  # includes point 0 itself
    ratio = 0.875 * u[:, 5]
    assert (fraction.double() - ratio).abs().mean() < 0.04
    assert bool((fraction < 0.99).all())


def test_point_views_are_deterministic_and_independent() -> None:
    xyz = clouds()
    a = augment_point_views(xyz, generator=torch.Generator().manual_seed(5))
    b = augment_point_views(xyz, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(5)
    first, second = augment_point_views(xyz, generator=gen), augment_point_views(xyz, generator=gen)
    torch.testing.assert_close(first, a, rtol=0, atol=0)
    assert not torch.allclose(first, second)
    # the global generator is not touched
    state = torch.get_rng_state()
    augment_point_views(xyz, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)


def test_axis_rotations() -> None:
    angle = torch.tensor([0.0, 0.3, math.pi / 2, 2.0], dtype=torch.float64)
    for axis in "xyz":
        rot = axis_rotations(angle, axis)
        eye = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
        torch.testing.assert_close(rot @ rot.transpose(1, 2), eye)
        torch.testing.assert_close(torch.linalg.det(rot), torch.ones(4, dtype=torch.float64))
    c, s = math.cos(0.3), math.sin(0.3)
    want = {
        "x": [[1, 0, 0], [0, c, -s], [0, s, c]],
        "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
        "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]],
    }
    for axis, matrix in want.items():
        torch.testing.assert_close(axis_rotations(angle, axis)[1], torch.tensor(matrix, dtype=torch.float64))
    with pytest.raises(ValueError, match="axis"):
        axis_rotations(angle, "w")


@pytest.mark.parametrize(
    ("xyz", "kwargs", "match"),
    [
        (torch.zeros(2, 5, 2), {}, "shape"),
        (torch.zeros(2, 0, 3), {}, "shape"),
        (torch.zeros(2, 5, 3, dtype=torch.long), {}, "floating"),
        (torch.zeros(2, 5, 3), {"max_dropout": 1.0}, "max_dropout"),
        (torch.zeros(2, 5, 3), {"scale": (2.0, 1.0)}, "scale"),
        (torch.zeros(2, 5, 3), {"rotate_axis": "w"}, "rotate_axis"),
    ],
)
def test_point_views_reject_bad_arguments(xyz, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        augment_point_views(xyz, generator=torch.Generator(), **kwargs)


# --- image views -------------------------------------------------------------------------------------------


def gray(img: torch.Tensor) -> torch.Tensor:
    """torchvision's tensor grayscale of one (3, H, W) image."""
    return 0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2]


def ref_brightness(img: torch.Tensor, f: float) -> torch.Tensor:
    return (f * img + (1 - f) * torch.zeros_like(img)).clamp(0, 1)


def ref_contrast(img: torch.Tensor, f: float) -> torch.Tensor:
    return (f * img + (1 - f) * gray(img).mean()).clamp(0, 1)


def ref_saturation(img: torch.Tensor, f: float) -> torch.Tensor:
    return (f * img + (1 - f) * gray(img)[None]).clamp(0, 1)


def images(
    batch: int = 6, channels: int = 3, height: int = 20, width: int = 20, seed: int = 0
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, height, width, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(
    ("adjust", "ref"),
    [
        (adjust_brightness, ref_brightness),
        (adjust_contrast, ref_contrast),
        (adjust_saturation, ref_saturation),
    ],
)
def test_adjustments_match_per_image_references(adjust, ref) -> None:
    x = images()
    factors = torch.tensor([0.0, 0.3, 0.6, 1.0, 1.4, 3.0], dtype=torch.float64)
    got = adjust(x, factors)
    for b in range(len(x)):
        torch.testing.assert_close(got[b], ref(x[b], float(factors[b])), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adjust(x, torch.ones(6, dtype=torch.float64)), x)  # factor 1 is the identity


def test_adjustment_landmarks() -> None:
    x = images()
    zero = torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(adjust_brightness(x, zero), torch.zeros_like(x))
    means = torch.stack([gray(img).mean() for img in x])
    torch.testing.assert_close(adjust_contrast(x, zero), means[:, None, None, None].expand_as(x))
    torch.testing.assert_close(
        adjust_saturation(x, zero), torch.stack([gray(img).expand(3, -1, -1) for img in x])
    )


def test_resize_shorter_side_then_centre_crop() -> None:
    square = images(height=137, width=137)
    want = F.interpolate(square, size=(144, 144), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(resize_shorter_and_crop(square, 144), want)
    wide = images(height=100, width=203)  # -> 144 × int(144 · 203 / 100) = 144 × 292, crop columns 74:218
    full = F.interpolate(wide, size=(144, 292), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(resize_shorter_and_crop(wide, 144), full[..., 74:218])
    tall = images(height=300, width=150)  # -> 288 × 144, crop rows 72:216
    full = F.interpolate(tall, size=(288, 144), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(resize_shorter_and_crop(tall, 144), full[..., 72:216, :])
    ready = images(height=144, width=144)
    assert resize_shorter_and_crop(ready, 144) is ready
    flat = torch.full((1, 3, 50, 70), 0.25, dtype=torch.float64)
    torch.testing.assert_close(
        resize_shorter_and_crop(flat, 144), torch.full((1, 3, 144, 144), 0.25).double()
    )


def reference_views(x: torch.Tensor, u: torch.Tensor, *, size: int, strengths, flip_p: float) -> torch.Tensor:
    """The image pipeline image by image: resize, jitter in the drawn order, flip, normalise."""
    ops = [ref_brightness, ref_contrast, ref_saturation]
    out = []
    for b in range(len(x)):
        img = x[b].expand(3, -1, -1) if x.shape[1] == 1 else x[b]
        img = resize_shorter_and_crop(img[None], size)[0]
        keys = u[b, :3].tolist()
        for op in sorted(range(3), key=lambda k: keys[k]):
            if strengths[op] == 0:
                continue
            low, high = max(0.0, 1.0 - strengths[op]), 1.0 + strengths[op]
            img = ops[op](img, low + (high - low) * float(u[b, 3 + op]))
        if float(u[b, 6]) < flip_p:
            img = img.flip(-1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype)[:, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=img.dtype)[:, None, None]
        out.append((img - mean) / std)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("shape", "strengths", "flip_p"),
    [
        ((16, 3, 144, 144), (0.4, 0.4, 0.4), 0.5),
        ((8, 3, 137, 137), (0.4, 0.4, 0.4), 0.5),
        ((8, 3, 30, 50), (0.9, 0.2, 1.5), 0.3),
        ((8, 1, 40, 40), (0.4, 0.0, 0.4), 1.0),
    ],
)
def test_image_views_match_the_per_image_reference(shape, strengths, flip_p) -> None:
    x = images(*shape)
    kwargs = {
        "brightness": strengths[0],
        "contrast": strengths[1],
        "saturation": strengths[2],
        "flip_p": flip_p,
    }
    size = 144 if shape[-1] > 100 else 24
    got = augment_images(x, generator=torch.Generator().manual_seed(9), size=size, **kwargs)
    u = torch.rand(shape[0], 7, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want = reference_views(x, u, size=size, strengths=strengths, flip_p=flip_p)
    assert got.shape == (shape[0], 3, size, size)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_colour_jitter_factors_and_order_are_random_per_image() -> None:
    x = images(batch=400, height=4, width=4) * 0.5  # dark: brightness never clamps
    out = augment_images(
        x,
        generator=torch.Generator().manual_seed(10),
        size=4,
        contrast=0.0,
        saturation=0.0,
        flip_p=0.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    factor = (out / x).flatten(1)
    torch.testing.assert_close(factor, factor[:, :1].expand_as(factor))  # one factor per image
    assert bool(((factor >= 0.6 - 1e-12) & (factor <= 1.4 + 1e-12)).all())
    assert factor.min() < 0.62
    assert factor.max() > 1.38
    # every one of the 3! orders is drawn, about equally often
    u = torch.rand(400, 7, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    orders = {tuple(row) for row in u[:, :3].argsort(dim=1).tolist()}
    assert len(orders) == 6


def test_flip_and_normalisation() -> None:
    x = images(batch=4, height=8, width=8)
    off = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "size": 8}
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
    kept = augment_images(x, generator=torch.Generator().manual_seed(0), flip_p=0.0, **off)
    torch.testing.assert_close(kept, (x - mean) / std)
    flipped = augment_images(x, generator=torch.Generator().manual_seed(0), flip_p=1.0, **off)
    torch.testing.assert_close(flipped, (x.flip(-1) - mean) / std)
    many = images(batch=64, height=8, width=8)
    some = augment_images(many, generator=torch.Generator().manual_seed(0), **off)
    plain = (many - mean) / std
    mirrored = [bool(torch.equal(some[b], plain[b].flip(-1))) for b in range(64)]
    assert [bool(torch.equal(some[b], plain[b])) for b in range(64)] == [not m for m in mirrored]
    assert 16 < sum(mirrored) < 48


def test_grayscale_uint8_dtypes_and_determinism() -> None:
    x = images(batch=5, channels=1, height=12, width=12)
    out = augment_images(x, generator=torch.Generator().manual_seed(1), size=12)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
    rgb = out * std + mean
    torch.testing.assert_close(rgb[:, 1], rgb[:, 0])
    torch.testing.assert_close(rgb[:, 2], rgb[:, 0])
    as_bytes = (images(batch=3, height=10, width=10) * 255).round().to(torch.uint8)
    got = augment_images(as_bytes, generator=torch.Generator().manual_seed(2), size=10)
    want = augment_images(as_bytes.float() / 255.0, generator=torch.Generator().manual_seed(2), size=10)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    again = augment_images(as_bytes.float() / 255.0, generator=torch.Generator().manual_seed(2), size=10)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    source = images(batch=2, height=10, width=10)
    before = source.clone()
    augment_images(source, generator=torch.Generator().manual_seed(3), size=10)
    torch.testing.assert_close(source, before, rtol=0, atol=0)  # the input is not modified


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (torch.zeros(2, 2, 8, 8), {}, "shape"),
        (torch.zeros(2, 3, 8), {}, "shape"),
        (torch.zeros(2, 3, 8, 8), {"size": 0}, "size"),
        (torch.zeros(2, 3, 8, 8), {"flip_p": 1.5}, "flip_p"),
        (torch.zeros(2, 3, 8, 8), {"brightness": -0.1}, "brightness"),
        (torch.zeros(2, 3, 8, 8), {"mean": (0.5,)}, "mean"),
    ],
)
def test_image_views_reject_bad_arguments(x, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        augment_images(x, generator=torch.Generator(), **kwargs)
