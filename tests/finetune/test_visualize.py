"""``pcpt-finetune visualize``: PNGs through the CLI, and the data each figure is drawn from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from datapipes.errors import UserError  # noqa: E402
from finetune.cli import main as finetune_main  # noqa: E402
from finetune.visualize_data import (  # noqa: E402
    collect_results,
    find_log_sources,
    group_results,
    per_class_subset,
    project_2d,
    read_csv_metrics,
)
from finetune.visualize_recon import (  # noqa: E402
    load_masked_model,
    place_patches,
    reconstruct,
    sample_panels,
    sub_cell_points,
)
from pretrain.checkpoint import CKPT_META_KEY, lightning_ckpt_meta, save_encoder  # noqa: E402
from pretrain.cli import main as pretrain_main  # noqa: E402
from pretrain.encoders import DataContract, PointViTSpec, build_encoder  # noqa: E402
from pretrain.methods.geomae import GeoMAE  # noqa: E402
from pretrain.ops.geometric_targets import patch_targets  # noqa: E402
from tests.cli_helpers import REPO  # noqa: E402
from tests.finetune.shape_shards import write_shape_shards  # noqa: E402

POINTS = 64
TINY_FIT = [
    "-c", str(REPO / "configs" / "pretrain" / "point_mae_tiny.yaml"),
    "--model.init_args.encoder.embed_dim=32",
    "--model.init_args.encoder.depth=2",
    "--model.init_args.encoder.num_heads=2",
    "--model.init_args.encoder.num_groups=8",
    "--model.init_args.encoder.group_size=8",
    "--model.init_args.encoder.tokenizer_dim=32",
    "--model.init_args.decoder_depth=1",
    f"--data.num_points={POINTS}",
    "--data.batch_size=4",
    "--data.num_workers=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.max_epochs=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shape shards, a tiny Point-MAE run through the real CLI (default logger), its artifact."""
    root = tmp_path_factory.mktemp("visualize")
    shards = write_shape_shards(root / "shards", 4, {"train": 4, "test": 3}, POINTS, np.random.default_rng(0))
    run = root / "run"
    status = pretrain_main(
        ["fit", *TINY_FIT, f"--data.data_root={shards}", f"--trainer.default_root_dir={run}",
         "--trainer.logger=null", "--trainer.log_every_n_steps=1", f"--export_dir={root / 'art'}"]
    )  # fmt: skip
    assert status == 0
    return {"root": root, "shards": shards, "run": run, "art": root / "art"}


