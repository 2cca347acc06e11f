from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from datapipes.errors import run_cli
from finetune.episodes import canonical_sha256
from finetune.fewshot_cli import add_fewshot_parser
from finetune.probe_cli import add_probe_parser
from finetune.probes import knn_probe, svm_probe
from pretrain.checkpoint import save_encoder
from pretrain.encoders import DataContract, PointViTSpec, build_encoder
from pretrain.features import extract_features
from tests.finetune.shape_shards import SHAPES, write_shape_shards

STORED_POINTS = 96
CONTRACT_POINTS = 64
CLASSES = SHAPES


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    rng = np.random.default_rng(0)
    shards = write_shape_shards(root / "shards", len(CLASSES), {"train": 8, "test": 5}, STORED_POINTS, rng)

    torch.manual_seed(0)
    encoder = build_encoder(PointViTSpec.named("tiny"))
    contract = DataContract(num_points=CONTRACT_POINTS, normalization="unit_sphere", fps_order=True)
    art = save_encoder(root / "art", encoder, data=contract, provenance={"method": "test"})
    other = save_encoder(
        root / "art_none",
        encoder,
        data=DataContract(num_points=CONTRACT_POINTS, normalization="none"),
        provenance={"method": "test"},
    )
    return {"root": root, "shards": shards, "art": art, "art_none": other, "encoder": encoder}


def parse_and_run(argv):
    parser = argparse.ArgumentParser(prog="pcpt-finetune")
    sub = parser.add_subparsers(dest="command", required=True)
    add_probe_parser(sub)
    add_fewshot_parser(sub)
    args = parser.parse_args(argv)
    assert args.func is args.handler
    return args.func(args)


def cli(argv):
    return run_cli("pcpt-finetune", parse_and_run, [str(a) for a in argv])


