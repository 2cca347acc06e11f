"""Damaged shards are never read silently: counts, tar ends, finite points, hashes and point budgets."""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from datapipes.datamodule import PointCloudDataModule
from datapipes.errors import UserError
from datapipes.memory import InMemoryPointDataset, load_split_arrays
from datapipes.pipeline import make_eval_loader, make_train_loader
from datapipes.progress import Progress
from datapipes.shards import (
    ShardFormatError,
    ShardSetWriter,
    check_shard_hashes,
    iter_shard_members,
    iter_shard_samples,
    iter_split_samples,
    iter_tar_members,
    manifest_shard_samples,
    read_manifest,
    shard_paths,
)
from datapipes.shards import verify as shard_verify
from datapipes.transforms import TakePoints
from tests.datapipes._shard_helpers import (
    make_samples,
    member_offsets,
    npy_bytes,
    truncate_at_member,
    write_raw_tar,
    write_tiny,
)


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    root = tmp_path / "ds"
    write_tiny(root, shards={"train": 4, "test": 1}, per_shard=12, points=40, fps_ordered=True)
    return root


def poison_first_float(path: Path, value: float, *, occurrence: int = 0) -> None:
    """Overwrites the first float of the ``occurrence``-th .npy payload in the shard with ``value``."""
    data = bytearray(path.read_bytes())
    pos = -1
    for _ in range(occurrence + 1):
        pos = data.index(b"\x93NUMPY", pos + 1)
    header_len = struct.unpack("<H", data[pos + 8 : pos + 10])[0]
    start = pos + 10 + header_len
    data[start : start + 4] = np.float32(value).tobytes()
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ tar reader


def test_tar_cut_at_a_header_boundary_is_truncated(tiny: Path) -> None:
    path = tiny / "train-000001.tar"
    complete = [name for name, _ in iter_tar_members(path)]
    truncate_at_member(path, 10)
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: truncated: .*end-of-archive"):
        list(iter_tar_members(path))
    cut: list[str] = []
    with pytest.raises(ShardFormatError):
        cut.extend(name for name, _ in iter_tar_members(path))
    assert cut == complete[:10]


def test_empty_file_and_oversized_member_are_truncated(tmp_path: Path) -> None:
    empty = tmp_path / "train-000000.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardFormatError, match=r"train-000000\.tar: truncated"):
        list(iter_tar_members(empty))
    path = tmp_path / "big.tar"
    write_raw_tar(path, [("a.xyz.npy", npy_bytes(np.zeros((4, 3), np.float32)))])
    data = path.read_bytes()
    path.write_bytes(data[:600])  # header kept, payload cut
    with pytest.raises(ShardFormatError, match=r"big\.tar: truncated tar member"):
        list(iter_tar_members(path))


def test_complete_tar_without_its_padding_still_reads(tiny: Path) -> None:
    path = tiny / "train-000000.tar"
    end = member_offsets(path)[-1]
    path.write_bytes(path.read_bytes()[: end + 512])  # one end-of-archive block, no record padding
    assert len(list(iter_shard_samples(path, expected=12))) == 12


# ------------------------------------------------------------------------------------------ counts


def test_shard_count_checked_against_manifest(tiny: Path) -> None:
    path = tiny / "train-000002.tar"
    assert len(list(iter_shard_members(path, expected=12))) == 12
    with pytest.raises(ShardFormatError, match=r"train-000002\.tar: ends after 12 samples, .* lists 13"):
        list(iter_shard_members(path, expected=13))
    got: list[str] = []
    with pytest.raises(ShardFormatError, match=r"train-000002\.tar: holds more than the 11 samples"):
        got.extend(key for key, _ in iter_shard_members(path, expected=11))
    assert len(got) == 11  # the extra sample is never handed out


def replace_with_shorter_valid_shard(root: Path, name: str, count: int) -> None:
    """Swaps a shard for a complete, well-formed tar with only its first ``count`` samples."""
    samples = list(iter_shard_members(root / name))[:count]
    write_raw_tar(
        root / name, [(f"{key}.{suffix}", data) for key, m in samples for suffix, data in m.items()]
    )


def test_memory_loader_refuses_short_shard(tiny: Path) -> None:
    replace_with_shorter_valid_shard(tiny, "train-000001.tar", 5)
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: ends after 5 samples, .* lists 12"):
        load_split_arrays(tiny, "train", 16)
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar"):
        InMemoryPointDataset(tiny, "train", num_points=16)


