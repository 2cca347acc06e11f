"""``pcpt-data convert --engine ray --ray-address`` on a real two-node Ray cluster on this host.

The cluster is started with the ``ray start`` command line: a head and one worker node, one CPU and a
100 MB object store each, their own temporary folders and ports, and a fresh auth token; every process of
it is killed by pid (its session) when the test ends, never another Ray on the host. The conversions run
as ``python -m datapipes.cli`` driver processes, as a user would run them. Checked: the cluster writes
byte-identical shards to the local engine's and the report counts each node's samples; then the worker node
is killed while it converts a chunk, and the run still ends with the local engine's shards, no sample
lost or written twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli_helpers import REPO
from tests.datapipes._convert_helpers import convert_cli, read_rejected, read_split, shard_bytes

pytest.importorskip("ray.data")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the nodes' processes in /proc"),
]

START_TIMEOUT_S = 60.0
CONVERT_TIMEOUT_S = 120.0
#: conversion options: FPS of 8000 points down to 1024 takes ~0.03 s per item
ARGS = ("--points", "1024", "--shard-size", "4")
CLASSES = ("a", "b", "c")
TRAIN, TEST = 12, 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _session_pids(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (a node's ``ray start`` and everything it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@dataclass
class RayNode:
    """One ``ray start --block`` process (its own session) and the Ray node id of its raylet."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    node_id: str = ""

    def pids(self) -> list[int]:
        return _session_pids(self.proc.pid)

    def busy_workers(self) -> list[int]:
        """Pids of this node's Ray workers running a Ray Data map task right now."""
        return [pid for pid in self.pids() if any("MapBatches" in arg for arg in _cmdline(pid))]

    def kill(self) -> None:
        """SIGKILLs every process of the node, as a machine failure would end them.

        ``ray start`` is left unreaped until :meth:`LocalRayCluster.shutdown`, so its pid (the session id)
        cannot be reused by another process meanwhile.
        """
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class LocalRayCluster:
    """A Ray cluster of ``ray start`` processes on this host, isolated from any other Ray on it.

    Each node has its own temporary folder (short: Unix socket paths are limited), explicit free ports
    (so two nodes and other clusters on the host never collide) and one CPU. The nodes are started with
    ``--node-ip-address 127.0.0.1``, which Ray replaces by the host's IP address. A fresh auth token
    protects the cluster; :attr:`env` carries it (and ``PYTHONPATH`` to this checkout, as an install of
    pcpt on every node would) to the nodes and to the drivers.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pcpt-ray-", dir="/tmp"))
        self.nodes: list[RayNode] = []
        self.address = ""
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
            # notice a dead node within about a second (defaults: several seconds)
            "RAY_health_check_initial_delay_ms": "1000",
            "RAY_health_check_period_ms": "300",
            "RAY_health_check_timeout_ms": "300",
            "RAY_health_check_failure_threshold": "3",
        }
        self.env.pop("RAY_ADDRESS", None)

    def _start(self, name: str, *args: str) -> RayNode:
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        assert ray is not None, "the ray command is not installed"
        ports = {
            "--node-manager-port": _free_port(),
            "--object-manager-port": _free_port(),
            "--dashboard-agent-listen-port": _free_port(),
            "--dashboard-agent-grpc-port": _free_port(),
            "--runtime-env-agent-port": _free_port(),
            "--metrics-export-port": _free_port(),
        }
        cmd = [ray, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
        cmd += ["--object-store-memory", "100000000", "--temp-dir", str(self.root / name)]
        cmd += ["--disable-usage-stats", *args]
        cmd += [str(v) for kv in ports.items() for v in kv]
        log = self.root / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = RayNode(name, proc, log)
        self.nodes.append(node)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "block forever" not in log.read_text(errors="replace") or not node.node_id:
            assert proc.poll() is None, f"ray node {name} exited:\n{log.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, (
                f"ray node {name} did not start:\n{log.read_text(errors='replace')[-3000:]}"
            )
            time.sleep(0.2)
            for pid in node.pids():
                argv = _cmdline(pid)
                if argv and argv[0].endswith("raylet"):
                    node.node_id = next((a.split("=", 1)[1] for a in argv if a.startswith("--node_id=")), "")
        return node

    def start_head(self) -> RayNode:
        port = _free_port()
        node = self._start(
            "head", "--head", "--port", str(port), "--include-dashboard", "false",
            "--dashboard-port", str(_free_port()),
        )  # fmt: skip
        self.address = f"127.0.0.1:{port}"
        return node

    def add_node(self, name: str) -> RayNode:
        return self._start(name, "--address", self.address)

    def shutdown(self) -> None:
        """Kills every process of every node (by pid, never another cluster's) and removes the folders."""
        for node in reversed(self.nodes):
            node.kill()
        for node in self.nodes:
            node.proc.wait()
        deadline = time.monotonic() + 10
        while any(node.pids() for node in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


def _write_source(src: Path) -> Path:
    """``<class>/{train,test}/*.npy`` clouds of 8000 points, plus one file that is rejected."""
    rng = np.random.default_rng(7)
    for c in CLASSES:
        for split, count in (("train", TRAIN), ("test", TEST)):
            (src / c / split).mkdir(parents=True)
            for i in range(count):
                np.save(
                    src / c / split / f"{c}_{split}{i}.npy", rng.normal(size=(8000, 3)).astype(np.float32)
                )
    (src / "a" / "train" / "broken.npy").write_bytes(b"\x93NUMPY broken")
    return src


@pytest.fixture
def cluster() -> Iterator[LocalRayCluster]:
    c = LocalRayCluster()
    try:
        c.start_head()
        c.add_node("worker")
        yield c
    finally:
        c.shutdown()


def _convert_cmd(cluster: LocalRayCluster, source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "datapipes.cli", "convert", "npy-tree", str(source), str(out), *ARGS,
            "--engine", "ray", "--ray-address", cluster.address, "--quiet", "--json"]  # fmt: skip


def _start_convert(cluster: LocalRayCluster, source: Path, out: Path) -> subprocess.Popen[bytes]:
    """``pcpt-data convert ... --json`` as a driver process; stdout and stderr go to files next to ``out``."""
    with open(f"{out}.json", "wb") as stdout, open(f"{out}.err", "wb") as stderr:
        return subprocess.Popen(
            _convert_cmd(cluster, source, out), cwd=REPO, env=cluster.env, stdout=stdout, stderr=stderr
        )


def _finish_convert(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    """Waits for the driver; returns its JSON report."""
    try:
        proc.wait(timeout=CONVERT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, Path(f"{out}.err").read_text(errors="replace")[-3000:]
    return dict(json.loads(Path(f"{out}.json").read_text()))  # stdout holds the summary only


def _assert_same_as_local(out: Path, reference: Path) -> None:
    """Byte-identical shards and manifest, and every sample once with the local label and points."""
    assert shard_bytes(out) == shard_bytes(reference)
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert read_rejected(out) == read_rejected(reference)
    for split, count in (("train", TRAIN), ("test", TEST)):
        samples = read_split(out, split)  # asserts that no key occurs twice
        assert len(samples) == len(CLASSES) * count
        ref = read_split(reference, split)
        assert sorted(samples) == sorted(ref)
        for key, sample in samples.items():
            assert sample["label"] == ref[key]["label"]
            np.testing.assert_array_equal(sample["xyz"], ref[key]["xyz"])


def _assert_node_counts(report: dict[str, Any], node_ids: set[str]) -> None:
    """The per-node counts add up to every sample and the one rejection, on the cluster's nodes only."""
    nodes = report["nodes"]
    assert set(nodes) <= node_ids
    assert sum(entry["samples"] for entry in nodes.values()) == len(CLASSES) * (TRAIN + TEST)
    assert sum(entry["rejected"] for entry in nodes.values()) == 1
    addresses = {entry["address"] for entry in nodes.values()}
    assert len(addresses) == 1  # one host (Ray registers the host's IP, not 127.0.0.1)
    assert "?" not in addresses


def test_convert_on_a_cluster_matches_local_and_survives_a_killed_node(
    cluster: LocalRayCluster, tmp_path: Path
) -> None:
    source = _write_source(tmp_path / "src")
    reference = tmp_path / "local"
    assert convert_cli("npy-tree", source, reference, *ARGS) == 0
    head, worker = cluster.nodes

    # both nodes convert, the shards are the local engine's, the report counts each node's samples
    out = tmp_path / "ray"
    report = _finish_convert(_start_convert(cluster, source, out), out)
    _assert_same_as_local(out, reference)
    assert report["samples"] == {"train": len(CLASSES) * TRAIN, "test": len(CLASSES) * TEST}
    assert report["rejected"] == 1
    _assert_node_counts(report, {head.node_id, worker.node_id})
    assert set(report["nodes"]) == {head.node_id, worker.node_id}
    assert all(entry["samples"] > 0 for entry in report["nodes"].values())

    # the worker node dies (every process SIGKILLed) while it converts a chunk: the head redoes its work
    out = tmp_path / "ray-killed"
    proc = _start_convert(cluster, source, out)
    deadline = time.monotonic() + CONVERT_TIMEOUT_S
    while not worker.busy_workers():
        assert proc.poll() is None, "the conversion ended before the worker node could be killed"
        assert time.monotonic() < deadline, "the worker node never got work"
        time.sleep(0.05)
    worker.kill()
    report = _finish_convert(proc, out)
    assert not worker.pids()
    _assert_same_as_local(out, reference)
    _assert_node_counts(report, {head.node_id, worker.node_id})
    assert report["nodes"][head.node_id]["samples"] > 0
    assert report["shards_written"] == len(list(out.glob("*.tar"))) == 13
