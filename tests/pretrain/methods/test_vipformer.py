"""ViPFormer: the loss terms, the image views, the CLI (fit, export, the chain from a Point-MAE artifact)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datapipes.synthetic import write_synthetic
from pretrain.artifacts import load_image_encoder
from pretrain.checkpoint import load_encoder, read_artifact_meta
from pretrain.cli import main as pretrain_main
from pretrain.contrastive_monitor import ContrastiveMonitor, retrieval_top1
from pretrain.encoders import PointViT, ViPFormerImageSpec, ViPFormerPointEncoder, ViPFormerPointSpec
from pretrain.methods.vipformer import ViPFormer
from pretrain.ops.contrastive import nt_xent
from tests.pretrain.methods.tiny_cli import RUNTIME, config, fit_two_ranks, tiny_encoder

POINT = ViPFormerPointSpec(embed_dim=32, num_latents=8, group_size=8, num_sa_layers=1, num_heads=2)
IMAGE = ViPFormerImageSpec(image_size=24, patch_size=12, embed_dim=32, num_sa_layers=1, num_heads=2)

#: the tiny config at test size: 8 latents of 8 points, 24-pixel images of 4 patches, 32 wide.
TINY = [
    *config("vipformer_tiny.yaml"),
    "--model.init_args.encoder.embed_dim=32",
    "--model.init_args.encoder.num_latents=8",
    "--model.init_args.encoder.group_size=8",
    "--model.init_args.encoder.num_sa_layers=1",
    "--model.init_args.encoder.num_heads=2",
    "--model.init_args.image_encoder.image_size=24",
    "--model.init_args.image_encoder.embed_dim=32",
    "--model.init_args.image_encoder.num_sa_layers=1",
    "--model.init_args.image_encoder.num_heads=2",
    *RUNTIME,
]


def _batch(size: int = 6, views: int = 2) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        points=torch.rand(size, 64, 3, generator=gen) * 2 - 1,
        images=torch.rand(size, views, 3, 32, 32, generator=gen),
    )


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 training and 8 test clouds of 96 points with one 32-pixel rendered view each."""
    root = tmp_path_factory.mktemp("demo_images")
    write_synthetic(root, classes=4, per_class=8, test_per_class=2, points=96, shard_size=8, images=True)
    return root


