"""modelnet-resampled (text) and modelnet-h5 / scanobjectnn (HDF5) converters."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from datapipes.converters.h5 import SCANOBJECTNN_CLASSES
from tests.datapipes._convert_helpers import (
    convert_cli,
    read_split,
    rejected_by_source,
    sorted_rows,
    unit_sphere,
)


def _xyzn(rng: np.random.Generator, n: int) -> np.ndarray:
    xyz = rng.normal(size=(n, 3)) + 1.0
    normal = rng.normal(size=(n, 3))
    return np.c_[xyz, normal / np.linalg.norm(normal, axis=1, keepdims=True)]


def _resampled(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    src = tmp_path / "modelnet40_normal_resampled"
    classes40 = ["airplane", "chair", "night_stand"]
    rows: dict[str, np.ndarray] = {}
    for c in classes40:
        (src / c).mkdir(parents=True)
        for i in range(1, 4):
            sid = f"{c}_{i:04d}"
            rows[sid] = _xyzn(rng, 40)
            np.savetxt(src / c / f"{sid}.txt", rows[sid], delimiter=",", fmt="%.6f")
    (src / "modelnet40_shape_names.txt").write_text("\n".join(classes40) + "\n")
    (src / "modelnet40_train.txt").write_text(
        "airplane_0001\nairplane_0002\nchair_0001\nchair_0002\nnight_stand_0001\nnight_stand_0002\n"
        "chair_0091\nchair_0092\nchair_0093\nchair_0094\nchair_0095\n"
    )
    (src / "modelnet40_test.txt").write_text("airplane_0003\nchair_0003\nnight_stand_0003\n")
    (src / "chair" / "chair_0091.txt").write_text("")
    (src / "chair" / "chair_0092.txt").write_text("0.1,0.2,0.3,0,0,1\n0.1,0.2\n")
    (src / "chair" / "chair_0093.txt").write_text("hello,world\n")
    bad = _xyzn(rng, 40)
    bad[3, 2] = np.nan
    np.savetxt(src / "chair" / "chair_0094.txt", bad, delimiter=",")
    # modelnet10 lists over the same folder
    (src / "modelnet10_shape_names.txt").write_text("chair\nnight_stand\n")
    (src / "modelnet10_train.txt").write_text("chair_0001\nnight_stand_0001\n")
    (src / "modelnet10_test.txt").write_text("chair_0003\n")
    return src, rows


def test_modelnet_resampled(tmp_path: Path) -> None:
    src, rows = _resampled(tmp_path)
    out = tmp_path / "out"
    assert convert_cli("modelnet-resampled", src, out) == 0  # default --points 8192 keeps all 40
    train, test = read_split(out, "train"), read_split(out, "test")
    assert set(train) == {
        "airplane_0001",
        "airplane_0002",
        "chair_0001",
        "chair_0002",
        "night_stand_0001",
        "night_stand_0002",
    }
    assert set(test) == {"airplane_0003", "chair_0003", "night_stand_0003"}
    for key, sample in {**train, **test}.items():
        ref = np.round(rows[key], 6)
        np.testing.assert_allclose(
            sorted_rows(sample["xyz"]), sorted_rows(unit_sphere(ref[:, :3])), atol=1e-5
        )
        # normals travel with their points
        order = np.lexsort(unit_sphere(ref[:, :3]).T[::-1])
        got = np.lexsort(sample["xyz"].astype(np.float64).T[::-1])
        np.testing.assert_allclose(sample["normal"][got], ref[order, 3:], atol=1e-5)
        assert sample["label"] == ["airplane", "chair", "night_stand"].index(key.rsplit("_", 1)[0])
    reasons = rejected_by_source(out)
    assert set(reasons) == {f"chair/chair_009{i}.txt" for i in range(1, 6)}
    assert reasons["chair/chair_0091.txt"] == "empty file (0 bytes)"
    assert reasons["chair/chair_0092.txt"].startswith("cannot parse comma-separated rows")
    assert reasons["chair/chair_0093.txt"].startswith("cannot parse comma-separated rows")
    assert reasons["chair/chair_0094.txt"] == "non-finite coordinate values (1 NaN/inf)"
    assert reasons["chair/chair_0095.txt"] == "missing file"

    out10 = tmp_path / "out10"
    assert convert_cli("modelnet-resampled", src, out10, "--variant", "modelnet10", "--points", "16") == 0
    train10 = read_split(out10, "train")
    assert {k: s["label"] for k, s in train10.items()} == {"chair_0001": 0, "night_stand_0001": 1}
    assert train10["chair_0001"]["xyz"].shape == (16, 3)


def _write_h5(path: Path, data: np.ndarray, label: np.ndarray, normal: np.ndarray | None = None) -> None:
    with h5py.File(path, "w") as fh:
        fh["data"] = data
        fh["label"] = label
        if normal is not None:
            fh["normal"] = normal


def test_modelnet_h5(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "modelnet40_ply_hdf5_2048"
    src.mkdir()
    data = {
        f: rng.normal(size=(n, 32, 3)).astype(np.float32)
        for f, n in (("train0", 5), ("train1", 3), ("test0", 4))
    }
    labels = {f: rng.integers(0, 3, size=(len(d), 1)).astype(np.uint8) for f, d in data.items()}
    data["train1"][1, 7, 0] = np.inf
    for f in data:
        normal = rng.normal(size=data[f].shape).astype(np.float32)
        _write_h5(src / f"ply_data_{f}.h5", data[f], labels[f], normal)
    (src / "ply_data_train2.h5").write_bytes(b"garbage, not hdf5")
    _write_h5(src / "ply_data_train3.h5", rng.normal(size=(2, 32, 2)), np.zeros((2, 1), np.int64))
    (src / "shape_names.txt").write_text("airplane\nbathtub\nbed\n")
    out = tmp_path / "out"
    assert convert_cli("modelnet-h5", src, out, "--no-fps", "--no-normalize") == 0
    train, test = read_split(out, "train"), read_split(out, "test")
    assert len(train) == 7
    assert len(test) == 4
    for f, arr in data.items():
        for row in range(len(arr)):
            key = f"ply_data_{f}_{row:05d}"
            if f == "train1" and row == 1:
                assert key not in train
                continue
            sample = (test if f.startswith("test") else train)[key]
            np.testing.assert_array_equal(sample["xyz"], arr[row])
            assert sample["label"] == int(labels[f][row, 0])
            assert sample["meta"]["class"] == ["airplane", "bathtub", "bed"][int(labels[f][row, 0])]
            assert sample["normal"].shape == (32, 3)
    reasons = rejected_by_source(out)
    assert reasons["ply_data_train1.h5#1"] == "non-finite coordinate values (1 NaN/inf)"
    assert reasons["ply_data_train2.h5"].startswith("unreadable HDF5 file")
    assert reasons["ply_data_train3.h5"] == "wrong 'data' shape (2, 32, 2): expected (n, P, 3)"
    assert len(reasons) == 3


def test_modelnet_h5_generated_class_names(tmp_path: Path) -> None:
    src = tmp_path / "h5"
    src.mkdir()
    _write_h5(
        src / "ply_data_train0.h5", np.random.default_rng(0).normal(size=(3, 20, 3)), np.array([0, 4, 2])
    )
    out = tmp_path / "out"
    assert convert_cli("modelnet-h5", src, out) == 0
    manifest_classes = [f"class_{i:02d}" for i in range(5)]
    assert {s["meta"]["class"] for s in read_split(out, "train").values()} == {
        manifest_classes[i] for i in (0, 4, 2)
    }


@pytest.mark.parametrize("variant", ["obj_bg", "obj_only", "pb_t50_rs"])
def test_scanobjectnn_variants(tmp_path: Path, variant: str) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "h5_files"
    files = {
        "obj_bg": ("main_split", "{}_objectdataset.h5"),
        "obj_only": ("main_split_nobg", "{}_objectdataset.h5"),
        "pb_t50_rs": ("main_split", "{}_objectdataset_augmentedrot_scale75.h5"),
    }
    written: dict[tuple[str, str], np.ndarray] = {}
    for name, (folder, pattern) in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for split, n in (("training", 4), ("test", 2)):
            arr = (rng.normal(size=(n, 48, 3)) * 3 + 5).astype(np.float32)
            written[(name, split)] = arr
            label = np.array([14, 0, 7, 3][:n], dtype=np.int64)
            if split == "training":
                arr = arr.copy()
                arr[2, 0, 0] = np.nan
            _write_h5(root / folder / pattern.format(split), arr, label)
    out = tmp_path / "out"
    assert convert_cli("scanobjectnn", root, out, "--variant", variant) == 0
    train, test = read_split(out, "train"), read_split(out, "test")
    assert len(train) == 3
    assert len(test) == 2
    stem = Path(files[variant][1].format("training")).stem
    sample = train[f"{stem}_00000"]
    # not normalised by default: the stored points are exactly the file's points (FPS-ordered)
    np.testing.assert_array_equal(sorted_rows(sample["xyz"]), sorted_rows(written[(variant, "training")][0]))
    assert sample["label"] == 14
    assert sample["meta"]["class"] == SCANOBJECTNN_CLASSES[14] == "toilet"
    assert rejected_by_source(out) == {
        f"{files[variant][0]}/{stem}.h5#2": "non-finite coordinate values (1 NaN/inf)"
    }
    out_norm = tmp_path / "norm"
    assert convert_cli("scanobjectnn", root, out_norm, "--variant", variant, "--normalize") == 0
    radius = np.linalg.norm(
        read_split(out_norm, "test")[next(iter(read_split(out_norm, "test")))]["xyz"], axis=1
    )
    assert np.isclose(radius.max(), 1.0, atol=1e-6)


def test_scanobjectnn_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "h5_files" / "main_split").mkdir(parents=True)
    assert convert_cli("scanobjectnn", tmp_path / "h5_files", tmp_path / "out", "--variant", "pb_t50_rs") == 2
    err = capsys.readouterr().err
    assert "training_objectdataset_augmentedrot_scale75.h5" in err
    assert len(err.strip().splitlines()) == 1
