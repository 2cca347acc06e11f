"""``pcpt-data convert las``: LAS / LAZ LiDAR files to shards (coordinates, channels, origins, rejections)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import laspy
import numpy as np
import pytest

from datapipes.converters import (
    ConvertOptions,
    ConvertReport,
    WorkItem,
    convert,
    get_converter,
    is_rejection,
    process_items,
    resolve_options,
)
from datapipes.engines import LocalEngine
from tests.datapipes._convert_helpers import convert_cli, read_split, rejected_by_source

KITTI = Path("/work/shared/data/kitti_raw_0005/velodyne")
SCALE = 0.01
INFO = {"format": "las", "units": "metres", "normalized": False, "frame": "as stored in the LAS files"}


def _cloud(
    seed: int, n: int, *, center: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> dict[str, np.ndarray]:
    """A LiDAR-like scene: xyz (metres), uint16 intensity and GPS times (seconds, week-time like)."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-40, 40, size=(n, 3)) * [1, 1, 0.05] + np.asarray(center)
    return {
        "xyz": xyz,
        "intensity": rng.integers(0, 65536, size=n, dtype=np.uint16),
        "gps_time": 345_600.0 + seed + np.sort(rng.uniform(0, 0.1, size=n)),
    }


def _write_las(
    path: Path,
    cloud: dict[str, np.ndarray],
    point_format: int,
    *,
    offsets: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> None:
    """Writes ``cloud`` as LAS (LAZ when the suffix says so) with a 1 cm scale."""
    version = "1.4" if point_format >= 6 else "1.2"
    header = laspy.LasHeader(point_format=point_format, version=version)
    header.scales = np.array([SCALE] * 3)
    header.offsets = np.array(offsets)
    las = laspy.LasData(header)
    las.x, las.y, las.z = cloud["xyz"].T
    las.intensity = cloud["intensity"]
    if "gps_time" in set(header.point_format.dimension_names):
        las.gps_time = cloud["gps_time"]
    path.parent.mkdir(parents=True, exist_ok=True)
    compressed = path.suffix.lower() == ".laz"
    las.write(str(path), laz_backend=laspy.LazBackend.Lazrs if compressed else None)


def _quantised(xyz: np.ndarray, offsets: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The coordinates as a LAS file with a 1 cm scale stores them."""
    off = np.asarray(offsets)
    return np.round((xyz - off) / SCALE) * SCALE + off


def _api_convert(src: Path, out: Path, **given: Any) -> ConvertReport:
    converter = get_converter("las")
    base = ConvertOptions(format="las", src=str(src.resolve()), shard_size=2)
    options = resolve_options(converter, base, given)
    return convert(converter, options, out, LocalEngine(1))


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def test_las_and_laz_with_gps_time(tmp_path: Path) -> None:
    src = tmp_path / "lidar"
    clouds = {key: _cloud(seed, 200 + 37 * seed) for seed, key in enumerate(["a", "sub_b", "velo_c", "d"])}
    files = {
        "a": (src / "train" / "a.las", 1),
        "sub_b": (src / "train" / "sub" / "b.laz", 3),
        "velo_c": (src / "velo" / "velodyne" / "c.LAZ", 6),
        "d": (src / "test" / "d.las", 7),
    }
    for key, (path, fmt) in files.items():
        _write_las(path, clouds[key], fmt)
    # damaged files: rejected with a reason, the others convert
    (src / "bad").mkdir()
    whole = (src / "train" / "a.las").read_bytes()
    (src / "bad" / "short.las").write_bytes(whole[: len(whole) - 100])
    packed = (src / "train" / "sub" / "b.laz").read_bytes()
    (src / "bad" / "cut.laz").write_bytes(packed[: len(packed) // 2])
    (src / "bad" / "junk.las").write_bytes(b"not a point cloud\n" * 20)
    (src / "bad" / "zero.las").write_bytes(b"")
    _write_las(src / "bad" / "empty.las", _cloud(9, 0), 1)
    _write_las(src / "bad" / "no_time.las", _cloud(10, 50), 0)
    (src / "train" / "notes.txt").write_text("ignored")

    out = tmp_path / "out"
    report = _api_convert(src, out)
    assert report.samples == {"train": 3, "test": 1}
    assert report.rejected == 6
    manifest = _manifest(out)
    assert manifest["fields"]["feat"] == {
        "dtype": "float32",
        "shape": ["N", 2],
        "channels": ["intensity", "time"],
    }
    assert manifest["converter"] == INFO
    assert manifest["fps_ordered"] is False
    assert manifest["points"] == {"min": 200, "max": 200 + 37 * 3}

    train, test = read_split(out, "train"), read_split(out, "test")
    assert set(train) == {"train_a", "train_sub_b", "velo_c"}
    assert set(test) == {"test_d"}
    stored = {
        "a": train["train_a"],
        "sub_b": train["train_sub_b"],
        "velo_c": train["velo_c"],
        "d": test["test_d"],
    }
    for key, sample in stored.items():
        cloud = clouds[key]
        # all points, in file order, metres (not unit sphere), 1 cm quantised
        np.testing.assert_allclose(sample["xyz"], _quantised(cloud["xyz"]), atol=1e-5)
        assert sample["feat"].dtype == np.float32
        assert sample["feat"].shape == (len(cloud["xyz"]), 2)
        np.testing.assert_allclose(sample["feat"][:, 0], cloud["intensity"] / 65535.0, rtol=1e-6)
        assert sample["feat"][:, 0].min() >= 0.0
        assert sample["feat"][:, 0].max() <= 1.0
        time = cloud["gps_time"] - cloud["gps_time"].min()
        np.testing.assert_allclose(sample["feat"][:, 1], time, atol=1e-6)
        assert sample["meta"]["origin"] == [0.0, 0.0, 0.0]
        assert sample["meta"]["time_origin"] == pytest.approx(cloud["gps_time"].min(), abs=1e-9)
        assert sample["meta"]["num_points"] == len(cloud["xyz"])
        assert "label" not in sample
        assert "normal" not in sample
    reasons = rejected_by_source(out)
    assert set(reasons) == {f"bad/{n}" for n in ("short.las", "cut.laz", "junk.las", "zero.las")} | {
        "bad/empty.las",
        "bad/no_time.las",
    }
    assert reasons["bad/short.las"].startswith(
        "truncated LAS file: the header declares 200 points of 28 bytes"
    )
    assert reasons["bad/cut.laz"].startswith("not a readable LAS/LAZ file: ")
    assert reasons["bad/junk.las"].startswith("not a readable LAS/LAZ file: ")
    assert reasons["bad/zero.las"] == "empty file (0 bytes)"
    assert reasons["bad/empty.las"] == "no points (the LAS header's point count is 0)"
    assert reasons["bad/no_time.las"].startswith("point format 0 has no gps_time dimension")
    assert all("\n" not in r for r in reasons.values())


def test_cli_point_format_0_and_subsampling(tmp_path: Path) -> None:
    src = tmp_path / "scans"
    clouds = [_cloud(seed, 300) for seed in range(3)]
    for i, cloud in enumerate(clouds):
        _write_las(src / f"scan{i}.laz", cloud, 0)
    _write_las(src / "scan9.las", _cloud(9, 300), 6)  # has GPS time, but the first file decides: not stored
    out = tmp_path / "out"
    assert convert_cli("las", src, out) == 0
    manifest = _manifest(out)
    assert manifest["fields"]["feat"]["channels"] == ["intensity"]
    assert manifest["converter"] == INFO
    assert manifest["source"]["normalize"] is False
    assert manifest["source"]["points"] is None
    samples = read_split(out, "train")
    assert set(samples) == {"scan0", "scan1", "scan2", "scan9"}
    assert samples["scan9"]["feat"].shape == (300, 1)
    for i, cloud in enumerate(clouds):
        np.testing.assert_allclose(samples[f"scan{i}"]["xyz"], _quantised(cloud["xyz"]), atol=1e-5)
        np.testing.assert_allclose(samples[f"scan{i}"]["feat"][:, 0], cloud["intensity"] / 65535.0, rtol=1e-6)
    assert not (out / "rejected.jsonl").read_text().strip()

    sub = tmp_path / "sub"
    assert convert_cli("las", src, sub, "--points", "100", "--normalize") == 0
    assert _manifest(sub)["converter"]["normalized"] is True
    assert _manifest(sub)["converter"]["units"] != "metres"
    for sample in read_split(sub, "train").values():
        assert len(sample["xyz"]) == 100
        assert np.linalg.norm(sample["xyz"], axis=1).max() == pytest.approx(1.0, abs=1e-5)


def test_no_las_files_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "nothing"
    src.mkdir()
    (src / "frame.bin").write_bytes(b"\0" * 16)
    assert convert_cli("las", src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(src) in err
    assert "no .las or .laz files" in err
    assert "Traceback" not in err


def test_key_clash_and_worker_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "clash"
    _write_las(src / "a.las", _cloud(0, 50), 1)
    _write_las(src / "a.laz", _cloud(1, 50), 1)
    assert convert_cli("las", src, tmp_path / "out") == 2
    assert "two source items map to the same sample key 'a'" in capsys.readouterr().err

    # spawned workers decide the channels as the plan did (the first file has GPS time)
    (src / "a.laz").rename(src / "b.laz")
    _write_las(src / "c.las", _cloud(2, 50), 0)
    out = tmp_path / "workers"
    assert convert_cli("las", src, out, "--workers", "2") == 0
    assert _manifest(out)["fields"]["feat"]["channels"] == ["intensity", "time"]
    assert set(read_split(out, "train")) == {"a", "b"}
    assert rejected_by_source(out)["c.las"].startswith("point format 0 has no gps_time dimension")


@pytest.mark.parametrize("name", ["scan.las", "scan.laz"])
def test_damaged_bytes_become_samples_or_one_line_rejections(tmp_path: Path, name: str) -> None:
    src = tmp_path / "src"
    _write_las(src / name, _cloud(3, 120), 1)
    original = (src / name).read_bytes()
    options = ConvertOptions(format="las", src=str(src), normalize=False, fps=False)
    rng = np.random.default_rng(0)
    outcomes = set()
    for trial in range(60):
        data = bytearray(original)
        # header fields (point count, offsets, scales, record length...) are where damage hurts most
        region = 400 if trial % 2 else len(data)
        for pos in rng.integers(0, min(region, len(data)), size=int(rng.integers(1, 6))):
            data[pos] = int(rng.integers(0, 256))
        if trial % 5 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        (src / name).write_bytes(bytes(data))
        item = WorkItem(key="scan", split="train", source=name, path=str(src / name))
        (result,) = process_items([item], options)
        if is_rejection(result):
            assert result["reason"].strip()
            assert "\n" not in result["reason"]
            outcomes.add("rejected")
        else:
            assert result["xyz"].dtype == np.float32
            assert np.isfinite(result["xyz"]).all()
            assert np.isfinite(result["feat"]).all()
            assert result["feat"].shape == (len(result["xyz"]), 2)
            outcomes.add("sample")
    assert "rejected" in outcomes


def test_georeferenced_coordinates_keep_centimetres(tmp_path: Path) -> None:
    src = tmp_path / "utm"
    utm = _cloud(1, 400, center=(500_123.0, 4_200_456.0, 150.0))
    offsets = (500_000.0, 4_200_000.0, 0.0)
    _write_las(src / "tile_offset.las", utm, 1, offsets=offsets)
    _write_las(src / "tile_no_offset.las", utm, 1)  # offset 0: the min corner becomes the origin
    out = tmp_path / "out"
    _api_convert(src, out)
    samples = read_split(out, "train")

    with_offset = samples["tile_offset"]
    assert with_offset["meta"]["origin"] == [500_000.0, 4_200_000.0, 0.0]
    absolute = with_offset["xyz"].astype(np.float64) + with_offset["meta"]["origin"]
    np.testing.assert_allclose(absolute, _quantised(utm["xyz"], offsets), atol=SCALE / 2)

    no_offset = samples["tile_no_offset"]
    expected_origin = [float(np.floor(np.min(_quantised(utm["xyz"])[:, a]))) for a in range(2)] + [0.0]
    assert no_offset["meta"]["origin"] == expected_origin
    absolute = no_offset["xyz"].astype(np.float64) + no_offset["meta"]["origin"]
    np.testing.assert_allclose(absolute, _quantised(utm["xyz"]), atol=SCALE / 2)
    # the stored float32 values recover the integer LAS records exactly
    records = np.round(absolute / SCALE)
    np.testing.assert_array_equal(records, np.round(utm["xyz"] / SCALE))


def test_datamodule_loads_ragged_scenes_in_metres(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datapipes.datamodule import PointCloudDataModule

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    src = tmp_path / "scenes"
    counts = {"s0": 250, "s1": 400, "s2": 321, "s3": 180}
    for seed, (key, n) in enumerate(counts.items()):
        _write_las(src / f"{key}.laz", _cloud(seed, n), 1)
    out = tmp_path / "out"
    _api_convert(src, out)
    stored = read_split(out, "train")

    dm = PointCloudDataModule(
        str(out),
        val_split=None,
        num_points=200_000,
        batch_size=2,
        num_workers=0,
        augment="none",
        normalize=False,
        fields={"ragged": True, "point_features": ["intensity", "time"]},
        streaming=False,
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    seen = set()
    for batch in batches:
        assert batch.lengths is not None
        assert batch.feats is not None
        lengths = batch.lengths.tolist()
        assert batch.points.shape == (2, max(lengths), 3)
        assert batch.feats.shape == (2, max(lengths), 2)
        assert batch.feat_names == ("intensity", "time")
        for b, key in enumerate(batch.key):
            n = counts[key]
            assert lengths[b] == n
            np.testing.assert_array_equal(batch.points[b, :n].numpy(), stored[key]["xyz"])
            np.testing.assert_array_equal(batch.feats[b, :n].numpy(), stored[key]["feat"])
            seen.add(key)
        # metres, not the unit sphere
        assert float(batch.points[batch.mask()].abs().max()) > 10.0
    assert seen == set(counts)


@pytest.mark.skipif(not KITTI.is_dir(), reason="shared KITTI frames not available")
def test_shared_kitti_frames(tmp_path: Path) -> None:
    src = tmp_path / "kitti" / "velodyne"
    src.mkdir(parents=True)
    names = ["0000000000.laz", "0000000001.laz", "0000000002.laz"]
    for name in names:
        shutil.copyfile(KITTI / name, src / name)
    out = tmp_path / "out"
    report = _api_convert(src.parent, out)
    assert report.samples == {"train": 3}
    assert report.rejected == 0
    manifest = _manifest(out)
    assert manifest["fields"]["feat"]["channels"] == ["intensity"]
    assert manifest["converter"] == INFO
    samples = read_split(out, "train")
    assert set(samples) == {"0000000000", "0000000001", "0000000002"}
    for name in names:
        las = laspy.read(str(src / name))
        sample = samples[name.removesuffix(".laz")]
        count = int(las.header.point_count)
        assert 98_000 <= count <= 124_000
        assert len(sample["xyz"]) == count
        assert sample["meta"]["num_points"] == count
        assert sample["meta"]["origin"] == [0.0, 0.0, 0.0]
        xyz = np.stack([las.x, las.y, las.z], axis=1)
        np.testing.assert_allclose(sample["xyz"], xyz, atol=1e-5)
        np.testing.assert_allclose(sample["feat"][:, 0], las.intensity / 65535.0, rtol=1e-6)
        assert np.abs(sample["xyz"]).max() < 120.0  # metres, sensor frame