def test_old_manifest_without_shard_counts_checks_split_total(tiny: Path) -> None:
    manifest = json.loads((tiny / "manifest.json").read_text())
    del manifest["shard_samples"]
    (tiny / "manifest.json").write_text(json.dumps(manifest))
    old = read_manifest(tiny)
    assert manifest_shard_samples(old) == {"test-000000.tar": 12}  # one-shard split: the split total
    assert len(list(iter_split_samples(tiny, "train", fields=("xyz",)))) == 48
    replace_with_shorter_valid_shard(tiny, "train-000001.tar", 5)
    with pytest.raises(ShardFormatError, match=r"split 'train' holds 41 samples .* lists 48"):
        list(iter_split_samples(tiny, "train", fields=("xyz",)))
    replace_with_shorter_valid_shard(tiny, "test-000000.tar", 3)
    with pytest.raises(ShardFormatError, match=r"test-000000\.tar: ends after 3 samples"):
        load_split_arrays(tiny, "test", 8)


def test_manifest_with_bad_counts_is_refused(tiny: Path) -> None:
    manifest = json.loads((tiny / "manifest.json").read_text())
    manifest["shard_samples"]["train-000000.tar"] = "twelve"
    (tiny / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="shard_samples"):
        read_manifest(tiny)


@pytest.mark.parametrize("loader", ["train", "eval"])
def test_streaming_loaders_refuse_truncated_and_short_shards(tiny: Path, loader: str) -> None:
    def run() -> int:
        urls = shard_paths(tiny, "train")
        if loader == "train":
            stream = make_train_loader(
                urls, transform=TakePoints(8), batch_size=4, batches_per_epoch=40, num_workers=0,
                rank=0, world_size=1, shuffle_buffer=4,
            )  # fmt: skip
        else:
            stream = make_eval_loader(urls, transform=TakePoints(8), batch_size=4, rank=0, world_size=1)
        return sum(len(batch.key) for batch in stream)

    assert run() == (160 if loader == "train" else 48)
    original = (tiny / "train-000001.tar").read_bytes()
    replace_with_shorter_valid_shard(tiny, "train-000001.tar", 5)
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: ends after 5 samples"):
        run()
    (tiny / "train-000001.tar").write_bytes(original)
    truncate_at_member(tiny / "train-000001.tar", 12)
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: truncated"):
        run()


def test_streaming_reader_takes_counts_from_the_manifest_beside_each_shard(tiny: Path) -> None:
    replace_with_shorter_valid_shard(tiny, "test-000000.tar", 7)
    stream = make_eval_loader([tiny / "test-000000.tar"], transform=TakePoints(8), batch_size=4)
    with pytest.raises(ShardFormatError, match=r"test-000000\.tar: ends after 7 samples, .* lists 12"):
        list(stream)


# ------------------------------------------------------------------------------------------ finite points


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_points_are_refused_naming_shard_and_key(tiny: Path, value: float) -> None:
    poison_first_float(tiny / "test-000000.tar", value)  # s00048.xyz.npy, the first member
    match = r"test-000000\.tar: member s00048\.xyz\.npy holds NaN or infinite values"
    with pytest.raises(ShardFormatError, match=match):
        load_split_arrays(tiny, "test", 8)
    with pytest.raises(ShardFormatError, match=match):
        list(make_eval_loader([tiny / "test-000000.tar"], transform=TakePoints(8), batch_size=4))


def test_non_finite_normals_feats_and_curvature_are_refused(tmp_path: Path) -> None:
    xyz = np.zeros((4, 3), np.float32)
    bad = np.zeros((4, 3), np.float32)
    bad[2, 1] = np.nan
    for suffix, array in (
        ("normal.npy", bad),
        ("feat.npy", bad),
        ("curv.npy", np.full(4, np.inf, np.float32)),
    ):
        path = tmp_path / "x.tar"
        write_raw_tar(path, [("k.xyz.npy", npy_bytes(xyz)), (f"k.{suffix}", npy_bytes(array))])
        with pytest.raises(ShardFormatError, match=rf"x\.tar: member k\.{suffix} holds NaN or infinite"):
            list(iter_shard_samples(path))
        assert len(list(iter_shard_samples(path, fields=("xyz",)))) == 1  # not decoded, not checked


def test_point_arrays_of_the_wrong_shape_or_dtype_are_refused(tmp_path: Path) -> None:
    cases = [
        ([("k.xyz.npy", npy_bytes(np.zeros((4, 2), np.float32)))], r"k\.xyz\.npy holds float32 \(4, 2\)"),
        ([("k.xyz.npy", npy_bytes(np.zeros((4, 3), np.int32)))], r"k\.xyz\.npy holds int32 \(4, 3\)"),
        (
            [("k.xyz.npy", npy_bytes(np.zeros((4, 3), np.float32))),
             ("k.normal.npy", npy_bytes(np.zeros((5, 3), np.float32)))],
            r"k\.normal\.npy holds float32 \(5, 3\)",
        ),
        ([("k.xyz.npy", npy_bytes(np.zeros((4, 3), np.float32))), ("k.cls.txt", b"-3")], "negative label"),
    ]  # fmt: skip
    for members, match in cases:
        path = tmp_path / "x.tar"
        write_raw_tar(path, members)
        with pytest.raises(ShardFormatError, match=rf"x\.tar: .*{match}"):
            list(iter_shard_samples(path))


