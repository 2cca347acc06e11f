"""Map-style, in-memory datasets for evaluation and fine-tuning sets (thousands of clouds).

The whole split is decoded once into arrays. Being map-style, Lightning's ``DistributedSampler`` splits
it evenly across ranks (streaming shards cannot promise that). ``num_points`` takes the first points of each
cloud: an FPS subsample when the manifest says the clouds are stored in FPS order, otherwise FPS is computed
here (start index 0), so evaluation sees the same deterministic subsample everywhere. Items are finished like
the streaming pipeline's samples (:func:`datapipes.decode.finish_sample`), so batches are the same
:class:`~datapipes.types.PointBatch` with the same :class:`~datapipes.types.BatchFields`.

Loading checks the data against its manifest (each shard's sample count, complete tars, finite point
arrays, labels within the class list) and stops with a :class:`~datapipes.shards.ShardFormatError` naming
the shard; it never returns a silently shorter split. Asking for more points than the smallest stored cloud
is an error, unless the caller treats ``num_points`` as an upper bound (``cap_to_stored=True``, or ragged
batches, where each cloud keeps ``min(num_points, its size)`` points).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from datapipes.decode import FeatureLayout, finish_sample
from datapipes.errors import UserError
from datapipes.geometry import fps_orders
from datapipes.shards import iter_split_samples, read_manifest
from datapipes.transforms import Arrays, Compose, Transform
from datapipes.types import POINT_FIELDS, BatchFields

__all__ = ["InMemoryPointDataset", "load_split_arrays"]


def _take_prefix(clouds: list[dict[str, Any]], n: int, *, fps_ordered: bool) -> None:
    """Keeps the first ``min(n, size)`` points of every cloud: an FPS subsample (computed if not stored)."""
    if not fps_ordered:
        for cloud, order in zip(clouds, fps_orders([c["xyz"] for c in clouds], n)):
            for name in POINT_FIELDS:
                if name in cloud:
                    cloud[name] = cloud[name][order]
    for cloud in clouds:
        for name in POINT_FIELDS:
            if name in cloud:
                cloud[name] = np.ascontiguousarray(cloud[name][:n])


def _load(
    root: str | Path,
    split: str,
    num_points: int | None,
    fields: Sequence[str],
    *,
    cap_to_stored: bool = False,
    ragged: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if num_points is not None and num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    manifest = read_manifest(root)
    clouds = list(iter_split_samples(root, split, fields=fields, manifest=manifest))
    if not clouds:
        raise UserError(f"{root}: split {split!r} has no samples")
    if num_points is not None:
        smallest = min(int(c["xyz"].shape[0]) for c in clouds)
        if smallest < num_points and not (cap_to_stored or ragged):
            raise UserError(
                f"{root}: split {split!r} stores clouds of {smallest} points (the smallest), fewer than the "
                f"{num_points} requested; ask for at most {smallest} points"
            )
        n = num_points if ragged else min(num_points, smallest)
        _take_prefix(clouds, n, fps_ordered=bool(manifest.get("fps_ordered", False)))
    return clouds, manifest


def load_split_arrays(
    root: str | Path, split: str, num_points: int | None, *, cap_to_stored: bool = False
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All clouds of one split as arrays (for probes, few-shot and embedding).

    Every shard is checked against the manifest while it is read (sample count, complete tar, finite point
    arrays, labels within the class list); file hashes are checked only by
    :func:`datapipes.shards.check_shard_hashes`.

    Args:
        root: shard folder.
        split: split name, e.g. ``"train"``.
        num_points: points per cloud, taken in FPS order (the first ``num_points`` of FPS-ordered storage).
            ``None`` keeps all points (every cloud must then have the same count).
        cap_to_stored: treat ``num_points`` as an upper bound: take ``min(num_points, smallest stored
            cloud)`` points, as the official loaders cap their FPS pool. Otherwise a split whose smallest
            cloud has fewer than ``num_points`` points is an error.

    Returns:
        ``(xyz (S, N, 3) float32, labels (S,) int64 (-1 where unlabelled), keys)`` in shard order.

    Raises:
        UserError: for a missing manifest or split, an empty split, clouds smaller than ``num_points``
            (without ``cap_to_stored``), or clouds of unequal sizes with ``num_points=None``.
        ShardFormatError: naming the shard for damaged, truncated or non-finite data or a wrong sample count.
    """
    clouds, _ = _load(root, split, num_points, ("xyz", "label"), cap_to_stored=cap_to_stored)
    counts = {int(c["xyz"].shape[0]) for c in clouds}
    if len(counts) != 1:
        raise UserError(f"{root}: split {split!r} has clouds of {len(counts)} sizes; pass num_points")
    xyz = np.stack([c["xyz"] for c in clouds]).astype(np.float32, copy=False)
    labels = np.asarray([c.get("label", -1) for c in clouds], dtype=np.int64)
    return xyz, labels, [str(c["key"]) for c in clouds]


