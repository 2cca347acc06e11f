from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.datapipes._convert_helpers import (
    convert_cli,
    naive_fps,
    read_rejected,
    read_split,
    rejected_by_source,
    sorted_rows,
    unit_sphere,
)

CLASSES = ("bench", "cup", "night_stand")


def _cloud(rng: np.random.Generator, n: int = 64, cols: int = 3) -> np.ndarray:
    return (rng.normal(size=(n, cols)) * [1.0, 2.0, 0.5, 1, 1, 1][:cols] + 3.0).astype(np.float32)


@pytest.fixture
def npy_tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Three classes, train/test, 2-3 valid clouds each, plus one damaged file of each kind."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    clouds: dict[str, np.ndarray] = {}
    for c in CLASSES:
        for split, count in (("train", 3), ("test", 2)):
            folder = src / c / split
            folder.mkdir(parents=True)
            for i in range(count):
                name = f"{c}_{split}{i:02d}"
                clouds[name] = _cloud(rng)
                np.save(folder / f"{name}.npy", clouds[name])
    bad = src / "cup" / "train"
    (bad / "zero.npy").write_bytes(b"")
    nan = _cloud(rng)
    nan[5, 1] = np.nan
    np.save(bad / "nan.npy", nan)
    np.save(bad / "inf.npy", np.full((32, 3), np.inf, np.float32))
    full = (bad / "zero.npy").parent / "trunc.npy"
    np.save(full, _cloud(rng))
    full.write_bytes(full.read_bytes()[:-40])
    (bad / "garbage.npy").write_bytes(b"this is not an array at all")
    np.save(bad / "flat.npy", rng.normal(size=(64, 2)).astype(np.float32))
    np.save(bad / "few.npy", _cloud(rng, n=5))
    np.save(src / "bench" / "test" / "same.npy", np.ones((40, 3), np.float32))
    return src, clouds


def test_npy_tree_roundtrip_and_rejections(
    npy_tree: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    src, clouds = npy_tree
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out, "--shard-size", "4") == 0
    train, test = read_split(out, "train"), read_split(out, "test")
    assert set(train) == {k for k in clouds if "_train" in k}
    assert set(test) == {k for k in clouds if "_test" in k}
    for key, sample in {**train, **test}.items():
        ref = unit_sphere(clouds[key])
        assert sample["xyz"].dtype == np.float32
        assert sample["xyz"].shape == (64, 3)
        # same points (as a set), normalised to the unit sphere ...
        np.testing.assert_allclose(sorted_rows(sample["xyz"]), sorted_rows(ref), atol=1e-5)
        # ... and stored in farthest-point order starting from the first source point
        order = naive_fps(ref, 64)
        np.testing.assert_allclose(sample["xyz"], ref[order], atol=1e-5)
        class_name = key.split("_t")[0]
        assert sample["label"] == CLASSES.index(class_name)
        assert sample["meta"]["class"] == class_name
        assert sample["meta"]["num_points"] == 64
        assert "normal" not in sample
    reasons = rejected_by_source(out)
    assert reasons == {
        "cup/train/zero.npy": "empty file (0 bytes)",
        "cup/train/nan.npy": "non-finite coordinate values (1 NaN/inf)",
        "cup/train/inf.npy": "non-finite coordinate values (96 NaN/inf)",
        "cup/train/trunc.npy": reasons["cup/train/trunc.npy"],
        "cup/train/garbage.npy": reasons["cup/train/garbage.npy"],
        "cup/train/flat.npy": "wrong array shape (64, 2): expected (N, 3) or (N, 6) points",
        "cup/train/few.npy": "too few points: 5 < --min-points 16",
        "bench/test/same.npy": "degenerate cloud: all points coincide",
    }
    assert reasons["cup/train/trunc.npy"].startswith("truncated .npy file")
    assert reasons["cup/train/garbage.npy"].startswith("not a .npy file")
    assert {r["split"] for r in read_rejected(out)} == {"train", "test"}


