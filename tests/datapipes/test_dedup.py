from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from datapipes.dedup import dedup, near_pairs, shape_descriptor
from datapipes.shards import ShardSetWriter
from tests.datapipes._convert_helpers import cli_main


def _surface(kind: str, dims: tuple[float, ...], rng: np.random.Generator, n: int = 1024) -> np.ndarray:
    if kind == "ellipsoid":
        p = rng.normal(size=(n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True) * dims
    if kind == "box":
        p = rng.uniform(-0.5, 0.5, size=(n, 3))
        axis = rng.integers(0, 3, n)
        p[np.arange(n), axis] = np.sign(p[np.arange(n), axis]) * 0.5
        return p * dims
    if kind == "torus":
        u, v = rng.uniform(0, 2 * np.pi, (2, n))
        big, small = dims
        return np.c_[
            (big + small * np.cos(v)) * np.cos(u), (big + small * np.cos(v)) * np.sin(u), small * np.sin(v)
        ]
    if kind == "cylinder":
        u = rng.uniform(0, 2 * np.pi, n)
        radius, height = dims
        return np.c_[radius * np.cos(u), radius * np.sin(u), rng.uniform(-height / 2, height / 2, n)]
    raise ValueError(kind)


SHAPES = [
    ("ellipsoid", (1.0, 1.0, 1.0)),
    ("ellipsoid", (1.0, 0.6, 0.3)),
    ("ellipsoid", (1.0, 0.3, 0.3)),
    ("ellipsoid", (1.0, 1.0, 0.2)),
    ("box", (1.0, 1.0, 1.0)),
    ("box", (1.0, 0.5, 0.2)),
    ("torus", (1.0, 0.3)),
    ("torus", (1.0, 0.6)),
    ("cylinder", (0.5, 2.0)),
    ("cylinder", (1.0, 0.5)),
]
NEW = [("ellipsoid", (1.0, 0.8, 0.5)), ("box", (1.0, 0.8, 0.1))]
PLANTED = {2: "copy_of_2", 5: "copy_of_5", 7: "copy_of_7"}


def _copy(xyz: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rotated = xyz @ Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix().T
    moved = (rotated[rng.permutation(len(xyz))] + rng.normal(size=3)) * 3.0
    return moved + rng.normal(scale=0.003 * 3.0 * np.linalg.norm(xyz, axis=1).max(), size=xyz.shape)


def _write(out: Path, splits: dict[str, dict[str, np.ndarray]]) -> Path:
    writer = ShardSetWriter(out, options={"test": "dedup"})
    for split, clouds in splits.items():
        writer.write_shard(split, 0, [{"key": k, "xyz": v.astype(np.float32)} for k, v in clouds.items()], [])
    writer.finalize(num_shards=dict.fromkeys(splits, 1), classes=[], fps_ordered=False)
    return out


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    train = {f"shape_{i}": _surface(k, d, rng) for i, (k, d) in enumerate(SHAPES)}
    test = {name: _copy(train[f"shape_{i}"], rng) for i, name in PLANTED.items()}
    test.update({f"new_{i}": _surface(k, d, rng) for i, (k, d) in enumerate(NEW)})
    return _write(tmp_path / "shards", {"train": train, "test": test}), test


def test_descriptor_invariances() -> None:
    rng = np.random.default_rng(1)
    xyz = _surface("box", (1.0, 0.5, 0.2), rng)
    ref = shape_descriptor(xyz)
    assert ref.shape == (3 + 4 * 32,)
    assert np.isclose(np.linalg.norm(ref), 1.0)
    moved = (xyz @ Rotation.random(random_state=3).as_matrix().T)[rng.permutation(len(xyz))] * 7.0 + 2.0
    np.testing.assert_allclose(shape_descriptor(moved), ref, atol=1e-5)
    other = shape_descriptor(_surface("torus", (1.0, 0.3), rng))
    assert np.linalg.norm(other - ref) > 0.05
    with pytest.raises(ValueError, match="all points are equal"):
        shape_descriptor(np.ones((10, 3)))


def test_near_pairs_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    desc = rng.normal(size=(60, 8)).astype(np.float32)
    desc[10] = desc[3] + 0.01
    desc[40] = desc[3] - 0.01
    dist = np.linalg.norm(desc[:, None] - desc[None], axis=-1)
    ordered = np.sort(dist[np.triu_indices(60, 1)])
    threshold = float(ordered[12] + ordered[13]) / 2  # 13 pairs, none on the boundary
    expected = {(i, j) for i in range(60) for j in range(i + 1, 60) if dist[i, j] <= threshold}
    got = near_pairs(desc, threshold=threshold)
    assert {(i, j) for i, j, _ in got} == expected
    assert len(expected) == 13
    for i, j, d in got:
        assert np.isclose(d, dist[i, j], atol=1e-5)
    cross = near_pairs(desc[:30], desc[30:], threshold=threshold)
    assert {(i, j) for i, j, _ in cross} == {
        (i, j - 30) for i in range(30) for j in range(30, 60) if dist[i, j] <= threshold
    }


def test_dedup_finds_planted_copies_only(planted: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = planted
    report = dedup(root)
    found = {(p["a"]["key"], p["b"]["key"]) for p in report["pairs"]}
    found = {tuple(sorted(pair)) for pair in found}
    assert found == {tuple(sorted((f"shape_{i}", name))) for i, name in PLANTED.items()}
    assert report["counts"] == {"test/train": 3}
    assert all(p["distance"] <= report["threshold"] for p in report["pairs"])


def test_dedup_against_and_cli_json(
    planted: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, test = planted
    other = _write(tmp_path / "other", {"val": {k: v for k, v in test.items() if k.startswith("copy")}})
    assert cli_main(["dedup", str(other), "--against", str(root), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    # each copy matches its original (train) and itself (test of the other folder)
    assert {(p["a"]["key"], p["b"]["key"]) for p in report["pairs"]} == {
        pair for i, name in PLANTED.items() for pair in ((name, f"shape_{i}"), (name, name))
    }
    assert report["counts"] == {"val/test": 3, "val/train": 3}
    assert report["samples"] == {"root": 3, "against": 15}
    assert cli_main(["dedup", str(root), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "3 pair(s)" in text
    assert "test/train: 3" in text
    assert cli_main(["dedup", str(tmp_path / "missing")]) == 2
    assert cli_main(["dedup", str(root), "--threshold", "-1"]) == 2
