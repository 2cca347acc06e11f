"""Streaming training and evaluation pipelines over pcpt shards (webdataset), with exact epochs per rank.

Training (:func:`make_train_loader`)::

    ResampledShards (seeded per seed / rank / worker / epoch)
      -> tar -> samples (fast reader; complete tars, sample counts as in the manifest)
      -> seeded shuffle buffer
      -> safe decode (npy / txt / json / png only, pickle refused, point arrays finite)
      -> transforms (one np.random.Generator per worker and epoch) -> fixed-size batches (partial=False)
      -> this worker's share of batches_per_epoch
    WebLoader(batch_size=None).with_epoch(batches_per_epoch)   # on the LOADER: exact count per rank

Every rank and worker draws shards with replacement from its own seeded stream, so ranks see different data
and never run out. The epoch length is set on the loader, so each rank yields exactly ``batches_per_epoch``
batches whatever the number of workers (on the dataset, webdataset counts per worker); each worker also
stops after its share, so no batch is computed only to be dropped at the end of an epoch. Seeds depend on
the epoch, which :class:`EpochLoader` sets before every pass (from the trainer when one is attached), so a
run resumed at an epoch boundary draws the same data as an uninterrupted one. The epoch reaches workers
through shared memory, so workers can stay alive between epochs.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from datapipes.shards import (
    MANIFEST_NAME,
    ShardFormatError,
    decode_members,
    decode_png,
    field_of_member,
    iter_shard_members,
    manifest_members,
    manifest_shard_samples,
    read_manifest,
)
from datapipes.transforms import Arrays, Compose, Transform
from datapipes.types import PointBatch

__all__ = [
    "EpochLoader",
    "StreamState",
    "collate",
    "decode_image",
    "make_eval_loader",
    "make_train_loader",
    "make_train_pipeline",
    "resolve_rank",
]

POINT_FEATURES = ("feat", "curv")
#: A sample as read from a shard: (shard path, key, {member suffix: bytes}).
RawSample = tuple[str, str, dict[str, bytes]]


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The ``(rank, world_size)`` to shard data by.

    Explicit arguments win; otherwise ``RANK`` / ``WORLD_SIZE`` from the environment; otherwise an initialised
    ``torch.distributed`` process group; otherwise ``(0, 1)``.

    Raises:
        ValueError: if only one of the two is given or ``rank`` is outside ``[0, world_size)``.
    """
    if (rank is None) != (world_size is None):
        raise ValueError(
            f"give both rank and world_size or neither, got rank={rank}, world_size={world_size}"
        )
    if rank is None or world_size is None:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class StreamState:
    """What a pipeline's random streams depend on: base seed, rank and epoch (set before each pass).

    The epoch lives in a shared-memory tensor, so setting it in the main process reaches the stages running
    in DataLoader workers, persistent ones included (they restart their stages at every pass).
    """

    def __init__(self, seed: int, rank: int, world_size: int, batches_per_epoch: int | None = None) -> None:
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batches_per_epoch = batches_per_epoch
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def worker_batches(self) -> int | None:
        """This worker's share of ``batches_per_epoch`` (``None``: unlimited)."""
        if self.batches_per_epoch is None:
            return None
        worker, workers = _worker()
        base, extra = divmod(self.batches_per_epoch, workers)
        return base + (1 if worker < extra else 0)

    @property
    def epoch(self) -> int:
        """The pass whose random streams the stages draw from."""
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch[0] = int(value)

    def entropy(self, stream: int) -> list[int]:
        """Seed material for one random stream of the current worker: seed, rank, worker, epoch, stream."""
        worker, workers = _worker()
        return [self.seed, self.rank, self.world_size, worker, workers, self.epoch, stream]

    def generator(self, stream: int) -> np.random.Generator:
        """A fresh ``np.random.Generator`` for ``stream`` in the current worker and epoch."""
        return np.random.default_rng(self.entropy(stream))

    def shard_seed(self) -> int:
        """Seed of the shard resampler in the current worker (used as webdataset's ``worker_seed``)."""
        return int(np.random.SeedSequence(self.entropy(_SHARDS)).generate_state(1)[0])


