"""Exact epochs per rank without a process group: ranks are simulated by arguments or RANK/WORLD_SIZE."""

from __future__ import annotations

from typing import Any

import pytest

from datapipes.pipeline import make_train_loader
from datapipes.shards import shard_paths
from datapipes.transforms import TakePoints
from tests.datapipes._shard_helpers import write_tiny

BATCHES = 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("epoch") / "ds"
    # 3 shards of uneven use: split_by_node would give ranks different counts; resampling never does
    write_tiny(root, shards={"train": 3}, per_shard=10, points=24)
    return shard_paths(root, "train")


def _loader(shards, rank: int, *, workers: int = 2, explicit: bool = True):
    kwargs: dict[str, Any] = {"rank": rank, "world_size": 2} if explicit else {}
    return make_train_loader(
        shards,
        transform=TakePoints(16, mode="random"),
        batch_size=4,
        batches_per_epoch=BATCHES,
        num_workers=workers,
        seed=11,
        **kwargs,
    )


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_each_rank_yields_exactly_batches_per_epoch_twice(shards, workers):
    for rank in range(2):
        loader = _loader(shards, rank, workers=workers)
        for _ in range(2):
            batches = list(loader)
            assert len(batches) == BATCHES
            assert all(b.points.shape == (4, 16, 3) for b in batches)


def test_ranks_draw_different_samples(shards):
    per_rank = [[k for b in _loader(shards, rank) for k in b.key] for rank in range(2)]
    assert per_rank[0] != per_rank[1]
    assert len(per_rank[0]) == len(per_rank[1]) == 4 * BATCHES


def test_workers_draw_different_samples(shards):
    loader = _loader(shards, 0, workers=2)
    batches = list(loader)
    # batches alternate between the two workers; their streams must not be copies of each other
    assert [b.key for b in batches[0::2]][:2] != [b.key for b in batches[1::2]][:2]


def test_rank_from_environment(shards, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    keys = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        loader = _loader(shards, rank, explicit=False)
        batches = list(loader)
        assert len(batches) == BATCHES
        keys.append([k for b in batches for k in b.key])
        assert keys[-1] == [k for b in _loader(shards, rank) for k in b.key]  # env and explicit agree
    assert keys[0] != keys[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_persistent_workers_draw_the_epochs_fresh_workers_draw(shards, workers):
    """A long-lived loader (persistent workers) and a fresh loader per epoch (a resumed run) agree."""
    kwargs: dict[str, Any] = {"rank": 1, "world_size": 2}
    long_lived = make_train_loader(
        shards, transform=TakePoints(8), batch_size=4, batches_per_epoch=3, num_workers=workers, **kwargs
    )
    for epoch in range(3):
        got = [k for b in long_lived for k in b.key]
        fresh = make_train_loader(
            shards,
            transform=TakePoints(8),
            batch_size=4,
            batches_per_epoch=3,
            num_workers=workers,
            persistent_workers=False,
            **kwargs,
        )
        fresh.set_epoch(epoch)
        assert got == [k for b in fresh for k in b.key], f"epoch {epoch}"
