from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from datapipes.errors import FieldError
from datapipes.pipeline import collate, make_eval_loader, make_train_loader, make_train_pipeline, resolve_rank
from datapipes.shards import ShardFormatError, ShardSetWriter, encode_png, shard_paths
from datapipes.transforms import Compose, ScaleAndTranslate, TakePoints
from datapipes.types import BatchFields, PointBatch
from tests.datapipes._shard_helpers import make_samples, npy_bytes, write_raw_tar, write_tiny


@pytest.fixture
def tiny(tmp_path):
    write_tiny(tmp_path / "ds", shards={"train": 4, "test": 2}, per_shard=12, points=48)
    return tmp_path / "ds"


def test_train_batches_shapes_and_dtypes(tiny):
    loader = make_train_loader(
        shard_paths(tiny, "train"),
        transform=Compose((TakePoints(32, mode="random"), ScaleAndTranslate())),
        batch_size=5,
        batches_per_epoch=3,
        num_workers=0,
        fields=BatchFields(normals=True),
        rank=0,
        world_size=1,
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    batch = batches[0]
    assert isinstance(batch, PointBatch)
    assert batch.points.shape == (5, 32, 3)
    assert batch.points.dtype == torch.float32
    assert batch.normals is not None
    assert batch.normals.shape == (5, 32, 3)
    assert batch.label is not None
    assert batch.label.dtype == torch.long
    assert batch.label.shape == (5,)
    assert batch.feats is None
    assert batch.images is None
    assert len(batch.key) == 5
    assert all(k.startswith("s") for k in batch.key)
    # labels are the ones stored under these keys
    assert batch.label.tolist() == [int(k[1:]) % 3 for k in batch.key]


def test_same_seed_and_epoch_reproduce_and_epochs_differ(tiny):
    def keys(epoch: int, seed: int = 0) -> list[str]:
        loader = make_train_loader(
            shard_paths(tiny, "train"),
            transform=TakePoints(16, mode="random"),
            batch_size=4,
            batches_per_epoch=4,
            num_workers=2,
            seed=seed,
            rank=0,
            world_size=1,
        )
        loader.set_epoch(epoch)
        return [k for b in loader for k in b.key]

    assert keys(1) == keys(1)
    assert keys(1) != keys(2)
    assert keys(1, seed=0) != keys(1, seed=5)


def test_epoch_advances_by_itself_and_follows_a_source(tiny):
    epochs: list[int] = []
    loader = make_train_loader(
        shard_paths(tiny, "train"),
        transform=TakePoints(16),
        batch_size=4,
        batches_per_epoch=1,
        num_workers=0,
        rank=0,
        world_size=1,
        epoch_source=lambda: epochs[-1] if epochs else None,
    )
    list(loader)
    list(loader)
    assert loader.epoch == 1
    epochs.append(7)
    list(loader)
    assert loader.epoch == 7


def test_pipeline_is_picklable(tiny):
    pipeline = make_train_pipeline(
        [str(p) for p in shard_paths(tiny, "train")],
        transform=TakePoints(8),
        batch_size=2,
        rank=0,
        world_size=1,
    )
    clone = pickle.loads(pickle.dumps(pipeline))
    clone.set_epoch(0)
    batch = next(iter(clone))
    assert batch.points.shape == (2, 8, 3)


def test_pickle_member_refused_in_training(tmp_path):
    good = tmp_path / "good-000000.tar"
    xyz = npy_bytes(np.zeros((8, 3), np.float32))
    write_raw_tar(good, [("a.xyz.npy", xyz), ("a.cls.txt", b"1"), ("a.extra.pyd", b"\x80\x04K\x01.")])
    loader = make_train_loader([good], batch_size=1, batches_per_epoch=1, num_workers=0, rank=0, world_size=1)
    with pytest.raises(ShardFormatError, match=r"good-000000.tar: member a.extra.pyd is a pickle"):
        list(loader)


def test_images_and_features_are_batched(tmp_path):
    root = tmp_path / "img"
    writer = ShardSetWriter(root, options={"format": "img"})
    samples = make_samples(0, 6, points=20)
    for i, s in enumerate(samples):
        s["feat"] = np.full((20, 2), i, np.float32)
        s["curv"] = np.full((20,), -i, np.float32)
        s["images"] = [
            encode_png(np.full((6, 5), 10 * i, np.uint8)),
            encode_png(np.full((6, 5), 255, np.uint8)),
        ]
    writer.write_shard("train", 0, samples, [])
    writer.finalize(num_shards={"train": 1}, classes=["a", "b", "c"], fps_ordered=False)
    loader = make_train_loader(
        shard_paths(root, "train"),
        transform=TakePoints(20),
        batch_size=3,
        batches_per_epoch=2,
        num_workers=0,
        rank=0,
        world_size=1,
        fields=BatchFields(point_features=("feat", "curv"), image_views=1),
    )
    batch = next(iter(loader))
    assert batch.feats is not None
    assert batch.feats.shape == (3, 20, 3)
    ids = [int(k[1:]) for k in batch.key]
    assert batch.feats[:, 0, 0].tolist() == ids
    assert batch.feats[:, 0, 2].tolist() == [-i for i in ids]
    assert batch.images is not None
    assert batch.images.shape == (3, 1, 1, 6, 5)  # (B, views, C, H, W)
    for image, i in zip(batch.images, ids):  # a random view: either the id-coded one or the white one
        assert image.max().item() in (pytest.approx(10 * i / 255), 1.0)


def test_eval_loader_covers_each_sample_once_across_ranks_and_workers(tiny):
    seen = []
    for rank in range(2):
        loader = make_eval_loader(
            shard_paths(tiny, "train"),
            transform=TakePoints(8),
            batch_size=5,
            num_workers=2,
            rank=rank,
            world_size=2,
        )
        seen += [k for b in loader for k in b.key]
    assert sorted(seen) == [f"s{k:05d}" for k in range(48)]


def test_collate_errors():
    a = {"key": "a", "xyz": np.zeros((4, 3), np.float32), "label": 1}
    with pytest.raises(ValueError, match="different point counts"):
        collate([a, {**a, "xyz": np.zeros((5, 3), np.float32)}])
    with pytest.raises(ValueError, match="labelled and unlabelled"):
        collate([a, {"key": "b", "xyz": np.zeros((4, 3), np.float32)}])
    with pytest.raises(ValueError, match="has no 'normal'"):
        collate([{**a, "normal": np.zeros((4, 3), np.float32)}, a])
    unlabelled = collate([{"key": "b", "xyz": np.zeros((4, 3), np.float32)}])
    assert unlabelled.label is None
    assert len(unlabelled) == 1


def test_resolve_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (1, 4)
    assert resolve_rank(2, 3) == (2, 3)
    with pytest.raises(ValueError, match="both"):
        resolve_rank(1, None)
    with pytest.raises(ValueError, match="rank < world_size"):
        resolve_rank(3, 3)


def test_argument_validation(tiny):
    paths = shard_paths(tiny, "train")
    with pytest.raises(ValueError, match="batches_per_epoch"):
        make_train_loader(paths, batch_size=2, batches_per_epoch=0)
    with pytest.raises(ValueError, match="at least one shard"):
        make_train_pipeline([], batch_size=2)
    with pytest.raises(ValueError, match="point_features"):
        make_train_pipeline(
            paths, batch_size=2, fields=BatchFields(point_features=("rgb",)), rank=0, world_size=1
        )
    with pytest.raises(FieldError, match="point_features: 'rgb' is not a stored per-point field"):
        make_train_pipeline(
            paths, batch_size=2, fields=BatchFields(point_features=("rgb",)), rank=0, world_size=1
        )


def test_seeded_shuffle_is_a_deterministic_permutation():
    from datapipes.streams import StreamState, seeded_shuffle

    state = StreamState(seed=3, rank=0, world_size=1)
    out = list(seeded_shuffle(range(500), state=state, bufsize=64))
    assert sorted(out) == list(range(500))  # nothing lost or repeated
    assert out != list(range(500))
    assert out == list(seeded_shuffle(range(500), state=state, bufsize=64))
    state.epoch = 1
    assert out != list(seeded_shuffle(range(500), state=state, bufsize=64))
    # an item can move at most about bufsize positions earlier than its input position
    assert all(pos >= item - 2 * 64 for pos, item in enumerate(out))
