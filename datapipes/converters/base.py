"""Work items, the per-item processing function and the conversion driver shared by every format.

A converter (one per format, see :mod:`datapipes.converters`) does two things:

- ``plan(src, options)`` lists the **work items** of each split in sorted source order, plus the class
  names. The driver then applies a seeded permutation per split (so shards mix classes; ``--no-shuffle``
  keeps the sorted order). Shard ``i`` of a split holds exactly items ``[i*S, (i+1)*S)`` of that order
  (``S = shard_size``) minus the rejected ones, so a re-run recomputes only the shards that are not
  complete and verified: nothing is lost or duplicated.
- ``read(item, options)`` loads one item's raw cloud (points, a mesh to sample, normals, features) or
  raises :class:`Reject` with a precise reason.

:func:`process_items` is the function every engine runs on a chunk of items: per item, read, validate,
sample meshes with a generator seeded from ``(seed, key)``, reduce to ``--points``, normalise to the unit
sphere, estimate normals and curvature, order by FPS, attach the label (only the FPS loops of equal-size
clouds are batched, with per-cloud results independent of the batch). An item's output depends only on the
item and the options, never on the chunk, the worker or the engine, so shards are byte-identical whatever
ran them.

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
xyz+normal arrays; decided once per dataset, see :attr:`Plan.source_normals`; items lacking them get
estimated ones) or with ``--normals``, which also adds curvature.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np

from datapipes.engines import Engine, ShardJob
from datapipes.errors import UserError
from datapipes.mesh import MeshError, Orientation, estimate_normals_curvature, sample_surface

if TYPE_CHECKING:  # datapipes.types imports torch, which per-item workers do not need
    from datapipes.shards import ShardSetWriter
    from datapipes.types import Rejection, Sample


class Reject(Exception):
    """Raised by a converter's ``read`` for an unusable item; the message is the rejection reason."""


@dataclass(frozen=True)
class WorkItem:
    """One unit of conversion work: a file, or one row of a container file (HDF5, Arrow, Parquet).

    Attributes:
        key: sample key, unique in the dataset (letters, digits, ``_`` and ``-``).
        split: output split.
        source: where it came from, relative to SRC (``file`` or ``file#row``); used in meta and rejections.
        path: absolute path of the file to read.
        row: row inside a container file; -1 for a whole file.
        label: class index; -1 when unlabelled.
        class_name: class name, ``""`` when unlabelled.
        error: a problem found while planning (e.g. an unreadable container); the item is then rejected
            with this reason without being read.
    """

    key: str
    split: str
    source: str
    path: str
    row: int = -1
    label: int = -1
    class_name: str = ""
    error: str = ""


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that decides the content of the shards (and so must match when a run is resumed).

    Engine, worker count, ``--strict`` and output formatting are deliberately not here.

    Attributes:
        format: converter name.
        src: absolute source path (or hub id for ``hf``).
        points: target point count (``None``: format default, see :attr:`Converter.default_points`).
        normalize: centre and scale each cloud to the unit sphere.
        normals: estimate normals (where the source has none) and curvature.
        fps: store points in farthest-point order.
        seed: base seed; each item's generator is derived from ``(seed, key)``.
        min_points: clouds with fewer points are rejected.
        shard_size: items per shard.
        normal_k: neighbourhood size for normal and curvature estimation.
        variant: format variant (``modelnet-resampled``: modelnet40/modelnet10; ``scanobjectnn``:
            obj_bg/obj_only/pb_t50_rs).
        test_fraction: ``mesh-folder`` without split folders: seeded fraction of each class sent to test.
        shuffle: store each split's items in a seeded shuffled order (classes mixed within shards, which
            streaming readers need); ``False`` keeps the sorted source order.
        points_column: ``hf``: column holding the points.
        label_column: ``hf``: column holding the label.
        split_map: ``hf``: ``(source_split, output_split)`` pairs.
        source_normals: the source provides normals (set by the driver from :attr:`Plan.source_normals`);
            they are stored, and estimated for the items that lack them, so every sample has the same fields.
    """

    format: str
    src: str
    points: int | None = None
    normalize: bool = True
    normals: bool = False
    fps: bool = True
    seed: int = 0
    min_points: int = 16
    shard_size: int = 1000
    normal_k: int = 16
    variant: str | None = None
    test_fraction: float = 0.0
    shuffle: bool = True
    points_column: str | None = None
    label_column: str | None = None
    split_map: tuple[tuple[str, str], ...] = ()
    source_normals: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (written to the manifest and compared on resume)."""
        out = asdict(self)
        out["split_map"] = [list(pair) for pair in self.split_map]
        return out