def test_npy_tree_raw_order_and_points(npy_tree: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    src, clouds = npy_tree
    out = tmp_path / "raw"
    assert convert_cli("npy-tree", src, out, "--no-fps", "--no-normalize") == 0
    for key, sample in read_split(out, "train").items():
        np.testing.assert_array_equal(sample["xyz"], clouds[key])  # untouched
    out = tmp_path / "reduced"
    assert convert_cli("npy-tree", src, out, "--points", "20", "--no-normalize") == 0
    for key, sample in read_split(out, "test").items():
        np.testing.assert_allclose(sample["xyz"], clouds[key][naive_fps(clouds[key], 20)], atol=1e-6)
        assert sample["meta"]["num_points"] == 64
    out = tmp_path / "kept"
    assert convert_cli("npy-tree", src, out, "--points", "100") == 0  # fewer points: kept as they are
    assert {s["xyz"].shape for s in read_split(out, "train").values()} == {(64, 3)}


def test_npy_tree_with_normals(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    (src / "a" / "train").mkdir(parents=True)
    cloud = _cloud(rng, cols=6)
    cloud[:, 3:] /= np.linalg.norm(cloud[:, 3:], axis=1, keepdims=True)
    np.save(src / "a" / "train" / "a_1.npy", cloud)
    np.save(src / "a" / "train" / "a_2.npy", _cloud(rng))  # no normals: estimated so fields match
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out, "--no-fps") == 0
    samples = read_split(out, "train")
    np.testing.assert_allclose(samples["a_1"]["normal"], cloud[:, 3:], atol=1e-6)
    assert samples["a_2"]["normal"].shape == (64, 3)
    np.testing.assert_allclose(np.linalg.norm(samples["a_2"]["normal"], axis=1), 1.0, atol=1e-5)
    assert "curv" not in samples["a_1"]
    out = tmp_path / "curv"
    assert convert_cli("npy-tree", src, out, "--normals") == 0
    samples = read_split(out, "train")
    assert samples["a_1"]["curv"].shape == (64,)
    assert np.all((samples["a_1"]["curv"] >= 0) & (samples["a_1"]["curv"] <= 1 / 3 + 1e-6))


def _shapenet(tmp_path: Path, *, lists: bool = True) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    root = tmp_path / "ShapeNet55-34"
    pc = root / "shapenet_pc"
    pc.mkdir(parents=True)
    clouds = {}
    names = [f"{s}-m{i}" for s in ("04379243", "02691156", "03001627") for i in range(3)]
    for name in names:
        clouds[name] = _cloud(rng, n=128)
        np.save(pc / f"{name}.npy", clouds[name])
    (pc / "02691156-zero.npy").write_bytes(b"")
    if lists:
        (root / "ShapeNet-55").mkdir()
        train = [f"{n}.npy" for n in names[::2]] + ["02691156-zero.npy", "03001627-missing.npy"]
        (root / "ShapeNet-55" / "train.txt").write_text("\n".join(train) + "\n")
        (root / "ShapeNet-55" / "test.txt").write_text("\n".join(f"{n}.npy" for n in names[1::2]) + "\n")
    return root, clouds


def test_shapenet55(tmp_path: Path) -> None:
    root, clouds = _shapenet(tmp_path)
    out = tmp_path / "out"
    assert convert_cli("shapenet55", root, out, "--shard-size", "3") == 0
    train, test = read_split(out, "train"), read_split(out, "test")
    names = [f"{s}-m{i}" for s in ("04379243", "02691156", "03001627") for i in range(3)]
    assert set(train) == set(names[::2])  # the lists decide the split
    assert set(test) == set(names[1::2])
    synsets = ["02691156", "03001627", "04379243"]
    for key, sample in {**train, **test}.items():
        assert sample["label"] == synsets.index(key.split("-")[0])
        np.testing.assert_allclose(
            sorted_rows(sample["xyz"]), sorted_rows(unit_sphere(clouds[key])), atol=1e-5
        )
    assert rejected_by_source(out) == {
        "shapenet_pc/02691156-zero.npy": "empty file (0 bytes)",
        "shapenet_pc/03001627-missing.npy": "missing file",
    }


def test_shapenet55_missing_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = _shapenet(tmp_path, lists=False)
    assert convert_cli("shapenet55", root, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.txt" in err
    assert "Point-BERT" in err


def test_chunk_processing_equals_one_at_a_time(
    npy_tree: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    from datapipes.converters import (
        ConvertOptions,
        get_converter,
        process_item,
        process_items,
        resolve_options,
    )

    src, _ = npy_tree
    extra = src / "bench" / "train"
    rng = np.random.default_rng(5)
    for i, n in enumerate((80, 80, 30, 100)):  # several sizes: FPS batches group equal sizes
        np.save(extra / f"bench_size{i}.npy", _cloud(rng, n=n))
    converter = get_converter("npy-tree")
    for points in (None, 50):
        base = ConvertOptions(format="npy-tree", src=str(src))
        options = resolve_options(converter, base, {"points": points})
        items = [item for split in converter.plan(src, options).splits.values() for item in split]
        together = process_items(items, options)
        alone = [process_item(item, options) for item in items]
        assert len(together) == len(items)
        for a, b in zip(together, alone):
            assert a.keys() == b.keys()
            for name in a:
                if isinstance(a[name], np.ndarray):
                    np.testing.assert_array_equal(a[name], b[name])
                else:
                    assert a[name] == b[name]
