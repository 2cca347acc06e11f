"""``pcpt-finetune probe`` and ``fewshot`` record their results in the artifact (encoder.json and card)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.cli import main as finetune_main
from pretrain import artifact_files
from pretrain.artifacts import load_encoder, read_artifact_meta, save_module_artifact
from pretrain.encoders import DataContract, PointViTSpec, build_encoder
from pretrain.model_card import CARD_FILE, render_model_card
from pretrain.provenance import git_sha
from tests.finetune.shape_shards import write_shape_shards

POINTS = 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("record")
    rng = np.random.default_rng(0)
    shards = write_shape_shards(root / "shards", 3, {"train": 6, "test": 4}, POINTS, rng)
    torch.manual_seed(0)
    encoder = build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8))
    contract = DataContract(num_points=POINTS, normalization="unit_sphere", fps_order=True)
    art = save_module_artifact(root / "art", encoder, data=contract, provenance={"method": "PointMAE"})
    return {"shards": shards, "art": art}


@pytest.fixture
def art(prepared: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the artifact per test (recording changes it)."""
    return Path(shutil.copytree(prepared["art"], tmp_path / "enc"))


def _run(argv: list[object]) -> int:
    return finetune_main([str(a) for a in argv])


def _probe(art: Path, shards: Path, *extra: str) -> list[object]:
    return ["probe", art, "--data", shards, "--method", "knn", "--k", "3", "--json", *extra]


def _fewshot(art: Path, shards: Path, *extra: str) -> list[object]:
    counts = ["--way", "2", "--shot", "2", "--query", "2", "--folds", "3"]
    return ["fewshot", art, "--data", shards, *counts, "--json", *extra]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_probe_and_fewshot_record_their_numbers(
    prepared: dict[str, Path], art: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = prepared["shards"]
    weights = _sha(art / "encoder.safetensors")
    assert _run(_probe(art, shards)) == 0
    probe_out = capsys.readouterr()
    probe = json.loads(probe_out.out)
    assert "recorded the result" in probe_out.err
    assert _run(_fewshot(art, shards)) == 0
    fewshot = json.loads(capsys.readouterr().out)

    meta = read_artifact_meta(art)
    first, second = meta["evaluations"]
    for entry, report in ((first, probe), (second, fewshot)):
        assert entry["command"] == report["command"]
        assert entry["protocol"] == report["protocol"]
        assert entry["manifest_sha256"] == report["manifest_sha256"]
        assert entry["num_points"] == report["num_points"] == POINTS
        assert entry["data"] == str(shards)
        assert entry["git_sha"] == git_sha()
        when = datetime.datetime.fromisoformat(entry["date"])
        assert abs(datetime.datetime.now(datetime.timezone.utc) - when) < datetime.timedelta(minutes=10)
    assert (first["accuracy"], first["test_split"], first["train_split"]) == (
        probe["accuracy"],
        "test",
        "train",
    )
    assert first["params"] == probe["params"]
    for key in ("mean", "std", "folds", "way", "shot", "episodes_sha256", "fold_accuracies", "summary"):
        assert second[key] == fewshot[key], key
    assert second["std"] is not None

    card = (art / CARD_FILE).read_text()
    assert card == render_model_card(meta, folder="enc")
    assert f"test accuracy **{100 * probe['accuracy']:.2f} %**" in card
    assert f"**{fewshot['summary']} %** over 3 folds" in card
    assert f"`{fewshot['episodes_sha256']}`" in card
    assert f"`{probe['manifest_sha256']}`" in card
    assert _sha(art / "encoder.safetensors") == weights  # the weights are never rewritten
    load_encoder(art)


def test_no_record_records_nothing_and_the_output_is_the_same(
    prepared: dict[str, Path], art: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = prepared["shards"]
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    outputs = []
    for argv in (_probe(art, shards), _fewshot(art, shards)):
        assert _run([*argv, "--no-record"]) == 0
        captured = capsys.readouterr()
        assert "record" not in captured.err
        outputs.append(captured.out)
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before

    for argv, unrecorded in zip((_probe(art, shards), _fewshot(art, shards)), outputs):
        assert _run(argv) == 0
        assert capsys.readouterr().out == unrecorded  # recording leaves the printed JSON as it was
    assert len(read_artifact_meta(art)["evaluations"]) == 2


def test_a_read_only_artifact_still_gets_its_result_printed(
    prepared: dict[str, Path],
    art: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    if os.geteuid() == 0:  # root writes anywhere: refuse the writes the way the kernel does for others

        def refused(path: Path, text: str) -> None:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(artifact_files, "_write_synced", refused)
    for path in art.iterdir():
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    art.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        assert _run(_probe(art, prepared["shards"])) == 0
        captured = capsys.readouterr()
    finally:
        art.chmod(stat.S_IRWXU)
    report = json.loads(captured.out)
    assert 0.0 <= report["accuracy"] <= 1.0
    assert "pcpt-finetune: note: the result was not recorded" in captured.err
    assert "error" not in captured.err
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
