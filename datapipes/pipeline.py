"""Streaming training and evaluation pipelines over pcpt shards (webdataset), with exact epochs per rank.

Training (:func:`make_train_loader`)::

    ResampledShards (seeded per seed / rank / worker / epoch)
      -> tar -> samples (fast reader; complete tars, sample counts as in the manifest)
      -> seeded shuffle buffer
      -> safe decode (npy / txt / json / png / jpeg only, pickle refused, point arrays finite)
      -> image views, transforms per point view (one np.random.Generator per worker and epoch), features
      -> batches (partial=False; stacked, or padded when ragged)
      -> this worker's share of batches_per_epoch
    WebLoader(batch_size=None).with_epoch(batches_per_epoch)   # on the LOADER: exact count per rank

Every rank and worker draws shards with replacement from its own seeded stream, so ranks see different data
and never run out. The epoch length is set on the loader, so each rank yields exactly ``batches_per_epoch``
batches whatever the number of workers (on the dataset, webdataset counts per worker); each worker also
stops after its share, so no batch is computed only to be dropped at the end of an epoch. Seeds depend on
the epoch, which :class:`~datapipes.epochs.EpochLoader` sets before every pass (from the trainer when one is
attached), so a run resumed at an epoch boundary draws the same data as an uninterrupted one. The epoch
reaches workers through shared memory, so workers can stay alive between epochs.

Shards may be local paths or URLs (``https://...``, ``s3://...``; see :mod:`datapipes.shards.remote`): a
remote shard is downloaded once per pass and read only when its sha256 equals the one its folder's manifest
lists, so a changed shard stops training with an error naming its URL before any of its samples is used.

What batches hold is one :class:`~datapipes.types.BatchFields` (normals, feature channels, image views,
point views, ragged clouds); the stages live in :mod:`datapipes.streams` (random streams),
:mod:`datapipes.decode` (reading, decoding) and :mod:`datapipes.collate` (batching).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds

from datapipes.collate import collate, collate_for_transfer, finish_batch
from datapipes.decode import FeatureLayout, SampleDecoder, ShardReader, folder_fields
from datapipes.epochs import EpochLoader
from datapipes.errors import FieldError
from datapipes.shards import MANIFEST_NAME, read_manifest
from datapipes.shards.remote import is_url, parent
from datapipes.streams import (
    EpochResampledShards,
    StreamState,
    resolve_rank,
    seeded_shuffle,
    split_by_rank,
    worker_share,
)
from datapipes.transforms import Compose, Transform
from datapipes.types import BatchFields

__all__ = [
    "EpochLoader",
    "StreamState",
    "TrainPipeline",
    "collate",
    "make_eval_loader",
    "make_train_loader",
    "make_train_pipeline",
    "resolve_rank",
]


class TrainPipeline(wds.DataPipeline):
    """The training :class:`webdataset.DataPipeline` plus :meth:`set_epoch`."""

    def __init__(self, *stages: Any, state: StreamState) -> None:
        super().__init__(*stages)
        self.state = state

    def set_epoch(self, epoch: int) -> None:
        """Selects the random streams of ``epoch`` (call before iterating)."""
        self.state.epoch = int(epoch)


def _decoding(
    urls: Sequence[str],
    transform: Transform | None,
    state: StreamState,
    fields: BatchFields | None,
    *,
    training: bool,
) -> tuple[ShardReader, SampleDecoder, Callable[..., Any]]:
    """The reading, decoding and batching stages of both pipelines (feature names resolved here, once)."""
    fields = BatchFields.coerce(fields)
    layout = FeatureLayout()
    if fields.point_features:
        where = ", ".join(sorted({parent(u) for u in urls}))
        layout = FeatureLayout.resolve(fields.point_features, _shard_fields(urls), where=where)
    decoder = SampleDecoder(transform or Compose(), state, fields=fields, layout=layout, training=training)
    return ShardReader(decoder.wants), decoder, partial(collate_for_transfer, ragged=fields.ragged)


def _shard_fields(urls: Sequence[str]) -> dict[str, Any] | None:
    """The manifest ``fields`` shared by the folders of ``urls`` (paths or URLs); see ``folder_fields``.

    Raises:
        FieldError: if the folders' manifests describe different fields.
        UserError: if a remote folder has no readable manifest.
    """
    if not any(is_url(u) for u in urls):
        return folder_fields(urls)
    found: dict[str, dict[str, Any]] = {}
    for folder in dict.fromkeys(parent(u) for u in urls):
        if is_url(folder) or os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
            found[folder] = dict(read_manifest(folder).get("fields") or {})
    if not found:
        return None
    (first, fields), *others = found.items()
    for folder, other in others:
        if other != fields:
            raise FieldError(f"{folder} and {first} hold different fields ({other} and {fields})")
    return fields


def make_train_pipeline(
    urls: Sequence[str | Path],
    *,
    transform: Transform | None = None,
    batch_size: int,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_buffer: int = 1000,
    fields: BatchFields | None = None,
    batches_per_epoch: int | None = None,
    finish: bool = True,
) -> TrainPipeline:
    """The infinite, resampled, batched training stream of one rank (see the module docstring).

    Args:
        urls: shard paths or URLs.
        transform: per-sample transform (must produce a fixed point count, e.g. ends with ``TakePoints``,
            unless ``fields.ragged``).
        batch_size: samples per batch; incomplete batches are never produced.
        seed: base seed; streams also depend on rank, worker and epoch.
        rank: this process's rank (default: :func:`resolve_rank`).
        world_size: number of ranks.
        shuffle_buffer: samples held in the shuffle buffer (per worker).
        fields: what batches hold besides points, labels and keys (default: nothing more).
        batches_per_epoch: if set, each pass of the pipeline stops after this many batches in total, split
            evenly over the DataLoader workers (otherwise it is infinite).
        finish: turn labels into tensors inside the pipeline; :func:`make_train_loader` passes ``False``
            and does it in the main process, which is cheaper than sending one more tensor per batch.

    Raises:
        ValueError: for no shard, a batch size or buffer below 1.
        FieldError: for a feature name the shards' manifest does not know.
    """
    if not urls:
        raise ValueError("urls must name at least one shard")
    if batch_size < 1 or shuffle_buffer < 1:
        raise ValueError(f"batch_size and shuffle_buffer must be >= 1, got {batch_size}, {shuffle_buffer}")
    rank, world_size = resolve_rank(rank, world_size)
    state = StreamState(seed, rank, world_size, batches_per_epoch)
    paths = [str(u) for u in urls]
    reader, decoder, batcher = _decoding(paths, transform, state, fields, training=True)
    return TrainPipeline(
        EpochResampledShards(paths, seed=seed, worker_seed=state.shard_seed, deterministic=True),
        reader,
        wds.filters.pipelinefilter(seeded_shuffle)(state=state, bufsize=shuffle_buffer),
        decoder,
        wds.batched(batch_size, collation_fn=batcher, partial=False),
        wds.filters.pipelinefilter(worker_share)(state=state),
        wds.map(finish_batch) if finish else None,
        state=state,
    )


def make_train_loader(
    urls: Sequence[str | Path],
    *,
    transform: Transform | None = None,
    batch_size: int,
    batches_per_epoch: int,
    num_workers: int = 2,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_buffer: int = 1000,
    fields: BatchFields | None = None,
    epoch_source: Callable[[], int | None] | None = None,
    progress_source: Callable[[], tuple[int, int] | None] | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = True,
) -> EpochLoader:
    """A training loader yielding exactly ``batches_per_epoch`` :class:`PointBatch` es per pass on this rank.

    Args:
        urls: shard paths or URLs.
        transform: per-sample transform ending in a fixed point count (unless ``fields.ragged``).
        batch_size: per-rank batch size.
        batches_per_epoch: batches per pass (per rank, whatever ``num_workers``).
        num_workers: DataLoader worker processes (0: in the main process).
        seed: base seed.
        rank: this process's rank (default: :func:`resolve_rank`).
        world_size: number of ranks.
        shuffle_buffer: per-worker shuffle buffer size.
        fields: what batches hold besides points, labels and keys (default: nothing more).
        epoch_source: see :class:`~datapipes.epochs.EpochLoader`.
        progress_source: see :class:`~datapipes.epochs.EpochLoader`.
        pin_memory: pin batches (GPU training).
        persistent_workers: keep worker processes between epochs (their stages restart at every pass with
            the new epoch's seeds, so results do not depend on it).
    """
    if batches_per_epoch < 1 or num_workers < 0:
        raise ValueError(
            f"need batches_per_epoch >= 1 and num_workers >= 0, got {batches_per_epoch}, {num_workers}"
        )
    pipeline = make_train_pipeline(
        urls,
        transform=transform,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        fields=fields,
        batches_per_epoch=batches_per_epoch,
        finish=False,
    )
    loader = wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin_memory,
    )
    return EpochLoader(
        loader.map(finish_batch).with_epoch(batches_per_epoch),
        length=batches_per_epoch,
        on_epoch=pipeline.set_epoch,
        epoch_source=epoch_source,
        progress_source=progress_source,
    )


def make_eval_loader(
    urls: Sequence[str | Path],
    *,
    transform: Transform | None = None,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    fields: BatchFields | None = None,
) -> wds.WebLoader:
    """One ordered pass over the shards, split by rank then by worker (last batch may be partial).

    For sets too large for memory; smaller evaluation sets should use :mod:`datapipes.memory`, which splits
    evenly. Ranks get whole shards, so per-rank sample counts differ unless shards divide evenly. Image views
    are the first ``fields.image_views`` stored ones.
    """
    rank, world_size = resolve_rank(rank, world_size)
    paths = [str(u) for u in urls]
    reader, decoder, batcher = _decoding(
        paths, transform, StreamState(seed, rank, world_size), fields, training=False
    )
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(paths),
        wds.filters.pipelinefilter(split_by_rank)(rank=rank, world_size=world_size),
        wds.split_by_worker,
        reader,
        decoder,
        wds.batched(batch_size, collation_fn=batcher, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers).map(finish_batch)
