"""Worker processes (LocalEngine's pool, Ray's) run torch, BLAS/OpenMP and numba on one thread each;
workers=1 is unchanged."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest

from datapipes.engines import WORKER_THREAD_ENV, Engine, LocalEngine, RayEngine, ShardJob


def _thread_report(items: Sequence[int]) -> list[dict[str, Any]]:
    """Runs in the worker: the thread counts its native libraries would use."""
    import numba
    import torch
    from threadpoolctl import threadpool_info

    pools = threadpool_info()
    return [
        {
            "item": int(item),
            "pid": os.getpid(),
            "torch": torch.get_num_threads(),
            "numba": numba.get_num_threads(),
            "pools": [(p["internal_api"], p["num_threads"]) for p in pools],
            "env": {name: os.environ.get(name) for name in WORKER_THREAD_ENV},
        }
        for item in items
    ]


def _env_report(items: Sequence[int]) -> list[dict[str, Any]]:
    return [
        {"pid": os.getpid(), "env": {name: os.environ.get(name) for name in WORKER_THREAD_ENV}} for _ in items
    ]


def test_pool_workers_use_one_thread_each() -> None:
    _check_one_thread_each(LocalEngine(2, chunk_size=1))


def test_ray_workers_use_one_thread_each() -> None:
    pytest.importorskip("ray.data")
    _check_one_thread_each(RayEngine(None, num_cpus=2, chunk_size=1))


def _check_one_thread_each(engine: Engine) -> None:
    try:
        (done,) = list(engine.run(_thread_report, [ShardJob("train", 0, tuple(range(4)))]))
    finally:
        engine.close()
    reports = done.results
    assert [r["item"] for r in reports] == [0, 1, 2, 3]
    assert all(r["pid"] != os.getpid() for r in reports)
    for report in reports:
        assert report["torch"] == 1
        assert report["numba"] == 1
        assert report["pools"], "threadpoolctl found no BLAS/OpenMP library in the worker"
        assert all(threads == 1 for _, threads in report["pools"]), report["pools"]
        assert set(report["env"].values()) == {"1"}


def test_one_worker_runs_in_process_with_its_own_threads() -> None:
    before = {name: os.environ.get(name) for name in WORKER_THREAD_ENV}
    engine = LocalEngine(1)
    try:
        (done,) = list(engine.run(_env_report, [ShardJob("train", 0, (0,))]))
    finally:
        engine.close()
    assert done.results[0]["pid"] == os.getpid()
    assert done.results[0]["env"] == before  # the calling process's settings are left alone
