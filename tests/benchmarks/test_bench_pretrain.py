"""The pre-training step benchmark runs pcpt and the official restatement in alternating processes."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli_helpers import REPO


def test_bench_pretrain_reports_both_variants_their_ratio_and_a_profile() -> None:
    cmd = [sys.executable, str(REPO / "benchmarks/bench_pretrain.py"), "--size", "modelnet_cpu"]
    cmd += ["--batch-size", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--rounds", "2"]
    cmd += ["--profile", "1"]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout)
    assert [(r["variant"], r["round"]) for r in report["results"]] == [
        ("pcpt", 0),
        ("official", 0),
        ("pcpt", 1),
        ("official", 1),
    ]
    summary = report["summary"]
    rates = {v: sorted(r["samples_per_s"] for r in report["results"] if r["variant"] == v) for v in summary}
    for variant in ("pcpt", "official"):
        assert summary[variant]["samples_per_s_min"] == rates[variant][0]
        assert summary[variant]["samples_per_s_max"] == rates[variant][-1]
    assert summary["pcpt_over_official"] == (
        summary["pcpt"]["samples_per_s_median"] / summary["official"]["samples_per_s_median"]
    )
    for result in report["results"]:
        profile = result["profile"]
        assert all(profile["forward_phases_ms"][phase] > 0 for phase in profile["forward_phases_ms"])
        assert profile["optimizer_step_ms"] > 0
        assert len(profile["top_ops_by_self_cpu"]) == 12
