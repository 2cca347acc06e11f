from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
import pytest

from datapipes.engines import LocalEngine, ShardJob, make_engine, pack_result, unpack_result
from datapipes.errors import UserError
from tests.datapipes._convert_helpers import convert_cli, read_rejected, shard_bytes


def _square(item: int) -> dict[str, Any]:
    if item % 7 == 3:
        return {"source": str(item), "reason": "multiple of 7 plus 3", "split": "train"}
    return {"key": f"k{item}", "xyz": np.full((2, 3), item, np.float32), "label": item}


def _squares(items: Sequence[int]) -> list[dict[str, Any]]:
    return [_square(item) for item in items]


def _jobs() -> list[ShardJob]:
    return [ShardJob("train", i, tuple(range(i * 10, i * 10 + n))) for i, n in enumerate((10, 10, 0, 7))]


def test_pack_roundtrip_without_pickle() -> None:
    result = {
        "key": "a-1",
        "xyz": np.arange(12, dtype=np.float32).reshape(4, 3),
        "curv": np.zeros(4, np.float32),
        "label": 3,
        "meta": {"source": "x/y.off", "center": [0.5, 1.0, -2.0]},
        "images": [b"\x89PNG one", b"\x89PNG two"],
    }
    back = unpack_result(pack_result(result))
    assert set(back) == set(result)
    for name in ("xyz", "curv"):
        np.testing.assert_array_equal(back[name], result[name])
        assert back[name].dtype == result[name].dtype
    assert back["meta"] == result["meta"]
    assert back["label"] == 3
    assert back["images"] == result["images"]
    assert unpack_result(pack_result({"source": "s", "reason": "r", "split": "t"})) == {
        "source": "s",
        "reason": "r",
        "split": "t",
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_local_engine_order_and_progress(workers: int) -> None:
    engine = LocalEngine(workers, chunk_size=3)
    done: list[int] = []
    try:
        got = {job.index: results for job, results in engine.run(_squares, _jobs(), done.append)}
    finally:
        engine.close()
    assert sorted(got) == [0, 1, 2, 3]
    for job in _jobs():
        assert [r.get("key", r.get("source")) for r in got[job.index]] == [
            f"k{i}" if i % 7 != 3 else str(i) for i in job.items
        ]
    assert sum(done) == 27


def test_ray_missing_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"pip install 'pcpt\[ray\]'"):
        make_engine("ray")
    with pytest.raises(UserError, match="unknown engine"):
        make_engine("dask")


@pytest.fixture
def meshes(tmp_path: Path) -> Path:
    src = tmp_path / "meshes"
    for c, mesh in (
        ("box", o3d.geometry.TriangleMesh.create_box()),
        ("cone", o3d.geometry.TriangleMesh.create_cone()),
    ):
        (src / c).mkdir(parents=True)
        for i in range(4):
            mesh.scale(1.2, center=(0, 0, 0))
            assert o3d.io.write_triangle_mesh(str(src / c / f"{c}{i}.ply"), mesh)
    (src / "box" / "bad.off").write_text("OFF\n3 1 0\n0 0 0\n")
    return src


def test_local_workers_give_identical_shards(meshes: Path, tmp_path: Path) -> None:
    args = ("--points", "128", "--normals", "--shard-size", "3", "--test-fraction", "0.25")
    outs = [tmp_path / "w1", tmp_path / "w2"]
    assert convert_cli("mesh-folder", meshes, outs[0], *args) == 0
    assert convert_cli("mesh-folder", meshes, outs[1], *args, "--workers", "2") == 0
    assert shard_bytes(outs[0]) == shard_bytes(outs[1])
    assert len(shard_bytes(outs[0])) >= 3
    assert (outs[0] / "manifest.json").read_bytes() == (outs[1] / "manifest.json").read_bytes()
    assert read_rejected(outs[0]) == read_rejected(outs[1])
    assert len(read_rejected(outs[0])) == 1


def test_ray_engine_gives_identical_shards(meshes: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.data")
    args = ("--points", "128", "--normals", "--shard-size", "3", "--test-fraction", "0.25")
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert convert_cli("mesh-folder", meshes, local, *args) == 0
    assert convert_cli("mesh-folder", meshes, ray_out, *args, "--engine", "ray", "--workers", "2") == 0
    assert shard_bytes(local) == shard_bytes(ray_out)
    assert len(shard_bytes(local)) >= 3
    assert (local / "manifest.json").read_bytes() == (ray_out / "manifest.json").read_bytes()
    assert read_rejected(local) == read_rejected(ray_out)
