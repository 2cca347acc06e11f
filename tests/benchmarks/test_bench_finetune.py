"""The finetuning benchmark runs each variant in its own process and reports them against full finetuning."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli_helpers import REPO


def test_bench_finetune_reports_variants_against_full_finetuning() -> None:
    cmd = [sys.executable, str(REPO / "benchmarks/bench_finetune.py")]
    cmd += [
        "--variants",
        "full,linear,point_adapter",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    ]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout)
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["full", "linear", "point_adapter"]
    assert rows["full"]["speed_vs_full"] == 1.0
    assert rows["full"]["frozen"] == 0
    head = rows["linear"]["trainable"]
    # the encoder alone is frozen; full finetuning adds a CLS token and its position (2 x 96) to it
    assert rows["linear"]["frozen"] == rows["full"]["trainable"] - head - 2 * 96
    assert head < rows["point_adapter"]["trainable"] < rows["full"]["trainable"]
    for row in rows.values():
        assert row["samples_per_s"] > 0
        assert row["peak_memory_mb"] > 0
        assert row["epoch_s_modelnet40"] == row["s_per_step"] * 4430  # ceil(8859 / 2) steps