class InMemoryPointDataset(Dataset[Arrays]):
    """One split decoded into memory; items are finished samples for :func:`~datapipes.collate.collate`.

    Args:
        root: shard folder.
        split: split name.
        num_points: points per cloud taken in FPS order (see :func:`load_split_arrays`); ``None`` keeps all.
            With ``fields.ragged`` an upper bound: each cloud keeps ``min(num_points, its size)``.
        transform: optional per-item transform (run once per point view); its generator is seeded by
            ``(seed, epoch, index)``, so every epoch differs and any worker layout gives the same result.
        seed: base seed for the transform.
        fields: what batches hold besides points, labels and keys; image views are drawn at random when a
            transform is set, else the first ones are taken.
        cap_to_stored: treat ``num_points`` as an upper bound (e.g. an FPS pool) taken from every cloud
            alike (``min(num_points, smallest cloud)``) instead of refusing clouds with fewer points.

    Raises:
        UserError: for a missing manifest or split, an empty split, too small clouds, or a sample without a
            requested field.
        FieldError: for a feature name the manifest does not know.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        num_points: int | None = None,
        transform: Transform | None = None,
        seed: int = 0,
        fields: BatchFields | None = None,
        cap_to_stored: bool = False,
    ) -> None:
        self.fields = BatchFields.coerce(fields)
        stored = self.fields.stored_fields()
        self.clouds, self.manifest = _load(
            root, split, num_points, stored, cap_to_stored=cap_to_stored, ragged=self.fields.ragged
        )
        self.layout = FeatureLayout.resolve(
            self.fields.point_features, self.manifest.get("fields") or {}, where=str(root)
        )
        self.root, self.split = Path(root), split
        self.transform, self.seed = transform, int(seed)
        self.epoch = 0
        for cloud in self.clouds:
            missing = [f for f in stored if f != "label" and f not in cloud]
            if missing:
                raise UserError(f"{root}: split {split!r} sample {cloud['key']} has no {missing[0]}")

    def set_epoch(self, epoch: int) -> None:
        """Selects the transform randomness of ``epoch``."""
        self.epoch = int(epoch)

    @property
    def labels(self) -> np.ndarray:
        """``(S,)`` int64 labels (-1 where unlabelled)."""
        return np.asarray([c.get("label", -1) for c in self.clouds], dtype=np.int64)

    @property
    def keys(self) -> list[str]:
        """Sample keys in order."""
        return [str(c["key"]) for c in self.clouds]

    def __len__(self) -> int:
        return len(self.clouds)

    def __getitem__(self, index: int) -> Arrays:
        return finish_sample(
            dict(self.clouds[index]),
            fields=self.fields,
            layout=self.layout,
            transform=self.transform or Compose(),
            rng=np.random.default_rng([self.seed, self.epoch, int(index)]),
            random_views=self.transform is not None,
            where=f"{self.root}: split {self.split!r}",
        )
