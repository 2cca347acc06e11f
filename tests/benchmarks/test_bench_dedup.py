"""The dedup benchmark plants near-duplicates it can find, and reports exact and IVF side by side."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.cli_helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_dedup import DIM, synthetic_descriptors


def test_synthetic_descriptors_plant_pairs_within_the_threshold() -> None:
    desc, planted = synthetic_descriptors(2000, dup_fraction=0.02, threshold=0.006, seed=3)
    assert desc.shape == (2000, DIM) == (2000, 131)
    assert desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    assert planted.shape == (40, 2)
    assert (planted[:, 0] < planted[:, 1]).all()
    assert len(np.unique(planted)) == 80  # every descriptor is in at most one planted pair
    dist = np.linalg.norm(desc[planted[:, 0]].astype(np.float64) - desc[planted[:, 1]], axis=1)
    assert (dist > 0.1 * 0.006).all()
    assert (dist < 0.85 * 0.006).all()
    others = np.setdiff1d(np.arange(2000), planted)[:200]
    gaps = np.linalg.norm(desc[others, None].astype(np.float64) - desc[None, others], axis=-1)
    assert gaps[np.triu_indices(200, 1)].min() > 0.006  # distinct descriptors are not near-duplicates
    again, planted_again = synthetic_descriptors(2000, dup_fraction=0.02, threshold=0.006, seed=3)
    assert np.array_equal(again, desc)
    assert np.array_equal(planted_again, planted)


def test_bench_dedup_reports_exact_and_ivf_side_by_side() -> None:
    cmd = [sys.executable, str(REPO / "benchmarks/bench_dedup.py")]
    cmd += ["--sizes", "800,1500", "--exact-max", "1000", "--threads", "1", "--dup-fraction", "0.02"]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout)
    assert report["command"].endswith("--sizes 800,1500 --exact-max 1000 --threads 1 --dup-fraction 0.02")
    assert (report["dim"], report["threshold"], report["threads"]) == (131, 0.006, 1)
    assert report["descriptor_ms_per_cloud"] > 0
    small, large = report["results"]
    assert (small["size"], large["size"]) == (800, 1500)
    for row in (small["exact"], small["ivf"], large["ivf"]):
        assert row["planted_pairs"] == round(0.02 * (800 if row is not large["ivf"] else 1500))
        assert row["planted_recall"] == 1.0
        assert row["pairs"] >= row["planted_pairs"]
        assert row["seconds"] > 0
        assert row["peak_rss_mb"] >= row["data_rss_mb"] > row["startup_rss_mb"] > 0
        assert row["search_rss_mb"] == round(row["peak_rss_mb"] - row["data_rss_mb"], 1)
        assert row["gpu"] is False
    assert small["exact"]["descriptors_mb"] == round(800 * 131 * 4 / 2**20, 1)
    assert small["ivf_equals_exact"] is True
    assert small["ivf_missed_vs_exact"] == 0
    assert small["speedup"] > 0
    assert small["ivf"]["unverified"] == 0
    assert small["ivf"]["nlist"] == 20  # the pcpt default for 800 descriptors: min(64, 800 // 39)
    assert large["exact"] == {"skipped": "size 1500 > --exact-max 1000"}
    assert "ivf_equals_exact" not in large


def test_bench_dedup_rejects_bad_options() -> None:
    cmd = [sys.executable, str(REPO / "benchmarks/bench_dedup.py"), "--methods", "exact,hnsw"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "--methods: unknown ['hnsw']" in result.stderr
