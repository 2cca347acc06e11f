"""The per-item processing every engine runs: read, validate, sample, reduce, normalise, normals, FPS order.

:func:`process_items` is the function every engine runs on a chunk of items: per item, read, validate,
sample meshes with a generator seeded from ``(seed, key)``, reduce to ``--points``, normalise to the unit
sphere, estimate normals and curvature, order by FPS, attach the label (only the FPS loops of equal-size
clouds are batched, with per-cloud results independent of the batch). An item's output depends only on the
item and the options, never on the chunk, the worker or the engine, so shards are byte-identical whatever
ran them. With ``encode=True`` (what the conversion driver asks for) each sample also leaves the worker
already encoded into its tar blocks (:func:`~datapipes.shards.samples.encode_for_shard`), so the process
writing the shards only appends bytes and hashes them.

Point-count policy (``--points N``): a mesh is sampled with exactly ``N`` points; a point set with more
than ``N`` points is reduced to ``N`` by FPS (or by a seeded random subset with ``--no-fps``); a point set
with fewer points is kept as it is (no duplicated points, which would distort FPS and density) and
``meta.num_points`` records the source count (the manifest records the min/max stored count). Without
``--points`` point sets keep all their points. Clouds with fewer than ``--min-points`` points are rejected.

Failures: whatever goes wrong with one item (an unreadable or malformed file, values that are NaN, infinite
or too large, a cloud that is degenerate after processing, an unexpected error in a reader) rejects that
item with the reason, and the run goes on; only ``MemoryError``, ``KeyboardInterrupt`` and ``SystemExit``
end it. Every stored array is checked to be finite.

Fields: every sample of a dataset has the same fields. Normals are stored when the source has them (meshes,
xyz+normal arrays; decided once per dataset, see :attr:`~datapipes.converters.base.Plan.source_normals`;
items lacking them get estimated ones) or with ``--normals``, which also adds curvature. Image views: a
source's own (``shapenet-render``) are stored as they are; ``--render-views K`` renders ``K`` views last,
from the item's mesh or its stored points (:mod:`datapipes.converters.images`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipes.converters.base import Converter, ConvertOptions, RawCloud, Reject, WorkItem, item_rng
from datapipes.converters.images import render_item
from datapipes.files import printable
from datapipes.geometry import fps_orders, normalize_unit_sphere
from datapipes.mesh import MeshError, estimate_normals_curvature, sample_surface
from datapipes.shards.samples import encode_for_shard

if TYPE_CHECKING:  # datapipes.types imports torch, which per-item workers do not need
    from datapipes.types import Sample

__all__ = ["MAX_COORDINATE", "MIN_EXTENT", "is_rejection", "process_item", "process_items"]


MAX_COORDINATE = 1e18
"""Largest accepted coordinate magnitude: squared distances of such points still fit in float32."""

MIN_EXTENT = 1e-12
"""Smallest accepted cloud extent (largest distance from the centroid) for unit-sphere normalisation."""


def _check_finite(name: str, arr: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise Reject(f"non-finite {name} values ({bad} NaN/inf)")


def _check_magnitude(name: str, arr: np.ndarray) -> None:
    """Rejects coordinates too large for float32 distance computations (FPS, normalisation)."""
    if arr.size:
        largest = float(np.max(np.abs(arr)))
        if largest > MAX_COORDINATE:
            raise Reject(
                f"{name} values too large: max |value| {largest:.3g} > {MAX_COORDINATE:g} "
                "(squared distances would overflow float32); rescale the source"
            )


@dataclass
class _Work:
    """One item between processing stages."""

    item: WorkItem
    xyz: np.ndarray
    normal: np.ndarray | None
    feat: np.ndarray | None
    meta: dict[str, Any]
    rng: np.random.Generator
    fps_ordered: bool = False
    curv: np.ndarray | None = None
    mesh: tuple[np.ndarray, np.ndarray] | None = None  # kept only to render image views
    images: list[bytes] | None = None
    frame: tuple[np.ndarray, float] | None = None  # (centre, scale) of the unit-sphere normalisation

    def take(self, order: np.ndarray) -> None:
        self.xyz = self.xyz[order]
        self.normal = None if self.normal is None else np.asarray(self.normal)[order]
        self.feat = None if self.feat is None else np.asarray(self.feat)[order]
        self.curv = None if self.curv is None else self.curv[order]


def _load(raw: RawCloud, item: WorkItem, options: ConvertOptions) -> _Work:
    """Stage 1: sample meshes, validate points (raises :class:`Reject`)."""
    rng = item_rng(options.seed, item.key)
    normal, feat = raw.normal, raw.feat
    if raw.mesh is not None:
        vertices, faces = raw.mesh
        _check_finite("vertex coordinate", np.asarray(vertices))
        _check_magnitude("vertex coordinate", np.asarray(vertices))
        if len(faces) == 0:
            raise Reject("degenerate mesh: no faces")
        try:
            xyz, normal = sample_surface(vertices, faces, options.points or 8192, rng)
        except ValueError as err:
            raise Reject(str(err)) from None
        counts = {"num_vertices": len(vertices), "num_faces": len(faces)}
    else:
        if raw.xyz is None:
            raise Reject("no points")
        xyz = np.asarray(raw.xyz)
        counts = {"num_points": len(xyz)}
        _check_finite("coordinate", xyz)
        _check_magnitude("coordinate", xyz)
        if normal is not None:
            _check_finite("normal", np.asarray(normal))
        if feat is not None:
            _check_finite("feature", np.asarray(feat))
    if len(xyz) < options.min_points:
        raise Reject(f"too few points: {len(xyz)} < --min-points {options.min_points}")
    meta: dict[str, Any] = {"source": item.source, **{k: int(v) for k, v in counts.items()}}
    if item.class_name:
        meta["class"] = item.class_name
    meta.update(raw.meta)
    work = _Work(item, np.asarray(xyz, dtype=np.float32), normal, feat, meta, rng)
    if raw.images is not None:
        if not raw.images or not all(isinstance(im, bytes) for im in raw.images):
            raise Reject("the source's images are not a non-empty list of PNG/JPEG bytes")
        work.images = list(raw.images)
    if raw.mesh is not None and options.render_views:
        work.mesh = (np.asarray(raw.mesh[0]), np.asarray(raw.mesh[1]))
    return work


def _shape(work: _Work, options: ConvertOptions, converter: Converter) -> None:
    """Stage 3 (after the reduction to ``--points``): extent check, normalisation, normals and curvature."""
    if not float(np.ptp(work.xyz, axis=0).max()) > 0.0:
        raise Reject("degenerate cloud: all points coincide")
    if options.normalize:
        pts = work.xyz.astype(np.float64)
        extent = float(np.sqrt(np.max(np.sum((pts - pts.mean(axis=0)) ** 2, axis=1))))
        if not extent >= MIN_EXTENT:
            raise Reject(f"degenerate cloud: extent {extent:.3g} < {MIN_EXTENT:g} is too small to normalise")
        xyz, center, scale = normalize_unit_sphere(work.xyz)
        work.xyz = np.asarray(xyz, dtype=np.float32)
        work.meta["center"], work.meta["scale"] = [float(c) for c in np.ravel(center)], float(scale)
        work.frame = (np.asarray(center, dtype=np.float64).reshape(3), float(scale))
    if not (options.normals or options.source_normals):
        work.normal = None
    if options.normals or (options.source_normals and work.normal is None):
        try:
            normal, curv = estimate_normals_curvature(
                work.xyz, k=options.normal_k, orient=converter.orientation
            )
        except ValueError as err:
            raise Reject(f"cannot estimate normals: {err}") from None
        work.normal = normal if work.normal is None else work.normal
        work.curv = curv if options.normals else None


def _render(work: _Work, options: ConvertOptions) -> None:
    """Stage 5 (``--render-views``): image views from the mesh or the stored points."""
    images, source = render_item(work.xyz, work.normal, work.mesh, work.frame, options)
    work.images, work.mesh = images, None
    work.meta["image_source"] = source


def _validate(work: _Work) -> None:
    """Last stage: every stored array is finite (rejects what processing could not make usable)."""
    for name, arr in (("coordinate", work.xyz), ("normal", work.normal), ("curvature", work.curv)):
        if arr is not None and not np.isfinite(arr).all():
            raise Reject(f"non-finite {name} values after processing")
    if work.feat is not None:
        feat = np.asarray(work.feat, dtype=np.float32)
        if not np.isfinite(feat).all():
            raise Reject("feature values overflow float32")


def _to_sample(work: _Work) -> Sample:
    n = len(work.xyz)
    sample: Sample = {"key": work.item.key, "xyz": np.ascontiguousarray(work.xyz, dtype=np.float32)}
    if work.normal is not None:
        sample["normal"] = np.ascontiguousarray(work.normal, dtype=np.float32)
    if work.curv is not None:
        sample["curv"] = np.ascontiguousarray(work.curv, dtype=np.float32)
    if work.feat is not None:
        sample["feat"] = np.ascontiguousarray(np.asarray(work.feat, dtype=np.float32).reshape(n, -1))
    if work.item.label >= 0:
        sample["label"] = int(work.item.label)
    if work.images:
        sample["images"] = list(work.images)
    sample["meta"] = printable(work.meta)
    return sample


_FATAL = (MemoryError,)
"""Exceptions that end the run instead of rejecting one item (the machine, not the item, is the problem)."""

_REASON_CHARS = 500


def _reason(item: WorkItem, err: BaseException, stage: str = "unreadable") -> str:
    """One-line rejection reason of an exception raised while processing ``item``."""
    if isinstance(err, Reject):
        text = str(err)
    elif isinstance(err, MeshError):
        text = str(err).removeprefix(f"{item.path}: ")
    else:
        text = f"{stage}: {type(err).__name__}: {err}"
    text = " ".join(printable(text).split()) or type(err).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def process_items(
    items: Sequence[WorkItem], options: ConvertOptions, *, encode: bool = False
) -> list[dict[str, Any]]:
    """The function every engine runs on a chunk of items: one finished sample or rejection per item.

    Each item is processed on its own (read, validate, sample meshes with a generator seeded from
    ``(seed, key)``, reduce to ``--points``, normalise, estimate normals, FPS order, label); only the FPS
    loops of equal-size clouds are batched, which gives the same orders as one cloud at a time. So the
    result for an item does not depend on the chunk, the worker or the engine.

    Args:
        items: work items.
        options: conversion options (defaults resolved).
        encode: return every sample encoded for the shard writer
            (:class:`~datapipes.shards.samples.EncodedSample`: its tar blocks, fields, point count and label)
            instead of its arrays; the shard is byte-identical either way. A sample that cannot be encoded
            raises ``ValueError`` (the run ends, as it does when the writer encodes it), it is not rejected.

    Returns:
        Per item, a :class:`~datapipes.types.Sample` (or with ``encode`` an
        :class:`~datapipes.shards.samples.EncodedSample`) or a :class:`~datapipes.types.Rejection` (it has a
        ``reason``), in input order.

    Raises:
        ValueError: with ``encode``, a sample the shard writer would refuse (see
            :func:`~datapipes.shards.samples.encode_for_shard`).
    """
    from datapipes.converters import get_converter

    converter = get_converter(options.format)
    results: list[dict[str, Any] | None] = [None] * len(items)
    works: dict[int, _Work] = {}

    def reject(i: int, reason: str) -> None:
        item = items[i]
        source, split = printable(item.source), printable(item.split)
        results[i] = {"source": source, "reason": printable(reason), "split": split}
        works.pop(i, None)

    def each(stage: str, step: Callable[[int], None]) -> None:
        """Runs ``step`` on every live item; an item whose step raises is rejected with the reason."""
        for i in list(works):
            try:
                step(i)
            except _FATAL:
                raise
            except Exception as err:
                reject(i, _reason(items[i], err, stage))

    def fps_stage(indices: list[int], n: int | None) -> None:
        """Batched FPS of ``indices``; if a batch fails, each cloud alone (failures rejected)."""
        try:
            orders = fps_orders([works[i].xyz for i in indices], n)
        except _FATAL:
            raise
        except Exception:
            orders = []
            for i in indices:
                try:
                    orders.append(fps_orders([works[i].xyz], n)[0])
                except _FATAL:
                    raise
                except Exception as err:
                    reject(i, _reason(items[i], err, "farthest point sampling failed"))
            indices = [i for i in indices if i in works]
        for i, order in zip(indices, orders):
            works[i].take(order)
            works[i].fps_ordered = True

    for i, item in enumerate(items):
        if item.error:
            reject(i, item.error)
            continue
        try:
            works[i] = _load(converter.read(item, options), item, options)
        except _FATAL:
            raise
        except Exception as err:
            reject(i, _reason(item, err))
    # stage 2: reduce large point sets to --points (FPS, or a seeded random subset)
    if options.points is not None:
        points = options.points
        large = [i for i, w in works.items() if len(w.xyz) > points]
        if options.fps:
            fps_stage(large, points)  # a reduction by FPS is already in FPS order
        else:
            large_set = set(large)

            def subset(i: int) -> None:
                if i in large_set:
                    size = len(works[i].xyz)
                    works[i].take(np.sort(works[i].rng.choice(size, size=points, replace=False)))

            each("processing failed", subset)
    each("processing failed", lambda i: _shape(works[i], options, converter))
    # stage 4: store in farthest-point order
    if options.fps:
        fps_stage([i for i, w in works.items() if not w.fps_ordered], None)
    if options.render_views:
        each("rendering failed", lambda i: _render(works[i], options))
    each("processing failed", lambda i: _validate(works[i]))

    def finish(i: int) -> None:
        results[i] = dict(_to_sample(works[i]))

    each("processing failed", finish)
    if encode:  # outside ``each``: a sample the writer refuses ends the run, as it did in the writer
        for i, result in enumerate(results):
            if result is not None and not is_rejection(result):
                results[i] = dict(encode_for_shard(result))  # type: ignore[arg-type]
    return [r for r in results if r is not None]


def process_item(item: WorkItem, options: ConvertOptions) -> dict[str, Any]:
    """:func:`process_items` for one item.

    Args:
        item: the work item.
        options: conversion options (defaults resolved).

    Returns:
        A :class:`~datapipes.types.Sample`, or a :class:`~datapipes.types.Rejection` (it has a ``reason``).
    """
    return process_items([item], options)[0]


def is_rejection(result: Mapping[str, Any]) -> bool:
    """Whether a :func:`process_item` / :func:`process_items` result (plain or encoded) is a rejection."""
    return "reason" in result and "xyz" not in result
