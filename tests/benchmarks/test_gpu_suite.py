"""The GPU suite at tiny size on CPU: one JSON with every method, FPS/kNN, the pipeline, per-item status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_suite
import method_configs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEP_KEYS = {"samples_per_s", "s_per_step", "peak_memory_mb", "batch_size", "num_points", "first_step_s"}


def _check_header(report: dict[str, Any]) -> None:
    assert report["benchmark"] == "pcpt GPU suite"
    assert report["device"]
    assert report["device_type"] == "cpu"
    assert report["versions"]["torch"]
    assert report["date"][:4].isdigit()
    assert report["tiny"] is True


def test_steps_of_every_method_with_per_item_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 steps of all methods in-process; a method that fails to build is one error row, not a crash."""
    real_build = method_configs.build_method

    def build(method: str, **kwargs: Any) -> Any:
        if method == "geomae":
            raise RuntimeError("broken on purpose")
        return real_build(method, **kwargs)

    monkeypatch.setattr(gpu_suite, "build_method", build)
    out = tmp_path / "suite.json"
    argv = ["--device", "cpu", "--tiny", "--precisions", "fp32", "--sections", "steps,ops"]
    status = gpu_suite.main([*argv, "--item-budget-s", "0.3", "--out", str(out)])
    report = json.loads(out.read_text())
    _check_header(report)
    assert status == 1  # one item failed
    rows = {row["method"]: row for row in report["steps"]}
    assert list(rows) == list(method_configs.METHODS)
    assert rows["geomae"]["status"] == "error"
    assert "broken on purpose" in rows["geomae"]["error"]
    for method, row in rows.items():
        if method == "geomae":
            continue
        assert row["status"] == "ok", row
        assert set(row) >= STEP_KEYS
        assert row["samples_per_s"] > 0
        assert row["peak_memory_mb"] > 0
        assert row["config"] == f"configs/pretrain/{method_configs.METHODS[method].tiny}"
    assert [row["case"] for row in report["ops"]] == [case[0] for case in gpu_suite.OP_CASES]
    assert all(row["status"] == "ok" and row["fps_ms"] > 0 and row["knn_ms"] > 0 for row in report["ops"])
    assert report["pipeline"] == []
    assert report["summary"] == {"ok": 5 + len(gpu_suite.OP_CASES), "error": 1, "skipped": 0}


def test_models_follow_the_official_configs(tmp_path: Path) -> None:
    """The suite's models have the shipped configs' sizes (read back from the built modules)."""
    module = method_configs.build_method("point_mae", tiny=False, workdir=tmp_path)
    encoder = method_configs.read_config("point_mae", tiny=False)["model"]["init_args"]["encoder"]
    assert module.encoder.spec.embed_dim == encoder["embed_dim"] == 384
    assert len(module.encoder.blocks) == encoder["depth"]
    assert method_configs.data_settings("point_mae", tiny=False)["batch_size"] == 128


@pytest.mark.slow
def test_tiny_cpu_run_writes_every_section(tmp_path: Path) -> None:
    """The documented command: ``gpu_suite.py --device cpu --tiny`` (both precisions, the pipeline)."""
    out = tmp_path / "suite.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--tiny"]
    cmd += ["--item-budget-s", "0.5", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout) == report
    _check_header(report)
    steps = {(row["method"], row["precision"]): row for row in report["steps"]}
    assert set(steps) == {(m, p) for m in method_configs.METHODS for p in ("fp32", "bf16")}
    assert all(row["status"] == "ok" and set(row) >= STEP_KEYS for row in steps.values())
    pipelines = {row["pipeline"]: row for row in report["pipeline"]}
    assert set(pipelines) == {"objects", "objects_images"}
    assert pipelines["objects_images"]["images"] is True
    for row in pipelines.values():
        assert row["status"] == "ok"
        assert row["samples_per_s"] > 0
        fastest = row["fastest_step"]["samples_per_s"]
        assert row["pipeline_over_step"] == pytest.approx(row["samples_per_s"] / fastest, rel=1e-2)
    assert report["summary"] == {"ok": len(steps) + len(gpu_suite.OP_CASES) + 2, "error": 0, "skipped": 0}
