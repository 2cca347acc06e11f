"""Fixtures of the method tests: the demo shards the CLI tests pre-train on."""

from __future__ import annotations

from pathlib import Path

import pytest

from datapipes.synthetic import write_synthetic


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 training and 8 test clouds of 96 points (4 classes), in shards of 8."""
    root = tmp_path_factory.mktemp("demo")
    write_synthetic(root, classes=4, per_class=8, test_per_class=2, points=96, shard_size=8)
    return root
