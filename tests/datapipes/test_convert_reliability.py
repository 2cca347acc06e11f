"""Conversion reliability: user files are never overwritten, bad files never end a run, one writer per
output folder, no orphaned workers after a kill, and fuzzed or killed conversions end in a sample or a
rejection with a reason, or in shards identical to an uninterrupted run's."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datapipes.converters import (
    ConvertOptions,
    WorkItem,
    get_converter,
    is_rejection,
    process_items,
    resolve_options,
)
from datapipes.converters.npy import NpyTree
from datapipes.errors import UserError
from datapipes.geometry import normalize_unit_sphere
from datapipes.shards import ShardSetWriter
from datapipes.types import Sample
from tests.cli_helpers import REPO, assert_one_error_line, repo_env
from tests.datapipes._convert_helpers import (
    cli_main,
    convert_cli,
    read_rejected,
    read_split,
    rejected_by_source,
    write_mesh_tree,
)

# ---------------------------------------------------------------------------------------------- helpers


def _cloud(seed: int, n: int = 64, cols: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, cols)).astype(np.float32)


def _npy_tree(root: Path, classes: dict[str, int]) -> Path:
    """``root/<class>/train/<class>_<i>.npy`` with ``count`` valid clouds per class."""
    for c, count in classes.items():
        (root / c / "train").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            np.save(root / c / "train" / f"{c}_{i}.npy", _cloud(100 * ord(c[0]) + i))
    return root


def _off_text(vertices: np.ndarray, faces: np.ndarray) -> str:
    lines = ["OFF", f"{len(vertices)} {len(faces)} 0"]
    lines += [" ".join(repr(float(v)) for v in row) for row in vertices]
    lines += ["3 " + " ".join(str(int(i)) for i in f) for f in faces]
    return "\n".join(lines) + "\n"


_TETRA_V = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
_TETRA_F = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])


def _err_of(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def _assert_same_dataset(out: Path, reference: Path) -> None:
    assert _shard_digests(out) == _shard_digests(reference)
    got, ref = (json.loads((p / "manifest.json").read_text()) for p in (out, reference))
    assert got["splits"] == ref["splits"]
    assert got["counts"] == ref["counts"]
    assert got["sha256"] == ref["sha256"]
    assert read_rejected(out) == read_rejected(reference)


# ------------------------------------------------------------------------ 1. user files are not overwritten


@pytest.mark.parametrize(
    "user_files",
    [
        {"manifest.json": b'{"my": "own manifest"}\n', "rejected.jsonl": b'{"mine": 1}\n'},
        {"notes.txt": b"my notes\n"},
        {"manifest.json": b'{"format": "pcpt-shards/1", "note": "hand-written"}\n'},
        {"sub/data.bin": b"\x00\x01"},
    ],
)
def test_non_empty_foreign_output_folder_is_refused_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], user_files: dict[str, bytes]
) -> None:
    src = _npy_tree(tmp_path / "src", {"a": 3})
    out = tmp_path / "out"
    for name, data in user_files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = _files(out)
    assert convert_cli("npy-tree", src, out) == 2
    first = sorted(user_files)[0].split("/")[0]
    assert_one_error_line("pcpt-data", _err_of(capsys), str(out), "not a pcpt output folder", first)
    assert _files(out) == before  # nothing replaced, nothing added (no .pcpt-progress either)
    assert sorted(p.name for p in out.iterdir()) == sorted({n.split("/")[0] for n in user_files})


def test_pcpt_output_is_resumed_and_user_files_in_it_are_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _npy_tree(tmp_path / "src", {"a": 3, "b": 2})
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out) == 0
    shards = _shard_digests(out)
    (out / "notes.txt").write_text("mine")
    (out / ".draft.tmp-12").write_text("mine too")  # looks like a temporary name, but not one of pcpt's
    capsys.readouterr()
    assert convert_cli("npy-tree", src, out) == 0
    assert "0 written, 1 kept" in capsys.readouterr().out
    assert _shard_digests(out) == shards
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / ".draft.tmp-12").read_text() == "mine too"
    assert convert_cli("npy-tree", src, out, "--seed", "3") == 2
    assert_one_error_line("pcpt-data", _err_of(capsys), str(out), "different options (seed)")
    assert _shard_digests(out) == shards


def test_finished_output_without_progress_folder_is_recognised_by_its_manifest(tmp_path: Path) -> None:
    src = _npy_tree(tmp_path / "src", {"a": 3})
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out) == 0
    for path in (out / ".pcpt-progress").iterdir():
        path.unlink()
    (out / ".pcpt-progress").rmdir()
    assert convert_cli("npy-tree", src, out) == 0  # the manifest says pcpt wrote it: shards are redone
    assert len(read_split(out, "train")) == 3


def test_foreign_manifest_in_an_unfinished_pcpt_folder_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = {"format": "tiny", "points": 4}
    writer = ShardSetWriter(out, options=options)
    writer.write_shard("train", 0, [], [{"source": "x", "reason": "broken", "split": "train"}])
    writer.close()
    (out / "manifest.json").write_text('{"mine": true}')
    with pytest.raises(UserError, match=r"manifest\.json: not a manifest written by pcpt"):
        ShardSetWriter(out, options=options)
    assert (out / "manifest.json").read_text() == '{"mine": true}'


# --------------------------------------------------------------- 2. one bad file never ends the conversion


def test_bad_files_are_rejected_and_the_run_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _npy_tree(tmp_path / "src", {"a": 3, "b": 2})
    train = src / "a" / "train"
    np.save(train / "huge.npy", _cloud(1) * np.float32(1e20))  # finite, but squares overflow float32
    np.save(train / "nan.npy", np.where(np.arange(192).reshape(64, 3) == 5, np.nan, _cloud(2)))
    np.save(train / "tiny.npy", _cloud(3) * np.float32(1e-30))
    with open(os.fsencode(train) + b"/bad\xff.npy", "wb") as fh:  # a name that is not UTF-8
        np.save(fh, _cloud(4))
    with open(os.fsencode(train) + b"/junk\xfe.npy", "wb") as fh:
        fh.write(b"\x93NUMPY garbage")
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out) == 0
    assert "rejected: 4" in capsys.readouterr().out
    reasons = rejected_by_source(out)
    assert set(reasons) == {
        "a/train/huge.npy",
        "a/train/nan.npy",
        "a/train/tiny.npy",
        "a/train/junk\\xfe.npy",
    }
    assert "too large" in reasons["a/train/huge.npy"]
    assert "non-finite" in reasons["a/train/nan.npy"]
    assert "too small" in reasons["a/train/tiny.npy"]
    assert reasons["a/train/junk\\xfe.npy"].startswith("not a .npy file")
    samples = read_split(out, "train")
    assert samples["a_bad"]["meta"]["source"] == "a/train/bad\\xff.npy"
    assert len(samples) == 6
    for sample in samples.values():
        assert np.isfinite(sample["xyz"]).all()
        assert np.linalg.norm(sample["xyz"], axis=1).max() == pytest.approx(1.0, abs=1e-5)
    for name in ("manifest.json", "rejected.jsonl"):
        (out / name).read_bytes().decode("utf-8")  # valid UTF-8 JSON
    assert convert_cli("npy-tree", src, out) == 0  # a re-run keeps everything, rejections included
    assert "0 written, 1 kept" in capsys.readouterr().out


def test_names_that_are_not_utf8_never_break_planning_or_json(tmp_path: Path) -> None:
    src = _npy_tree(tmp_path / "src", {"a": 1})
    folder = os.fsencode(src) + b"/caf\xe9/train"  # a Latin-1 class folder name
    os.makedirs(folder)
    with open(folder + b"/x.npy", "wb") as fh:
        np.save(fh, _cloud(5))
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out) == 0
    manifest = json.loads((out / "manifest.json").read_bytes().decode("utf-8"))
    assert manifest["classes"] == ["a", "caf\\xe9"]
    assert read_split(out, "train")["caf_x"]["meta"]["class"] == "caf\\xe9"

    res = tmp_path / "resampled"  # split lists naming files whose names are not UTF-8
    (res / "c").mkdir(parents=True)
    (res / "modelnet40_shape_names.txt").write_text("c\n")
    (res / "modelnet40_train.txt").write_bytes(b"c_0001\nc_\xff02\n")
    (res / "modelnet40_test.txt").write_text("")
    rows = "".join(",".join(f"{v:.5f}" for v in row) + "\n" for row in _cloud(6, 32, 6))
    (res / "c" / "c_0001.txt").write_text(rows)
    with open(os.fsencode(res) + b"/c/c_\xff02.txt", "w") as fh:
        fh.write(rows.replace("0", "1"))
    out = tmp_path / "out_resampled"
    assert convert_cli("modelnet-resampled", res, out, "--points", "32") == 0
    sources = sorted(s["meta"]["source"] for s in read_split(out, "train").values())
    assert sources == ["c/c_0001.txt", "c/c_\\xff02.txt"]


def test_mesh_with_huge_or_overflowing_vertices_is_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    (src / "tet" / "train").mkdir(parents=True)
    for i in range(2):
        (src / "tet" / "train" / f"ok{i}.off").write_text(_off_text(_TETRA_V * (i + 1), _TETRA_F))
    (src / "tet" / "train" / "huge.off").write_text(_off_text(_TETRA_V * 1e30, _TETRA_F))
    (src / "tet" / "train" / "overflow.off").write_text(_off_text(_TETRA_V * 1e300, _TETRA_F))
    (src / "tet" / "train" / "bigint.off").write_text(
        "OFF\n4 1 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 99999999999999999999999\n"
    )
    out = tmp_path / "out"
    assert convert_cli("modelnet-off", src, out, "--points", "64") == 0
    reasons = rejected_by_source(out)
    assert set(reasons) == {"tet/train/huge.off", "tet/train/overflow.off", "tet/train/bigint.off"}
    assert "too large" in reasons["tet/train/huge.off"]
    assert "too large" in reasons["tet/train/overflow.off"]
    assert "not integers" in reasons["tet/train/bigint.off"]
    assert len(read_split(out, "train")) == 2
    assert capsys.readouterr().err == ""


def _options(src: Path, fmt: str = "npy-tree", **given: Any) -> ConvertOptions:
    converter = get_converter(fmt)
    return resolve_options(converter, ConvertOptions(format=fmt, src=str(src)), given)


def _item(path: Path, key: str = "k") -> WorkItem:
    return WorkItem(key=key, split="train", source=path.name, path=str(path), label=0, class_name="c")


def test_unexpected_errors_become_rejections_but_fatal_ones_end_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.save(tmp_path / "ok.npy", _cloud(0))
    items = [_item(tmp_path / "ok.npy", "a"), _item(tmp_path / "ok.npy", "b")]
    original = NpyTree.read

    def failing(error: BaseException) -> Callable[..., Any]:
        def read(self: NpyTree, item: WorkItem, options: ConvertOptions) -> Any:
            if item.key == "b":
                raise error
            return original(self, item, options)

        return read

    monkeypatch.setattr(NpyTree, "read", failing(ZeroDivisionError("a bug\nover two lines")))
    results = process_items(items, _options(tmp_path))
    assert "xyz" in results[0]
    assert is_rejection(results[1])
    assert results[1]["reason"] == "unreadable: ZeroDivisionError: a bug over two lines"
    for fatal in (MemoryError(), KeyboardInterrupt(), SystemExit(3)):
        monkeypatch.setattr(NpyTree, "read", failing(fatal))
        with pytest.raises(type(fatal)):
            process_items(items, _options(tmp_path))


def test_errors_after_reading_reject_only_their_item(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(tmp_path / "ok.npy", _cloud(0))
    items = [_item(tmp_path / "ok.npy", "a"), _item(tmp_path / "ok.npy", "b")]
    import datapipes.converters.process as process

    real = process.estimate_normals_curvature
    calls: list[int] = []

    def flaky(xyz: np.ndarray, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("open3d failed")
        return real(xyz, **kwargs)

    monkeypatch.setattr(process, "estimate_normals_curvature", flaky)
    results = process_items(items, replace(_options(tmp_path), normals=True))
    assert "normal" in results[0]
    assert results[1]["reason"] == "processing failed: RuntimeError: open3d failed"


def test_every_item_rejected_is_a_failure_with_the_reasons_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    (src / "a" / "train").mkdir(parents=True)
    for i in range(3):
        (src / "a" / "train" / f"x{i}.npy").write_bytes(b"not an array")
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out) == 2
    assert_one_error_line(
        "pcpt-data", _err_of(capsys), "all 3 input items were rejected", str(out / "rejected.jsonl")
    )
    assert not (out / "manifest.json").exists()
    assert len(read_rejected(out)) == 3
    for i in range(3):  # once the inputs are fixed, the same command reads them again
        np.save(src / "a" / "train" / f"x{i}.npy", _cloud(i))
    assert convert_cli("npy-tree", src, out) == 0
    assert len(read_split(out, "train")) == 3
    assert read_rejected(out) == []


def test_a_class_folder_without_files_is_reported_and_keeps_its_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _npy_tree(tmp_path / "src", {"a": 2, "c": 2})
    (src / "b" / "train").mkdir(parents=True)  # no files
    (src / "d" / "train").mkdir(parents=True)
    (src / "d" / "train" / "d_0.npy").write_bytes(b"garbage")  # every file rejected
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["empty_classes"] == ["b", "d"]
    assert report["classes"] == ["a", "b", "c", "d"]
    assert {s["label"] for s in read_split(out, "train").values()} == {0, 2}
    assert json.loads((out / "manifest.json").read_text())["counts"]["train"] == {
        "a": 2,
        "b": 0,
        "c": 2,
        "d": 0,
    }
    assert convert_cli("npy-tree", src, out) == 0
    assert "empty classes (no sample in any split; label kept): 2: b, d" in capsys.readouterr().out


def test_normalize_unit_sphere_handles_finite_values_whose_squares_overflow() -> None:
    cloud = _cloud(0)
    for scale in (np.float32(1e20), np.float32(1e36)):
        out, centre, radius = normalize_unit_sphere(cloud * scale)
        assert np.isfinite(out).all()
        assert np.linalg.norm(out, axis=1).max() == pytest.approx(1.0, abs=1e-5)
        ref, _, ref_radius = normalize_unit_sphere(cloud.astype(np.float64))
        np.testing.assert_allclose(out, ref, atol=1e-5)
        assert radius == pytest.approx(ref_radius * float(scale), rel=1e-5)
        assert np.isfinite(centre).all()
    with pytest.raises(ValueError, match="NaN or infinite"):
        normalize_unit_sphere(np.full((4, 3), np.inf, np.float32))


# ------------------------------------------------------------------- 3. one writer per folder, no orphans


def test_a_second_writer_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = ShardSetWriter(out, options={"format": "tiny"})
    message = f"{out}: another conversion is writing here (pid {os.getpid()})"
    with pytest.raises(UserError, match=re.escape(message)):
        ShardSetWriter(out, options={"format": "tiny"})
    first.close()
    with ShardSetWriter(out, options={"format": "tiny"}) as second:
        second.write_shard("train", 0, [], [{"source": "x", "reason": "r", "split": "train"}])
    ShardSetWriter(out, options={"format": "tiny"}).close()  # released on exit of the with block


@pytest.fixture(scope="module")
def mesh_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mesh_tree(tmp_path_factory.mktemp("reliability") / "ModelNet", train=6, test=2)


SLOW_ARGS = (
    "--points",
    "1024",
    "--shard-size",
    "1",
    "--normals",
)  # slow enough per item to be caught mid-run


@pytest.fixture(scope="module")
def mesh_reference(mesh_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reliability_ref") / "out"
    assert convert_cli("modelnet-off", mesh_src, out, *SLOW_ARGS) == 0
    return out


def _start(src: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    code = "import sys; from tests.datapipes._convert_helpers import cli_main as m; sys.exit(m(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "convert", "modelnet-off", str(src), str(out), "--quiet", *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, env=repo_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _records(out: Path) -> int:
    return len(list((out / ".pcpt-progress").glob("*.tar.json")))


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 60) -> bool:
    """Waits until ``condition()``; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out waiting for the conversion"
        time.sleep(0.005)
    return True


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    table = _proc_table()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        children = {p for p, (ppid, _) in table.items() if ppid in frontier} - found
        found |= children
        frontier = children
    return found


