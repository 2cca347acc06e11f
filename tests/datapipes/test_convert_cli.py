from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.datapipes._convert_helpers import cli_main, convert_cli, read_split


def _tree(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for split in ("train", "test"):
            (root / c / split).mkdir(parents=True)
            for i in range(n):
                np.save(
                    root / c / split / f"{c}_{split}_{i}.npy", rng.normal(size=(32, 3)).astype(np.float32)
                )
    return root


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("pcpt-data: error: ")
    return err


def test_bad_format_and_missing_src(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _tree(tmp_path / "src")
    assert convert_cli("npy-forest", src, tmp_path / "out") == 2
    err = _one_line_error(capsys)
    assert "unknown format 'npy-forest'" in err
    assert "modelnet-off" in err
    assert convert_cli("npy-tree", tmp_path / "nowhere", tmp_path / "out") == 2
    assert "nowhere: no such file or directory" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--points", "0"), "--points must be >= 1"),
        (("--shard-size", "0"), "--shard-size must be >= 1"),
        (("--variant", "modelnet10"), "--variant does not apply to format 'npy-tree'"),
        (("--test-fraction", "0.2"), "--test-fraction does not apply"),
        (("--engine", "spark"), "--engine must be local or ray"),
        (("--ray-address", "auto"), "--ray-address needs --engine ray"),
        (("--workers", "0"), "--workers must be >= 1"),
    ],
)
def test_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    src = _tree(tmp_path / "src")
    assert convert_cli("npy-tree", src, tmp_path / "out", *args) == 2
    assert message in _one_line_error(capsys)


def test_bad_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert_cli("scanobjectnn", tmp_path, tmp_path / "out", "--variant", "hardest") == 2
    assert "--variant 'hardest' is not one of obj_bg, obj_only, pb_t50_rs" in _one_line_error(capsys)


def test_strict_fails_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _tree(tmp_path / "src")
    (src / "b" / "test" / "broken.npy").write_bytes(b"")
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out, "--strict", "--no-shuffle") == 2
    err = _one_line_error(capsys)
    assert "b/test/broken.npy: empty file (0 bytes) (rejected under --strict)" in err
    assert not (out / "manifest.json").exists()
    # without --strict the same output folder resumes and finishes, listing the file
    assert convert_cli("npy-tree", src, out, "--no-shuffle") == 0
    assert len(read_split(out, "test")) == 6


def test_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _tree(tmp_path / "src")
    (src / "a" / "train" / "nan.npy").write_bytes(b"\x93NUMPY garbage")
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out, "--json", "--shard-size", "2") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == {"train": 6, "test": 6}
    assert report["classes"] == ["a", "b"]
    assert report["num_classes"] == 2
    assert report["rejected"] == 1
    assert report["shards_written"] == 7
    assert report["shards_resumed"] == 0
    assert report["out"] == str(out)
    assert report["elapsed_s"] >= 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["format"] == "npy-tree"
    assert manifest["fps_ordered"] is True


def test_text_summary_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _tree(tmp_path / "src")
    assert convert_cli("npy-tree", src, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "train: 6 samples" in out
    assert "test: 6 samples" in out
    assert "rejected: 0" in out
    with pytest.raises(SystemExit) as exc:
        cli_main(["convert", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for fmt in (
        "npy-tree",
        "modelnet-off",
        "modelnet-resampled",
        "modelnet-h5",
        "shapenet55",
        "scanobjectnn",
        "mesh-folder",
        "kitti",
        "hf",
    ):
        assert fmt in text


def test_rerun_with_other_options_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _tree(tmp_path / "src")
    out = tmp_path / "out"
    assert convert_cli("npy-tree", src, out) == 0
    capsys.readouterr()
    assert convert_cli("npy-tree", src, out, "--points", "8") == 2
    assert "different options (points)" in _one_line_error(capsys)


def test_real_pcpt_data_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = pytest.importorskip("datapipes.cli")
    src = _tree(tmp_path / "src")
    out = tmp_path / "out"
    assert cli.main(["convert", "npy-tree", str(src), str(out), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == {"train": 6, "test": 6}
    assert cli.main(["inspect", str(out)]) == 0
    assert cli.main(["convert", "nope", str(src), str(out)]) == 2
