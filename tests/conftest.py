"""Shared test options: ``--runslow``, automatic skips for GPU tests, small deterministic fixtures."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: thread spin-up costs more than it saves; xdist runs 2 workers


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: needs --runslow"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="gpu: needs CUDA"))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
