"""``pcpt-data export-hf``: shards -> Hugging Face dataset (disk or Parquet) -> ``convert hf`` -> shards."""

from __future__ import annotations

import io
import json
import math
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datapipes.cli import build_parser, main
from datapipes.shards import ShardSetWriter, encode_png, iter_split_samples, read_manifest
from tests.cli_helpers import assert_one_error_line

SMALL = ["--classes", "3", "--per-class", "4", "--test-per-class", "2", "--points", "48", "--shard-size", "5"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny synthetic shards with one PNG view per sample (train 12, test 6; keys repeat across splits)."""
    out = tmp_path_factory.mktemp("synth") / "shards"
    assert main(["synth", str(out), *SMALL, "--images", "--json"]) == 0
    return out


def _samples(root: Path) -> dict[str, dict[str, dict[str, Any]]]:
    manifest = read_manifest(root)
    return {split: {s["key"]: s for s in iter_split_samples(root, split)} for split in manifest["splits"]}


def _export(shards: Path, dest: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["export-hf", str(shards), str(dest), "--json", "--quiet", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _reimport(report: dict[str, Any], out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs the read-back command the export printed (``pcpt-data convert hf DEST OUT ...``)."""
    words = shlex.split(report["reimport"])
    assert words[:5] == ["pcpt-data", "convert", "hf", report["dest"], "OUT"]
    assert main(["convert", "hf", report["dest"], str(out), "--quiet", *words[5:]]) == 0
    capsys.readouterr()


def _assert_same_samples(src: Path, out: Path, *, dropped: frozenset[str] = frozenset()) -> None:
    """Every sample of ``src`` is in ``out`` with the same key, label, arrays, image bytes and meta.

    A key found in several splits comes back prefixed with its split (conversions need keys unique across
    splits). ``dropped`` names fields the importer does not read back.
    """
    before, after = _samples(src), _samples(out)
    m_src, m_out = read_manifest(src), read_manifest(out)
    assert m_out["classes"] == m_src["classes"]
    assert sorted(after) == sorted(before)
    expected_fields = {k: v for k, v in m_src["fields"].items() if k not in dropped}
    assert m_out["fields"] == expected_fields
    counts = Counter(key for split in before.values() for key in split)
    for split, samples in before.items():
        got = after[split]
        assert len(got) == len(samples)
        for key, sample in samples.items():
            new = got[f"{split}_{key}" if counts[key] > 1 else key]
            assert set(new) == set(sample) - dropped
            np.testing.assert_array_equal(new["xyz"], sample["xyz"])
            assert new["xyz"].dtype == np.float32
            for name in ("normal", "feat"):
                if name in sample:
                    np.testing.assert_array_equal(new[name], sample[name])
            assert new.get("label") == sample.get("label")
            assert new.get("images") == sample.get("images")  # byte-identical PNG/JPEG
            assert {k: new["meta"][k] for k in sample["meta"]} == sample["meta"]


def test_export_disk_reads_back_and_round_trips(synth: Path, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "hf"
    report = _export(synth, dest, capsys, "--rows-per-file", "5")
    manifest = read_manifest(synth)
    assert report["format"] == "disk"
    assert report["samples"] == {"test": 6, "train": 12}
    assert report["files"] == {"test": 2, "train": 3}
    assert report["columns"] == ["key", "points", "normals", "label", "image", "meta"]
    assert report["reimport"] == f"pcpt-data convert hf {dest} OUT --no-normalize"

    dd = datasets.load_from_disk(str(dest))
    assert isinstance(dd, datasets.DatasetDict)
    assert sorted(dd) == ["test", "train"]
    features = dd["train"].features
    assert features["label"] == datasets.ClassLabel(names=manifest["classes"])
    assert isinstance(features["image"], datasets.Image)
    assert features["key"] == datasets.Value("string")
    assert features["meta"] == datasets.Value("string")
    assert features.arrow_schema.field("points").type == features.arrow_schema.field("normals").type
    assert str(features.arrow_schema.field("points").type) == "list<item: fixed_size_list<item: float>[3]>"
    for split, n in report["samples"].items():
        assert dd[split].num_rows == n
        assert len(list((dest / split).glob("data-*.arrow"))) == math.ceil(n / 5)
    shards = _samples(synth)
    rows = dd["train"].cast_column("image", datasets.Image(decode=False)).with_format("numpy")
    for row in rows:
        sample = shards["train"][row["key"]]
        np.testing.assert_array_equal(np.stack(row["points"]), sample["xyz"])
        assert row["image"]["bytes"] == sample["images"][0]
        assert json.loads(row["meta"]) == sample["meta"]
        assert int(row["label"]) == sample["label"]
    assert Image.open(io.BytesIO(shards["train"][rows[0]["key"]]["images"][0])).size == (32, 32)

    _reimport(report, tmp_path / "back", capsys)
    _assert_same_samples(synth, tmp_path / "back")


def test_export_parquet_hub_names_row_groups_and_round_trip(synth: Path, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "pq"
    report = _export(
        synth, dest, capsys, "--format", "parquet", "--rows-per-file", "5", "--row-group-size", "2"
    )
    assert [p.name for p in dest.iterdir()] == ["data"]  # the hub's layout: data/<split>-IIIII-of-NNNNN
    names = sorted(p.name for p in (dest / "data").iterdir())
    assert names == [
        "test-00000-of-00002.parquet",
        "test-00001-of-00002.parquet",
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet",
    ]
    meta = [pq.ParquetFile(dest / "data" / name).metadata for name in names]
    assert [m.num_rows for m in meta] == [5, 1, 5, 5, 2]
    assert [m.num_row_groups for m in meta] == [3, 1, 3, 3, 1]

    dd = datasets.load_dataset("parquet", data_dir=str(dest), cache_dir=str(tmp_path / "cache"))
    assert {split: dd[split].num_rows for split in dd} == {"train": 12, "test": 6}
    assert dd["test"].features["label"].names == read_manifest(synth)["classes"]
    assert isinstance(dd["test"].features["image"], datasets.Image)
    keys = [row["key"] for row in dd["train"]]
    assert keys == list(_samples(synth)["train"])  # shard order

    _reimport(report, tmp_path / "back", capsys)
    _assert_same_samples(synth, tmp_path / "back")


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def rich(tmp_path: Path) -> Path:
    """Unlabelled, not FPS-ordered shards with curvature, named feature channels and two views (PNG, JPEG)."""
    root = tmp_path / "rich"
    writer = ShardSetWriter(root, options={"format": "test-rich"})
    rng = np.random.default_rng(3)
    for split, count in (("train", 5), ("holdout", 2)):
        samples = []
        for i in range(count):
            n = 20 + 3 * i
            pixels = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
            samples.append(
                {
                    "key": f"{split}-scan{i}",
                    "xyz": rng.normal(size=(n, 3)).astype(np.float32) * 30,
                    "curv": rng.random(n).astype(np.float32),
                    "feat": rng.random((n, 2)).astype(np.float32),
                    "images": [encode_png(pixels), _jpeg(pixels)],
                    "meta": {"source": f"scans/{split}/{i}.las", "frame": [i, "x"]},
                }
            )
        writer.write_shard(split, 0, samples, [])
    writer.finalize(
        num_shards={"train": 1, "holdout": 1},
        classes=[],
        fps_ordered=False,
        channels={"feat": ["intensity", "time"]},
    )
    return root


@pytest.mark.parametrize("fmt", ["disk", "parquet"])
def test_export_every_field_and_round_trip(fmt: str, rich: Path, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "hf"
    report = _export(rich, dest, capsys, "--format", fmt)
    assert report["columns"] == ["key", "points", "curv", "feat", "images", "meta"]
    assert report["reimport"].endswith("--no-normalize --no-fps")
    if fmt == "disk":
        dd = datasets.load_from_disk(str(dest))
    else:  # a split name outside train/test/validation: the hub file name carries it
        assert sorted(p.name for p in (dest / "data").iterdir()) == [
            "holdout-00000-of-00001.parquet",
            "train-00000-of-00001.parquet",
        ]
        dd = datasets.load_dataset("parquet", data_dir=str(dest), cache_dir=str(tmp_path / "cache"))
    assert sorted(dd) == ["holdout", "train"]
    features = dd["train"].features
    schema = features.arrow_schema
    assert str(schema.field("feat").type) == "list<item: struct<intensity: float, time: float>>"
    assert str(schema.field("curv").type) == "list<item: float>"
    assert isinstance(features["images"].feature, datasets.Image)
    shards = _samples(rich)
    rows = dd["holdout"].cast_column("images", [datasets.Image(decode=False)])
    assert [row["key"] for row in rows] == list(shards["holdout"])
    for row in rows:
        sample = shards["holdout"][row["key"]]
        np.testing.assert_array_equal(np.asarray(row["curv"], dtype=np.float32), sample["curv"])
        feat = np.asarray([[p["intensity"], p["time"]] for p in row["feat"]], dtype=np.float32)
        np.testing.assert_array_equal(feat, sample["feat"])
        assert [im["bytes"] for im in row["images"]] == sample["images"]

    _reimport(report, tmp_path / "back", capsys)
    # curvature is exported, but the importer (like every converter) only computes it with --normals
    _assert_same_samples(rich, tmp_path / "back", dropped=frozenset({"curv"}))
    assert read_manifest(tmp_path / "back")["fields"]["feat"]["channels"] == ["intensity", "time"]


def test_export_hf_is_a_pcpt_data_command() -> None:
    text = build_parser().format_help()
    assert "export-hf" in text


def test_export_errors(synth: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    not_shards = tmp_path / "plain"
    not_shards.mkdir()
    (not_shards / "x.txt").write_text("x")
    assert main(["export-hf", str(not_shards), str(tmp_path / "a")]) == 2
    assert_one_error_line("pcpt-data", capsys.readouterr().err, "manifest.json: not found", str(not_shards))
    assert main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "a")]) == 2
    assert_one_error_line("pcpt-data", capsys.readouterr().err, "no such shard folder")
    assert not (tmp_path / "a").exists()

    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert main(["export-hf", str(synth), str(dest), "--quiet"]) == 2
    assert_one_error_line(
        "pcpt-data", capsys.readouterr().err, str(dest), "already exists and is not an empty"
    )
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert main(["export-hf", str(synth), str(tmp_path / "b"), "--rows-per-file", "0"]) == 2
    assert_one_error_line("pcpt-data", capsys.readouterr().err, "--rows-per-file")
    assert main(["export-hf", str(synth), str(tmp_path / "b"), "--format", "csv"]) == 2
    assert_one_error_line("pcpt-data", capsys.readouterr().err, "--format")


def test_damaged_shard_leaves_nothing_at_dest(synth: Path, tmp_path: Path, capsys) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in synth.iterdir():
        if path.is_file():
            (damaged / path.name).write_bytes(path.read_bytes())
    shard = damaged / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    capsys.readouterr()
    for fmt in ("disk", "parquet"):
        assert main(["export-hf", str(damaged), str(tmp_path / fmt), "--format", fmt, "--quiet"]) == 2
        assert_one_error_line("pcpt-data", capsys.readouterr().err, "train-000001.tar")
        assert not (tmp_path / fmt).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # no temporary folder left behind
