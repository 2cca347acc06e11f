"""What a source format implements: the :class:`Converter` interface and the records it produces and reads.

A converter (one per format, registered in :mod:`datapipes.converters`) does two things:

- ``plan(src, options)`` lists the **work items** of each split in sorted source order, plus the class
  names (a :class:`Plan`). The driver (:mod:`datapipes.converters.driver`) then applies a seeded permutation
  per split, so shards mix classes, and cuts each split into shards.
- ``read(item, options)`` loads one item's raw cloud (a :class:`RawCloud`: points, a mesh to sample,
  normals, features) or raises :class:`Reject` with a precise reason.

Everything else (sampling, normalisation, normals, FPS order, validation) is shared, in
:mod:`datapipes.converters.process`; helpers for walking source trees and reading plain files are in
:mod:`datapipes.converters.sources`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from datapipes.mesh import Orientation

__all__ = ["ConvertOptions", "Converter", "Plan", "RawCloud", "Reject", "WorkItem", "item_rng"]


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
        test_fraction: ``mesh-folder`` without split folders: seeded fraction of each class sent to test;
            ``shapenet-render`` without split lists: fraction of models sent to test by a model-id hash.
        shuffle: store each split's items in a seeded shuffled order (classes mixed within shards, which
            streaming readers need); ``False`` keeps the sorted source order.
        points_column: ``hf``: column holding the points.
        label_column: ``hf``: column holding the label.
        split_map: ``hf``: ``(source_split, output_split)`` pairs.
        source_normals: the source provides normals (set by the driver from :attr:`Plan.source_normals`);
            they are stored, and estimated for the items that lack them, so every sample has the same fields.
        render_views: image views rendered per sample at conversion (``--render-views``; 0: none): from the
            mesh for mesh formats, splatted from the points otherwise (:mod:`datapipes.converters.images`).
        render_size: side of the rendered views in pixels.
        render_up: the world axis that points up in the rendered views (the format's
            :attr:`Converter.render_up` unless ``--render-up``); ``None`` when nothing is rendered.
        max_views: ``shapenet-render``: views stored per model (the first renderings in sorted order);
            ``--max-views``, else set by the driver to the count the plan decided (:attr:`Plan.images`).
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
    render_views: int = 0
    render_size: int = 144
    render_up: str | None = None
    max_views: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (written to the manifest and compared on resume).

        The image options appear only when used, so conversions without images keep the form they had
        before image views existed (and earlier runs of them still resume).
        """
        out = asdict(self)
        out["split_map"] = [list(pair) for pair in self.split_map]
        if not self.render_views:
            for name in ("render_views", "render_size", "render_up"):
                del out[name]
        if self.max_views is None:
            del out["max_views"]
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
        images: PNG/JPEG bytes of the source's own image views, in view order (stored as they are).
    """

    xyz: np.ndarray | None = None
    normal: np.ndarray | None = None
    feat: np.ndarray | None = None
    mesh: tuple[np.ndarray, np.ndarray] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    images: list[bytes] | None = None


@dataclass
class Plan:
    """A converter's work list.

    Attributes:
        splits: split name -> work items in their fixed order.
        classes: class names, index = label (empty when unlabelled).
        source_normals: the source has normals (mesh faces, xyz+normal columns); decided from the format or
            the first item, never per item, so that all samples of a dataset have the same fields.
        info: extra JSON-serialisable source information for the manifest.
        channels: names of the channels of multi-channel per-point fields the format stores, e.g.
            ``{"feat": ("intensity",)}`` (written to the manifest, where batches select channels by name).
        images: the source's own image views, for the manifest's ``images`` entry, e.g. ``{"views": 24,
            "size": 137, "source": "rendering"}``; ``None`` when the source has none (``--render-views``
            images are described by the driver).
    """

    splits: dict[str, list[WorkItem]]
    classes: list[str]
    source_normals: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    channels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    images: dict[str, Any] | None = None


class Converter(ABC):
    """One source format. Subclasses are stateless and registered by name in :mod:`datapipes.converters`.

    Class attributes give the format's defaults (used when the command line leaves an option unset) and the
    format-specific options it accepts. ``render_source`` says how ``--render-views`` makes image views for
    the format: ``"point_splat"`` (from the points, the default), ``"mesh_render"`` (from the mesh; point-set
    items of the format are splatted) or ``None`` (the option does not apply: scenes, formats with their
    own images). ``render_up`` is the world up axis of the format's objects for those views.
    ``default_test_fraction`` is the ``--test-fraction`` used when the option is not given (formats that
    accept it).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    default_points: ClassVar[int | None] = None
    default_normalize: ClassVar[bool] = True
    default_fps: ClassVar[bool] = True
    orientation: ClassVar[Orientation] = "consistent"
    variants: ClassVar[tuple[str, ...]] = ()
    accepts: ClassVar[frozenset[str]] = frozenset()
    render_source: ClassVar[str | None] = "point_splat"
    render_up: ClassVar[str] = "y"
    default_test_fraction: ClassVar[float] = 0.0

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
