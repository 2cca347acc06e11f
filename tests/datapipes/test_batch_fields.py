"""What batches hold (BatchFields), through the real pipelines on shards written in tmp_path.

Ragged clouds (padded, lengths, mask), named LiDAR-like feature channels, several transformed point views
per sample and several image views per sample; for the streaming train and eval loaders, the in-memory
dataset and the data module.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from datapipes.collate import collate
from datapipes.datamodule import PointCloudDataModule
from datapipes.errors import FieldError, UserError
from datapipes.memory import InMemoryPointDataset
from datapipes.pipeline import make_eval_loader, make_train_loader
from datapipes.shards import ShardFormatError, ShardSetWriter, encode_png, shard_paths
from datapipes.transforms import Compose, ScaleAndTranslate, TakePoints
from datapipes.types import PAD_VALUE, BatchFields, PointBatch
from tests.datapipes._shard_helpers import make_samples

SIZES = (20, 33, 47)  # point counts of the ragged clouds, by key index


def _loader(root: Path, fields: BatchFields, **kwargs) -> list[PointBatch]:
    options = {"batch_size": 4, "batches_per_epoch": 3, "num_workers": 0, "rank": 0, "world_size": 1}
    return list(make_train_loader(shard_paths(root, "train"), fields=fields, **{**options, **kwargs}))


@pytest.fixture
def ragged(tmp_path: Path) -> Path:
    """12 clouds of 20, 33 or 47 points, with normals and a per-point channel equal to the point index."""
    root = tmp_path / "ragged"
    writer = ShardSetWriter(root, options={"format": "ragged"})
    for shard in range(2):
        samples = []
        for k in range(shard * 6, shard * 6 + 6):
            sample = make_samples(k, 1, points=SIZES[k % 3])[0]
            sample["feat"] = np.arange(SIZES[k % 3], dtype=np.float32)[:, None]
            samples.append(sample)
        writer.write_shard("train", shard, samples, [])
    writer.finalize(num_shards={"train": 2}, classes=["a", "b", "c"], fps_ordered=True)
    return root


def _stored(k: int) -> np.ndarray:
    return make_samples(k, 1, points=SIZES[k % 3])[0]["xyz"]


# ------------------------------------------------------------------------------------------ BatchFields


def test_batch_fields_validate_and_round_trip_as_plain_data():
    fields = BatchFields(normals=True, point_features=["feat", "curv"], image_views=2, point_views=3)  # type: ignore[arg-type]
    assert fields.point_features == ("feat", "curv")  # a list from YAML becomes a tuple: hashable, frozen
    assert BatchFields(**fields.to_dict()) == fields
    assert BatchFields.coerce(fields.to_dict()) == fields
    assert BatchFields.coerce(None) == BatchFields()
    assert fields.stored_fields() == ("xyz", "label", "normal", "curv", "feat", "images")
    assert BatchFields(point_features=("intensity", "time")).stored_fields() == ("xyz", "label", "feat")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fields.normals = False  # type: ignore[misc]
    for bad in ({"point_views": 0}, {"image_views": -1}, {"point_features": ("feat", "feat")}):
        with pytest.raises(ValueError):
            BatchFields(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="point_features"):
        BatchFields(point_features="feat")  # type: ignore[arg-type]


def test_data_module_maps_the_shorthand_keys_of_older_configs(ragged: Path):
    dm = PointCloudDataModule(str(ragged), normals=True, point_features=["feat"], images=True)
    assert dm.fields == BatchFields(normals=True, point_features=("feat",), image_views=1)
    assert dm.hparams["fields"] == dm.fields.to_dict()  # plain data in checkpoints
    again = PointCloudDataModule(**dict(dm.hparams))  # hparams hold both forms: they agree
    assert again.fields == dm.fields
    assert PointCloudDataModule(str(ragged), fields={"point_views": 2}).fields.point_views == 2
    with pytest.raises(ValueError, match="contradicts"):
        PointCloudDataModule(
            str(ragged), point_features=["curv"], fields=BatchFields(point_features=("feat",))
        )


# ------------------------------------------------------------------------------------------ ragged clouds


def test_ragged_clouds_are_padded_with_lengths_and_a_mask(ragged: Path):
    fields = BatchFields(ragged=True, normals=True, point_features=("feat",))
    batches = _loader(ragged, fields, transform=TakePoints(40, keep_fewer=True))
    seen = set()
    for batch in batches:
        assert batch.lengths is not None
        assert batch.lengths.dtype == torch.int64
        assert batch.points.shape == (4, int(batch.lengths.max()), 3)
        mask = batch.mask()
        assert mask.shape == batch.points.shape[:2]
        assert mask.sum(dim=1).tolist() == batch.lengths.tolist()
        for row, key in enumerate(batch.key):
            k = int(key[1:])
            n = min(SIZES[k % 3], 40)  # 40 is an upper bound: smaller clouds keep every point
            seen.add(n)
            assert int(batch.lengths[row]) == n
            np.testing.assert_array_equal(batch.points[row, :n].numpy(), _stored(k)[:n])
            assert batch.feats is not None
            assert batch.normals is not None
            assert batch.feats[row, :n, 0].tolist() == list(range(n))
            # padding is never a plausible point: every padded value of every per-point field is NaN
            for tensor in (batch.points, batch.normals, batch.feats):
                assert torch.isnan(tensor[row, n:]).all()
                assert not torch.isnan(tensor[row, :n]).any()
    assert seen == {20, 33, 40}
    assert math.isnan(PAD_VALUE)


def test_ragged_clouds_in_evaluation_and_in_memory(ragged: Path):
    fields = BatchFields(ragged=True)
    loader = make_eval_loader(shard_paths(ragged, "train"), batch_size=5, fields=fields, rank=0, world_size=1)
    batches = list(loader)
    assert sorted(n for b in batches for n in b.lengths.tolist()) == sorted(SIZES[k % 3] for k in range(12))
    memory = InMemoryPointDataset(ragged, "train", num_points=30, fields=fields)  # FPS prefix, capped
    batch = collate([memory[i] for i in range(3)], ragged=True)
    assert batch.lengths is not None
    assert batch.lengths.tolist() == [20, 30, 30]
    np.testing.assert_array_equal(batch.points[1].numpy(), _stored(1)[:30])
    assert torch.isnan(batch.points[0, 20:]).all()
    with pytest.raises(ValueError, match="different point counts"):
        collate([memory[i] for i in range(3)])  # without ragged, unequal clouds stay an error


def test_data_module_ragged_training_and_validation(ragged: Path):
    dm = PointCloudDataModule(
        str(ragged), val_split="train", num_points=40, batch_size=4, num_workers=0, fields={"ragged": True}
    )
    dm.setup("fit")  # 40 > the smallest stored cloud: fine when ragged
    batch = next(iter(dm.train_dataloader()))
    assert batch.lengths is not None
    assert batch.points.shape[1] == int(batch.lengths.max()) <= 40
    val = next(iter(dm.val_dataloader()))
    assert val.lengths is not None
    assert set(val.lengths.tolist()) <= {20, 33, 40}
    with pytest.raises(UserError, match="smallest stored cloud has 20"):
        PointCloudDataModule(str(ragged), val_split=None, num_points=40, num_workers=0).setup("fit")


# ------------------------------------------------------------------------------------------ feature channels


def _one_shard(root: Path, samples: list, **finalize) -> dict:
    """Writes ``samples`` as the single train shard of ``root`` and returns the manifest."""
    writer = ShardSetWriter(root, options={"format": root.name})
    writer.write_shard("train", 0, samples, [])
    return writer.finalize(num_shards={"train": 1}, classes=["a", "b", "c"], fps_ordered=False, **finalize)


@pytest.fixture
def lidar(tmp_path: Path) -> Path:
    """LiDAR-like scans: xyz, ``feat`` = (intensity, time) with named channels, and curvature."""
    samples = make_samples(0, 8, points=24)
    for k, sample in enumerate(samples):
        sample["feat"] = np.stack([np.full(24, k / 10), np.arange(24) * 0.5], axis=1).astype(np.float32)
        sample["curv"] = np.full(24, -k, np.float32)
    manifest = _one_shard(tmp_path / "lidar", samples, channels={"feat": ["intensity", "time"]})
    assert manifest["fields"]["feat"] == {
        "dtype": "float32",
        "shape": ["N", 2],
        "channels": ["intensity", "time"],
    }
    return tmp_path / "lidar"


def test_channel_names_must_fit_their_field(tmp_path: Path):
    samples = make_samples(0, 2, points=8)
    for sample in samples:
        sample["feat"] = np.zeros((8, 2), np.float32)
    bad = [
        {"feat": ["a"]},
        {"feat": ["a", "a"]},
        {"normal": ["x", "y", "z"]},
        {"feat": ["a.b", "c"]},
        {"feat": ["xyz", "c"]},
    ]
    for i, channels in enumerate(bad):
        with pytest.raises(ValueError, match="channels"):
            _one_shard(tmp_path / f"bad{i}", samples, channels=channels)


def test_named_feature_channels_are_selected_and_named(lidar: Path):
    first = TakePoints(24)
    (batch,) = _loader(
        lidar, BatchFields(point_features=("feat", "curv")), transform=first, batches_per_epoch=1
    )
    assert batch.feats is not None
    assert batch.feats.shape == (4, 24, 3)
    assert batch.feat_names == ("intensity", "time", "curv")
    (batch,) = _loader(
        lidar, BatchFields(point_features=("time", "intensity")), transform=first, batches_per_epoch=1
    )
    assert batch.feat_names == ("time", "intensity")
    ids = [int(k[1:]) for k in batch.key]
    assert batch.feats is not None
    np.testing.assert_allclose(batch.feats[:, :, 0].numpy(), np.tile(np.arange(24) * 0.5, (4, 1)))
    np.testing.assert_allclose(batch.feats[:, 0, 1].numpy(), [k / 10 for k in ids], rtol=1e-6)
    memory = InMemoryPointDataset(lidar, "train", fields=BatchFields(point_features=("intensity",)))
    assert memory[3]["feat_names"] == ("intensity",)
    np.testing.assert_allclose(memory[3]["feats"][:, 0], 0.3, rtol=1e-6)


def test_unknown_feature_channel_names_the_choices(lidar: Path):
    with pytest.raises(
        FieldError, match=r"'rgb' is not a stored per-point field \(feat, curv\) .*intensity, time"
    ):
        _loader(lidar, BatchFields(point_features=("rgb",)))
    with pytest.raises(FieldError, match="'rgb'"):
        InMemoryPointDataset(lidar, "train", fields=BatchFields(point_features=("rgb",)))


# ------------------------------------------------------------------------------------------ point views


def test_point_views_are_separate_draws_of_the_same_sample(ragged: Path):
    fields = BatchFields(point_views=2, ragged=False)
    views_of = Compose((TakePoints(16, mode="random"),))
    for batch in _loader(ragged, fields, transform=views_of):
        assert batch.views is not None
        assert batch.views.shape == (4, 2, 16, 3)
        assert torch.equal(batch.views[:, 0], batch.points)
        for row, key in enumerate(batch.key):
            stored = {tuple(p) for p in _stored(int(key[1:])).tolist()}
            first, second = (batch.views[row, v].tolist() for v in range(2))
            assert {tuple(p) for p in first} <= stored  # both views come from this sample's cloud
            assert {tuple(p) for p in second} <= stored
            assert first != second  # each view has its own random draw


def test_point_views_with_augmentation_differ_and_are_reproducible(ragged: Path):
    fields = BatchFields(point_views=3)
    transform = Compose((TakePoints(16), ScaleAndTranslate()))
    batches = _loader(ragged, fields, transform=transform, seed=4)
    again = _loader(ragged, fields, transform=transform, seed=4)
    for batch, repeat in zip(batches, again):
        assert batch.views is not None
        assert repeat.views is not None
        assert torch.equal(batch.views, repeat.views)
        for row in range(4):  # the same 16 points, scaled and shifted differently per view
            v = batch.views[row]
            assert not torch.allclose(v[0], v[1])
            assert not torch.allclose(v[1], v[2])
            centred = v - v.mean(dim=1, keepdim=True)
            ratio = centred[1] / centred[0]
            assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-3, atol=1e-3)  # per-axis scale
    loader = make_eval_loader(
        shard_paths(ragged, "train"), transform=TakePoints(16), batch_size=3, fields=fields
    )
    batch = next(iter(loader))
    assert batch.views is not None
    assert batch.views.shape == (3, 3, 16, 3)


# ------------------------------------------------------------------------------------------ image views


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    """6 clouds with 3 grey PNG views each; pixel value = 10 * sample index + view index."""
    samples = make_samples(0, 6, points=16)
    for k, sample in enumerate(samples):
        sample["images"] = [encode_png(np.full((5, 7), 10 * k + v, np.uint8)) for v in range(3)]
    _one_shard(tmp_path / "pictures", samples)
    return tmp_path / "pictures"


def _codes(batch: PointBatch) -> list[list[int]]:
    assert batch.images is not None
    return (batch.images[:, :, 0, 0, 0] * 255).round().int().tolist()


def test_several_image_views_per_sample(pictures: Path):
    fields = BatchFields(image_views=2)
    batches = _loader(pictures, fields, transform=TakePoints(16), batch_size=3, batches_per_epoch=4)
    drawn = set()
    for batch in batches:
        assert batch.images is not None
        assert batch.images.shape == (3, 2, 1, 5, 7)
        for key, (a, b) in zip(batch.key, _codes(batch)):
            k = int(key[1:])
            assert {a // 10, b // 10} == {k}  # both views belong to the sample
            assert a != b  # two distinct stored views
            drawn.add((a % 10, b % 10))
    assert len(drawn) > 1  # drawn at random in training
    loader = make_eval_loader(
        shard_paths(pictures, "train"), batch_size=6, fields=fields, rank=0, world_size=1
    )
    batch = next(iter(loader))
    assert _codes(batch) == [[10 * k, 10 * k + 1] for k in range(6)]  # evaluation: the first views, in order
    memory = InMemoryPointDataset(pictures, "train", fields=BatchFields(image_views=3))
    assert memory[2]["images"].shape == (3, 1, 5, 7)
    np.testing.assert_allclose(memory[2]["images"][:, 0, 0, 0] * 255, [20, 21, 22], atol=1e-4)


def test_more_image_views_than_stored_is_an_error(pictures: Path):
    with pytest.raises(ShardFormatError, match="has 3 image view\\(s\\), 4 requested"):
        _loader(pictures, BatchFields(image_views=4), transform=TakePoints(16))