def _alive(pids: set[int]) -> set[int]:
    table = _proc_table()
    return {p for p in pids if p in table and table[p][1] not in ("Z", "X")}


def _kill_and_check_no_orphans(proc: subprocess.Popen[bytes]) -> None:
    children = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(children), f"processes left behind by the killed conversion: {_alive(children)}"


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")


@needs_proc
def test_a_concurrent_conversion_is_refused_with_the_pid_of_the_running_one(
    mesh_src: Path, mesh_reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    proc = _start(mesh_src, out, *SLOW_ARGS)
    try:
        assert _wait_for(lambda: _records(out) >= 1, proc), "conversion ended before the second one started"
        assert convert_cli("modelnet-off", mesh_src, out, *SLOW_ARGS) == 2
        assert_one_error_line(
            "pcpt-data", _err_of(capsys), f"{out}: another conversion is writing here (pid {proc.pid})"
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert convert_cli("modelnet-off", mesh_src, out, *SLOW_ARGS) == 0  # the dead one's lock is gone
    _assert_same_dataset(out, mesh_reference)


@needs_proc
def test_killing_a_pooled_conversion_leaves_no_workers_and_a_rerun_completes(
    mesh_src: Path, mesh_reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = _start(mesh_src, out, *SLOW_ARGS, "--workers", "2")
    try:
        started = _wait_for(lambda: _records(out) >= 2 and len(_descendants(proc.pid)) >= 2, proc)
        assert started, "conversion ended before it could be killed"
    finally:
        _kill_and_check_no_orphans(proc)
    assert not (out / "manifest.json").exists()
    assert convert_cli("modelnet-off", mesh_src, out, *SLOW_ARGS) == 0  # engines give identical shards
    _assert_same_dataset(out, mesh_reference)


# ------------------------------------------------------------------------------------------- 4. fuzzing


FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_SPECIAL = [np.nan, np.inf, -np.inf, 1e20, -3.4e38, 1e19, 1e-45, 1e-30, 0.0]
_SPECIAL_TEXT = [
    "nan", "inf", "-inf", "1e20", "1e30", "1e400", "-1e19", "1e-320", "0", "x", "", "1,2", "--1",
    "99999999999999999999999",
]  # fmt: skip


def _valid_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, _cloud(0, 48, 6))
    return buf.getvalue()


def _valid_off() -> bytes:
    return _off_text(_TETRA_V, _TETRA_F).encode()


def _valid_txt() -> bytes:
    rows = _cloud(0, 32, 6)
    return "".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in rows).encode()


def _valid_bin() -> bytes:
    return _cloud(0, 48, 4).astype("<f4").tobytes()


_VALID = {"npy": _valid_npy, "off": _valid_off, "txt": _valid_txt, "bin": _valid_bin}


@st.composite
def _damaged(draw: st.DrawFn, kind: str) -> bytes:
    """Random bytes, a truncated valid file, a valid file with random bytes flipped, or special values."""
    valid = _VALID[kind]()
    how = draw(st.sampled_from(["random", "truncate", "flip", "values"]))
    if how == "random":
        return draw(st.binary(max_size=600))
    if how == "truncate":
        return valid[: draw(st.integers(0, len(valid)))]
    if how == "flip":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind in ("off", "txt"):
        text = valid.decode()
        tokens = text.replace(",", " , ").split(" ")
        for _ in range(draw(st.integers(1, 12))):
            i = draw(st.integers(0, len(tokens) - 1))
            tokens[i] = draw(st.sampled_from(_SPECIAL_TEXT))
        return " ".join(tokens).replace(" , ", ",").encode()
    if kind == "npy":
        arr = _cloud(0, 48, 6)
        header = len(valid) - arr.nbytes
        values = np.frombuffer(valid[header:], dtype=np.float32).copy()
    else:
        header, values = 0, np.frombuffer(valid, dtype="<f4").copy()
    for _ in range(draw(st.integers(1, 6))):
        values[draw(st.integers(0, len(values) - 1))] = draw(
            st.sampled_from(_SPECIAL) | st.floats(width=32, allow_nan=True, allow_infinity=True)
        )
    return valid[:header] + values.astype("<f4").tobytes()


def _layout(kind: str, src: Path, data: bytes) -> tuple[str, Path]:
    """Writes the fuzzed file next to one valid file in ``kind``'s source layout; returns (format, fuzzed)."""
    if kind == "npy":
        folder = src / "c" / "train"
        folder.mkdir(parents=True)
        (folder / "a.npy").write_bytes(_VALID["npy"]())
        (folder / "z.npy").write_bytes(data)
        return "npy-tree", folder / "z.npy"
    if kind == "off":
        folder = src / "c" / "train"
        folder.mkdir(parents=True)
        (folder / "a.off").write_bytes(_VALID["off"]())
        (folder / "z.off").write_bytes(data)
        return "modelnet-off", folder / "z.off"
    if kind == "txt":
        (src / "c").mkdir(parents=True)
        (src / "modelnet40_shape_names.txt").write_text("c\n")
        (src / "modelnet40_train.txt").write_text("c_0001\nc_0002\n")
        (src / "modelnet40_test.txt").write_text("")
        (src / "c" / "c_0001.txt").write_bytes(_VALID["txt"]())
        (src / "c" / "c_0002.txt").write_bytes(data)
        return "modelnet-resampled", src / "c" / "c_0002.txt"
    src.mkdir(parents=True)
    (src / "a.bin").write_bytes(_VALID["bin"]())
    (src / "z.bin").write_bytes(data)
    return "kitti", src / "z.bin"


def _check_result(result: dict[str, Any]) -> None:
    if is_rejection(result):
        assert isinstance(result["reason"], str)
        assert result["reason"].strip()
        assert "\n" not in result["reason"]
        return
    sample: Sample = result  # type: ignore[assignment]
    xyz = sample["xyz"]
    assert xyz.dtype == np.float32
    assert xyz.shape[1:] == (3,)
    for name in ("xyz", "normal", "curv", "feat"):
        if name in sample:
            assert np.isfinite(sample[name]).all(), name  # type: ignore[literal-required]


def _fuzz_one(kind: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        fmt, fuzzed = _layout(kind, src, data)
        normals = kind in ("npy", "bin")  # open3d normal estimation on damaged clouds too
        options = replace(_options(src, fmt, points=32), normals=normals, min_points=4)
        item = WorkItem(key="z", split="train", source=fuzzed.name, path=str(fuzzed), label=0, class_name="c")
        (result,) = process_items([item], options)
        _check_result(result)
        stdout, stderr = io.StringIO(), io.StringIO()
        args = ["convert", fmt, str(src), str(out), "--quiet", "--points", "32", "--min-points", "4"]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli_main([*args, "--normals"] if normals else args)
        assert code == 0, stderr.getvalue()
        assert "Traceback" not in stderr.getvalue()
        samples = read_split(out, "train")
        rejected = read_rejected(out)
        assert len(samples) + len(rejected) == 2
        assert all(r["reason"].strip() for r in rejected)


@pytest.mark.parametrize("kind", ["npy", "off", "txt", "bin"])
def test_fuzzed_inputs_become_samples_or_rejections(kind: str) -> None:
    @FUZZ
    @given(data=_damaged(kind))
    def run(data: bytes) -> None:
        _fuzz_one(kind, data)

    run()


# --------------------------------------------------------------------------------- 5. fault injection


@pytest.mark.slow
@needs_proc
def test_conversions_killed_at_random_points_resume_to_the_uninterrupted_result(
    mesh_src: Path, mesh_reference: Path, tmp_path: Path
) -> None:
    rng = random.Random(1234)
    out = tmp_path / "out"
    total = _records(mesh_reference)  # one item per shard
    for attempt in range(5):
        workers = ("--workers", "2") if attempt % 2 else ()
        proc = _start(mesh_src, out, *SLOW_ARGS, *workers)
        target = min(total, _records(out) + rng.randint(0, 6))

        def reached(target: int = target) -> bool:
            return _records(out) >= target

        _wait_for(reached, proc)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            _kill_and_check_no_orphans(proc)
        else:
            proc.wait()
    assert convert_cli("modelnet-off", mesh_src, out, *SLOW_ARGS) == 0
    _assert_same_dataset(out, mesh_reference)
    assert not list(out.glob(".*.tmp-*"))
