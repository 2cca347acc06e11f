from __future__ import annotations

import json
import sys

import pytest

from datapipes.cli import build_parser, main
from tests.cli_helpers import REPO, repo_env, run_command

SMALL = ["--classes", "3", "--per-class", "4", "--test-per-class", "2", "--points", "32", "--shard-size", "5"]


def test_synth_then_inspect(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["synth", out, *SMALL, "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert "split train: 12 samples in 3 shard(s)" in text
    assert f"wrote {out}" in text
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "OK:" in text
    assert "sphere" in text
    assert main(["inspect", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["counts"]["train"] == {"sphere": 4, "ellipsoid": 4, "cube": 4}
    assert report["source"]["seed"] == 2
    assert report["fps_ordered"] is True


def test_synth_json_and_images(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "d"), *SMALL, "--images", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fields"]["images"] == {"dtype": "png", "shape": [1]}
    assert summary["splits"]["test"] == {"samples": 6, "shards": 2}


def test_inspect_damage_exits_1_naming_the_shard(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["synth", str(out), *SMALL]) == 0
    path = out / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[1500] ^= 0x20
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 1
    assert "train-000001.tar: sha256 mismatch" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pcpt-data: error: {tmp_path / 'missing'}: no such shard folder"
    assert main(["inspect", str(tmp_path)]) == 2
    assert "manifest.json: not found" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "x"), "--classes", "40"]) == 2
    assert capsys.readouterr().err.strip() == "pcpt-data: error: --classes must be in [2, 12]"
    out = str(tmp_path / "demo")
    assert main(["synth", out, *SMALL]) == 0
    capsys.readouterr()
    assert main(["synth", out, *SMALL, "--seed", "9"]) == 2  # resume with other options is refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "different options (seed)" in err[0]


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["synth"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["synth", "x", "--points", "many"])
    assert info.value.code == 2


def test_help_lists_commands():
    text = build_parser().format_help()
    assert "synth" in text
    assert "inspect" in text


def test_console_entry_in_a_subprocess(tmp_path):
    env = repo_env()
    out = tmp_path / "demo"
    done = run_command(
        [sys.executable, "-m", "datapipes.cli", "synth", str(out), *SMALL, "--json"], cwd=REPO, env=env
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["splits"]["train"]["samples"] == 12
    bad = run_command(
        [sys.executable, "-m", "datapipes.cli", "inspect", str(tmp_path / "nope")], cwd=REPO, env=env
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr
