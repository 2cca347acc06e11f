from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
import pytest

from datapipes.converters import ConvertOptions, convert, get_converter, resolve_options
from datapipes.converters.cli import format_report
from datapipes.converters.driver import dumps_report
from datapipes.engines import (
    JobAssembler,
    JobResult,
    LocalEngine,
    Node,
    ShardJob,
    make_engine,
    pack_result,
    unpack_result,
)
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
        outputs = list(engine.run(_squares, _jobs(), done.append))
    finally:
        engine.close()
    got = {out.job.index: out.results for out in outputs}
    assert len(outputs) == len(got) == 4  # each job once
    assert sorted(got) == [0, 1, 2, 3]
    for job in _jobs():
        assert [r.get("key", r.get("source")) for r in got[job.index]] == [
            f"k{i}" if i % 7 != 3 else str(i) for i in job.items
        ]
    for out in outputs:
        assert out.nodes == (Node("local", socket.gethostname()),) * len(out.job.items)
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


def test_job_assembler_keeps_the_first_result_and_completes_each_job_once() -> None:
    jobs = _jobs()
    assembler = JobAssembler(jobs)
    assert [out.job.index for out in assembler.empty_jobs()] == [2]
    nodes = (Node("n0", "10.0.0.1"), Node("n1", "10.0.0.2"))
    arrivals = [(j, p) for j, job in enumerate(jobs) for p in range(len(job.items))]
    order = np.random.default_rng(0).permutation(len(arrivals))
    arrivals = [arrivals[i] for i in order]
    arrivals = arrivals[:9] + arrivals[3:12] + arrivals[9:]  # a retried chunk answers again
    done = []
    for n, (j, p) in enumerate(arrivals):
        first = assembler.wants(j, p)
        out = assembler.add(j, p, {"key": f"{j}/{p}", "attempt": 0 if first else 1}, nodes[n % 2])
        if out is not None:
            done.append(out)
    assembler.check_complete()
    assert sorted(out.job.index for out in done) == [0, 1, 3]  # each non-empty job once
    for out in done:
        j = jobs.index(out.job)
        assert [r["key"] for r in out.results] == [f"{j}/{p}" for p in range(len(out.job.items))]
        assert all(r["attempt"] == 0 for r in out.results)  # a second answer never replaces the first
        assert len(out.nodes) == len(out.results)
    assert assembler.add(0, 0, {"key": "late"}, nodes[0]) is None
    assert not assembler.wants(0, 10)

    partial = JobAssembler(jobs)
    partial.add(0, 0, {"key": "0/0"}, nodes[0])
    with pytest.raises(RuntimeError, match="no result for 26 items of 3 shards"):
        partial.check_complete()


def _npy_src(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (root / c / "train").mkdir(parents=True)
        for i in range(5):
            np.save(root / c / "train" / f"{c}_{i}.npy", rng.normal(size=(64, 3)).astype(np.float32))
    (root / "a" / "train" / "broken.npy").write_bytes(b"\x93NUMPY broken")
    return root


class _TwoNodeEngine:
    """Runs in-process but says the items alternate between two nodes; ``repeat`` yields a job twice."""

    def __init__(self, repeat: bool = False) -> None:
        self.inner = LocalEngine(1)
        self.repeat = repeat
        self.nodes = (Node("node-a" * 8, "10.0.0.1"), Node("node-b" * 8, "10.0.0.2"))

    def run(self, fn: Any, jobs: Sequence[ShardJob], progress: Any = None) -> Iterator[JobResult]:
        for out in self.inner.run(fn, jobs, progress):
            nodes = tuple(self.nodes[i % 2] for i in range(len(out.results)))
            yield JobResult(out.job, out.results, nodes)
            if self.repeat:
                yield JobResult(out.job, out.results, nodes)

    def close(self) -> None:
        self.inner.close()


def _options(src: Path) -> ConvertOptions:
    converter = get_converter("npy-tree")
    base = ConvertOptions(format="npy-tree", src=str(src.resolve()), shard_size=3)
    return resolve_options(converter, base, {})


def test_report_counts_samples_and_rejections_per_node(tmp_path: Path) -> None:
    src = _npy_src(tmp_path / "src")
    out = tmp_path / "out"
    engine = _TwoNodeEngine()
    report = convert(get_converter("npy-tree"), _options(src), out, engine)
    assert report.samples == {"train": 10}
    assert report.rejected == 1
    node_a, node_b = engine.nodes  # shards of 3, 3, 3, 2 items: positions 0 and 2 go to node a
    assert set(report.nodes) == {node_a.id, node_b.id}
    assert [report.nodes[n.id]["address"] for n in engine.nodes] == ["10.0.0.1", "10.0.0.2"]
    assert [report.nodes[n.id]["samples"] + report.nodes[n.id]["rejected"] for n in engine.nodes] == [7, 4]
    assert sum(entry["samples"] for entry in report.nodes.values()) == 10
    assert sum(entry["rejected"] for entry in report.nodes.values()) == 1
    text = format_report(report)
    assert "  nodes: 2 (samples, rejected computed in this run)" in text
    assert f"    10.0.0.1 {node_a.id[:12]}: {report.nodes[node_a.id]['samples']} samples" in text
    assert json.loads(dumps_report(report))["nodes"] == report.nodes
    # a resumed run computes nothing, so no node did any work
    assert convert(get_converter("npy-tree"), _options(src), out, _TwoNodeEngine()).nodes == {}


def test_driver_never_writes_a_shard_twice(tmp_path: Path) -> None:
    src = _npy_src(tmp_path / "src")
    with pytest.raises(RuntimeError, match=r"engine returned shard train-000000 twice"):
        convert(get_converter("npy-tree"), _options(src), tmp_path / "out", _TwoNodeEngine(repeat=True))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_local_report_names_the_local_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _npy_src(tmp_path / "src")
    assert convert_cli("npy-tree", src, tmp_path / "out", "--json") == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds the summary only
    assert report["nodes"] == {"local": {"address": socket.gethostname(), "samples": 10, "rejected": 1}}
    assert convert_cli("npy-tree", src, tmp_path / "out2") == 0
    assert "nodes:" not in capsys.readouterr().out  # the human summary lists nodes for Ray runs only