_SHARDS, _SHUFFLE, _AUGMENT = 0, 1, 2


def _seeded_shuffle(src: Iterable[Any], *, state: StreamState, bufsize: int) -> Iterator[Any]:
    """Buffer shuffle (webdataset's algorithm) drawing from the worker's stream state.

    Output starts once ``min(bufsize, 100)`` items are buffered; while the buffer is below ``bufsize`` two
    items are read per item emitted, so it fills up quickly.
    """
    rng = random.Random(int(state.generator(_SHUFFLE).integers(2**62)))
    initial = min(bufsize, 100)
    buf: list[Any] = []
    items = iter(src)

    def pick() -> Any:
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        return buf.pop()

    for item in items:
        buf.append(item)
        if len(buf) < bufsize:
            extra = next(items, _END)
            if extra is not _END:
                buf.append(extra)
        if len(buf) >= initial:
            yield pick()
    while buf:
        yield pick()


_END = object()


def _worker_share(src: Iterable[Any], *, state: StreamState) -> Iterator[Any]:
    """Ends each worker's pass after its share of the epoch, so no batch is computed only to be dropped."""
    limit = state.worker_batches()
    yield from src if limit is None else itertools.islice(src, limit)


def decode_image(data: bytes, *, where: str) -> np.ndarray:
    """PNG (built-in decoder) or JPEG (needs Pillow) bytes -> ``(C, H, W)`` float32 in ``[0, 1]``.

    Raises:
        ShardFormatError: naming ``where`` for undecodable bytes or a JPEG without Pillow installed.
    """
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            image = decode_png(data)
        else:
            try:
                from PIL import Image  # optional: only JPEG needs it
            except ImportError as err:
                raise ShardFormatError(
                    f"{where}: decoding JPEG images needs Pillow (pip install pillow)"
                ) from err
            import io

            image = np.asarray(Image.open(io.BytesIO(data)))
            image = image[:, :, None] if image.ndim == 2 else image
    except ShardFormatError:
        raise
    except Exception as err:
        raise ShardFormatError(f"{where}: undecodable image ({err})") from err
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / 255.0


class SampleDecoder:
    """Turns raw samples ``(shard path, key, {suffix: bytes})`` into transformed arrays.

    Pickle members are refused (an error naming shard and member), only the fields the batch needs are
    decoded, and transforms draw from one generator per worker and epoch.

    Args:
        transform: per-sample transform.
        state: the pipeline's stream state.
        normals: keep ``normal``.
        point_features: per-point feature fields concatenated into ``feats`` (``"feat"``, ``"curv"``).
        images: decode one image view per sample (random view in training, the first otherwise).
        random_view: pick the image view at random.
    """

    def __init__(
        self,
        transform: Transform,
        state: StreamState,
        *,
        normals: bool = False,
        point_features: Sequence[str] = (),
        images: bool = False,
        random_view: bool = True,
    ) -> None:
        bad = [f for f in point_features if f not in POINT_FEATURES]
        if bad:
            raise ValueError(f"point_features must be among {POINT_FEATURES}, got {bad}")
        self.transform, self.state = transform, state
        self.images, self.random_view = images, random_view
        self.point_features = tuple(point_features)
        self.fields = ("xyz", "label", *(("normal",) if normals else ()), *self.point_features)
        self.fields += ("images",) if images else ()

    def wants(self, suffix: str) -> bool:
        """Whether the member ``suffix`` must be read from disk (the others are skipped)."""
        return field_of_member(suffix) in self.fields

    def __call__(self, src: Iterable[RawSample]) -> Iterator[Arrays]:
        rng = self.state.generator(_AUGMENT)
        for raw in src:
            yield self.decode(raw, rng)

    def decode(self, raw: RawSample, rng: np.random.Generator) -> Arrays:
        """Decodes and transforms one raw sample ``(shard path, key, {suffix: bytes})``."""
        url, key, members = raw
        where = os.path.basename(url)
        sample = decode_members(key, members, where=where, fields=self.fields)
        if self.images:
            views = sample.pop("images", None)
            if not views:
                raise ShardFormatError(f"{where}: sample {key} has no image")
            pick = int(rng.integers(len(views))) if self.random_view and len(views) > 1 else 0
            sample["image"] = decode_image(views[pick], where=f"{where}: sample {key}")
        for name in self.point_features:
            if name not in sample:
                raise ShardFormatError(f"{where}: sample {key} has no {name}.npy member")
        return self.transform(sample, rng)


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


