"""The embedded demo dataset: deterministic procedural shapes, labelled, with normals (``pcpt-data synth``).

Up to 12 classes of surface-sampled primitives: sphere, ellipsoid, cube, cuboid, cylinder, capsule, cone,
pyramid, torus, table, helix, dumbbell (the first ``classes`` are used; the default 10 stop at table). Pairs
are deliberately close (sphere / ellipsoid, cube / cuboid, cylinder / capsule, cone / pyramid), and every
sample is deformed (class-specific proportions, anisotropic scale, taper and a parabolic bend), randomly
rotated (uniform over SO(3)), normalised into the unit sphere, jittered with Gaussian noise and stored in
farthest-point order. Normals follow every deformation exactly (inverse-transpose Jacobian). With
``images``, each sample gets one small PNG depth view (orthographic, along -z), encoded with Pillow
(deterministic bytes).

Each sample's randomness comes from ``np.random.default_rng([seed, split, class, index])``: a sample does
not depend on the shard size or the order of generation, and the same arguments give byte-identical shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.geometry import fps_order_batch, normalize_unit_sphere
from datapipes.shards import ShardSetWriter, encode_png
from datapipes.types import Sample

__all__ = ["CLASS_NAMES", "make_sample", "render_depth", "write_synthetic"]

CLASS_NAMES: tuple[str, ...] = (
    "sphere",
    "ellipsoid",
    "cube",
    "cuboid",
    "cylinder",
    "capsule",
    "cone",
    "pyramid",
    "torus",
    "table",
    "helix",
    "dumbbell",
)
GENERATOR = "pcpt-synth/1"
_SPLITS = ("train", "test")

Surface = tuple[np.ndarray, np.ndarray]  # (M, 3) points, (M, 3) unit normals


# ------------------------------------------------------------------------------------------------ primitives


def _sphere(n: int, rng: np.random.Generator, radius: float = 1.0) -> Surface:
    v = rng.standard_normal((n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v * radius, v


def _split_counts(n: int, areas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How many of ``n`` points each part gets, proportional to its area (multinomial)."""
    return rng.multinomial(n, areas / areas.sum())


def _box(n: int, rng: np.random.Generator, half: np.ndarray, centre: np.ndarray | None = None) -> Surface:
    a, b, c = half
    areas = np.array([b * c, b * c, a * c, a * c, a * b, a * b])
    pts, nrm = [], []
    for face, m in enumerate(_split_counts(n, areas, rng)):
        axis, sign = face // 2, 1.0 if face % 2 == 0 else -1.0
        p = rng.uniform(-1.0, 1.0, size=(m, 3)) * half
        p[:, axis] = sign * half[axis]
        normal = np.zeros((m, 3))
        normal[:, axis] = sign
        pts.append(p)
        nrm.append(normal)
    xyz = np.concatenate(pts)
    return (xyz if centre is None else xyz + centre), np.concatenate(nrm)


def _disk(m: int, rng: np.random.Generator, radius: float, y: float, up: float) -> Surface:
    r = radius * np.sqrt(rng.uniform(size=m))
    t = rng.uniform(0.0, 2.0 * np.pi, size=m)
    xyz = np.stack([r * np.cos(t), np.full(m, y), r * np.sin(t)], axis=1)
    return xyz, np.tile([0.0, up, 0.0], (m, 1))


def _tube(m: int, rng: np.random.Generator, radius: float, half_height: float) -> Surface:
    t = rng.uniform(0.0, 2.0 * np.pi, size=m)
    y = rng.uniform(-half_height, half_height, size=m)
    normal = np.stack([np.cos(t), np.zeros(m), np.sin(t)], axis=1)
    return normal * radius + np.stack([np.zeros(m), y, np.zeros(m)], axis=1), normal


