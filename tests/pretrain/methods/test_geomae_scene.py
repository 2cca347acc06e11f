"""Scene-level GeoMAE: loss on masked pillars, batches of very different scans, CLI fit, export and embed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datapipes.cli import main as data_main
from finetune.cli import main as finetune_main
from pretrain.cli import main as pretrain_main
from pretrain.losses import masked_mse
from pretrain.methods.geomae_scene import GeoMAEScene
from pretrain.ops.masking import random_segment_mask
from pretrain.scene_encoder import SceneEncoderSpec, load_scene_encoder
from tests.pretrain.methods.tiny_cli import config
from tests.scene_data import synthetic_scan, write_las_scans


def tiny_model(**kwargs: object) -> GeoMAEScene:
    torch.manual_seed(0)
    options: dict[str, object] = {"decoder_depth": 1, "lr_scheduler": None, **kwargs}
    return GeoMAEScene(SceneEncoderSpec.named("tiny"), **options)  # type: ignore[arg-type]


def scene_batch(counts: list[int], seed: int = 0) -> SimpleNamespace:
    """A padded batch of synthetic scans with ``counts`` points each (NaN padding), intensity channel."""
    rng = np.random.default_rng(seed)
    width = max(counts)
    points = torch.full((len(counts), width, 3), float("nan"))
    feats = torch.full((len(counts), width, 1), float("nan"))
    for i, count in enumerate(counts):
        xyz, intensity = synthetic_scan(rng, count)
        points[i, :count] = torch.from_numpy(xyz).float()
        feats[i, :count, 0] = torch.from_numpy(intensity / 65535.0).float()
    lengths = torch.tensor(counts)
    return SimpleNamespace(
        points=points,
        feats=feats,
        feat_names=("intensity",),
        mask=lambda: torch.arange(width)[None] < lengths[:, None],
        __len__=lambda: len(counts),
    )


def test_loss_scores_the_masked_pillars_of_scans_of_very_different_sizes() -> None:
    model = tiny_model(scene_augment=False).eval()
    batch = scene_batch([40, 6000])
    points, valid, feats = model.scene_inputs(batch)
    pillars, tokens = model.encoder.embed(points, valid, feats)
    per_scan = torch.bincount(pillars.coords[:, 0], minlength=2)
    assert per_scan[0] < 40 < per_scan[1]  # very different pillar counts in one batch
    target = model.targets(points, pillars)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        terms = model.loss_terms(batch, torch.Generator().manual_seed(5), augment=False)
        masked = random_segment_mask(pillars.coords[:, 0], 0.7, num_segments=2, generator=generator)
        assert torch.equal(
            torch.bincount(pillars.coords[masked, 0], minlength=2), (per_scan * 0.7).floor().long()
        )
        visible = model.encoder(tokens, pillars.coords, keep=~masked)
        full = model.mask_token.expand(tokens.shape[0], -1).clone()
        full[~masked] = visible
        features = model.decoders["normal"](full, pillars.coords)[masked]
        expected = masked_mse(model.heads["normal"](features), target.normal[masked])
    torch.testing.assert_close(terms["normal"], expected)
    assert set(terms) == set(model.loss_weights)
    assert all(bool(torch.isfinite(v)) for v in terms.values())


def test_training_step_reaches_every_parameter_and_weights_sum() -> None:
    model = tiny_model(curvature_weight=0.0)
    terms = model.loss_terms(scene_batch([800, 2500], seed=1), torch.Generator().manual_seed(0), augment=True)
    total = model.total_loss(terms)
    torch.testing.assert_close(total, sum(model.loss_weights[k] * v for k, v in terms.items()))
    total.backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None and not n.startswith("heads.curvature")
    ]
    assert not missing
    assert float(model.heads["curvature"].weight.grad.abs().sum()) == 0.0  # weight 0: the official loss


def test_missing_channels_and_empty_range_are_clear_errors() -> None:
    model = tiny_model()
    batch = scene_batch([100, 100])
    batch.feat_names = ("time",)
    with pytest.raises(ValueError, match="point_features: \\['intensity'\\]"):
        model.loss_terms(batch, torch.Generator(), augment=False)
    far = scene_batch([100, 100])
    far.points = far.points + 1000.0
    with pytest.raises(ValueError, match="point_range"):
        model.loss_terms(far, torch.Generator(), augment=False)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"mask_ratio": 0.0}, "mask_ratio"), ({"low_ratio": (4, 4)}, "low_ratio")]
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_model(**kwargs)


TINY_SCENE = [
    *config("geomae_scene_tiny.yaml"),
    "--model.init_args.encoder.point_range=[-6.4, -6.4, -2.0, 6.4, 6.4, 2.0]",
    "--model.init_args.encoder.window=[4, 4]",
    "--model.init_args.encoder.group_size=16",
    "--model.init_args.encoder.buckets=[8, 16]",
    "--model.init_args.decoder_depth=1",
    "--data.num_workers=0",
    "--trainer.enable_progress_bar=false",
]


def test_las_to_scene_pretraining_to_embed_through_the_clis(tmp_path: Path) -> None:
    scans = write_las_scans(tmp_path / "las", 4, points=600, laz=True)
    shards = tmp_path / "shards"
    assert data_main(["convert", "las", str(tmp_path / "las"), str(shards)]) == 0
    art = tmp_path / "art"
    args = [*TINY_SCENE, f"--data.data_root={shards}", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2", f"--export_dir={art}",
            # a logger merges the model's and the data module's hyperparameters: their names must not clash
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path / 'logs'}"]  # fmt: skip
    assert pretrain_main(["fit", *args]) == 0
    encoder, meta = load_scene_encoder(art)
    assert meta["kind"] == "scene_encoder"
    assert meta["provenance"]["method"] == "GeoMAEScene"
    assert meta["provenance"]["step"] == 2
    assert meta["data_contract"]["normalization"] == "none"
    assert meta["data_contract"]["channels"] == ["x", "y", "z", "intensity"]
    (ckpt,) = (tmp_path / "logs").rglob("last.ckpt")
    assert pretrain_main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    exported, _ = load_scene_encoder(tmp_path / "exported")
    for (key, a), (_, b) in zip(encoder.state_dict().items(), exported.state_dict().items()):
        torch.testing.assert_close(a, b, msg=key)

    out = tmp_path / "pillars.npz"
    assert finetune_main(["embed", str(art), "--input", str(scans[1]), "--out", str(out), "--quiet"]) == 0
    with np.load(out) as features:
        assert set(features.files) == {"features", "cells", "centers"}
        num_pillars = features["features"].shape[0]
        assert features["features"].shape == (num_pillars, encoder.spec.embed_dim)
        assert features["cells"].shape == (num_pillars, 2)
        assert features["centers"].shape == (num_pillars, 2)
        assert np.isfinite(features["features"]).all()
        assert len(np.unique(features["cells"], axis=0)) == num_pillars  # one row per non-empty pillar
    # the same scan as .npy (x, y, z, intensity) gives the same features
    import laspy

    las = laspy.read(scans[1])
    array = np.column_stack([las.x, las.y, las.z, np.asarray(las.intensity) / 65535.0]).astype(np.float32)
    np.save(tmp_path / "scan.npy", array)
    out2 = tmp_path / "pillars2.npz"
    assert (
        finetune_main(
            [
                "embed",
                str(art),
                "--input",
                str(tmp_path / "scan.npy"),
                "--out",
                str(out2),
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    with np.load(out) as a, np.load(out2) as b:
        np.testing.assert_allclose(a["features"], b["features"], atol=1e-5)


def test_embed_names_a_scan_with_the_wrong_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pretrain.artifacts import save_module_artifact
    from pretrain.encoders import DataContract
    from pretrain.scene_encoder import PillarSceneEncoder

    art = save_module_artifact(
        tmp_path / "art",
        PillarSceneEncoder(SceneEncoderSpec.named("tiny")),
        data=DataContract(),
        provenance={},
    )
    np.save(tmp_path / "scan.npy", np.zeros((10, 3), np.float32))
    status = finetune_main(
        ["embed", str(art), "--input", str(tmp_path / "scan.npy"), "--out", str(tmp_path / "o.npz")]
    )
    assert status != 0
    err = capsys.readouterr().err
    assert "scan.npy" in err
    assert "(N, 4)" in err


@pytest.mark.ddp
def test_two_process_gloo_ddp_on_scans_of_different_sizes(tmp_path: Path) -> None:
    """Two CPU ranks (in-memory data): disjoint scans of different pillar counts, identical weights."""
    from tests.pretrain.methods.tiny_cli import fit_two_ranks

    write_las_scans(tmp_path / "las", 8, points=300)
    shards = tmp_path / "shards"
    assert data_main(["convert", "las", str(tmp_path / "las"), str(shards), "--shard-size", "2"]) == 0
    record = tmp_path / "record"
    args = [
        *TINY_SCENE,
        f"--data.data_root={shards}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--data.streaming=false",
    ]
    ranks = fit_two_ranks(args, callback="tests.pretrain.methods.record_callback.RecordRank", record=record)
    # 8 scans / (batch 2 x 2 ranks) = 2 batches per rank
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2
    keys = [{key for batch in r["keys"] for key in batch} for r in ranks]
    assert not keys[0] & keys[1]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    _, meta = load_scene_encoder(tmp_path / "encoder")
    assert meta["provenance"]["step"] == 2
