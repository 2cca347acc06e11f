from __future__ import annotations

import numpy as np
import pytest

from datapipes.errors import UserError
from datapipes.geometry import fps_order
from datapipes.memory import InMemoryPointDataset, load_split_arrays
from datapipes.shards import ShardSetWriter
from datapipes.transforms import Jitter
from datapipes.types import BatchFields
from tests.datapipes._shard_helpers import make_samples, write_tiny


def test_load_split_arrays_not_fps_ordered_computes_fps(tmp_path):
    write_tiny(tmp_path / "ds", fps_ordered=False)
    xyz, labels, keys = load_split_arrays(tmp_path / "ds", "test", 10)
    originals = make_samples(64, 16)  # the test split holds samples 64..79
    assert xyz.shape == (16, 10, 3)
    assert xyz.dtype == np.float32
    assert keys == [s["key"] for s in originals]
    assert labels.tolist() == [s["label"] for s in originals]
    for got, sample in zip(xyz, originals):
        np.testing.assert_array_equal(got, sample["xyz"][fps_order(sample["xyz"], n=10)])


def test_load_split_arrays_fps_ordered_takes_prefix_and_caps(tmp_path):
    write_tiny(tmp_path / "ds", fps_ordered=True, points=48)
    xyz, _, _ = load_split_arrays(tmp_path / "ds", "test", 20)
    np.testing.assert_array_equal(xyz[0], make_samples(64, 1)[0]["xyz"][:20])
    with pytest.raises(UserError, match=r"ds: split 'test' stores clouds of 48 points .* 1200 requested"):
        load_split_arrays(tmp_path / "ds", "test", 1200)  # never silently fewer points than asked for
    # an explicit upper bound, like Point-MAE's FPS pool of 1200
    capped, _, _ = load_split_arrays(tmp_path / "ds", "test", 1200, cap_to_stored=True)
    assert capped.shape == (16, 48, 3)
    everything, _, _ = load_split_arrays(tmp_path / "ds", "test", None)
    assert everything.shape == (16, 48, 3)


def test_unequal_clouds_need_num_points(tmp_path):
    root = tmp_path / "ds"
    writer = ShardSetWriter(root, options={"format": "x"})
    writer.write_shard("train", 0, make_samples(0, 2, points=10) + make_samples(2, 2, points=14), [])
    writer.finalize(num_shards={"train": 1}, classes=["a", "b", "c"], fps_ordered=True)
    with pytest.raises(UserError, match="sizes"):
        load_split_arrays(root, "train", None)
    with pytest.raises(UserError, match="10 points"):
        load_split_arrays(root, "train", 12)
    xyz, _, _ = load_split_arrays(root, "train", 12, cap_to_stored=True)
    assert xyz.shape == (4, 10, 3)  # capped at the smallest cloud


def test_missing_split_is_a_user_error(tmp_path):
    write_tiny(tmp_path / "ds")
    with pytest.raises(UserError, match="no split 'val'"):
        load_split_arrays(tmp_path / "ds", "val", 8)


def test_dataset_items_and_seeded_transform(tmp_path):
    write_tiny(tmp_path / "ds", fps_ordered=True)
    ds = InMemoryPointDataset(
        tmp_path / "ds", "train", num_points=16, transform=Jitter(), seed=3, fields=BatchFields(normals=True)
    )
    assert len(ds) == 64
    assert ds.labels.shape == (64,)
    assert ds.keys[0] == "s00000"
    item = ds[5]
    assert item["xyz"].shape == (16, 3)
    assert item["normal"].shape == (16, 3)
    assert item["label"] == 5 % 3
    np.testing.assert_array_equal(ds[5]["xyz"], item["xyz"])  # same (seed, epoch, index) -> same item
    ds.set_epoch(1)
    assert not np.array_equal(ds[5]["xyz"], item["xyz"])
    raw = InMemoryPointDataset(tmp_path / "ds", "train", num_points=16)
    np.testing.assert_array_equal(raw[5]["xyz"], make_samples(5, 1)[0]["xyz"][:16])
    assert "normal" not in raw[5]
