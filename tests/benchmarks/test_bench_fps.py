"""The FPS benchmark compares both pcpt backends with open3d per thread count, and checks exactness."""

from __future__ import annotations

import importlib.util
import json
import os
from types import ModuleType

import pytest
import torch

from datapipes import fps_numba
from tests.cli_helpers import REPO

pytestmark = pytest.mark.skipif(
    not fps_numba.numba_enabled() or importlib.util.find_spec("open3d") is None,
    reason="bench_fps.py needs numba and open3d",
)


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_fps", REPO / "benchmarks/bench_fps.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_fps_reports_both_backends_and_open3d_per_thread_count(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # main() sets it
    threads = torch.get_num_threads()
    try:
        _bench_module().main(
            ["--repeats", "1", "--threads", "1", "2", "--case", "3", "300", "20", "--naive-clouds", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    assert report["threads"] == [1, 2]
    assert report["load"] == {"busy_process": False, "pid": None}
    assert report["first_call_s"] >= 0  # numba is already warm in this process
    assert [(r["threads"], r["batch"], r["num_points"], r["num_samples"]) for r in report["results"]] == [
        (1, 3, 300, 20),
        (2, 3, 300, 20),
    ]
    methods = {"pcpt_numba", "pcpt_torch", "pcpt_numba_parity", "pcpt_torch_parity", "open3d", "naive"}
    for row in report["results"]:
        assert set(row["ms_per_cloud"]) == methods
        assert all(v > 0 for v in row["ms_per_cloud"].values())
        assert row["exact_numba_vs_torch"]
        assert row["exact_vs_open3d"]
        assert row["exact_vs_naive"]
        for key in ("numba_speedup_vs_open3d", "numba_speedup_vs_torch", "torch_speedup_vs_open3d"):
            assert row[key] > 0


def test_load_option_runs_one_busy_process_and_stops_it() -> None:
    bench = _bench_module()
    with bench.busy_process(True) as pid:
        assert pid is not None
        os.kill(pid, 0)  # alive while the block runs
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with bench.busy_process(False) as none:
        assert none is None


def test_numba_switch_is_restored() -> None:
    bench = _bench_module()
    before = os.environ.get(fps_numba.DISABLE_NUMBA_ENV)
    with bench.numba_disabled():
        assert not fps_numba.numba_enabled()
    assert os.environ.get(fps_numba.DISABLE_NUMBA_ENV) == before
    assert bench.DISABLE_NUMBA_ENV == fps_numba.DISABLE_NUMBA_ENV
