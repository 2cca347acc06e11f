"""Interrupted conversions resume: complete shards are kept, the rest redone, nothing lost or duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datapipes.converters import ConvertOptions, ConvertReport, convert, get_converter, resolve_options
from datapipes.engines import LocalEngine
from tests.datapipes._convert_helpers import convert_cli, read_rejected, shard_bytes, write_mesh_tree

ROOT = Path(__file__).resolve().parents[2]
ARGS = ("--points", "256", "--shard-size", "2")


@pytest.fixture(scope="module")
def mesh_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mesh_tree(tmp_path_factory.mktemp("resume") / "ModelNet", train=5, test=2)


@pytest.fixture(scope="module")
def reference(mesh_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert convert_cli("modelnet-off", mesh_src, out, *ARGS) == 0
    return out


def _options(src: Path) -> ConvertOptions:
    converter = get_converter("modelnet-off")
    base = ConvertOptions(format="modelnet-off", src=str(src.resolve()), shard_size=2)
    return resolve_options(converter, base, {"points": 256})


def _assert_same(out: Path, reference: Path) -> None:
    assert shard_bytes(out) == shard_bytes(reference)
    got, ref = (json.loads((p / "manifest.json").read_text()) for p in (out, reference))
    assert got["splits"] == ref["splits"]
    assert got["sha256"] == ref["sha256"]
    assert read_rejected(out) == read_rejected(reference)


class _Stop(Exception):
    pass


def test_resume_after_failure_matches_uninterrupted_run(
    mesh_src: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    written: list[tuple[str, int]] = []

    def stop_after_three(split: str, index: int) -> None:
        written.append((split, index))
        if len(written) == 3:
            raise _Stop

    options = _options(mesh_src)
    with pytest.raises(_Stop):
        convert(get_converter("modelnet-off"), options, out, LocalEngine(1), on_shard=stop_after_three)
    assert not (out / "manifest.json").exists()
    assert len(list(out.glob("*.tar"))) == 3
    # damage one finished shard and leave a stray temporary file, as a crash mid-write would
    damaged = out / f"{written[0][0]}-{written[0][1]:06d}.tar"
    damaged.write_bytes(damaged.read_bytes()[:-512])
    (out / ".train-000005.tar.tmp-999").write_bytes(b"partial")
    report: ConvertReport = convert(get_converter("modelnet-off"), options, out, LocalEngine(1))
    assert report.shards_resumed == 2  # the damaged one is redone
    assert report.shards_written == 11 - 2
    _assert_same(out, reference)
    assert report.samples == {"train": 15, "test": 6}
    assert report.rejected == 1
    assert not list(out.glob(".*tmp*"))


def test_resume_after_kill(mesh_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("--points", "1024", "--shard-size", "1", "--normals")  # slow enough per item to be killed mid-way
    code = "import sys; from tests.datapipes._convert_helpers import cli_main as m; sys.exit(m(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "convert", "modelnet-off", str(mesh_src), str(out), "--quiet", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / ".pcpt-progress"
    deadline = time.monotonic() + 60
    try:
        while len(list(progress.glob("*.tar.json"))) < 2:
            assert proc.poll() is None, "conversion ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert 2 <= len(list(progress.glob("*.tar.json"))) < 22
    assert convert_cli("modelnet-off", mesh_src, out, *args) == 0
    twin = tmp_path / "twin"
    assert convert_cli("modelnet-off", mesh_src, twin, *args) == 0
    _assert_same(out, twin)
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["samples"] == 15
