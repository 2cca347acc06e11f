"""Per-sample point cloud transforms: small callables ``(arrays, rng) -> arrays`` on numpy data.

``arrays`` is a decoded sample: ``{"xyz": (N, 3) float32, "normal": (N, 3), "curv": (N,) | (N, 1),
"feat": (N, C), ...}``; other keys (``key``, ``label``, ``images``) pass through untouched. Per-point fields
(:data:`datapipes.types.POINT_FIELDS`) are selected together, normals follow rotations and scalings, and every
random draw comes from the ``np.random.Generator`` passed in (no global random state, so forked workers never
share augmentations). Transforms never modify their input in place.

The Point-MAE / Point-BERT recipe is :class:`ScaleAndTranslate` (per sample s ~ U(2/3, 3/2)^3,
t ~ U(-0.2, 0.2)^3, x' = x * s + t); the PointNet++ family adds :class:`PointDropout`, :class:`RandomRotate`
about the up axis and :class:`Jitter`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from datapipes.errors import UserError
from datapipes.geometry import normalize_unit_sphere
from datapipes.types import POINT_FIELDS

__all__ = [
    "PRESETS",
    "TRANSFORMS",
    "Arrays",
    "AugmentConfig",
    "Compose",
    "Jitter",
    "NormalizeUnitSphere",
    "PointDropout",
    "RandomRotate",
    "ScaleAndTranslate",
    "TakePoints",
    "Transform",
    "build_augment",
]

Arrays = dict[str, Any]
#: A preset name (``"none"``, ``"scale_translate"``, ``"rotate_jitter"``) or a list of transform configs such
#: as ``[{"name": "rotate", "axis": "y"}, {"name": "jitter", "sigma": 0.01}]`` (names: :data:`TRANSFORMS`).
AugmentConfig = str | Sequence[Mapping[str, Any]]


class Transform(Protocol):
    """A per-sample transform."""

    def __call__(self, sample: Arrays, rng: np.random.Generator) -> Arrays:
        """Returns a transformed copy of ``sample``, drawing randomness only from ``rng``."""
        ...


def _select(sample: Arrays, index: np.ndarray) -> Arrays:
    out = dict(sample)
    for name in POINT_FIELDS:
        if name in out:
            out[name] = np.take(out[name], index, axis=0)  # several times faster than fancy indexing
    return out


def _unit(vectors: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norm, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Compose:
    """Applies transforms in order."""

    transforms: tuple[Transform, ...] = ()

    def __call__(self, sample: Arrays, rng: np.random.Generator) -> Arrays:
        for transform in self.transforms:
            sample = transform(sample, rng)
        return sample


@dataclass(frozen=True)
class NormalizeUnitSphere:
    """Centres ``xyz`` on its centroid and scales it into the unit sphere (normals are unchanged)."""

    def __call__(self, sample: Arrays, rng: np.random.Generator) -> Arrays:
        out = dict(sample)
        out["xyz"] = normalize_unit_sphere(sample["xyz"])[0]
        return out


@dataclass(frozen=True)
class TakePoints:
    """Selects ``n`` points (and the matching rows of every per-point field).

    Args:
        n: points to keep.
        mode: ``"first"`` keeps the first ``n`` (an FPS subsample when the cloud is stored in FPS order);
            ``"random"`` draws ``n`` without replacement, from the first ``pool`` points when ``pool`` is set
            (Point-MAE fine-tuning: FPS to 1200, then a random 1024) or from all points.
        pool: size of the stored prefix that ``"random"`` draws from (capped at the cloud size).
        top_up: let a cloud with fewer than ``n`` points keep all of them, topped up with points drawn with
            replacement. Off by default: such a cloud is an error (duplicated points would change what a
            model sees without saying so).
        keep_fewer: let a cloud with fewer than ``n`` points keep all of them, and nothing more: ``n`` is an
            upper bound (for ragged batches, which pad clouds instead).

    Raises:
        UserError: when called on a cloud with fewer than ``n`` points and neither ``top_up`` nor
            ``keep_fewer`` is set.
    """

    n: int
    mode: Literal["first", "random"] = "first"
    pool: int | None = None
    top_up: bool = False
    keep_fewer: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.mode not in ("first", "random"):
            raise ValueError(f"mode must be 'first' or 'random', got {self.mode!r}")
        if self.pool is not None and self.pool < self.n:
            raise ValueError(f"pool must be >= n ({self.n}), got {self.pool}")
        if self.top_up and self.keep_fewer:
            raise ValueError("top_up and keep_fewer are exclusive")

    def __call__(self, sample: Arrays, rng: np.random.Generator) -> Arrays:
        count = int(sample["xyz"].shape[0])
        if count <= self.n and self.keep_fewer:
            return dict(sample)
        if count < self.n:
            if not self.top_up:
                raise UserError(
                    f"sample {sample.get('key')!r} has {count} points, fewer than the {self.n} requested"
                )
            extra = rng.integers(0, count, size=self.n - count)
            return _select(sample, np.concatenate([np.arange(count), extra]))
        if self.mode == "first":
            if count == self.n:
                return dict(sample)
            return _select(sample, np.arange(self.n))
        pool = count if self.pool is None else min(self.pool, count)
        return _select(sample, rng.permutation(pool)[: self.n])


@dataclass(frozen=True)
class ScaleAndTranslate:
    """Point-MAE's ``PointcloudScaleAndTranslate``: x' = x * s + t per sample.

    s ~ U(scale_low, scale_high)^3 and t ~ U(-translate, translate)^3. Normals follow the anisotropic
    scaling (n' ∝ n / s, renormalised).
    """

    scale_low: float = 2.0 / 3.0
    scale_high: float = 3.0 / 2.0
    translate: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.scale_low <= self.scale_high:
            raise ValueError(f"need 0 < scale_low <= scale_high, got {self.scale_low}, {self.scale_high}")
        if self.translate < 0:
            raise ValueError(f"translate must be >= 0, got {self.translate}")

    def __call__(self, sample: Arrays, rng: np.random.Generator) -> Arrays:
        draws = rng.random(6)
        scale = (self.scale_low + (self.scale_high - self.scale_low) * draws[:3]).astype(np.float32)
        shift = (self.translate * (2.0 * draws[3:] - 1.0)).astype(np.float32)
        out = dict(sample)
        out["xyz"] = (sample["xyz"] @ np.diag(scale) + shift).astype(
            np.float32, copy=False
        )  # matmul: fast on (N, 3)
        if "normal" in sample:
            out["normal"] = _unit(sample["normal"] / scale)
        return out


def rotation_matrix(axis: Literal["x", "y", "z"], angle: float) -> np.ndarray:
    """``(3, 3)`` float32 matrix of a right-handed rotation by ``angle`` radians about ``axis``."""
    c, s = math.cos(angle), math.sin(angle)
    if axis == "x":
        mat = [[1, 0, 0], [0, c, -s], [0, s, c]]
    elif axis == "y":
        mat = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    elif axis == "z":
        mat = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    else:
        raise ValueError(f"axis must be 'x', 'y' or 'z', got {axis!r}")
    return np.asarray(mat, dtype=np.float32)


@dataclass(frozen=True)
class RandomRotate:
    """Rotates about one axis by an angle drawn uniformly from ``degrees`` (default: any angle).

    Normals are rotated with the points.
    """

    axis: Literal["x", "y", "z"] = "y"
    degrees: tuple[float, float] = (-180.0, 180.0)

    def __post_init__(self) -> None:
        if self.axis not in ("x", "y", "z"):
            raise ValueError(f"axis must be 'x', 'y' or 'z', got {self.axis!r}")
        if len(self.degrees) != 2 or self.degrees[0] > self.degrees[1]:
            raise ValueError(f"degrees must be a (low, high) range, got {self.degrees!r}")

    def __call__(self, sample: Arrays, rng: np.random.Generator) -> Arrays:
        angle = math.radians(rng.uniform(self.degrees[0], self.degrees[1]))
        rot_t = rotation_matrix(self.axis, angle).T
        out = dict(sample)
        out["xyz"] = (sample["xyz"] @ rot_t).astype(np.float32)
        if "normal" in sample:
            out["normal"] = (sample["normal"] @ rot_t).astype(np.float32)
        return out


@dataclass(frozen=True)
class Jitter:
    """Adds clipped Gaussian noise to ``xyz``: x' = x + clip(sigma * N(0, 1), -clip, clip)."""

    sigma: float = 0.01
    clip: float = 0.05

    def __post_init__(self) -> None:
        if self.sigma < 0 or self.clip <= 0:
            raise ValueError(f"need sigma >= 0 and clip > 0, got sigma={self.sigma}, clip={self.clip}")

    def __call__(self, sample: Arrays, rng: np.random.Generator) -> Arrays:
        xyz = sample["xyz"]
        noise = np.clip(self.sigma * rng.standard_normal(xyz.shape), -self.clip, self.clip)
        out = dict(sample)
        out["xyz"] = (xyz + noise).astype(np.float32)
        return out


@dataclass(frozen=True)
class PointDropout:
    """PointNet++ random input dropout: ratio ~ U(0, max_ratio), dropped points become the first point.

    The point count stays fixed; every per-point field is replaced the same way.
    """

    max_ratio: float = 0.875

    def __post_init__(self) -> None:
        if not 0 <= self.max_ratio < 1:
            raise ValueError(f"max_ratio must be in [0, 1), got {self.max_ratio}")

    def __call__(self, sample: Arrays, rng: np.random.Generator) -> Arrays:
        count = int(sample["xyz"].shape[0])
        ratio = rng.uniform(0.0, self.max_ratio)
        index = np.arange(count)
        index[rng.random(count) <= ratio] = 0
        return _select(sample, index)


TRANSFORMS: dict[str, type] = {
    "normalize": NormalizeUnitSphere,
    "take_points": TakePoints,
    "scale_translate": ScaleAndTranslate,
    "rotate": RandomRotate,
    "jitter": Jitter,
    "dropout": PointDropout,
}

PRESETS: dict[str, tuple[Transform, ...]] = {
    "none": (),
    "scale_translate": (ScaleAndTranslate(),),
    "rotate_jitter": (RandomRotate(axis="y"), Jitter()),
}


def build_augment(config: AugmentConfig) -> Compose:
    """Builds the training augmentation from a preset name or a list of ``{"name": ..., **params}`` configs.

    Raises:
        ValueError: naming an unknown preset, an unknown transform name or bad parameters.
    """
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(
                f"augment must be one of {sorted(PRESETS)} or a list of transforms, got {config!r}"
            )
        return Compose(PRESETS[config])
    transforms: list[Transform] = []
    for item in config:
        if not isinstance(item, Mapping) or "name" not in item:
            raise ValueError(f"each augment entry needs a 'name' (one of {sorted(TRANSFORMS)}), got {item!r}")
        params = {k: v for k, v in item.items() if k != "name"}
        cls = TRANSFORMS.get(str(item["name"]))
        if cls is None:
            raise ValueError(f"unknown transform {item['name']!r}; choose from {sorted(TRANSFORMS)}")
        if "degrees" in params:
            params["degrees"] = tuple(params["degrees"])
        try:
            transforms.append(cls(**params))
        except TypeError as err:
            raise ValueError(f"bad parameters for transform {item['name']!r}: {err}") from err
    return Compose(tuple(transforms))
