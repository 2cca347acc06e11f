"""Random streams of the data pipelines: ranks, workers, epochs, and the stages that draw from them.

Every random choice of a pipeline (which shards, the shuffle order, the augmentations) comes from a
generator seeded by ``(seed, rank, world size, worker, workers, epoch, stream)`` (:class:`StreamState`):
never from global random state, so forked workers never share draws, ranks see different data, and a run
resumed at an epoch draws what an uninterrupted one would have.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds

__all__ = [
    "AUGMENT",
    "SHARDS",
    "SHUFFLE",
    "EpochResampledShards",
    "StreamState",
    "resolve_rank",
    "seeded_shuffle",
    "split_by_rank",
    "worker_share",
]

#: Stream ids: the shard resampler, the shuffle buffer and the per-sample draws use separate streams.
SHARDS, SHUFFLE, AUGMENT = 0, 1, 2


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
        return int(np.random.SeedSequence(self.entropy(SHARDS)).generate_state(1)[0])


class EpochResampledShards(wds.ResampledShards):
    """webdataset's ``ResampledShards``, seeded only from the :class:`StreamState` (as ``worker_seed``).

    webdataset also mixes in a pass counter kept in each worker's copy; it is reset here, so a persistent
    worker, a fresh worker and a resumed run all draw the same shards for the same epoch.
    """

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch = -1
        return super().__iter__()


_END = object()


def seeded_shuffle(src: Iterable[Any], *, state: StreamState, bufsize: int) -> Iterator[Any]:
    """Buffer shuffle (webdataset's algorithm) drawing from the worker's stream state.

    Output starts once ``min(bufsize, 100)`` items are buffered; while the buffer is below ``bufsize`` two
    items are read per item emitted, so it fills up quickly.
    """
    rng = random.Random(int(state.generator(SHUFFLE).integers(2**62)))
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


def worker_share(src: Iterable[Any], *, state: StreamState) -> Iterator[Any]:
    """Ends each worker's pass after its share of the epoch, so no batch is computed only to be dropped."""
    limit = state.worker_batches()
    yield from src if limit is None else itertools.islice(src, limit)


def split_by_rank(src: Iterable[Any], *, rank: int, world_size: int) -> Iterator[Any]:
    """Every ``world_size``-th item, starting at ``rank`` (whole shards per rank in evaluation)."""
    for i, item in enumerate(src):
        if i % world_size == rank:
            yield item