def run_cli(argv: list[object], capsys: pytest.CaptureFixture[str]) -> dict:
    assert finetune_main([*(str(a) for a in argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def check_png(path: Path, *, min_colors: int = 3) -> tuple[int, int]:
    """A readable PNG, not blank: several distinct colours, many non-white pixels."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.load()
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape[0] >= 200
    assert rgb.shape[1] >= 200
    colors = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colors) >= min_colors, len(colors)
    assert (rgb.min(axis=2) < 200).mean() > 0.002  # something drawn
    return rgb.shape[1], rgb.shape[0]


def has_color(path: Path, rgb_value: tuple[int, int, int], tol: int = 30) -> bool:
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    return bool((np.abs(rgb - np.asarray(rgb_value)).max(axis=2) < tol).any())


# ---------------------------------------------------------------------------------------- reconstruction


def test_reconstruction_png_from_real_run_checkpoint(ws, tmp_path, capsys):
    ckpt = ws["run"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    out = tmp_path / "rec.png"
    summary = run_cli(
        ["visualize", "reconstruction", ckpt, "--data", ws["shards"], "--samples", "2", "--out", out], capsys
    )
    assert summary["method"] == "PointMAE"
    assert (summary["masked_patches"], summary["patches"]) == (4, 8)  # int(0.6 * 8)
    assert len(summary["keys"]) == 2
    assert all(k.startswith("test_") for k in summary["keys"])
    width, height = check_png(out)
    assert width > height  # three columns side by side, two rows
    assert has_color(out, (214, 39, 40))  # tab:red, the predicted points
    assert has_color(out, (31, 119, 180))  # tab:blue, the visible points


def test_reconstruction_of_an_artifact_says_the_decoder_is_missing(ws, tmp_path, capsys):
    status = finetune_main(
        [
            "visualize",
            "reconstruction",
            str(ws["art"]),
            "--data",
            str(ws["shards"]),
            "--out",
            str(tmp_path / "a.png"),
        ]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "encoder only" in err
    assert "checkpoints/last.ckpt" in err
    assert not (tmp_path / "a.png").exists()


def test_rebuilt_point_mae_matches_the_method(ws):
    """The checkpoint rebuild reproduces PointMAE.reconstruct and places predictions at the masked centres."""
    from pretrain.methods.point_mae import PointMAE

    ckpt_path = ws["run"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    hp["encoder"] = ckpt[CKPT_META_KEY]["spec"]
    method = PointMAE(**hp)
    method.load_state_dict(ckpt["state_dict"])
    method.eval()

    model = load_masked_model(ckpt_path)
    clouds = np.stack([np.random.default_rng(i).normal(size=(POINTS, 3)) for i in range(3)]).astype(
        np.float32
    )
    rec = reconstruct(model, clouds, seed=5)
    assert rec.mask.shape == (3, 8)
    assert (rec.mask.sum(axis=1) == 4).all()
    with torch.no_grad():
        groups = method.encoder.group(torch.from_numpy(clouds))
        mask = torch.from_numpy(rec.mask)
        prediction, target = method.reconstruct(groups, mask)
    expected = place_patches(
        groups.centers[mask].reshape(3, -1, 3).numpy().reshape(-1, 3),
        prediction.numpy().reshape(-1, 8, 3),
    ).reshape(rec.predicted.shape)
    np.testing.assert_allclose(rec.predicted, expected, atol=1e-5)
    # the true masked patches, placed at their centres, are points of the input cloud
    panels = sample_panels(rec, 1)
    truth = place_patches(rec.centers[1][rec.mask[1]], target[1].numpy())
    np.testing.assert_allclose(panels["masked_truth"], truth.reshape(-1, 3), atol=1e-5)
    dist = np.linalg.norm(panels["masked_truth"][:, None] - clouds[1][None], axis=2).min(axis=1)
    assert dist.max() < 1e-5
    assert panels["visible"].shape == (4 * 8, 3)
    assert panels["reconstruction"].shape == (8 * 8, 3)  # visible + predicted
    np.testing.assert_array_equal(panels["ground_truth"], clouds[1])


def test_place_patches_and_sub_cell_points_invert_the_targets():
    centers = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    rel = np.arange(2 * 4 * 3, dtype=np.float64).reshape(2, 4, 3) / 10
    placed = place_patches(centers, rel)
    np.testing.assert_allclose(placed[1, 2], centers[1] + rel[1, 2])

    # a patch whose points are the centroids of distinct sub-cells comes back exactly from its targets
    sub = 2
    rng = np.random.default_rng(0)
    pts = torch.from_numpy(rng.uniform(-0.2, 0.2, size=(1, 1, 16, 3)))
    center = torch.tensor([[[0.5, -0.3, 0.1]]], dtype=torch.float64)
    targets = patch_targets(pts, center, sub=sub)
    half = pts.abs().amax().item()
    back = sub_cell_points(center[0].numpy(), np.array([half]), targets.sub_centroid[0].numpy(), sub)
    occupied = targets.sub_occupancy[0, 0].numpy()
    u = (pts[0, 0].numpy() + half) / (2 * half)
    idx = np.clip(np.floor(u * sub), 0, sub - 1).astype(int)
    slot = (idx[:, 2] * sub + idx[:, 1]) * sub + idx[:, 0]
    for s in np.flatnonzero(occupied):
        expected = center[0, 0].numpy() + pts[0, 0].numpy()[slot == s].mean(axis=0)
        np.testing.assert_allclose(back[0, s], expected, atol=1e-5)


def write_geomae_ckpt(path: Path, *, chamfer: bool = False) -> GeoMAE:
    """A GeoMAE checkpoint laid out as LightningCLI writes it (plain-data hyperparameters, pcpt metadata)."""
    torch.manual_seed(0)
    spec = PointViTSpec.named("tiny")
    hp = {"mask_ratio": 0.5, "mask_type": "rand", "decoder_depth": 1, "decoder_num_heads": None,
          "sub_cells": 2, "chamfer_weight": 1.0 if chamfer else 0.0}  # fmt: skip
    model = GeoMAE(spec, **hp)
    meta = lightning_ckpt_meta(
        method="GeoMAE",
        module=model.encoder,
        prefix="encoder.",
        data_contract=DataContract(num_points=POINTS, normalization="unit_sphere", fps_order=True),
    )
    hparams = {
        "_class_path": "pretrain.methods.geomae.GeoMAE",
        "encoder": {"init_args": spec.to_dict()},
        **hp,
    }
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": hparams,
        "global_step": 7,
        CKPT_META_KEY: meta,
    }
    torch.save(ckpt, path)
    return model.eval()


@pytest.mark.parametrize("chamfer", [False, True])
def test_geomae_reconstruction_uses_its_heads(ws, tmp_path, capsys, chamfer):
    ckpt = tmp_path / "geomae.ckpt"
    method = write_geomae_ckpt(ckpt, chamfer=chamfer)
    model = load_masked_model(ckpt)
    assert (model.method, model.sub_cells, model.step) == ("GeoMAE", 2, 7)
    clouds = np.random.default_rng(1).normal(size=(2, POINTS, 3)).astype(np.float32)
    rec = reconstruct(model, clouds, seed=0)
    mask = torch.from_numpy(rec.mask)
    with torch.no_grad():
        groups, tokens = method.encoder.tokenize(torch.from_numpy(clouds))
        visible = method.encoder(tokens, groups.centers, keep=~mask).tokens
        mc = groups.centers[mask].reshape(2, -1, 3)
        features = method.decoder.decode(visible, groups.centers[~mask].reshape(2, -1, 3), mc)
        out = {name: head(features) for name, head in method.heads.items()}
    if chamfer:
        rel = out["chamfer"].reshape(2, -1, method.encoder.spec.group_size, 3)
        np.testing.assert_allclose(rec.predicted, (mc[:, :, None] + rel).numpy(), atol=1e-5)
        assert rec.valid.all()
    else:
        logits = out["occupancy"].reshape(2, -1, 8, 2)
        np.testing.assert_array_equal(rec.valid, (logits[..., 1] > logits[..., 0]).numpy())
        assert rec.predicted.shape == (2, rec.mask.sum() // 2, 8, 3)
    png = tmp_path / "geo.png"
    summary = run_cli(["visualize", "reconstruction", ckpt, "--data", ws["shards"], "--keys",
                       "test_1_00,test_3_02", "--out", png], capsys)  # fmt: skip
    assert summary["keys"] == ["test_1_00", "test_3_02"]
    check_png(png)


# --------------------------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embedding_png(ws, tmp_path, capsys, method):
    out = tmp_path / f"{method}.png"
    summary = run_cli(
        ["visualize", "embedding", ws["art"], "--data", ws["shards"], "--method", method, "--out", out],
        capsys,
    )
    assert (summary["samples"], summary["classes"]) == (12, 4)
    check_png(out, min_colors=8)  # four class colours, plus text and antialiasing


def test_project_2d_and_subset():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (20, 6)), rng.normal(8, 1, (20, 6))])
    coords = project_2d(x, "pca")
    assert coords.shape == (40, 2)
    assert coords.dtype == np.float32
    # the first component separates the two clusters
    assert (np.sign(coords[:20, 0]) != np.sign(coords[20:, 0])).all() or abs(
        coords[:20, 0].mean() - coords[20:, 0].mean()
    ) > 3
    tsne = project_2d(x, "tsne", seed=1)
    assert tsne.shape == (40, 2)
    assert np.isfinite(tsne).all()
    labels = np.repeat(np.arange(4), [10, 5, 30, 2])
    idx = per_class_subset(labels, 8, seed=0)
    assert (np.diff(idx) > 0).all()
    assert np.bincount(labels[idx], minlength=4).tolist() == [2, 2, 2, 2]
    np.testing.assert_array_equal(per_class_subset(labels, None), np.arange(labels.size))
    with pytest.raises(ValueError, match="tsne"):
        project_2d(x, "umap")


# ------------------------------------------------------------------------------------------------ curves


def test_default_logger_and_curves_png(ws, tmp_path, capsys):
    """The run configured with no logger logged to TensorBoard if installed, else CSV; curves draw it."""
    from finetune.visualize_data import read_tensorboard_metrics, tensorboard_available

    sources = find_log_sources(ws["run"])
    version = ws["run"] / "lightning_logs" / "version_0"
    if tensorboard_available():
        assert (sources.csv, sources.tensorboard) == ([], [version])
        series = read_tensorboard_metrics(version)
    else:
        assert (sources.csv, sources.tensorboard) == ([version / "metrics.csv"], [])
        series = read_csv_metrics(sources.csv[0])
    steps, values = series["train/loss"]
    assert steps.tolist() == list(range(2 * 4))  # log_every_n_steps=1; 16 train clouds / batch 4, 2 epochs
    assert np.isfinite(values).all()
    assert "epoch" not in series
    out = tmp_path / "curves.png"
    summary = run_cli(["visualize", "curves", ws["run"], "--out", out], capsys)
    assert "train/loss" in summary["metrics"]
    check_png(out)


def test_read_tensorboard_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from finetune.visualize_data import read_tensorboard_metrics

    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in (3, 1, 2):
        writer.add_scalar("train/loss", 10.0 * step, step)
    writer.add_scalar("val/acc", 0.5, 2)
    writer.close()
    series = read_tensorboard_metrics(tmp_path / "tb")
    assert sorted(series) == ["train/loss", "val/acc"]
    np.testing.assert_array_equal(series["train/loss"][0], [1, 2, 3])
    np.testing.assert_allclose(series["train/loss"][1], [10.0, 20.0, 30.0])
    assert find_log_sources(tmp_path).tensorboard == [tmp_path / "tb"]


def test_logger_false_keeps_no_logs(ws, tmp_path, capsys):
    run = tmp_path / "quiet"
    assert pretrain_main(
        ["fit", *TINY_FIT, f"--data.data_root={ws['shards']}", f"--trainer.default_root_dir={run}",
         "--trainer.max_epochs=1", f"--export_dir={tmp_path / 'art'}"]
    ) == 0  # fmt: skip
    assert not (run / "lightning_logs").exists()
    assert find_log_sources(run).csv == []
    capsys.readouterr()
    assert finetune_main(["visualize", "curves", str(run), "--out", str(tmp_path / "c.png")]) == 2
    assert "logger: false" in capsys.readouterr().err


def test_read_csv_metrics_columns(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss,val/acc\n0,4,1.5,\n0,9,1.25,\n0,9,,0.5\n1,14,1.0,\n1,19,,0.75\n1,19,nan,\n"
    )
    series = read_csv_metrics(path)
    assert sorted(series) == ["train/loss", "val/acc"]
    np.testing.assert_array_equal(series["train/loss"][0], [4, 9, 14])
    np.testing.assert_array_equal(series["train/loss"][1], [1.5, 1.25, 1.0])
    np.testing.assert_array_equal(series["val/acc"][0], [9, 19])
    np.testing.assert_array_equal(series["val/acc"][1], [0.5, 0.75])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_csv_metrics(tmp_path / "empty.csv")


# ----------------------------------------------------------------------------------------------- results


def make_results(tmp_path: Path) -> tuple[Path, Path]:
    encoder = build_encoder(PointViTSpec.named("tiny"))
    art = save_encoder(
        tmp_path / "mae", encoder, data=DataContract(num_points=64), provenance={"method": "t"}
    )
    meta = json.loads((art / "encoder.json").read_text())
    meta["evaluations"] = [
        {"command": "probe", "protocol": "svm", "test_split": "test", "accuracy": 0.5, "data": "d",
         "date": "2026-01-01T00:00:00+00:00"},
        {"command": "probe", "protocol": "svm", "test_split": "test", "accuracy": 0.75, "data": "d",
         "date": "2026-02-01T00:00:00+00:00"},  # a later re-run replaces the first
        {"command": "fewshot", "protocol": "svm", "way": 5, "shot": 10, "folds": 4, "mean": 0.8,
         "std": 0.1, "data": "d", "date": "2026-01-01T00:00:00+00:00"},
    ]  # fmt: skip
    (art / "encoder.json").write_text(json.dumps(meta))
    report = tmp_path / "fs_other.json"
    report.write_text(json.dumps(
        {"command": "fewshot", "artifact": "runs/other", "protocol": "svm", "way": 5, "shot": 10, "folds": 4,
         "mean": 0.6, "std": 0.05, "fold_accuracies": [0.55, 0.6, 0.6, 0.65], "data": "d"}
    ))  # fmt: skip
    return art, report


def test_results_rows_and_png(tmp_path, capsys):
    art, report = make_results(tmp_path)
    groups = group_results(collect_results([art, report]))
    assert list(groups) == ["probe svm (test)", "fewshot svm 5-way 10-shot"]
    [probe] = groups["probe svm (test)"]
    assert (probe.label, probe.mean, probe.std, probe.folds) == ("mae", 75.0, 0.0, 1)
    fewshot = groups["fewshot svm 5-way 10-shot"]
    assert [(r.label, r.mean, r.std, r.folds) for r in fewshot] == [
        ("mae", 80.0, pytest.approx(10.0), 4),
        ("other", 60.0, pytest.approx(5.0), 4),
    ]
    out = tmp_path / "results.png"
    summary = run_cli(["visualize", "results", art, report, "--out", out], capsys)
    assert summary["panels"]["fewshot svm 5-way 10-shot"][1]["mean"] == 60.0
    check_png(out, min_colors=6)


def test_results_from_different_data_get_separate_panels(tmp_path):
    _, report = make_results(tmp_path)
    other = tmp_path / "fs_b.json"
    other.write_text(report.read_text().replace('"data": "d"', '"data": "/x/scanobjectnn"'))
    groups = group_results(collect_results([report, other]))
    assert sorted(groups) == ["fewshot svm 5-way 10-shot [d]", "fewshot svm 5-way 10-shot [scanobjectnn]"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["results", "{tmp}/nope.json", "--out", "{tmp}/r.png"], "no such artifact folder or JSON"),
        (["results", "{tmp}/bad.json", "--out", "{tmp}/r.png"], "neither an artifact"),
        (["curves", "{tmp}/norun", "--out", "{tmp}/c.png"], "no such run folder"),
        (["curves", "{tmp}", "--out", "{tmp}/c.jpg"], ".png"),
        (["reconstruction", "{tmp}/x.ckpt", "--data", "{tmp}", "--out", "{tmp}/r.png"], "no such checkpoint"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, needle):
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    status = finetune_main(["visualize", *(a.format(tmp=tmp_path) for a in argv)])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("pcpt-finetune: error: "), err
    assert needle in err[0], err


def test_help_names_the_checkpoint(capsys):
    assert finetune_main(["visualize", "reconstruction", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "checkpoints/last.ckpt" in text
    assert "encoder artifact" in text
