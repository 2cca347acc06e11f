"""Object-level GeoMAE: loss terms from the targets of the masked patches, gradients, CLI fit and export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_encoder
from pretrain.cli import main as pretrain_main
from pretrain.encoders import PointViTSpec
from pretrain.losses import masked_mse
from pretrain.methods.geomae import GeoMAE
from pretrain.ops.geometric_targets import patch_targets
from tests.pretrain.methods.tiny_cli import RUNTIME, config, tiny_encoder


def tiny_model(**kwargs: object) -> GeoMAE:
    torch.manual_seed(0)
    spec = PointViTSpec.named("tiny")
    options: dict[str, object] = {"decoder_depth": 1, "sub_cells": 2, "lr_scheduler": None, **kwargs}
    return GeoMAE(spec, **options)  # type: ignore[arg-type]


def test_terms_score_the_targets_of_the_masked_patches_only() -> None:
    model = tiny_model().eval()
    gen = torch.Generator().manual_seed(1)
    points = torch.rand(2, 128, 3, generator=gen)
    groups, _ = model.encoder.tokenize(points)
    mask = model.make_mask(groups, torch.Generator().manual_seed(2))
    target, masked_points = model.masked_targets(groups, mask)
    batch, num_masked = mask.shape[0], int(mask[0].sum())
    assert masked_points.shape == (batch, num_masked, groups.neighborhoods.shape[2], 3)
    expected = patch_targets(
        groups.neighborhoods[mask].reshape_as(masked_points),
        groups.centers[mask].reshape(batch, num_masked, 3),
        sub=2,
    )
    torch.testing.assert_close(target.normal, expected.normal)
    # the centroid term is the MSE of the centroid head on the decoder features of the masked patches
    with torch.no_grad():
        terms = model.loss_terms(points, mask=mask, generator=torch.Generator().manual_seed(3))
        groups, tokens = model.encoder.tokenize(points, generator=torch.Generator().manual_seed(3))
        visible = model.encoder(tokens, groups.centers, keep=~mask).tokens
        features = model.decoder.decode(
            visible,
            groups.centers[~mask].reshape(batch, -1, 3),
            groups.centers[mask].reshape(batch, -1, 3),
        )
        centroid = masked_mse(model.heads["centroid"](features), expected.centroid)
    torch.testing.assert_close(terms["centroid"], centroid)
    assert set(terms) == {"centroid", "sub_centroid", "occupancy", "normal", "curvature"}
    assert all(torch.isfinite(v) for v in terms.values())


def test_weights_and_chamfer_option() -> None:
    model = tiny_model(chamfer_weight=1.0, curvature_weight=0.0)
    points = torch.rand(2, 128, 3, generator=torch.Generator().manual_seed(0))
    terms = model.loss_terms(points, generator=torch.Generator().manual_seed(0))
    assert "chamfer" in terms
    total = model.total_loss(terms)
    expected = sum(model.loss_weights[k] * v for k, v in terms.items())
    torch.testing.assert_close(total, expected)
    total.backward()
    assert model.heads["curvature"].weight.grad is not None
    assert float(model.heads["curvature"].weight.grad.abs().sum()) == 0.0  # weight 0: not trained
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert float(model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"sub_cells": 0}, "sub_cells"),
        ({"normal_weight": -1.0}, "weights"),
    ],
)
def test_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_model(**kwargs)


def test_fit_through_the_cli_exports_an_encoder_that_loads_strictly(demo: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    args = [
        *config("geomae_tiny.yaml"), *tiny_encoder(num_groups=8, tokenizer_dim=32),
        "--model.init_args.decoder_depth=1", *RUNTIME, f"--data.data_root={demo}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.max_epochs=1",
        f"--export_dir={art}",
    ]  # fmt: skip
    assert pretrain_main(["fit", *args]) == 0
    encoder, meta = load_encoder(art)
    assert meta["provenance"]["method"] == "GeoMAE"
    assert meta["provenance"]["step"] == 2
    assert encoder.eval().encode(torch.rand(2, 64, 3)).tokens.shape == (2, 8, 32)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert pretrain_main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    exported, _ = load_encoder(tmp_path / "exported")
    for (key, a), (_, b) in zip(encoder.state_dict().items(), exported.state_dict().items()):
        torch.testing.assert_close(a, b, msg=key)


@pytest.mark.parametrize("embed_masked", [False, True])
def test_only_visible_patches_are_embedded_unless_asked(embed_masked: bool) -> None:
    model = tiny_model(embed_masked_patches=embed_masked).train()
    shapes: list[tuple[int, ...]] = []
    model.encoder.tokenizer.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    model.loss_terms(torch.rand(2, 128, 3, generator=torch.Generator().manual_seed(0)))
    assert shapes == [(2, 16 if embed_masked else 16 - int(0.6 * 16), 8, 3)]
