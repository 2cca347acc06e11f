from __future__ import annotations

import pytest

from datapipes.errors import UserError
from datapipes.inspect import format_report, inspect_shards, summarize
from datapipes.shards import read_manifest
from tests.datapipes._shard_helpers import write_tiny


def test_summary_and_clean_report(tmp_path):
    write_tiny(tmp_path / "ds", fps_ordered=True)
    report = inspect_shards(tmp_path / "ds")
    assert report.ok
    assert report.verified
    assert report.problems == []
    s = report.summary
    assert list(s["splits"]) == ["train", "test"]  # train first, whatever the manifest order
    assert s["splits"]["train"] == {"samples": 64, "shards": 4}
    assert s["classes"] == ["c0", "c1", "c2"]
    assert s["counts"]["test"] == {"c0": 5, "c1": 6, "c2": 5}
    assert s["points"] == {"min": 48, "max": 48}
    assert s["fps_ordered"] is True
    text = format_report(report)
    assert "split train: 64 samples in 4 shard(s)" in text
    assert "stored in FPS order: yes" in text
    assert "xyz float32 (N, 3)" in text
    assert text.splitlines()[-1].startswith("OK:")
    assert report.to_json()["ok"] is True
    assert summarize(read_manifest(tmp_path / "ds")) == s


def test_damage_is_reported_by_shard(tmp_path):
    write_tiny(tmp_path / "ds")
    (tmp_path / "ds" / "train-000002.tar").unlink()
    report = inspect_shards(tmp_path / "ds")
    assert not report.ok
    assert report.problems[0] == "train-000002.tar: missing shard"
    assert "FAILED" in format_report(report)
    assert "train-000002.tar" in format_report(report)
    quick = inspect_shards(tmp_path / "ds", verify=False)
    assert not quick.verified
    assert quick.problems == []
    assert "not verified" in format_report(quick)


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such shard folder"):
        inspect_shards(tmp_path / "nope")
