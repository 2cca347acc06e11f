"""The conversion benchmark reports throughput and where the CPU time went (main process, pool workers)."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType

import pytest

from tests.cli_helpers import REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("open3d") is None, reason="bench_convert.py generates meshes with open3d"
)


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_convert", REPO / "benchmarks/bench_convert.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_convert_reports_main_and_worker_cpu_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--meshes", "6", "--points", "64", "--skip-modelnet", "--workers", "1", "2"]
    assert _bench_module().main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["benchmark"] == "bench_convert"
    assert set(doc["machine"]) == {"cpus", "platform", "python", "loadavg_1m_at_end"}
    one, two = doc["results"]
    for case, workers in ((one, 1), (two, 2)):
        assert case["format"] == "mesh-folder"
        assert case["workers"] == workers
        assert case["samples"] + case["rejected"] == 6
        assert case["samples_per_s"] > 0
        assert case["main_cpu_s"] > 0
        assert case["case"] == "meshes -> 64 points + face normals + FPS order"
    assert one["workers_cpu_s"] < 0.5  # one worker runs in the main process (no children to reap)
    assert two["workers_cpu_s"] > 0  # the pool's workers, reaped by engine.close() inside the case