@dataclass
class RawCloud:
    """What a converter's ``read`` returns for one item (before sampling, normalisation and ordering).

    Exactly one of ``xyz`` (a point set) and ``mesh`` (vertices, faces) is set.

    Attributes:
        xyz: ``(N, 3)`` points, any float dtype.
        normal: ``(N, 3)`` normals from the source, if any.
        feat: ``(N, C)`` per-point features from the source (e.g. LiDAR intensity), if any.
        mesh: ``(vertices (V, 3), faces (F, 3))`` to sample the surface of.
        meta: extra JSON-serialisable metadata.
    """

    xyz: np.ndarray | None = None
    normal: np.ndarray | None = None
    feat: np.ndarray | None = None
    mesh: tuple[np.ndarray, np.ndarray] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """A converter's work list.

    Attributes:
        splits: split name -> work items in their fixed order.
        classes: class names, index = label (empty when unlabelled).
        source_normals: the source has normals (mesh faces, xyz+normal columns); decided from the format or
            the first item, never per item, so that all samples of a dataset have the same fields.
        info: extra JSON-serialisable source information for the manifest.
    """

    splits: dict[str, list[WorkItem]]
    classes: list[str]
    source_normals: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Converter(ABC):
    """One source format. Subclasses are stateless and registered by name in :mod:`datapipes.converters`.

    Class attributes give the format's defaults (used when the command line leaves an option unset) and the
    format-specific options it accepts.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    default_points: ClassVar[int | None] = None
    default_normalize: ClassVar[bool] = True
    default_fps: ClassVar[bool] = True
    orientation: ClassVar[Orientation] = "consistent"
    variants: ClassVar[tuple[str, ...]] = ()
    accepts: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Lists the work items per split (sorted, deterministic) and the class names.

        Raises:
            UserError: the source layout is not this format (missing folders or list files).
        """

    @abstractmethod
    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Loads one item.

        Raises:
            Reject: the item is unusable; the message is the reason.
        """


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(*parts: str) -> str:
    """Joins parts into a shard-safe key: anything but letters, digits, ``_`` and ``-`` becomes ``_``.

    Args:
        parts: key components, joined with ``_``.

    Returns:
        The key (never empty).
    """
    key = "_".join(_KEY_UNSAFE.sub("_", p).strip("_") for p in parts if p)
    return key or "_"


def item_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one item: derived from the base seed and the key only (engine-independent).

    Args:
        seed: base seed (``--seed``).
        key: the item's key.

    Returns:
        A fresh PCG64 generator.
    """
    digest = hashlib.sha256(key.encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return np.random.default_rng(np.random.SeedSequence([seed % 2**32, *words]))


def as_points(array: Any, what: str = "points") -> tuple[np.ndarray, np.ndarray | None]:
    """Splits an ``(N, 3)`` or ``(N, 6)`` (xyz + normals) array into xyz and normals.

    Args:
        array: the loaded array.
        what: name used in the rejection reason.

    Returns:
        ``(xyz, normal or None)``.

    Raises:
        Reject: not a 2-D numeric array with 3 or 6 columns.
    """
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiu":
        raise Reject(f"wrong array dtype {arr.dtype}: expected numeric {what}")
    if arr.ndim != 2 or arr.shape[1] not in (3, 6):
        raise Reject(f"wrong array shape {tuple(arr.shape)}: expected (N, 3) or (N, 6) {what}")
    if arr.shape[1] == 6:
        return arr[:, :3], arr[:, 3:6]
    return arr, None


MAX_COORDINATE = 1e18
"""Largest accepted coordinate magnitude: squared distances of such points still fit in float32."""

MIN_EXTENT = 1e-12
"""Smallest accepted cloud extent (largest distance from the centroid) for unit-sphere normalisation."""


def printable_text(text: str) -> str:
    r"""``text`` as valid Unicode: undecodable file-name bytes (``surrogateescape``) are spelled ``\xNN``.

    File names that are not valid UTF-8 reach Python as strings with lone surrogates, which cannot be
    written to UTF-8 JSON; sources, class names and reasons go through this before they are stored.

    Args:
        text: any string.

    Returns:
        The same string when it is valid Unicode, else its readable escaped form.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _clean_meta(value: Any) -> Any:
    if isinstance(value, str):
        return printable_text(value)
    if isinstance(value, dict):
        return {printable_text(str(k)): _clean_meta(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_meta(v) for v in value]
    return value


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


def _normalize(xyz: np.ndarray) -> tuple[np.ndarray, list[float], float]:
    from datapipes.geometry import normalize_unit_sphere

    out, center, scale = normalize_unit_sphere(xyz)
    return np.asarray(out, dtype=np.float32), [float(c) for c in np.ravel(center)], float(scale)


FPS_BATCH_POINTS = 32768
"""Points per batched FPS loop: larger batches stop fitting in cache and get slower per cloud."""


def fps_orders(clouds: Sequence[np.ndarray], n: int | None = None) -> list[np.ndarray]:
    """Farthest-point orders of several clouds, batching clouds of equal size into vectorised loops.

    Always goes through :func:`datapipes.geometry.fps_order_batch`, whose per-cloud result does not depend
    on the batch it is in, so any grouping of items (engine, worker, chunk) gives the same orders. Batches
    hold up to :data:`FPS_BATCH_POINTS` points (at least one cloud).

    Args:
        clouds: ``(N_i, 3)`` float32 point sets.
        n: indices per cloud (``None``: a full permutation).

    Returns:
        One int64 index array per cloud, in input order.
    """
    from datapipes.geometry import fps_order_batch

    out: list[np.ndarray | None] = [None] * len(clouds)
    groups: dict[int, list[int]] = {}
    for i, xyz in enumerate(clouds):
        groups.setdefault(len(xyz), []).append(i)
    for size, members in groups.items():
        step = max(1, FPS_BATCH_POINTS // max(size, 1))
        for start in range(0, len(members), step):
            part = members[start : start + step]
            batch = np.stack([np.asarray(clouds[i], dtype=np.float32) for i in part])
            orders = np.asarray(fps_order_batch(batch, n), dtype=np.int64)
            for row, i in enumerate(part):
                out[i] = orders[row]
    return [o for o in out if o is not None]


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
    return _Work(item, np.asarray(xyz, dtype=np.float32), normal, feat, meta, rng)


def _shape(work: _Work, options: ConvertOptions, converter: Converter) -> None:
    """Stage 3 (after the reduction to ``--points``): extent check, normalisation, normals and curvature."""
    if not float(np.ptp(work.xyz, axis=0).max()) > 0.0:
        raise Reject("degenerate cloud: all points coincide")
    if options.normalize:
        pts = work.xyz.astype(np.float64)
        extent = float(np.sqrt(np.max(np.sum((pts - pts.mean(axis=0)) ** 2, axis=1))))
        if not extent >= MIN_EXTENT:
            raise Reject(f"degenerate cloud: extent {extent:.3g} < {MIN_EXTENT:g} is too small to normalise")
        work.xyz, center, scale = _normalize(work.xyz)
        work.meta["center"], work.meta["scale"] = center, scale
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
    sample["meta"] = _clean_meta(work.meta)
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
    text = " ".join(printable_text(text).split()) or type(err).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def process_items(items: Sequence[WorkItem], options: ConvertOptions) -> list[dict[str, Any]]:
    """The function every engine runs on a chunk of items: one finished sample or rejection per item.

    Each item is processed on its own (read, validate, sample meshes with a generator seeded from
    ``(seed, key)``, reduce to ``--points``, normalise, estimate normals, FPS order, label); only the FPS
    loops of equal-size clouds are batched, which gives the same orders as one cloud at a time. So the
    result for an item does not depend on the chunk, the worker or the engine.

    Args:
        items: work items.
        options: conversion options (defaults resolved).

    Returns:
        Per item, a :class:`~datapipes.types.Sample` or a :class:`~datapipes.types.Rejection` (it has a
        ``reason``), in input order.
    """
    from datapipes.converters import get_converter

    converter = get_converter(options.format)
    results: list[dict[str, Any] | None] = [None] * len(items)
    works: dict[int, _Work] = {}

    def reject(i: int, reason: str) -> None:
        item = items[i]
        source, split = printable_text(item.source), printable_text(item.split)
        results[i] = {"source": source, "reason": printable_text(reason), "split": split}
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
    each("processing failed", lambda i: _validate(works[i]))

    def finish(i: int) -> None:
        results[i] = dict(_to_sample(works[i]))

    each("processing failed", finish)
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
    """Whether a :func:`process_item` result is a rejection."""
    return "reason" in result and "xyz" not in result


def resolve_options(converter: Converter, base: ConvertOptions, given: Mapping[str, Any]) -> ConvertOptions:
    """Fills in the format defaults for options the user left unset and checks format-specific ones.

    Args:
        converter: the format.
        base: options with everything but ``points``, ``normalize``, ``fps`` and ``variant`` set.
        given: the command-line values (``None`` = not given) of ``points``, ``normalize``, ``fps``,
            ``variant``, ``test_fraction``, ``points_column``, ``label_column`` and ``split_map``.

    Returns:
        The completed options.

    Raises:
        UserError: an option this format does not accept, or an unknown variant.
    """
    for name in ("variant", "test_fraction", "points_column", "label_column", "split_map"):
        if given.get(name) not in (None, (), "") and name not in converter.accepts:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} does not apply to format {converter.name!r}")
    variant = given.get("variant")
    if converter.variants:
        variant = variant or converter.variants[0]
        if variant not in converter.variants:
            raise UserError(f"--variant {variant!r} is not one of {', '.join(converter.variants)}")
    points, normalize, fps = given.get("points"), given.get("normalize"), given.get("fps")
    return replace(
        base,
        points=converter.default_points if points is None else int(points),
        normalize=converter.default_normalize if normalize is None else bool(normalize),
        fps=converter.default_fps if fps is None else bool(fps),
        variant=variant,
    )


@dataclass
class ConvertReport:
    """Outcome of a conversion (the summary printed by the CLI).

    Attributes:
        format: converter name.
        out: output directory.
        samples: split -> number of samples written.
        classes: class names.
        rejected: number of rejected items (all shards, including resumed ones).
        shards_written: shards computed in this run.
        shards_resumed: complete shards kept from an earlier run.
        elapsed_s: wall-clock seconds.
        empty_classes: classes without any sample in any split (a class folder without input files, or
            whose files were all rejected); they keep their label index.
    """

    format: str
    out: str
    samples: dict[str, int]
    classes: list[str]
    rejected: int
    shards_written: int
    shards_resumed: int
    elapsed_s: float
    empty_classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        out = asdict(self)
        out["num_classes"] = len(self.classes)
        return out


def shuffled(items: Sequence[WorkItem], seed: int, split: str) -> list[WorkItem]:
    """A seeded permutation of a split's items (depends only on the seed, the split and the item list).

    Args:
        items: the split's items in sorted order.
        seed: base seed.
        split: split name (each split gets its own permutation).

    Returns:
        The items in shuffled order.
    """
    perm = item_rng(seed, f"__order__/{split}").permutation(len(items))
    return [items[i] for i in perm]


def _printable_plan(plan: Plan) -> None:
    """Makes sources and class names valid Unicode (file names need not be UTF-8), in place."""
    plan.classes = [printable_text(c) for c in plan.classes]
    for items in plan.splits.values():
        for i, item in enumerate(items):
            source, class_name = printable_text(item.source), printable_text(item.class_name)
            if source != item.source or class_name != item.class_name:
                items[i] = replace(item, source=source, class_name=class_name)


def _check_plan(plan: Plan) -> None:
    seen: dict[str, str] = {}
    for split, items in plan.splits.items():
        for item in items:
            if item.key in seen:
                raise UserError(
                    f"two source items map to the same sample key {item.key!r}: {seen[item.key]} and "
                    f"{item.source}; rename one of them"
                )
            seen[item.key] = item.source
            if item.split != split:
                raise ValueError(f"item {item.key!r} listed under split {split!r} but says {item.split!r}")


def count_rejected(out: Path) -> int:
    """Number of lines in ``OUT/rejected.jsonl`` (0 when absent)."""
    path = out / "rejected.jsonl"
    if not path.is_file():
        return 0
    with path.open() as fh:
        return sum(1 for line in fh if line.strip())


def convert(
    converter: Converter,
    options: ConvertOptions,
    out: Path,
    engine: Engine,
    *,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    on_shard: Callable[[str, int], None] | None = None,
) -> ConvertReport:
    """Plans, runs and finalises one conversion (resuming complete shards of an earlier identical run).

    Args:
        converter: the format.
        options: resolved options (:func:`resolve_options`).
        out: output directory.
        engine: where the per-item function runs.
        strict: any rejection raises instead of being listed.
        progress: called with the number of items just finished.
        on_total: called once with the number of items still to process.
        on_shard: called after each shard is written, with ``(split, index)``.

    Returns:
        The report (``empty_classes`` lists the classes without any sample).

    Raises:
        UserError: bad source layout, duplicate keys, an output folder that holds files pcpt did not write or
            a run with different options, another conversion writing to the same folder, a rejection under
            ``strict``, or every item rejected (``rejected.jsonl`` then lists the reasons and no manifest is
            written).
    """
    from datapipes.shards import ShardSetWriter

    start = time.perf_counter()
    plan = converter.plan(Path(options.src), options)
    _printable_plan(plan)
    _check_plan(plan)
    options = replace(options, source_normals=plan.source_normals)
    if options.shuffle:
        plan.splits = {split: shuffled(items, options.seed, split) for split, items in plan.splits.items()}
    if not any(plan.splits.values()):
        raise UserError(f"{options.src}: no {converter.name} input found")
    with ShardSetWriter(out, options=options.to_dict()) as writer:
        manifest, written, resumed = _run(
            converter, writer, plan, options, engine, strict, progress, on_total, on_shard
        )
    samples_per_split = {s: int(v.get("samples", 0)) for s, v in manifest.get("splits", {}).items()}
    totals = {c: sum(int(per.get(c, 0)) for per in manifest.get("counts", {}).values()) for c in plan.classes}
    return ConvertReport(
        format=converter.name,
        out=printable_text(str(out)),
        samples=samples_per_split,
        classes=list(plan.classes),
        rejected=count_rejected(out),
        shards_written=written,
        shards_resumed=resumed,
        elapsed_s=round(time.perf_counter() - start, 3),
        empty_classes=[c for c in plan.classes if totals[c] == 0],
    )


def _run(
    converter: Converter,
    writer: ShardSetWriter,
    plan: Plan,
    options: ConvertOptions,
    engine: Engine,
    strict: bool,
    progress: Callable[[int], None] | None,
    on_total: Callable[[int], None] | None,
    on_shard: Callable[[str, int], None] | None,
) -> tuple[dict[str, Any], int, int]:
    """Computes the shards that are not complete and finalises; returns ``(manifest, written, resumed)``."""
    size = options.shard_size
    num_shards = {split: math.ceil(len(items) / size) for split, items in plan.splits.items() if items}
    jobs: list[ShardJob] = []
    resumed = 0
    for split in sorted(num_shards):
        items = plan.splits[split]
        for index in range(num_shards[split]):
            if writer.is_complete(split, index):
                resumed += 1
            else:
                jobs.append(ShardJob(split, index, tuple(items[index * size : (index + 1) * size])))
    if on_total is not None:
        on_total(sum(len(job.items) for job in jobs))
    fn = partial(process_items, options=options)
    written = 0
    for job, results in engine.run(fn, jobs, progress):
        rejected = [cast("Rejection", r) for r in results if is_rejection(r)]
        if strict and rejected:
            first = rejected[0]
            raise UserError(f"{first['source']}: {first['reason']} (rejected under --strict)")
        samples = [cast("Sample", r) for r in results if not is_rejection(r)]
        writer.write_shard(job.split, job.index, samples, rejected)
        written += 1
        if on_shard is not None:
            on_shard(job.split, job.index)
    extra = {"converter": {"format": converter.name, **plan.info}}
    manifest = writer.finalize(
        num_shards=num_shards,
        classes=plan.classes,
        fps_ordered=options.fps,
        extra=extra,
        require_samples=True,
    )
    return manifest, written, resumed


def dumps_report(report: ConvertReport) -> str:
    """The ``--json`` summary."""
    return json.dumps(report.to_dict(), indent=2, sort_keys=True)