def test_label_outside_the_class_list_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    writer = ShardSetWriter(root, options={"format": "x"})
    writer.write_shard("train", 0, make_samples(0, 4, points=8, classes=3), [])
    writer.finalize(num_shards={"train": 1}, classes=["a", "b", "c"], fps_ordered=False)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["classes"] = ["a", "b"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"train-000000\.tar: sample s00002 has label 2, .* 2 classes"):
        load_split_arrays(root, "train", 8)


# ------------------------------------------------------------------------------------------ hashes


def test_check_shard_hashes_names_the_first_bad_shard(
    tiny: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    check_shard_hashes(tiny, progress=False)
    assert capsys.readouterr().err == ""
    # progress lines in a log come every `interval` seconds (short steps stay silent): report every shard
    monkeypatch.setattr(shard_verify, "Progress", functools.partial(Progress, interval=0.0))
    check_shard_hashes(tiny, ["train"], progress=True)
    assert "sha256" in capsys.readouterr().err  # the progress report goes to stderr
    poison_first_float(tiny / "train-000003.tar", 0.5)  # still decodes: only the hash tells
    assert len(load_split_arrays(tiny, "train", 8)[2]) == 48
    check_shard_hashes(tiny, ["test"], progress=False)
    with pytest.raises(ShardFormatError, match=r"^train-000003\.tar: sha256 differs from .*manifest\.json"):
        check_shard_hashes(tiny, progress=False)
    (tiny / "train-000001.tar").unlink()
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: missing or unreadable shard"):
        check_shard_hashes(tiny, ["train"], progress=False)


# ------------------------------------------------------------------------------------------ data modules


def test_datamodule_verify_and_point_budget(tiny: Path) -> None:
    with pytest.raises(UserError, match=r"ds: num_points 41 requested, .* smallest stored cloud has 40"):
        PointCloudDataModule(str(tiny), num_points=41, num_workers=0).setup("fit")
    PointCloudDataModule(str(tiny), num_points=40, num_workers=0, verify=True).setup("fit")
    poison_first_float(tiny / "test-000000.tar", 0.25)
    dm = PointCloudDataModule(str(tiny), num_points=16, num_workers=0, verify=True)
    with pytest.raises(ShardFormatError, match=r"test-000000\.tar: sha256 differs"):
        dm.setup("fit")
    PointCloudDataModule(str(tiny), num_points=16, num_workers=0, val_split=None, verify=True).setup("fit")


def test_datamodule_in_memory_pool_is_an_upper_bound(tiny: Path) -> None:
    dm = PointCloudDataModule(
        str(tiny), num_points=32, fps_pool=1200, batch_size=8, num_workers=0, streaming=False, augment="none"
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.points.shape == (8, 32, 3)


def test_datamodule_training_stops_at_a_truncated_shard(tiny: Path) -> None:
    truncate_at_member(tiny / "train-000001.tar", 6)
    dm = PointCloudDataModule(str(tiny), num_points=16, batch_size=4, num_workers=0, val_split=None)
    dm.setup("fit")
    loader = dm.train_dataloader()  # 12 batches of 4 from resampled shards (seed 0 draws the damaged one)
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: truncated"):
        list(loader)


def test_classification_datamodule_checks(tiny: Path) -> None:
    from finetune.data import ClassificationDataModule

    with pytest.raises(UserError, match=r"ds: num_points 64 requested, .* smallest stored cloud has 40"):
        ClassificationDataModule(str(tiny), num_points=64).setup("fit")
    dm = ClassificationDataModule(str(tiny), num_points=32, pool_points=1200, verify=True)
    dm.setup("fit")  # the pool is capped at the 40 stored points
    assert dm.train_dataloader().dataset[0][0].shape == (40, 3)
    truncate_at_member(tiny / "test-000000.tar", 9)
    with pytest.raises(ShardFormatError, match=r"test-000000\.tar: sha256 differs"):
        ClassificationDataModule(str(tiny), num_points=32, verify=True).setup("fit")
    with pytest.raises(ShardFormatError, match=r"test-000000\.tar: truncated"):
        ClassificationDataModule(str(tiny), num_points=32).setup("fit")


def test_a_sample_without_a_member_its_manifest_lists_is_refused(tiny: Path) -> None:
    path = tiny / "test-000000.tar"
    samples = list(iter_shard_members(path))
    del samples[3][1]["cls.txt"]  # s00051 loses its label
    write_raw_tar(path, [(f"{key}.{suffix}", data) for key, m in samples for suffix, data in m.items()])
    match = r"test-000000\.tar: sample s00051 lacks member\(s\) s00051\.cls\.txt"
    with pytest.raises(ShardFormatError, match=match):
        load_split_arrays(tiny, "test", 8)
    with pytest.raises(ShardFormatError, match=match):
        list(make_eval_loader([path], transform=TakePoints(8), batch_size=4))
    assert len(list(iter_split_samples(tiny, "test", fields=("xyz",)))) == 12  # labels not read: not needed