def run_json(capsys, argv):
    assert cli([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def direct_features(ws, split, per_class):
    from datapipes.memory import load_split_arrays

    xyz, labels, _ = load_split_arrays(ws["shards"], split, CONTRACT_POINTS)
    assert xyz.shape == (per_class * len(CLASSES), CONTRACT_POINTS, 3)
    return extract_features(ws["encoder"], xyz, batch_size=5), labels


def test_probe_svm_json_matches_library(workspace, capsys):
    ws = workspace
    report = run_json(
        capsys, ["probe", ws["art"], "--data", ws["shards"], "--c-grid", "0.1,1", "--seed", "3"]
    )
    assert report["protocol"] == "svm"
    assert report["num_points"] == CONTRACT_POINTS
    assert (report["n_train"], report["n_test"]) == (32, 20)
    assert report["n_val"] == 8  # 2 per class held out from train
    assert "hold-out of train" in report["selection"]
    assert report["feature_dim"] == 64
    train_x, train_y = direct_features(ws, "train", 8)
    test_x, test_y = direct_features(ws, "test", 5)
    want = svm_probe(train_x, train_y, test_x, test_y, c_grid=(0.1, 1.0), seed=3)
    assert report["accuracy"] == pytest.approx(want.accuracy)
    assert report["params"]["C"] == want.params["C"]


def test_probe_knn_and_human_table(workspace, capsys):
    ws = workspace
    report = run_json(capsys, ["probe", ws["art"], "--data", ws["shards"], "--method", "knn", "--k", "3"])
    train_x, train_y = direct_features(ws, "train", 8)
    test_x, test_y = direct_features(ws, "test", 5)
    assert report["accuracy"] == pytest.approx(knn_probe(train_x, train_y, test_x, test_y, k=3).accuracy)
    assert report["params"]["k"] == 3
    assert report["selection"].startswith("none")
    assert cli(["probe", ws["art"], "--data", ws["shards"], "--method", "knn"]) == 0
    out = capsys.readouterr().out
    assert "protocol" in out
    assert "test acc" in out
    assert "single pass" in out


def test_probe_num_points_override_warns(workspace, capsys):
    ws = workspace
    argv = ["probe", ws["art"], "--data", ws["shards"], "--method", "knn", "--num-points", "80", "--json"]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["num_points"] == 80
    assert any("64" in w for w in report["warnings"])
    assert "warning: data contract mismatch" in captured.err


def test_fewshot_episode_file_roundtrip(workspace, capsys, tmp_path):
    ws = workspace
    episodes = tmp_path / "eps.json"
    argv = ["fewshot", ws["art"], "--data", ws["shards"], "--way", "3", "--shot", "2", "--query", "4"]
    first = run_json(capsys, [*argv, "--folds", "3", "--seed", "5", "--write-episodes", episodes])
    assert first["protocol"] == "svm"
    assert first["folds"] == 3
    assert len(first["fold_accuracies"]) == 3
    assert first["std_kind"] == "sample (ddof=1)"
    assert first["query_split"] == "test"
    assert first["support_split"] == "train"
    data = json.loads(episodes.read_text())
    assert data["sha256"] == first["episodes_sha256"]
    assert data["dataset"]["classes"] == CLASSES
    # rerun from the file (way/shot come from it)
    second = run_json(capsys, ["fewshot", ws["art"], "--data", ws["shards"], "--episodes", episodes])
    assert second["fold_accuracies"] == first["fold_accuracies"]
    assert second["episodes_sha256"] == first["episodes_sha256"]
    assert second["warnings"] == []
    # human output
    assert cli(["fewshot", ws["art"], "--data", ws["shards"], "--episodes", episodes]) == 0
    out = capsys.readouterr().out
    assert "mean ± std" in out
    assert "fold 2" in out


def test_fewshot_query_from_train(workspace, capsys):
    ws = workspace
    argv = ["fewshot", ws["art"], "--data", ws["shards"], "--way", "2", "--shot", "3", "--query", "5"]
    report = run_json(capsys, [*argv, "--folds", "2", "--query-split", "train"])
    assert report["query_split"] == "train"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe", "{root}/missing", "--data", "{shards}"], "no such encoder artifact"),
        (["probe", "{art}", "--data", "{root}/nothing"], "no manifest.json"),
        (["probe", "{art_none}", "--data", "{shards}"], "normalization"),
        (["probe", "{art}", "--data", "{shards}", "--train-split", "val"], "no split 'val'"),
        (["probe", "{art}", "--data", "{shards}", "--num-points", "4"], "needs at least"),
        (["fewshot", "{art}", "--data", "{shards}", "--way", "5", "--shot", "1", "--query", "1"], "way=5"),
        (
            ["fewshot", "{art}", "--data", "{shards}", "--way", "2", "--shot", "9", "--query", "1"],
            "at least 9",
        ),
        (["fewshot", "{art}", "--data", "{shards}", "--way", "2"], "--way and --shot are required"),
        (["fewshot", "{art}", "--data", "{shards}", "--episodes", "{root}/none.json"], "not found"),
    ],
)
def test_user_errors_are_one_line(workspace, capsys, argv, message):
    ws = workspace
    argv = [
        a.format(root=ws["root"], shards=ws["shards"], art=ws["art"], art_none=ws["art_none"]) for a in argv
    ]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pcpt-finetune: error:")
    assert message in err
    assert "\n" not in err
    assert "Traceback" not in err


def test_tampered_episodes_are_rejected(workspace, capsys, tmp_path):
    ws = workspace
    episodes = tmp_path / "eps.json"
    argv = [
        "fewshot",
        ws["art"],
        "--data",
        ws["shards"],
        "--way",
        "2",
        "--shot",
        "2",
        "--query",
        "2",
        "--folds",
        "1",
    ]
    run_json(capsys, [*argv, "--write-episodes", episodes])
    data = json.loads(episodes.read_text())
    data["episodes"][0]["query"][0] = "test_3_04"
    episodes.write_text(json.dumps(data))
    assert cli(["fewshot", ws["art"], "--data", ws["shards"], "--episodes", episodes]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    # a consistent file whose keys are not in the data
    data["episodes"][0]["query"][0] = "test_9_99"
    data["sha256"] = canonical_sha256({k: v for k, v in data.items() if k != "sha256"})
    episodes.write_text(json.dumps(data))
    assert cli(["fewshot", ws["art"], "--data", ws["shards"], "--episodes", episodes]) == 2
    assert "is not in the 'test' split" in capsys.readouterr().err


def test_data_normalization_from_manifest():
    from finetune.data import manifest_normalization as _data_normalization

    assert _data_normalization({"source": {"normalization": "unit_sphere"}}) == "unit_sphere"
    assert _data_normalization({"source": {"normalize": True}}) == "unit_sphere"
    assert _data_normalization({"source": {"normalize": False}}) == "none"
    assert _data_normalization({"normalization": "none", "source": {"normalize": True}}) == "none"
    assert _data_normalization({"source": {}}) is None
