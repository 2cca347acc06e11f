"""Data types shared by the pcpt data layer: one cloud before encoding, a rejection record, and batches.

Reserved sample fields and the shard members they become (see :mod:`datapipes.shards`):

========== ============================ =========================================
field      in memory                    shard member
========== ============================ =========================================
``key``    ``str`` (no dots)            ``__key__``
``xyz``    float32 ``(N, 3)``           ``xyz.npy``
``normal`` float32 ``(N, 3)``           ``normal.npy``
``curv``   float32 ``(N,)``/``(N, 1)``  ``curv.npy``
``feat``   float32 ``(N, C)``           ``feat.npy`` (channel names, e.g. ``intensity``, in the manifest)
``label``  ``int``                      ``cls.txt``
``images`` ``list[bytes]`` (PNG/JPEG)   ``img.png`` / ``img.jpg``, or ``img.0.png``, ``img.1.png``, ...
``meta``   ``dict`` (JSON-serialisable) ``meta.json``
========== ============================ =========================================

A batch is described by :class:`BatchFields` (what it holds besides points, labels and keys) and delivered as
a :class:`PointBatch`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

if TYPE_CHECKING:  # torch is not imported at runtime, so shard tools (pcpt-data) start fast
    from torch import Tensor

__all__ = ["PAD_VALUE", "POINT_FIELDS", "BatchFields", "PointBatch", "Rejection", "Sample"]

#: Fields that hold one row per point; point selection and dropout apply to all of them together.
POINT_FIELDS: tuple[str, ...] = ("xyz", "normal", "curv", "feat")

PAD_VALUE = math.nan
"""What fills the padding rows of ragged batches (points, views, normals, feats): NaN, so a computation that
forgets :meth:`PointBatch.mask` gives NaN instead of a plausible but wrong result (a zero would look like a
point at the origin)."""


class Sample(TypedDict, total=False):
    """One cloud in memory, before encoding into a shard (every field but ``key`` and ``xyz`` is optional)."""

    key: str
    xyz: np.ndarray
    normal: np.ndarray
    curv: np.ndarray
    feat: np.ndarray
    label: int
    images: list[bytes]
    meta: dict


class Rejection(TypedDict):
    """A source item a converter skipped, written to ``OUT/rejected.jsonl``."""

    source: str
    reason: str
    split: str


@dataclass(frozen=True)
class BatchFields:
    """What the batches of a loader hold besides points, labels and keys: one description for every loader.

    Every loader (:func:`~datapipes.pipeline.make_train_loader`, :func:`~datapipes.pipeline.make_eval_loader`,
    :class:`~datapipes.memory.InMemoryPointDataset`, :class:`~datapipes.datamodule.PointCloudDataModule`)
    takes one ``BatchFields`` and fills the matching :class:`PointBatch` attributes. Frozen and made of plain
    values, so it hashes, pickles into DataLoader workers and reads from YAML (LightningCLI:
    ``data.fields: {normals: true, point_views: 2}``).

    Attributes:
        normals: ``PointBatch.normals`` ``(B, N, 3)`` from the stored unit normals.
        point_features: per-point channels concatenated, in this order, into ``PointBatch.feats`` ``(B, N,
            C)`` and named in ``PointBatch.feat_names``: a stored field (``"feat"``: all its channels,
            ``"curv"``), or one channel of ``feat`` by the name the manifest gives it (``"intensity"``,
            ``"time"``).
        image_views: images per sample in ``PointBatch.images`` ``(B, V, C, H, W)``; 0: no images. Training
            loaders draw ``V`` distinct stored views at random, evaluation takes the first ``V``.
        point_views: transformed copies of each cloud. With ``V > 1``, ``PointBatch.views`` is ``(B, V, N,
            3)``: the whole per-sample transform (point selection and augmentation) runs once per view, each
            with its own random draw, e.g. two augmentations of one cloud for contrastive learning; ``points``
            is view 0, and normals and features belong to view 0.
        ragged: clouds keep their own point counts (a point budget, if any, is an upper bound): batches are
            padded to the largest cloud with :data:`PAD_VALUE` and carry ``PointBatch.lengths`` ``(B,)``.
            Otherwise every cloud of a batch must have the same count.
    """

    normals: bool = False
    point_features: tuple[str, ...] = ()
    image_views: int = 0
    point_views: int = 1
    ragged: bool = False

    def __post_init__(self) -> None:
        names = self.point_features
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"point_features must be a sequence of field or channel names, got {names!r}")
        object.__setattr__(self, "point_features", tuple(names))
        if len(set(self.point_features)) != len(self.point_features):
            raise ValueError(f"point_features must not repeat a name, got {self.point_features}")
        if self.image_views < 0 or self.point_views < 1:
            raise ValueError(
                f"need image_views >= 0 and point_views >= 1, got {self.image_views}, {self.point_views}"
            )

    @classmethod
    def coerce(cls, value: BatchFields | dict[str, Any] | None) -> BatchFields:
        """``value`` as a ``BatchFields``: itself, one built from a dict (a config), or the default."""
        if value is None:
            return cls()
        if isinstance(value, BatchFields):
            return value
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (hyperparameters, checkpoints): ``BatchFields(**fields.to_dict()) == fields``."""
        out = asdict(self)
        out["point_features"] = list(self.point_features)
        return out

    def stored_fields(self) -> tuple[str, ...]:
        """The sample fields a reader decodes for these batches (channel names resolve to ``feat``)."""
        stored = {"curv", "feat"}
        wanted = ["xyz", "label"]
        wanted += ["normal"] if self.normals else []
        wanted += sorted({name if name in stored else "feat" for name in self.point_features})
        wanted += ["images"] if self.image_views else []
        return tuple(wanted)


