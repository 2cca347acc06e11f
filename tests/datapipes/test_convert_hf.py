from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image as PILImage

from datapipes.shards import read_manifest
from tests.datapipes._convert_helpers import (
    convert_cli,
    read_split,
    rejected_by_source,
    sorted_rows,
    unit_sphere,
)


def _rows(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [(rng.normal(size=(40, 3)) + i).astype(np.float32) for i in range(n)]


@pytest.fixture
def disk_dataset(tmp_path: Path) -> tuple[Path, dict[str, list[np.ndarray]], dict[str, list[int]]]:
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            "points": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
            "label": datasets.ClassLabel(names=["cone", "cube", "torus"]),
        }
    )
    points = {"train": _rows(rng, 5), "validation": _rows(rng, 3)}
    labels = {"train": [0, 2, 1, 2, 0], "validation": [1, 1, 0]}
    bad = {"train": [], "validation": []}  # rows that must be rejected
    points["train"][1] = points["train"][1].copy()
    points["train"][1][4, 0] = np.nan
    bad["train"].append(1)
    points["train"].append(np.zeros((6, 3), np.float32) + rng.normal(size=(6, 3)).astype(np.float32))
    labels["train"].append(1)
    bad["train"].append(5)
    table = {}
    for split in points:
        rows = [p.tolist() for p in points[split]]
        table[split] = datasets.Dataset.from_dict({"points": rows, "label": labels[split]}, features=features)
    ragged = [[0.0, 1.0, 2.0], [1.0, 2.0]] + [[float(i), 0.0, 1.0] for i in range(20)]
    table["validation"] = datasets.concatenate_datasets(
        [
            table["validation"],
            datasets.Dataset.from_dict({"points": [ragged], "label": [2]}, features=features),
        ]
    )
    points["validation"].append(np.zeros(0))
    labels["validation"].append(2)
    bad["validation"].append(3)
    src = tmp_path / "hfdisk"
    datasets.DatasetDict(table).save_to_disk(str(src))
    return src, points, {"labels": labels, "bad": bad}  # type: ignore[return-value]


def test_hf_save_to_disk(disk_dataset, tmp_path: Path) -> None:
    src, points, info = disk_dataset
    out = tmp_path / "out"
    assert convert_cli("hf", src, out, "--split-map", "train=train,validation=test", "--shard-size", "2") == 0
    for source, split in (("train", "train"), ("validation", "test")):
        got = read_split(out, split)
        expected = {f"{source}_{i:07d}" for i in range(len(points[source])) if i not in info["bad"][source]}
        assert set(got) == expected
        for key, sample in got.items():
            i = int(key.rsplit("_", 1)[1])
            np.testing.assert_allclose(
                sorted_rows(sample["xyz"]), sorted_rows(unit_sphere(points[source][i])), atol=1e-5
            )
            assert sample["label"] == info["labels"][source][i]
            assert sample["meta"]["class"] == ["cone", "cube", "torus"][info["labels"][source][i]]
    assert rejected_by_source(out) == {
        "train#1": "non-finite coordinate values (1 NaN/inf)",
        "train#5": "too few points: 6 < --min-points 16",
        "validation#3": "wrong array shape: ragged or non-numeric 'points' value",
    }


def test_hf_parquet_glob_string_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "pq"
    src.mkdir()
    clouds = {"train": _rows(rng, 4), "test": _rows(rng, 2)}
    names = {"train": ["b", "a", "c", "a"], "test": ["c", "b"]}
    for split in clouds:
        ds = datasets.Dataset.from_dict(
            {"xyz": [c.tolist() for c in clouds[split]], "category": names[split]}
        )
        ds.to_parquet(str(src / f"{split}-00000-of-00001.parquet"))
    (src / "train-00001-of-00002.parquet").write_bytes(b"PAR1 garbage")
    out = tmp_path / "out"
    code = convert_cli(
        "hf",
        str(src / "*.parquet"),
        out,
        "--points-column",
        "xyz",
        "--label-column",
        "category",
        "--no-normalize",
        "--no-fps",
    )
    assert code == 0
    for split in clouds:
        got = read_split(out, split)
        assert len(got) == len(clouds[split])
        for i, cloud in enumerate(clouds[split]):
            sample = got[f"{split}_{i:07d}"]
            np.testing.assert_array_equal(sample["xyz"], cloud)
            assert sample["label"] == ["a", "b", "c"].index(names[split][i])
    reasons = rejected_by_source(out)
    assert list(reasons) == ["train-00001-of-00002.parquet"]
    assert reasons["train-00001-of-00002.parquet"].startswith("unreadable Parquet file")


