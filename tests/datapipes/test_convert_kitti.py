from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.datapipes._convert_helpers import convert_cli, naive_fps, read_split, rejected_by_source


def _frame(rng: np.random.Generator, n: int) -> np.ndarray:
    xyz = rng.uniform(-40, 40, size=(n, 3)) * [1, 1, 0.05]
    return np.c_[xyz, rng.uniform(0, 1, n)].astype("<f4")


def test_kitti_frames(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "kitti"
    frames: dict[str, np.ndarray] = {}
    layout = {
        "sequences_00_000000": src / "sequences" / "00" / "velodyne" / "000000.bin",
        "sequences_00_000001": src / "sequences" / "00" / "velodyne" / "000001.bin",
        "sequences_01_000000": src / "sequences" / "01" / "velodyne" / "000000.bin",
        "testing_000007": src / "testing" / "velodyne" / "000007.bin",
    }
    for key, path in layout.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        frames[key] = _frame(rng, 300)
        frames[key].tofile(path)
    bad = src / "sequences" / "02" / "velodyne"
    bad.mkdir(parents=True)
    (bad / "000000.bin").write_bytes(b"")
    (bad / "000001.bin").write_bytes(_frame(rng, 50).tobytes()[:-6])
    nan = _frame(rng, 50)
    nan[3, 1] = np.nan
    nan.tofile(bad / "000002.bin")

    out = tmp_path / "out"
    assert convert_cli("kitti", src, out) == 0
    fields = json.loads((out / "manifest.json").read_text())["fields"]
    assert fields["feat"] == {"dtype": "float32", "shape": ["N", 1], "channels": ["intensity"]}
    train, test = read_split(out, "train"), read_split(out, "test")
    assert set(test) == {"testing_000007"}
    assert set(train) == set(layout) - {"testing_000007"}
    for key, sample in {**train, **test}.items():
        # scenes: no normalisation, no FPS reordering, intensity as feat (N, 1), no label
        np.testing.assert_array_equal(sample["xyz"], frames[key][:, :3])
        np.testing.assert_array_equal(sample["feat"], frames[key][:, 3:4])
        assert "label" not in sample
    assert rejected_by_source(out) == {
        "sequences/02/velodyne/000000.bin": "empty file (0 bytes)",
        "sequences/02/velodyne/000001.bin": "truncated file: 794 bytes is not a multiple of 16 "
        "(float32 x, y, z, intensity records)",
        "sequences/02/velodyne/000002.bin": "non-finite coordinate values (1 NaN/inf)",
    }

    sub = tmp_path / "sub"
    assert convert_cli("kitti", src, sub, "--points", "100") == 0
    for key, sample in read_split(sub, "train").items():
        rows = {tuple(r) for r in frames[key].tolist()}
        got = np.c_[sample["xyz"], sample["feat"]]
        assert len(got) == 100
        assert all(tuple(r) in rows for r in got.tolist())
    fps = tmp_path / "fps"
    assert convert_cli("kitti", src, fps, "--points", "50", "--fps", "--normals") == 0
    sample = read_split(fps, "test")["testing_000007"]
    frame = frames["testing_000007"]
    np.testing.assert_allclose(sample["xyz"], frame[naive_fps(frame[:, :3], 50), :3], atol=1e-4)
    # estimated normals point towards the sensor at the origin
    assert np.all(np.sum(sample["normal"] * -sample["xyz"], axis=1) >= -1e-6)
    assert sample["curv"].shape == (50,)