def _cylinder(n: int, rng: np.random.Generator, radius: float, half_height: float) -> Surface:
    areas = np.array([2 * np.pi * radius * 2 * half_height, np.pi * radius**2, np.pi * radius**2])
    side, top, bottom = _split_counts(n, areas, rng)
    parts = [
        _tube(side, rng, radius, half_height),
        _disk(top, rng, radius, half_height, 1.0),
        _disk(bottom, rng, radius, -half_height, -1.0),
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _capsule(n: int, rng: np.random.Generator, radius: float, half_height: float) -> Surface:
    areas = np.array([2 * np.pi * radius * 2 * half_height, 4 * np.pi * radius**2])
    side, caps = _split_counts(n, areas, rng)
    tube = _tube(side, rng, radius, half_height)
    cap_xyz, cap_nrm = _sphere(caps, rng, radius)
    cap_xyz[:, 1] += np.where(cap_xyz[:, 1] >= 0, half_height, -half_height)
    return np.concatenate([tube[0], cap_xyz]), np.concatenate([tube[1], cap_nrm])


def _cone(n: int, rng: np.random.Generator, radius: float, half_height: float) -> Surface:
    height = 2 * half_height
    slant = math.hypot(radius, height)
    side, base = _split_counts(n, np.array([np.pi * radius * slant, np.pi * radius**2]), rng)
    frac = np.sqrt(rng.uniform(size=side))  # distance from the apex, area-uniform
    t = rng.uniform(0.0, 2.0 * np.pi, size=side)
    xyz = np.stack(
        [radius * frac * np.cos(t), half_height - height * frac, radius * frac * np.sin(t)], axis=1
    )
    normal = np.stack([height * np.cos(t), np.full(side, radius), height * np.sin(t)], axis=1) / slant
    disk = _disk(base, rng, radius, -half_height, -1.0)
    return np.concatenate([xyz, disk[0]]), np.concatenate([normal, disk[1]])


def _triangles(n: int, rng: np.random.Generator, tris: np.ndarray) -> Surface:
    """Area-uniform samples on triangles ``(T, 3, 3)`` with outward normals from vertex order."""
    cross = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    areas = np.linalg.norm(cross, axis=1) / 2
    pts, nrm = [], []
    for tri, normal, m in zip(tris, cross / (2 * areas[:, None]), _split_counts(n, areas, rng)):
        u, v = rng.uniform(size=m), rng.uniform(size=m)
        flip = u + v > 1
        u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
        pts.append(tri[0] + u[:, None] * (tri[1] - tri[0]) + v[:, None] * (tri[2] - tri[0]))
        nrm.append(np.tile(normal, (m, 1)))
    return np.concatenate(pts), np.concatenate(nrm)


def _pyramid(n: int, rng: np.random.Generator, half_width: float, half_height: float) -> Surface:
    a, h = half_width, half_height
    apex = [0.0, h, 0.0]
    base = [[a, -h, a], [a, -h, -a], [-a, -h, -a], [-a, -h, a]]
    sides = [[base[i], base[(i + 1) % 4], apex] for i in range(4)]
    bottom = [[base[0], base[2], base[1]], [base[0], base[3], base[2]]]
    return _triangles(n, rng, np.asarray(sides + bottom, dtype=np.float64))


def _torus(n: int, rng: np.random.Generator, major: float, minor: float) -> Surface:
    u_list, v_list, have = [], [], 0
    while have < n:  # rejection sampling: area density is proportional to (R + r cos v)
        u = rng.uniform(0.0, 2.0 * np.pi, size=2 * n)
        v = rng.uniform(0.0, 2.0 * np.pi, size=2 * n)
        keep = rng.uniform(size=2 * n) * (major + minor) <= major + minor * np.cos(v)
        u_list.append(u[keep])
        v_list.append(v[keep])
        have += int(keep.sum())
    u, v = np.concatenate(u_list)[:n], np.concatenate(v_list)[:n]
    normal = np.stack([np.cos(v) * np.cos(u), np.sin(v), np.cos(v) * np.sin(u)], axis=1)
    ring = np.stack([major * np.cos(u), np.zeros(n), major * np.sin(u)], axis=1)
    return ring + minor * normal, normal


def _boxes(n: int, rng: np.random.Generator, boxes: list[tuple[np.ndarray, np.ndarray]]) -> Surface:
    """Union of axis-aligned boxes ``(half, centre)``, points split by surface area."""
    areas = np.array([2 * (h[0] * h[1] + h[1] * h[2] + h[0] * h[2]) for h, _ in boxes])
    parts = [_box(m, rng, h, c) for (h, c), m in zip(boxes, _split_counts(n, areas, rng))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _table(n: int, rng: np.random.Generator) -> Surface:
    width, depth = rng.uniform(0.8, 1.0), rng.uniform(0.45, 0.75)
    top_t, leg_h, leg_w = rng.uniform(0.04, 0.1), rng.uniform(0.35, 0.6), rng.uniform(0.04, 0.09)
    boxes = [(np.array([width, top_t, depth]), np.array([0.0, leg_h, 0.0]))]
    for sx in (-1, 1):
        for sz in (-1, 1):
            centre = np.array([sx * (width - leg_w), 0.0, sz * (depth - leg_w)])
            boxes.append((np.array([leg_w, leg_h - top_t, leg_w]), centre - [0.0, top_t, 0.0]))
    return _boxes(n, rng, boxes)


def _helix(n: int, rng: np.random.Generator) -> Surface:
    radius, tube = rng.uniform(0.4, 0.6), rng.uniform(0.08, 0.15)
    turns, height = rng.uniform(2.0, 4.0), rng.uniform(1.2, 1.8)
    t = rng.uniform(0.0, 2.0 * np.pi * turns, size=n)
    pitch = height / (2.0 * np.pi * turns)
    centre = np.stack([radius * np.cos(t), pitch * t - height / 2, radius * np.sin(t)], axis=1)
    tangent = np.stack([-radius * np.sin(t), np.full(n, pitch), radius * np.cos(t)], axis=1)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    inward = np.stack([-np.cos(t), np.zeros(n), -np.sin(t)], axis=1)
    binormal = np.cross(tangent, inward)
    phi = rng.uniform(0.0, 2.0 * np.pi, size=n)
    normal = np.cos(phi)[:, None] * inward + np.sin(phi)[:, None] * binormal
    return centre + tube * normal, normal


def _dumbbell(n: int, rng: np.random.Generator) -> Surface:
    ball, half, bar = rng.uniform(0.3, 0.45), rng.uniform(0.7, 1.0), rng.uniform(0.08, 0.15)
    areas = np.array([4 * np.pi * ball**2, 4 * np.pi * ball**2, 2 * np.pi * bar * 2 * half])
    left, right, middle = _split_counts(n, areas, rng)
    parts = []
    for m, y in ((left, -half), (right, half)):
        xyz, nrm = _sphere(m, rng, ball)
        parts.append((xyz + np.array([0.0, y, 0.0]), nrm))
    parts.append(_tube(middle, rng, bar, half))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _scaled_sphere(n: int, rng: np.random.Generator, axes: np.ndarray) -> Surface:
    xyz, nrm = _sphere(n, rng)
    return xyz * axes, nrm / axes


def _shape(name: str, n: int, rng: np.random.Generator) -> Surface:
    """Class-specific primitive with random proportions (normals may be unnormalised)."""
    u = rng.uniform
    if name == "sphere":
        return _scaled_sphere(n, rng, u(0.85, 1.15, size=3))
    if name == "ellipsoid":
        return _scaled_sphere(n, rng, rng.permutation([1.0, u(0.45, 0.8), u(0.6, 0.9)]))
    if name == "cube":
        return _box(n, rng, u(0.85, 1.15, size=3))
    if name == "cuboid":
        return _box(n, rng, rng.permutation([1.0, u(0.35, 0.7), u(0.55, 0.85)]))
    if name == "cylinder":
        return _cylinder(n, rng, u(0.4, 0.7), u(0.6, 1.0))
    if name == "capsule":
        return _capsule(n, rng, u(0.4, 0.65), u(0.4, 0.8))
    if name == "cone":
        return _cone(n, rng, u(0.5, 0.9), u(0.6, 1.0))
    if name == "pyramid":
        return _pyramid(n, rng, u(0.5, 0.85), u(0.6, 1.0))
    if name == "torus":
        return _torus(n, rng, u(0.6, 0.8), u(0.15, 0.35))
    if name == "table":
        return _table(n, rng)
    if name == "helix":
        return _helix(n, rng)
    if name == "dumbbell":
        return _dumbbell(n, rng)
    raise ValueError(f"unknown synthetic class {name!r}; choose from {CLASS_NAMES}")


# ------------------------------------------------------------------------------------------------ deformation


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random rotation (QR of a Gaussian matrix with sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _deform(xyz: np.ndarray, normal: np.ndarray, rng: np.random.Generator) -> Surface:
    """Anisotropic scale, taper along y and a parabolic bend; normals by the inverse-transpose Jacobian."""
    scale = rng.uniform(0.85, 1.15, size=3)
    taper, bend = rng.uniform(-0.3, 0.3), rng.uniform(-0.35, 0.35)
    p = xyz * scale
    k = 1.0 + taper * p[:, 1]
    tapered = np.stack([p[:, 0] * k, p[:, 1], p[:, 2] * k], axis=1)
    out = tapered + np.stack([bend * tapered[:, 1] ** 2, np.zeros(len(p)), np.zeros(len(p))], axis=1)
    m = len(p)
    j_taper = np.zeros((m, 3, 3))
    j_taper[:, 0, 0], j_taper[:, 0, 1] = k, taper * p[:, 0]
    j_taper[:, 1, 1] = 1.0
    j_taper[:, 2, 2], j_taper[:, 2, 1] = k, taper * p[:, 2]
    j_bend = np.tile(np.eye(3), (m, 1, 1))
    j_bend[:, 0, 1] = 2.0 * bend * tapered[:, 1]
    jac = j_bend @ j_taper * scale[None, None, :]  # d out / d xyz
    new_normal = np.linalg.solve(np.transpose(jac, (0, 2, 1)), normal[:, :, None])[:, :, 0]
    new_normal /= np.linalg.norm(new_normal, axis=1, keepdims=True)
    return out, new_normal


def render_depth(xyz: np.ndarray, size: int = 32) -> np.ndarray:
    """Orthographic depth view along -z of a unit-sphere cloud: ``(size, size)`` uint8, nearer is brighter."""
    ij = np.clip(((xyz[:, :2] + 1.0) / 2.0 * size).astype(np.int64), 0, size - 1)
    depth = np.clip(55.0 + 200.0 * (xyz[:, 2] + 1.0) / 2.0, 1.0, 255.0)
    image = np.zeros(size * size)
    np.maximum.at(image, (size - 1 - ij[:, 1]) * size + ij[:, 0], depth)
    return image.reshape(size, size).astype(np.uint8)


def _raw_sample(name: str, points: int, rng: np.random.Generator) -> Surface:
    xyz, normal = _shape(name, points, rng)
    normal = normal / np.linalg.norm(normal, axis=1, keepdims=True)
    xyz, normal = _deform(xyz, normal, rng)
    rot = _random_rotation(rng)
    xyz, normal = xyz @ rot.T, normal @ rot.T
    xyz = normalize_unit_sphere(xyz)[0].astype(np.float64)
    xyz = xyz + rng.normal(0.0, rng.uniform(0.004, 0.012), size=xyz.shape)
    return xyz.astype(np.float32), normal.astype(np.float32)


def make_sample(
    class_index: int,
    index: int,
    *,
    split: str = "train",
    points: int = 1024,
    seed: int = 0,
    images: bool = False,
    image_size: int = 32,
) -> Sample:
    """One demo sample, deterministic in ``(seed, split, class_index, index)``, stored in FPS order.

    Returns:
        A :class:`~datapipes.types.Sample` with ``key``, ``xyz`` and ``normal`` ``(points, 3)`` float32,
        ``label``, ``meta`` and (with ``images``) one PNG depth view.
    """
    if not 0 <= class_index < len(CLASS_NAMES):
        raise ValueError(f"class_index must be in [0, {len(CLASS_NAMES)}), got {class_index}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return _finish([_make_raw(class_index, index, split, points, seed)], images, image_size)[0]


def _make_raw(class_index: int, index: int, split: str, points: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, _SPLITS.index(split), class_index, index])
    name = CLASS_NAMES[class_index]
    xyz, normal = _raw_sample(name, points, rng)
    return {"class": class_index, "index": index, "xyz": xyz, "normal": normal}


def _finish(raws: list[dict[str, Any]], images: bool, image_size: int) -> list[Sample]:
    """FPS-orders raw samples (one batched pass) and builds the final samples."""
    orders = fps_order_batch(np.stack([r["xyz"] for r in raws]))
    samples: list[Sample] = []
    for raw, order in zip(raws, orders):
        name = CLASS_NAMES[raw["class"]]
        xyz, normal = raw["xyz"][order], raw["normal"][order]
        sample: Sample = {
            "key": f"{name}_{raw['index']:05d}",
            "xyz": xyz,
            "normal": normal,
            "label": int(raw["class"]),
            "meta": {"class": name, "source": GENERATOR, "index": int(raw["index"]), "points": len(xyz)},
        }
        if images:
            sample["images"] = [encode_png(render_depth(xyz, image_size))]
        samples.append(sample)
    return samples


def write_synthetic(
    out: str | Path,
    *,
    classes: int = 10,
    per_class: int = 60,
    test_per_class: int = 20,
    points: int = 1024,
    seed: int = 0,
    images: bool = False,
    shard_size: int = 100,
    image_size: int = 32,
    on_shard: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Writes the demo dataset as shards (resumable) and returns the manifest.

    Args:
        out: output folder.
        classes: number of classes (the first ``classes`` of :data:`CLASS_NAMES`, 2 to 12).
        per_class: training samples per class.
        test_per_class: test samples per class (0: no test split).
        points: points per cloud.
        seed: generation seed.
        images: add one PNG depth view per sample.
        shard_size: samples per shard.
        image_size: side of the depth view in pixels.
        on_shard: called with ``(shard name, samples)`` after each shard (progress reporting).
    """
    if not 2 <= classes <= len(CLASS_NAMES):
        raise ValueError(f"classes must be in [2, {len(CLASS_NAMES)}], got {classes}")
    if per_class < 1 or test_per_class < 0 or points < 16 or shard_size < 1 or image_size < 8:
        raise ValueError(
            "need per_class >= 1, test_per_class >= 0, points >= 16, shard_size >= 1, image_size >= 8; got "
            f"{per_class}, {test_per_class}, {points}, {shard_size}, {image_size}"
        )
    options = {
        "format": "synthetic",
        "generator": GENERATOR,
        "classes": classes,
        "per_class": per_class,
        "test_per_class": test_per_class,
        "points": points,
        "seed": seed,
        "images": images,
        "image_size": image_size if images else None,
        "shard_size": shard_size,
        "normals": True,
        "normalization": "unit_sphere",
        "fps": True,
    }
    writer = ShardSetWriter(out, options=options)
    num_shards: dict[str, int] = {}
    for split, count in (("train", per_class), ("test", test_per_class)):
        if count == 0:
            continue
        items = [(c, i) for c in range(classes) for i in range(count)]
        order = np.random.default_rng([seed, _SPLITS.index(split), 10**6]).permutation(len(items))
        items = [items[j] for j in order]
        chunks = [items[s : s + shard_size] for s in range(0, len(items), shard_size)]
        num_shards[split] = len(chunks)
        for index, chunk in enumerate(chunks):
            if not writer.is_complete(split, index):
                raws = [_make_raw(c, i, split, points, seed) for c, i in chunk]
                writer.write_shard(split, index, _finish(raws, images, image_size), [])
            if on_shard is not None:
                on_shard(f"{split}-{index:06d}.tar", len(chunk))
    return writer.finalize(num_shards=num_shards, classes=CLASS_NAMES[:classes], fps_ordered=True)