def test_hf_errors(disk_dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _, _ = disk_dataset
    assert convert_cli("hf", src, tmp_path / "a", "--points-column", "nope") == 2
    assert "--points-column 'nope' is not a column" in capsys.readouterr().err
    assert convert_cli("hf", src, tmp_path / "b", "--split-map", "training=train") == 2
    assert "--split-map names splits ['training']" in capsys.readouterr().err
    assert convert_cli("hf", tmp_path / "missing-dir", tmp_path / "c") == 2
    assert "not a save_to_disk folder" in capsys.readouterr().err


def _image(fmt: str, size: tuple[int, int] = (8, 6), value: int = 90) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, (value, 20, 200)).save(buf, format=fmt)
    return buf.getvalue()


def test_hf_keys_images_feat_meta_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    features = datasets.Features(
        {
            "__key__": datasets.Value("string"),
            "xyz": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=3)),
            "feat": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
            "image": datasets.Image(),
            "meta": {"site": datasets.Value("string"), "frame": datasets.Value("int32")},
        }
    )
    png, bmp = _image("PNG"), _image("BMP", value=7)
    rows = {
        "train": (["a-1", "shared", "has.dot", "bad-image"], [png, bmp, png, b"not an image"]),
        "test": (["shared"], [png]),
    }
    clouds = {s: [rng.normal(size=(20, 3)).astype(np.float32) for _ in keys] for s, (keys, _) in rows.items()}
    feats = {s: [rng.random((20, 2)).astype(np.float32) for _ in keys] for s, (keys, _) in rows.items()}
    table = {
        split: datasets.Dataset.from_dict(
            {
                "__key__": keys,
                "xyz": [c.tolist() for c in clouds[split]],
                "feat": [f.tolist() for f in feats[split]],
                "image": [{"bytes": im, "path": None} for im in images],
                "meta": [{"site": f"{split}{i}", "frame": i} for i in range(len(keys))],
            },
            features=features,
        )
        for split, (keys, images) in rows.items()
    }
    src = tmp_path / "hfdisk"
    datasets.DatasetDict(table).save_to_disk(str(src))
    out = tmp_path / "out"
    assert convert_cli("hf", src, out, "--no-normalize", "--no-fps") == 0
    train, test = read_split(out, "train"), read_split(out, "test")
    # a key found in two splits is prefixed with its split; an unsafe key is made safe
    assert set(train) == {"a-1", "train_shared", "has_dot"}
    assert set(test) == {"test_shared"}
    reasons = rejected_by_source(out)
    assert list(reasons) == ["train#3"]
    assert reasons["train#3"].startswith("'image' view 0: undecodable image")
    for key, i in (("a-1", 0), ("train_shared", 1), ("has_dot", 2)):
        np.testing.assert_array_equal(train[key]["xyz"], clouds["train"][i])
        np.testing.assert_array_equal(train[key]["feat"], feats["train"][i])
        assert train[key]["meta"]["site"] == f"train{i}"
        assert train[key]["meta"]["frame"] == i
    assert train["a-1"]["images"] == [png]  # PNG bytes kept as they are
    (converted,) = train["train_shared"]["images"]  # BMP re-encoded as PNG, same pixels
    assert converted[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(
        np.asarray(PILImage.open(io.BytesIO(converted))), np.asarray(PILImage.open(io.BytesIO(bmp)))
    )
    manifest = read_manifest(out)
    assert manifest["images"]["views"] == 1
    assert manifest["images"]["size"] == [6, 8]
    assert manifest["fields"]["feat"]["shape"] == ["N", 2]
    assert "channels" not in manifest["fields"]["feat"]
