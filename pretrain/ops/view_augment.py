"""ViPFormer's view augmentations, batched: point cloud views and rendered-image views.

ViPFormer (Sun et al., ICRA 2023) pre-trains on CrossPoint's ShapeNetRender pairs: two independently augmented
views of each point cloud (the intra-modal term) and one augmented rendering (the cross-modal term).

* :func:`augment_point_views` is the point pipeline (CrossPoint's ``data_utils`` transforms, per cloud, in
  this order): unit-sphere normalisation, isotropic scale, rotation about the y axis, translation by a
  fraction of the bounding-box extent, clipped Gaussian jitter, random input dropout.
* :func:`augment_images` is the image pipeline (torchvision ``Resize(144)``, ``ColorJitter(0.4, 0.4, 0.4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ImageNet ``Normalize``), written by hand because pcpt does not
  depend on torchvision, and batched.

Every random number comes from the ``generator`` argument, drawn on its device (CPU unless a CUDA generator
is passed) and then moved to the data's device, so a seed gives the same views on CPU and CUDA. The draws
of one call are documented per function; one call draws independently for every sample of the batch, so
calling twice with the same generator gives ViPFormer's two independent point views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.ops.transforms import normalize_unit_sphere

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "augment_images",
    "augment_point_views",
    "axis_rotations",
    "resize_shorter_and_crop",
    "rgb_to_grayscale",
]

#: torchvision's ImageNet channel means and standard deviations (RGB).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_AXES = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}


def axis_rotations(angle: Tensor, axis: str = "y") -> Tensor:
    """Rotation matrices by ``angle`` about a coordinate axis (Rodrigues, CrossPoint's ``angle_axis``).

    ``R = cos θ · I + sin θ · [u]ₓ + (1 − cos θ) · u uᵀ`` for the unit axis ``u``; a point maps to
    ``p' = R p``. About y: ``x' = x cos θ + z sin θ``, ``y' = y``, ``z' = −x sin θ + z cos θ``.

    Args:
        angle: rotation angles in radians.
        axis: ``"x"``, ``"y"`` or ``"z"``.

    Returns:
        The matrices, dtype and device of ``angle``.

    Shapes:
        angle: (B,) -> (B, 3, 3).

    Raises:
        ValueError: an unknown axis.
    """
    if axis not in _AXES:
        raise ValueError(f"axis must be one of {sorted(_AXES)}, got {axis!r}")
    ux, uy, uz = _AXES[axis]
    u = torch.tensor([ux, uy, uz], dtype=angle.dtype, device=angle.device)
    cross = torch.tensor(
        [[0.0, -uz, uy], [uz, 0.0, -ux], [-uy, ux, 0.0]], dtype=angle.dtype, device=angle.device
    )  # [u]ₓ: cross v = u × v
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    eye = torch.eye(3, dtype=angle.dtype, device=angle.device)
    return cos * eye + sin * cross + (1.0 - cos) * torch.outer(u, u)


def augment_point_views(
    xyz: Tensor,
    *,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.5, 2.0),
    rotate_axis: str = "y",
    translate: float = 0.5,
    jitter_sigma: float = 0.01,
    jitter_clip: float = 0.05,
    max_dropout: float = 0.875,
) -> Tensor:
    """One random ViPFormer / CrossPoint point view of every cloud, all steps batched.

    Per cloud, in this order (CrossPoint's ``PointcloudNormalize``, ``PointcloudScale(0.5, 2)``,
    ``PointcloudRotate()``, ``PointcloudTranslate(0.5)``, ``PointcloudJitter()``,
    ``PointcloudRandomInputDropout()``, all with ``p=1``):

    1. centre on the centroid and divide by the largest norm
       (:func:`~pretrain.ops.transforms.normalize_unit_sphere`);
    2. multiply by one ``s ~ U(scale)``;
    3. rotate about ``rotate_axis`` by ``θ ~ U(0, 2π)`` (:func:`axis_rotations`);
    4. add ``t = translate · (2u − 1) ⊙ (max − min)`` with ``u ~ U(0, 1)³``: a shift of up to ``translate``
       times the per-axis bounding-box extent of the rotated cloud;
    5. add ``clamp(N(0, jitter_sigma²), ±jitter_clip)`` to every coordinate;
    6. input dropout: draw a ratio ``r = max_dropout · v`` with ``v ~ U(0, 1)`` per cloud, then replace
       every point whose own draw ``w ~ U(0, 1)`` satisfies ``w ≤ r`` by (a copy of) point 0, the cloud's
       first point after step 5. Every point, point 0 included (a no-op), is dropped independently, so a
       cloud loses ``r·N`` points on average and keeps its size N; the duplicates all sit on point 0.

    Draws, in this order from ``generator``: ``torch.rand(B, 6, float64)`` with columns (scale, angle,
    t_x, t_y, t_z, dropout ratio); ``torch.randn(B, N, 3, float32)`` (jitter, before ``· jitter_sigma``);
    ``torch.rand(B, N, float32)`` (the per-point dropout draws ``w``). The arithmetic is done in the dtype
    of ``xyz``.

    Args:
        xyz: dense clouds (no padding).
        generator: the source of every random number.
        scale: ``(low, high)`` of the isotropic scale factor.
        rotate_axis: ``"x"``, ``"y"`` (ViPFormer) or ``"z"``.
        translate: largest shift as a fraction of the bounding-box extent, per axis.
        jitter_sigma: standard deviation of the jitter.
        jitter_clip: largest absolute jitter per coordinate.
        max_dropout: largest dropout ratio, in ``[0, 1)``.

    Returns:
        The augmented clouds, dtype and device of ``xyz``.

    Shapes:
        xyz: (B, N, 3) -> (B, N, 3).

    Raises:
        ValueError: malformed ``xyz`` or out-of-range parameters.
    """
    if xyz.ndim != 3 or xyz.shape[-1] != 3 or xyz.shape[1] < 1:
        raise ValueError(f"xyz must have shape (B, N >= 1, 3), got {tuple(xyz.shape)}")
    if not xyz.dtype.is_floating_point:
        raise ValueError(f"xyz must be floating point, got {xyz.dtype}")
    if not 0.0 <= max_dropout < 1.0:
        raise ValueError(f"max_dropout must be in [0, 1), got {max_dropout}")
    if scale[0] > scale[1]:
        raise ValueError(f"scale must be (low, high) with low <= high, got {scale}")
    if translate < 0 or jitter_sigma < 0 or jitter_clip < 0:
        raise ValueError("translate, jitter_sigma and jitter_clip must be >= 0")
    if rotate_axis not in _AXES:
        raise ValueError(f"rotate_axis must be one of {sorted(_AXES)}, got {rotate_axis!r}")
    batch, num_points, _ = xyz.shape
    device = generator.device
    u = torch.rand(batch, 6, generator=generator, device=device, dtype=torch.float64)
    noise = torch.randn(batch, num_points, 3, generator=generator, device=device, dtype=torch.float32)
    w = torch.rand(batch, num_points, generator=generator, device=device, dtype=torch.float32)

    factor = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    maps = axis_rotations(2.0 * math.pi * u[:, 1], rotate_axis) * factor[:, None, None]  # R·s
    points = normalize_unit_sphere(xyz) @ maps.to(device=xyz.device, dtype=xyz.dtype).transpose(1, 2)
    extent = points.amax(dim=1) - points.amin(dim=1)  # (B, 3)
    shift = translate * (2.0 * u[:, 2:5] - 1.0)
    points = points + (shift.to(device=xyz.device, dtype=xyz.dtype) * extent)[:, None, :]
    jitter = (noise.to(device=xyz.device, dtype=xyz.dtype) * jitter_sigma).clamp(-jitter_clip, jitter_clip)
    points = points + jitter
    ratio = max_dropout * u[:, 5]
    drop = w.to(torch.float64) <= ratio[:, None]  # (B, N)
    return torch.where(drop.to(xyz.device)[..., None], points[:, :1], points)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Grayscale as torchvision computes it for tensors: ``0.2989 R + 0.587 G + 0.114 B``.

    Shapes:
        images: (B, 3, H, W) -> (B, 1, H, W).
    """
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    ratio = factor.to(images.dtype)[:, None, None, None]
    return (ratio * images + (1.0 - ratio) * other).clamp(0.0, 1.0)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Brightness as torchvision's ``adjust_brightness``: ``clamp(f · x, 0, 1)``, one factor per image.

    Shapes:
        images: (B, 3, H, W) in [0, 1], factor: (B,) -> (B, 3, H, W).
    """
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Contrast as torchvision's ``adjust_contrast``: blend with the mean grayscale, one factor per image.

    Shapes:
        images: (B, 3, H, W) in [0, 1], factor: (B,) -> (B, 3, H, W).
    """
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Saturation as torchvision's ``adjust_saturation``: blend with the grayscale, one factor per image.

    Shapes:
        images: (B, 3, H, W) in [0, 1], factor: (B,) -> (B, 3, H, W).
    """
    return _blend(images, rgb_to_grayscale(images), factor)


def resize_shorter_and_crop(images: Tensor, size: int) -> Tensor:
    """Torchvision's ``Resize(size)`` (shorter side to ``size``, bilinear, antialiased), then centre crop.

    The longer side becomes ``int(size · long / short)`` as in torchvision; a non-square result is then
    centre-cropped to ``size × size`` (torchvision's ``center_crop`` offsets,
    ``round((length − size) / 2)``), since the image encoder needs square inputs. Square inputs (the 137 ×
    137 ShapeNet renderings) are only resized. Already ``size × size`` images are returned as they are.

    Shapes:
        images: (B, C, H, W) floating -> (B, C, size, size).
    """
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if height <= width else (new_long, size)
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    return resized[..., top : top + size, left : left + size]


def _factor_range(name: str, value: float) -> tuple[float, float]:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return max(0.0, 1.0 - value), 1.0 + value


def augment_images(
    images: Tensor,
    *,
    generator: torch.Generator,
    size: int = 144,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    flip_p: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """ViPFormer's image view: resize, colour jitter, horizontal flip and ImageNet normalisation, batched.

    Hand-written instead of torchvision (which pcpt does not depend on) and batched over images with one
    independent draw per image. Per image, in this order:

    1. grayscale (C = 1) images are repeated to three channels (the official loader converts to RGB);
    2. :func:`resize_shorter_and_crop` to ``size × size`` (torchvision ``Resize(144)``);
    3. ``ColorJitter(brightness, contrast, saturation)``: factors ``f ~ U(max(0, 1 − v), 1 + v)`` for each of
       the three, applied in a uniformly random order (torchvision draws a random permutation per call) with
       torchvision's tensor definitions (:func:`adjust_brightness`, :func:`adjust_contrast`,
       :func:`adjust_saturation`, each clamped to [0, 1]); a strength of 0 skips that adjustment (torchvision
       sets it to None); there is no hue jitter (ViPFormer's hue is 0);
    4. mirror left-right with probability ``flip_p``;
    5. ``(x − mean) / std`` per channel.

    Draws: one ``torch.rand(B, 7, float64)`` from ``generator``, columns (three order keys — the
    adjustments run in ascending order of their keys: brightness, contrast, saturation —, brightness factor,
    contrast factor, saturation factor, flip; the image is flipped where the draw is below ``flip_p``).

    The official pipeline runs on PIL images, which round to uint8 after every adjustment and use PIL's
    grayscale weights (299/587/114, contrast mean rounded to an integer); here everything stays in floating
    point with torchvision's tensor weights, so values differ from PIL's by the rounding only.

    Args:
        images: images in [0, 1] (uint8 images are divided by 255, like ``ToTensor``).
        generator: the source of every random number.
        size: output side length.
        brightness: brightness strength ``v``.
        contrast: contrast strength ``v``.
        saturation: saturation strength ``v``.
        flip_p: probability of a horizontal flip.
        mean: per-channel means subtracted last (RGB).
        std: per-channel standard deviations divided by last (RGB).

    Returns:
        The normalised views: float64 for float64 input, else float32; on the device of ``images``.

    Shapes:
        images: (B, C, H, W) with C ∈ {1, 3} -> (B, 3, size, size).

    Raises:
        ValueError: malformed images or out-of-range parameters.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, C in {{1, 3}}, H, W), got {tuple(images.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need three values (RGB), got {len(mean)} and {len(std)}")
    ranges = [
        _factor_range("brightness", brightness),
        _factor_range("contrast", contrast),
        _factor_range("saturation", saturation),
    ]
    strengths = (brightness, contrast, saturation)
    adjust = (adjust_brightness, adjust_contrast, adjust_saturation)

    if images.dtype == torch.uint8:
        x = images.to(torch.float32) / 255.0
    else:
        x = images.to(torch.float64 if images.dtype == torch.float64 else torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = resize_shorter_and_crop(x, size).clone()  # owned and contiguous: adjusted in place below
    batch = x.shape[0]
    u = torch.rand(batch, 7, generator=generator, device=generator.device, dtype=torch.float64)
    order = u[:, :3].argsort(dim=1).to(x.device)  # order[b, k]: the adjustment run k-th on image b
    lows = torch.tensor([low for low, _ in ranges], dtype=torch.float64, device=u.device)
    highs = torch.tensor([high for _, high in ranges], dtype=torch.float64, device=u.device)
    factors = (lows + (highs - lows) * u[:, 3:6]).to(x.device)
    for position in range(3):
        for op in range(3):
            if strengths[op] == 0:
                continue
            chosen = order[:, position] == op
            if bool(chosen.any()):
                x[chosen] = adjust[op](x[chosen], factors[chosen, op])
    flip = (u[:, 6] < flip_p).to(x.device)[:, None, None, None]
    x = torch.where(flip, x.flip(-1), x)
    mean_t = torch.tensor(list(mean), dtype=x.dtype, device=x.device)[:, None, None]
    std_t = torch.tensor(list(std), dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean_t) / std_t
