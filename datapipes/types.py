"""Data types shared by the pcpt data layer: one cloud before encoding, a rejection record and a batch.

Reserved sample fields and the shard members they become (see ``datapipes.shards``):

========== ============================ =========================================
field      in memory                    shard member
========== ============================ =========================================
``key``    ``str`` (no dots)            ``__key__``
``xyz``    float32 ``(N, 3)``           ``xyz.npy``
``normal`` float32 ``(N, 3)``           ``normal.npy``
``curv``   float32 ``(N,)``/``(N, 1)``  ``curv.npy``
``feat``   float32 ``(N, C)``           ``feat.npy``
``label``  ``int``                      ``cls.txt``
``images`` ``list[bytes]`` (PNG/JPEG)   ``img.png`` / ``img.jpg``, or ``img.0.png``, ``img.1.png``, ...
``meta``   ``dict`` (JSON-serialisable) ``meta.json``
========== ============================ =========================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

import numpy as np

if TYPE_CHECKING:  # torch is not imported at runtime, so shard tools (pcpt-data) start fast
    from torch import Tensor

__all__ = ["POINT_FIELDS", "PointBatch", "Rejection", "Sample"]

#: Fields that hold one row per point; point selection and dropout apply to all of them together.
POINT_FIELDS: tuple[str, ...] = ("xyz", "normal", "curv", "feat")


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


@dataclass
class PointBatch:
    """A collated batch of clouds with a fixed point count.

    Not frozen: Lightning moves dataclass batches to the device field by field.

    Attributes:
        points: ``(B, N, 3)`` float32 coordinates.
        normals: ``(B, N, 3)`` float32 unit normals, or ``None`` when not requested.
        feats: ``(B, N, C)`` float32 per-point features (e.g. LiDAR intensity), or ``None``.
        images: ``(B, C, H, W)`` float32 in ``[0, 1]``, one view per cloud, or ``None``.
        label: ``(B,)`` int64 class indices, or ``None`` for unlabelled data.
        key: the ``B`` sample keys.
    """

    points: Tensor
    normals: Tensor | None = None
    feats: Tensor | None = None
    images: Tensor | None = None
    label: Tensor | None = None
    key: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def pin_memory(self) -> PointBatch:
        """A copy with every tensor in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        pinned = {
            name: value.pin_memory() if hasattr(value, "pin_memory") else value
            for name, value in vars(self).items()
            if name != "key"
        }
        return PointBatch(**pinned, key=list(self.key))