@dataclass
class PointBatch:
    """A collated batch of clouds (see :class:`BatchFields` for what fills the optional attributes).

    Not frozen: Lightning moves dataclass batches to the device field by field.

    Attributes:
        points: ``(B, N, 3)`` float32 coordinates (view 0 when there are several point views). In a ragged
            batch ``N`` is the largest cloud and rows ``lengths[b]:`` of cloud ``b`` hold :data:`PAD_VALUE`.
        normals: ``(B, N, 3)`` float32 unit normals, or ``None``.
        feats: ``(B, N, C)`` float32 per-point channels named by ``feat_names`` (e.g. LiDAR intensity), or
            ``None``.
        images: ``(B, V, C, H, W)`` float32 in ``[0, 1]``, ``V`` views per cloud, or ``None``.
        label: ``(B,)`` int64 class indices, or ``None`` for unlabelled data.
        key: the ``B`` sample keys.
        views: ``(B, V, N, 3)`` float32: ``V`` differently transformed copies of each cloud (``views[:, 0]``
            equals ``points``), or ``None`` with a single view.
        lengths: ``(B,)`` int64 point count of each cloud in a ragged batch, or ``None`` (every cloud has
            ``N`` points).
        feat_names: one name per channel of ``feats``.
    """

    points: Tensor
    normals: Tensor | None = None
    feats: Tensor | None = None
    images: Tensor | None = None
    label: Tensor | None = None
    key: list[str] = field(default_factory=list)
    views: Tensor | None = None
    lengths: Tensor | None = None
    feat_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def mask(self) -> Tensor:
        """``(B, N)`` bool: ``True`` for real points, ``False`` for padding (all ``True`` unless ragged)."""
        import torch

        batch, count = self.points.shape[:2]
        if self.lengths is None:
            return torch.ones(batch, count, dtype=torch.bool, device=self.points.device)
        positions = torch.arange(count, device=self.points.device)
        return positions[None, :] < self.lengths.to(self.points.device)[:, None]

    def pin_memory(self) -> PointBatch:
        """A copy with every tensor in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        pinned = {
            name: value.pin_memory() if hasattr(value, "pin_memory") else value
            for name, value in vars(self).items()
            if name != "key"
        }
        return PointBatch(**pinned, key=list(self.key))
