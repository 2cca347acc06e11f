"""From shard members to transformed samples: the reading and decoding stages shared by every loader.

- :class:`ShardReader`: the ``tar -> samples`` stage of the streaming pipelines (raw members, checked
  against the manifest beside each shard);
- :class:`FeatureLayout`: which stored channels make up ``feats``, resolved once from the manifest;
- :func:`finish_sample`: image views, per-view transforms and feature channels of one decoded sample (used
  by the streaming :class:`SampleDecoder` and by :class:`~datapipes.memory.InMemoryPointDataset` alike);
- :class:`SampleDecoder`: the decoding stage of the streaming pipelines.

A finished sample is ``{"key", "xyz" (N, 3), "label"?, "normal"? (N, 3), "feats"? (N, C), "feat_names"?,
"images"? (V, C, H, W) float32, "views"? (V, N, 3)}``; :mod:`datapipes.collate` batches it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.errors import FieldError
from datapipes.shards import (
    MANIFEST_NAME,
    ShardFormatError,
    decode_image,
    decode_members,
    field_of_member,
    iter_shard_members,
    manifest_members,
    manifest_shard_samples,
    read_manifest,
)
from datapipes.streams import AUGMENT, StreamState
from datapipes.transforms import Arrays, Transform
from datapipes.types import BatchFields

__all__ = ["FeatureLayout", "RawSample", "SampleDecoder", "ShardReader", "finish_sample", "folder_fields"]

#: A sample as read from a shard: (shard path, key, {member suffix: bytes}).
RawSample = tuple[str, str, dict[str, bytes]]
#: Stored per-point fields that can be put into ``feats`` whole.
_FEATURE_FIELDS = ("feat", "curv")


def folder_fields(urls: Iterable[str | Path]) -> dict[str, Any] | None:
    """The manifest ``fields`` shared by the shard folders of ``urls`` (``None``: no manifest beside them).

    Raises:
        FieldError: if the folders' manifests describe different fields.
    """
    found: dict[str, dict[str, Any]] = {}
    for folder in dict.fromkeys(os.path.dirname(str(u)) or "." for u in urls):
        if os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
            found[folder] = dict(read_manifest(folder).get("fields") or {})
    if not found:
        return None
    first, *others = found.items()
    for folder, fields in others:
        if fields != first[1]:
            raise FieldError(f"{folder} and {first[0]} hold different fields ({fields} and {first[1]})")
    return first[1]


@dataclass(frozen=True)
class FeatureLayout:
    """How the requested ``point_features`` map onto stored channels.

    Attributes:
        parts: per requested name, ``(stored field, column)``; column ``None`` takes every column.
        names: the channel names of the concatenation, or ``None`` when no manifest gave the widths (then
            they are derived from the data: ``feat`` for one column, ``feat.0``, ``feat.1``, ... otherwise).
    """

    parts: tuple[tuple[str, int | None], ...] = ()
    names: tuple[str, ...] | None = ()

    @classmethod
    def resolve(
        cls, requested: Sequence[str], fields: Mapping[str, Any] | None, *, where: str
    ) -> FeatureLayout:
        """Resolves feature names against a manifest's ``fields`` (``None``: no manifest; stored fields only).

        Raises:
            FieldError: naming ``where`` for a name that is neither a stored per-point field nor a named
                channel of ``feat``.
        """
        parts: list[tuple[str, int | None]] = []
        names: list[str] = []
        feat = dict((fields or {}).get("feat") or {})
        channels = list(feat.get("channels") or [])
        for name in requested:
            if name in _FEATURE_FIELDS and (fields is None or name in fields):
                parts.append((name, None))
                if fields is not None:
                    names += _field_names(name, fields[name])
            elif name in channels:
                parts.append(("feat", channels.index(name)))
                names.append(name)
            else:
                stored = [f for f in _FEATURE_FIELDS if fields is None or f in fields]
                raise FieldError(
                    f"point_features: {name!r} is not a stored per-point field "
                    f"({', '.join(stored) or 'none'}) or a channel of feat "
                    f"({', '.join(channels) or 'none named'}) in {where}"
                )
        return cls(tuple(parts), tuple(names) if fields is not None else None)

    def gather(self, sample: Mapping[str, Any], *, where: str) -> tuple[np.ndarray, tuple[str, ...]]:
        """``(feats (N, C) float32, channel names)`` of one sample.

        Raises:
            ShardFormatError: naming ``where`` for a sample without a requested field.
        """
        columns: list[np.ndarray] = []
        for name, column in self.parts:
            arr = sample.get(name)
            if arr is None:
                raise ShardFormatError(f"{where}: sample {sample.get('key')} has no {name}.npy member")
            arr = np.asarray(arr, dtype=np.float32).reshape(len(arr), -1)
            columns.append(arr if column is None else arr[:, column : column + 1])
        names = self.names
        if names is None:
            names = tuple(
                n for (name, _), c in zip(self.parts, columns) for n in _column_names(name, c.shape[1])
            )
        return np.concatenate(columns, axis=1), names


def _field_names(name: str, spec: Mapping[str, Any]) -> list[str]:
    if spec.get("channels"):
        return list(spec["channels"])
    shape = list(spec.get("shape") or [])
    return _column_names(name, int(shape[1]) if len(shape) == 2 else 1)


def _column_names(name: str, width: int) -> list[str]:
    return [name] if width == 1 else [f"{name}.{i}" for i in range(width)]


def finish_sample(
    sample: Arrays,
    *,
    fields: BatchFields,
    layout: FeatureLayout,
    transform: Transform,
    rng: np.random.Generator,
    random_views: bool,
    where: str,
) -> Arrays:
    """Image views, per-view transforms and feature channels of one decoded sample (see the module docstring).

    Args:
        sample: a decoded sample (``images`` as raw PNG/JPEG bytes in view order); the caller's own copy,
            which may be changed.
        fields: what the batch holds.
        layout: the resolved ``point_features``.
        transform: the per-sample transform, run once per point view.
        rng: the generator every random draw of this sample comes from (image views, then each point view).
        random_views: draw the image views at random (training) instead of taking the first ones.
        where: what to name in errors (shard or split).

    Raises:
        ShardFormatError: for a sample with fewer image views than requested or without a requested field.
        ValueError: if the point views of one sample end with different point counts.
    """
    key = sample.get("key")
    if fields.image_views:
        sample = dict(sample)
        stored = sample.pop("images", None) or []
        want = fields.image_views
        if len(stored) < want:
            raise ShardFormatError(f"{where}: sample {key} has {len(stored)} image view(s), {want} requested")
        picks = rng.permutation(len(stored))[:want] if random_views and len(stored) > 1 else range(want)
        images = [decode_image(stored[i], where=f"{where}: sample {key}") for i in picks]
        if len({im.shape for im in images}) != 1:
            raise ShardFormatError(f"{where}: sample {key} has image views of different sizes")
        sample["images"] = np.stack(images)
    out = transform(sample, rng)
    if fields.point_views > 1:
        views = [out, *(transform(sample, rng) for _ in range(fields.point_views - 1))]
        if len({v["xyz"].shape for v in views}) != 1:
            raise ValueError(
                f"the {len(views)} point views of sample {key!r} have different point counts; "
                "the transform must give every view the same count"
            )
        out["views"] = np.stack([v["xyz"] for v in views])
    if layout.parts:
        out["feats"], out["feat_names"] = layout.gather(out, where=where)
        for name, _ in layout.parts:
            out.pop(name, None)
    return out


class SampleDecoder:
    """Turns raw samples ``(shard path, key, {suffix: bytes})`` into finished samples (a pipeline stage).

    Pickle members are refused (an error naming shard and member), only the fields the batch needs are
    decoded, and every random draw comes from one generator per worker and epoch.

    Args:
        transform: per-sample transform.
        state: the pipeline's stream state.
        fields: what the batches hold.
        layout: ``fields.point_features`` resolved against the manifest.
        training: draw image views at random (else the first ones).
    """

    def __init__(
        self,
        transform: Transform,
        state: StreamState,
        *,
        fields: BatchFields,
        layout: FeatureLayout,
        training: bool,
    ) -> None:
        self.transform, self.state, self.fields, self.layout = transform, state, fields, layout
        self.training = training
        self.stored = fields.stored_fields()

    def wants(self, suffix: str) -> bool:
        """Whether the member ``suffix`` must be read from disk (the others are skipped)."""
        return field_of_member(suffix) in self.stored

    def __call__(self, src: Iterable[RawSample]) -> Iterator[Arrays]:
        rng = self.state.generator(AUGMENT)
        for raw in src:
            yield self.decode(raw, rng)

    def decode(self, raw: RawSample, rng: np.random.Generator) -> Arrays:
        """Decodes and finishes one raw sample ``(shard path, key, {suffix: bytes})``."""
        url, key, members = raw
        where = os.path.basename(url)
        sample = decode_members(key, members, where=where, fields=self.stored)
        return finish_sample(
            sample,
            fields=self.fields,
            layout=self.layout,
            transform=self.transform,
            rng=rng,
            random_views=self.training,
            where=where,
        )


class ShardReader:
    """The ``tar -> samples`` stage: ``{"url": path}`` items in, raw samples ``(path, key, members)`` out.

    Uses the fast streaming reader of :mod:`datapipes.shards`: members the decoder does not need are skipped
    on disk, pickle members are refused, and each file is closed as soon as its shard ends. A shard must be
    a complete tar holding the number of samples that the ``manifest.json`` next to it lists, each with the
    members of the manifest's fields; otherwise a :class:`~datapipes.shards.ShardFormatError` names it (a
    shard without a manifest beside it is only checked for completeness, and a shard of a manifest without
    per-shard counts is not counted).

    Args:
        wants: which member suffixes to read (the others are skipped on disk).
    """

    def __init__(self, wants: Callable[[str], bool] | None = None) -> None:
        self.wants = wants
        self._folders: dict[str, tuple[dict[str, int], frozenset[str]]] = {}

    def contract(self, url: str) -> tuple[int | None, frozenset[str]]:
        """``(sample count, required member suffixes)`` of the shard at ``url`` per the manifest beside it."""
        folder, name = os.path.split(url)
        known = self._folders.get(folder)
        if known is None:
            root = folder or "."
            if os.path.isfile(os.path.join(root, MANIFEST_NAME)):
                manifest = read_manifest(root)
                known = (manifest_shard_samples(manifest), manifest_members(manifest))
            else:
                known = ({}, frozenset())
            self._folders[folder] = known
        return known[0].get(name), known[1]

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[RawSample]:
        for item in src:
            url = str(item["url"])
            expected, required = self.contract(url)
            for key, members in iter_shard_members(
                url, select=self.wants, expected=expected, required=required
            ):
                yield url, key, members