def _stack(samples: Sequence[Arrays], name: str) -> torch.Tensor | None:
    present = [name in s for s in samples]
    if not any(present):
        return None
    if not all(present):
        key = samples[present.index(False)].get("key")
        raise ValueError(f"cannot batch: sample {key!r} has no {name!r} while others do")
    return torch.from_numpy(np.stack([np.asarray(s[name], dtype=np.float32) for s in samples]))


def collate(samples: Sequence[Arrays]) -> PointBatch:
    """Stacks transformed samples of equal point count into a :class:`PointBatch`.

    Per-point features ``feat`` and ``curv`` present in the samples are concatenated (in that order) into
    ``feats``; ``image`` arrays ``(C, H, W)`` become ``images``.

    Raises:
        ValueError: if the samples have different point counts or some lack a field the others have.
    """
    batch = _collate_for_transfer(samples)
    return _finish_batch(batch)


def _collate_for_transfer(samples: Sequence[Arrays]) -> PointBatch:
    """:func:`collate`, but the labels stay a small numpy array (see :func:`_finish_batch`).

    Every tensor leaving a DataLoader worker costs a shared-memory segment and a file-descriptor hand-over
    (about half a millisecond); a 32-entry label vector is far cheaper to pickle as numpy.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    counts = {int(s["xyz"].shape[0]) for s in samples}
    if len(counts) != 1:
        raise ValueError(f"cannot batch clouds with different point counts {sorted(counts)}; use TakePoints")
    feats = [t for t in (_stack(samples, "feat"), _stack(samples, "curv")) if t is not None]
    feats = [t if t.ndim == 3 else t[:, :, None] for t in feats]
    labels = [s.get("label") for s in samples]
    if any(label is None for label in labels) and not all(label is None for label in labels):
        raise ValueError("cannot batch labelled and unlabelled samples together")
    points = _stack(samples, "xyz")
    if points is None:
        raise ValueError("cannot batch samples without xyz")
    return PointBatch(
        points=points,
        normals=_stack(samples, "normal"),
        feats=torch.cat(feats, dim=2) if feats else None,
        images=_stack(samples, "image"),
        label=None if labels[0] is None else np.asarray(labels, dtype=np.int64),  # type: ignore[arg-type]
        key=[str(s.get("key", "")) for s in samples],
    )


def _finish_batch(batch: PointBatch) -> PointBatch:
    """Turns the numpy labels of a transferred batch into a tensor (in the main process)."""
    if isinstance(batch.label, np.ndarray):
        batch.label = torch.from_numpy(batch.label)
    return batch


class EpochResampledShards(wds.ResampledShards):
    """webdataset's ``ResampledShards``, seeded only from the :class:`StreamState` (as ``worker_seed``).

    webdataset also mixes in a pass counter kept in each worker's copy; it is reset here, so a persistent
    worker, a fresh worker and a resumed run all draw the same shards for the same epoch.
    """

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch = -1
        return super().__iter__()


class TrainPipeline(wds.DataPipeline):
    """The training :class:`webdataset.DataPipeline` plus :meth:`set_epoch`."""

    def __init__(self, *stages: Any, state: StreamState) -> None:
        super().__init__(*stages)
        self.state = state

    def set_epoch(self, epoch: int) -> None:
        """Selects the random streams of ``epoch`` (call before iterating)."""
        self.state.epoch = int(epoch)


def make_train_pipeline(
    urls: Sequence[str | Path],
    *,
    transform: Transform | None = None,
    batch_size: int,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_buffer: int = 1000,
    normals: bool = False,
    point_features: Sequence[str] = (),
    images: bool = False,
    batches_per_epoch: int | None = None,
    finish: bool = True,
) -> TrainPipeline:
    """The infinite, resampled, batched training stream of one rank (see the module docstring).

    Args:
        urls: shard paths.
        transform: per-sample transform (must produce a fixed point count, e.g. ends with ``TakePoints``).
        batch_size: samples per batch; incomplete batches are never produced.
        seed: base seed; streams also depend on rank, worker and epoch.
        rank: this process's rank (default: :func:`resolve_rank`).
        world_size: number of ranks.
        shuffle_buffer: samples held in the shuffle buffer (per worker).
        normals: include ``normals`` in batches.
        point_features: ``"feat"`` / ``"curv"`` fields concatenated into ``feats``.
        images: include one image view per sample.
        batches_per_epoch: if set, each pass of the pipeline stops after this many batches in total, split
            evenly over the DataLoader workers (otherwise it is infinite).
        finish: turn labels into tensors inside the pipeline; :func:`make_train_loader` passes ``False``
            and does it in the main process, which is cheaper than sending one more tensor per batch.
    """
    if not urls:
        raise ValueError("urls must name at least one shard")
    if batch_size < 1 or shuffle_buffer < 1:
        raise ValueError(f"batch_size and shuffle_buffer must be >= 1, got {batch_size}, {shuffle_buffer}")
    rank, world_size = resolve_rank(rank, world_size)
    state = StreamState(seed, rank, world_size, batches_per_epoch)
    shards = EpochResampledShards(
        [str(u) for u in urls], seed=seed, worker_seed=state.shard_seed, deterministic=True
    )
    decoder = SampleDecoder(
        transform or Compose(), state, normals=normals, point_features=point_features, images=images
    )
    return TrainPipeline(
        shards,
        ShardReader(decoder.wants),
        wds.filters.pipelinefilter(_seeded_shuffle)(state=state, bufsize=shuffle_buffer),
        decoder,
        wds.batched(batch_size, collation_fn=_collate_for_transfer, partial=False),
        wds.filters.pipelinefilter(_worker_share)(state=state),
        wds.map(_finish_batch) if finish else None,
        state=state,
    )


class EpochLoader:
    """An iterable of batches with a fixed length that sets the data epoch before every pass.

    The epoch is read when the first batch of a pass is requested: from ``epoch_source`` when given (e.g. the
    trainer's current epoch, so a resumed run gets the data of the epoch it resumes at), otherwise from
    :meth:`set_epoch`, advancing by one after each pass.
    It is deliberately not a ``torch.utils.data.DataLoader``, so Lightning does not try to re-shard it.

    Resuming inside an epoch: Lightning stores :meth:`state_dict` in its checkpoints (the epoch and how many
    of its batches were trained, from ``progress_source``) and hands it back through :meth:`load_state_dict`
    on resume; the first pass of the resumed run then skips the batches already trained, so it continues with
    exactly the batches the interrupted run would have drawn next (the streams are seeded per epoch).

    Args:
        loader: the underlying iterable (a WebLoader with ``with_epoch`` or a DataLoader).
        length: batches per pass.
        on_epoch: called with the epoch number before each pass.
        epoch_source: returns the epoch to use, or ``None`` to use the internal counter.
        progress_source: returns ``(epoch, batches of it trained)`` at checkpoint time (e.g. from the
            trainer), or ``None`` when unknown.
    """

    def __init__(
        self,
        loader: Iterable[PointBatch],
        *,
        length: int,
        on_epoch: Callable[[int], None],
        epoch_source: Callable[[], int | None] | None = None,
        progress_source: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:
        self.loader, self.length, self.on_epoch = loader, int(length), on_epoch
        self.epoch_source, self.progress_source = epoch_source, progress_source
        self._next_epoch = 0
        self._resume: tuple[int, int] | None = None
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass use ``epoch``."""
        self._next_epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_done"}``: where training stands in the data (saved in checkpoints)."""
        position = self.progress_source() if self.progress_source is not None else None
        epoch, done = position if position is not None else (self.epoch, 0)
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Makes the next pass skip the batches a checkpoint says were trained, if it is the same epoch."""
        self._resume = (int(state.get("epoch", -1)), int(state.get("batches_done", 0)))

    def __iter__(self) -> Iterator[PointBatch]:
        return self._run()

    def _run(self) -> Iterator[PointBatch]:
        # A generator: the epoch is resolved at the first batch, not when the iterator is created. Lightning
        # creates the first iterator before it restores the epoch counters of a resumed run.
        source = self.epoch_source() if self.epoch_source is not None else None
        self.epoch = self._next_epoch if source is None else int(source)
        self._next_epoch = self.epoch + 1
        skip = 0
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            if epoch == self.epoch and 0 < done < self.length:
                skip = done
        self.on_epoch(self.epoch)
        batches = iter(self.loader)
        for _ in itertools.islice(batches, skip):  # drawn and dropped: the streams stay in step
            pass
        yield from batches

    def __len__(self) -> int:
        return self.length


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
    normals: bool = False,
    point_features: Sequence[str] = (),
    images: bool = False,
    epoch_source: Callable[[], int | None] | None = None,
    progress_source: Callable[[], tuple[int, int] | None] | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = True,
) -> EpochLoader:
    """A training loader yielding exactly ``batches_per_epoch`` :class:`PointBatch` es per pass on this rank.

    Args:
        urls: shard paths.
        transform: per-sample transform ending in a fixed point count.
        batch_size: per-rank batch size.
        batches_per_epoch: batches per pass (per rank, whatever ``num_workers``).
        num_workers: DataLoader worker processes (0: in the main process).
        seed: base seed.
        rank: this process's rank (default: :func:`resolve_rank`).
        world_size: number of ranks.
        shuffle_buffer: per-worker shuffle buffer size.
        normals: include normals.
        point_features: per-point fields concatenated into ``feats``.
        images: include one image per sample.
        epoch_source: see :class:`EpochLoader`.
        progress_source: see :class:`EpochLoader`.
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
        normals=normals,
        point_features=point_features,
        images=images,
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
    loader = loader.map(_finish_batch).with_epoch(batches_per_epoch)
    return EpochLoader(
        loader,
        length=batches_per_epoch,
        on_epoch=pipeline.set_epoch,
        epoch_source=epoch_source,
        progress_source=progress_source,
    )


def _split_by_rank(src: Iterable[Any], *, rank: int, world_size: int) -> Iterator[Any]:
    for i, item in enumerate(src):
        if i % world_size == rank:
            yield item


def make_eval_loader(
    urls: Sequence[str | Path],
    *,
    transform: Transform | None = None,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    normals: bool = False,
    point_features: Sequence[str] = (),
    images: bool = False,
) -> wds.WebLoader:
    """One ordered pass over the shards, split by rank then by worker (last batch may be partial).

    For sets too large for memory; smaller evaluation sets should use :mod:`datapipes.memory`, which splits
    evenly. Ranks get whole shards, so per-rank sample counts differ unless shards divide evenly.
    """
    rank, world_size = resolve_rank(rank, world_size)
    state = StreamState(seed, rank, world_size)
    decoder = SampleDecoder(
        transform or Compose(),
        state,
        normals=normals,
        point_features=point_features,
        images=images,
        random_view=False,
    )
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(u) for u in urls]),
        wds.filters.pipelinefilter(_split_by_rank)(rank=rank, world_size=world_size),
        wds.split_by_worker,
        ShardReader(decoder.wants),
        decoder,
        wds.batched(batch_size, collation_fn=_collate_for_transfer, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers).map(_finish_batch)