def test_terms_are_nt_xent_of_the_views_and_train_every_part() -> None:
    module = ViPFormer(POINT, IMAGE, temperature=0.2, cmid_weight=0.5)
    batch = _batch()
    terms = module.loss_terms(batch, torch.Generator().manual_seed(1))
    assert set(terms) == {"imid", "cmid"}
    loss = module.total_loss(terms)
    torch.testing.assert_close(loss, terms["imid"] + 0.5 * terms["cmid"])
    loss.backward()
    for part in (module.encoder, module.image_encoder, module.point_head, module.image_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    # without augmentation the views are the cloud itself: IMID is NT-Xent of two identical embeddings
    module.eval()
    clean = module.loss_terms(batch, torch.Generator().manual_seed(1), augment=False)
    z = module.point_embeddings(batch.points, torch.Generator().manual_seed(1))
    torch.testing.assert_close(clean["imid"], nt_xent(z, z, temperature=0.2))


def test_terms_are_deterministic_under_a_seeded_generator() -> None:
    module = ViPFormer(POINT, IMAGE).eval()
    a = module.loss_terms(_batch(), torch.Generator().manual_seed(3))
    b = module.loss_terms(_batch(), torch.Generator().manual_seed(3))
    c = module.loss_terms(_batch(), torch.Generator().manual_seed(4))
    assert torch.equal(a["cmid"], b["cmid"])
    assert not torch.equal(a["cmid"], c["cmid"])


def test_intra_modal_only_needs_no_images_and_a_missing_image_is_a_clear_error() -> None:
    points_only = SimpleNamespace(points=torch.rand(4, 64, 3))
    intra = ViPFormer(POINT, IMAGE, cmid_weight=0.0)
    terms = intra.loss_terms(points_only, torch.Generator())
    assert set(terms) == {"imid"}
    assert intra.image_encoder is None  # nothing untrained is built, handed to DDP or exported
    assert intra.companions() == {}
    with pytest.raises(ValueError, match="image views"):
        ViPFormer(POINT, IMAGE).loss_terms(points_only, torch.Generator())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoder": None}, "init_from"),
        ({"temperature": 0.0}, "temperature"),
        ({"imid_weight": -1.0}, ">= 0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args = {"encoder": POINT, "image_encoder": IMAGE, **kwargs}
    with pytest.raises(ValueError, match=match):
        ViPFormer(**args)  # type: ignore[arg-type]


def test_retrieval_top1_closed_form() -> None:
    gallery = torch.eye(4)
    assert retrieval_top1(gallery, gallery) == 1.0
    assert retrieval_top1(gallery[[1, 0, 3, 2]], gallery) == 0.0
    assert retrieval_top1(gallery[[0, 1, 3, 2]], gallery) == 0.5


def test_monitor_scores_a_held_out_part_of_train_and_never_a_test_split(demo_images: Path) -> None:
    with pytest.raises(ValueError, match="test split"):
        ContrastiveMonitor(demo_images, split="Test")
    monitor = ContrastiveMonitor(demo_images, holdout_fraction=0.25, num_points=64, batch_size=8)
    module = ViPFormer(POINT, ViPFormerImageSpec(image_size=24, patch_size=12, embed_dim=32, num_sa_layers=1))
    result = monitor.compute(module)
    assert module.training  # the mode is restored
    assert set(result) == {"svm_acc", "retrieval_top1"}
    assert all(0.0 <= v <= 1.0 for v in result.values())
    _, _labels, images, fit_idx, held_idx = monitor._load(64, demo_images)
    assert len(held_idx) == 8
    assert set(fit_idx).isdisjoint(held_idx)
    assert images is not None
    assert images.shape[0] == 32


def test_fit_exports_the_point_encoder_with_its_image_encoder(demo_images: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    args = [
        *TINY, f"--data.data_root={demo_images}", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=3", "--trainer.max_epochs=1", f"--export_dir={art}",
        "--trainer.callbacks+=pretrain.contrastive_monitor.ContrastiveMonitor",  # data_root from the data
        "--trainer.callbacks.num_points=64", "--trainer.callbacks.holdout_fraction=0.25",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    ]  # fmt: skip
    assert pretrain_main(["fit", *args]) == 0
    logged = next(tmp_path.glob("lightning_logs/version_*/metrics.csv")).read_text()
    assert "monitor/svm_acc" in logged
    assert "monitor/retrieval_top1" in logged
    encoder, meta = load_encoder(art)
    assert isinstance(encoder, ViPFormerPointEncoder)
    assert meta["provenance"]["method"] == "vipformer"
    assert meta["provenance"]["step"] == 3
    image_encoder, image_meta = load_image_encoder(art / "image_encoder")
    assert image_meta["kind"] == "image_encoder"
    assert image_encoder.eval()(torch.rand(2, 3, 24, 24)).shape == (2, 4, 32)
    # the same two artifacts from the Lightning checkpoint
    ckpt = next(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    out = tmp_path / "exported"
    assert pretrain_main(["export", str(ckpt), str(out)]) == 0
    again, _ = load_image_encoder(out / "image_encoder")
    for (key, a), (_, b) in zip(image_encoder.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=key)


def test_the_contrastive_stage_continues_a_point_mae_encoder(demo_images: Path, tmp_path: Path) -> None:
    mae = tmp_path / "mae"
    first = [
        *config("point_mae_tiny.yaml"), *tiny_encoder(num_groups=8, tokenizer_dim=32),
        "--model.init_args.decoder_depth=1", *RUNTIME, f"--data.data_root={demo_images}",
        f"--trainer.default_root_dir={tmp_path / 'one'}", "--trainer.max_steps=2", "--trainer.max_epochs=1",
        f"--export_dir={mae}",
    ]  # fmt: skip
    assert pretrain_main(["fit", *first]) == 0
    start, start_meta = load_encoder(mae)
    begun = ViPFormer(POINT, IMAGE, init_from=str(mae))  # the artifact's spec replaces the configured one
    assert begun.encoder.spec == start.spec
    for key, value in start.state_dict().items():
        assert torch.equal(begun.encoder.state_dict()[key], value), key
    chained = tmp_path / "chained"
    second = [
        *TINY, f"--model.init_args.init_from={mae}", f"--data.data_root={demo_images}",
        f"--trainer.default_root_dir={tmp_path / 'two'}", "--trainer.max_steps=2", "--trainer.max_epochs=1",
        f"--export_dir={chained}",
    ]  # fmt: skip
    assert pretrain_main(["fit", *second]) == 0
    encoder, meta = load_encoder(chained)
    assert isinstance(encoder, PointViT)
    assert encoder.spec == start.spec
    assert meta["provenance"]["init_from"]["artifact"] == str(mae)
    assert meta["provenance"]["init_from"]["method"] == start_meta["provenance"]["method"]
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert changed  # trained on from the artifact's weights
    assert read_artifact_meta(chained / "image_encoder")["kind"] == "image_encoder"


@pytest.mark.ddp
def test_two_process_gloo_ddp_with_gathered_negatives(demo_images: Path, tmp_path: Path) -> None:
    """Two CPU ranks: the gathered negatives' collectives run in step, ranks end with identical weights."""
    ranks = fit_two_ranks(
        [*TINY, f"--data.data_root={demo_images}", f"--trainer.default_root_dir={tmp_path}",
         "--trainer.max_epochs=1"],
        callback="tests.pretrain.methods.record_callback.RecordRank",
        record=tmp_path / "record",
    )  # fmt: skip
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4  # 32 clouds / (4 x 2 ranks)
    assert ranks[0]["keys"] != ranks[1]["keys"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert load_image_encoder(tmp_path / "encoder" / "image_encoder")[1]["kind"] == "image_encoder"
    # negatives from the rank's own batch only (the official behaviour) train other weights: gathering is on
    local = fit_two_ranks(
        [*TINY, f"--data.data_root={demo_images}", f"--trainer.default_root_dir={tmp_path / 'local'}",
         "--trainer.max_epochs=1", "--model.init_args.gather_negatives=false"],
        callback="tests.pretrain.methods.record_callback.RecordRank",
        record=tmp_path / "record_local",
    )  # fmt: skip
    assert local[0]["keys"] == ranks[0]["keys"]  # the same data and draws
    assert local[0]["weights_sha256"] != ranks[0]["weights_sha256"]


def test_methods_that_train_no_point_encoder_refuse_init_from(tmp_path: Path) -> None:
    from pretrain.checkpoint import save_encoder
    from pretrain.encoders import build_encoder
    from pretrain.encoders.spec import DataContract
    from pretrain.methods.geomae_scene import GeoMAEScene
    from pretrain.scene_encoder import SceneEncoderSpec

    art = save_encoder(tmp_path / "a", build_encoder(POINT), data=DataContract(num_points=64), provenance={})
    with pytest.raises(ValueError, match="init_from"):
        GeoMAEScene(SceneEncoderSpec.named("tiny"), init_from=str(art))
