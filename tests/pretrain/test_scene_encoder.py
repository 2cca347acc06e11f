from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.artifacts import (
    ArtifactError,
    WeightsMismatchError,
    artifact_kind,
    load_artifact,
    read_artifact_meta,
    save_module_artifact,
)
from pretrain.encoders.spec import DataContract
from pretrain.ops.pillars import pillar_centers, pillarize
from pretrain.scene_encoder import (
    SCENE_ENCODER_KIND,
    PillarSceneEncoder,
    SceneEncoderSpec,
    load_scene_encoder,
)

DATA = DataContract(num_points=300, normalization="none", channels=("x", "y", "z", "intensity"))


def _scans(gen: torch.Generator, batch: int = 2, num: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    points = torch.rand(batch, num, 3, generator=gen) * torch.tensor([14.0, 14.0, 5.0]) - torch.tensor(
        [7.0, 7.0, 2.5]
    )
    points[-1, num // 2 :] = float("nan")  # a shorter scan, NaN-padded
    return points, torch.rand(batch, num, 1, generator=gen)


def test_spec_defaults_are_geomae_and_round_trip() -> None:
    spec = SceneEncoderSpec()
    assert spec.point_range == (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    assert spec.pillar_size == (0.256, 0.256)
    assert spec.grid == (400, 400)
    assert (spec.vfe_dims, spec.embed_dim, spec.depth, spec.num_heads, spec.ffn_dim) == (
        (64, 128),
        128,
        12,
        8,
        256,
    )
    assert (spec.window, spec.buckets, spec.group_size, spec.partition) == ((12, 12), (56, 144), 144, "flat")
    assert SceneEncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert SceneEncoderSpec.named("base") == spec
    tiny = SceneEncoderSpec.named("tiny", partition="padded", point_channels=("intensity", "time"))
    assert (tiny.embed_dim, tiny.partition, tiny.point_channels) == (32, "padded", ("intensity", "time"))
    from_json = SceneEncoderSpec.from_dict(
        {"point_range": [-10, -10, -2, 10, 10, 2], "pillar_size": [0.5, 0.5]}
    )
    assert from_json.point_range == (-10.0, -10.0, -2.0, 10.0, 10.0, 2.0)
    with pytest.raises(ValueError, match="unknown scene encoder size"):
        SceneEncoderSpec.named("huge")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"arch": "point_vit"}, "arch"),
        ({"pillar_size": (0.3, 0.3)}, "whole cells"),
        ({"point_range": (1.0, 0.0, 0.0, 0.0, 1.0, 1.0)}, "min < max"),
        ({"point_range": (0.0, 0.0, 1.0)}, "point_range"),
        ({"pillar_size": (0.2, float("nan"))}, "pillar_size"),
        ({"point_channels": ("intensity", "intensity")}, "duplicate"),
        ({"point_channels": ("",)}, "point_channels"),
        ({"vfe_dims": ()}, "vfe_dims"),
        ({"embed_dim": 126, "num_heads": 2}, "multiple of 4"),
        ({"embed_dim": 132}, "num_heads=8"),
        ({"depth": 0}, "depth"),
        ({"window": (12,)}, "window"),
        ({"partition": "dense"}, "partition"),
        ({"group_size": 0}, "group_size"),
        ({"buckets": (144, 56)}, "strictly increasing"),
        ({"dropout": 1.0}, "dropout"),
        ({"heads": 8}, "unknown SceneEncoderSpec fields"),
    ],
)
def test_spec_validation(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SceneEncoderSpec.from_dict(fields)


@pytest.mark.parametrize("partition", ["flat", "padded"])
def test_encode_tiny_batch(gen: torch.Generator, partition: str) -> None:
    encoder = PillarSceneEncoder(SceneEncoderSpec.named("tiny", partition=partition)).eval()
    points, feats = _scans(gen)
    out = encoder.encode(points, None, feats)
    spec = encoder.spec
    pillars = pillarize(points, None, point_range=spec.point_range, pillar_size=spec.pillar_size)
    assert torch.equal(out.coords, pillars.coords)
    assert out.features.shape == (len(pillars.coords), encoder.embed_dim) == (len(pillars.coords), 32)
    assert out.features.isfinite().all()
    torch.testing.assert_close(
        out.centers, pillar_centers(pillars.coords, spec.point_range, spec.pillar_size)
    )
    assert set(out.coords[:, 0].tolist()) == {0, 1}
    # embed + forward is encode
    again, tokens = encoder.embed(points, None, feats)
    assert tokens.shape == (len(again.coords), 32)
    torch.testing.assert_close(encoder(tokens, again.coords), out.features)


def test_keep_mask_processes_only_kept_tokens(gen: torch.Generator) -> None:
    encoder = PillarSceneEncoder(SceneEncoderSpec.named("tiny")).eval()
    points, feats = _scans(gen)
    pillars, tokens = encoder.embed(points, None, feats)
    keep = torch.rand(len(tokens), generator=gen) < 0.3
    visible = encoder(tokens, pillars.coords, keep)
    assert visible.shape == (int(keep.sum()), 32)
    torch.testing.assert_close(visible, encoder(tokens[keep], pillars.coords[keep]))
    # masked tokens have no influence on the visible outputs
    noisy = tokens.clone()
    noisy[~keep] = torch.randn(int((~keep).sum()), 32, generator=gen) * 100
    torch.testing.assert_close(encoder(noisy, pillars.coords, keep), visible)
    assert encoder(tokens, pillars.coords, torch.zeros(len(tokens), dtype=torch.bool)).shape == (0, 32)
    with pytest.raises(ValueError, match="keep"):
        encoder(tokens, pillars.coords, keep.long())
    with pytest.raises(ValueError, match="tokens"):
        encoder(tokens[:, :16], pillars.coords)


def test_feats_must_match_point_channels(gen: torch.Generator) -> None:
    points, feats = _scans(gen)
    encoder = PillarSceneEncoder(SceneEncoderSpec.named("tiny"))
    with pytest.raises(ValueError, match="feats"):
        encoder.embed(points, None, None)
    with pytest.raises(ValueError, match="feats"):
        encoder.embed(points, None, torch.cat([feats, feats], -1))
    xyz_only = PillarSceneEncoder(SceneEncoderSpec.named("tiny", point_channels=(), vfe_dims=(16, 24)))
    assert xyz_only.vfe.in_channels == 3
    assert "proj.weight" in xyz_only.state_dict()  # 24 -> 32
    assert xyz_only.encode(points, None).features.shape[1] == 32
    with pytest.raises(ValueError, match="no extra point channels"):
        xyz_only.embed(points, None, feats)


def test_every_parameter_gets_a_gradient(gen: torch.Generator) -> None:
    encoder = PillarSceneEncoder(SceneEncoderSpec.named("tiny")).train()
    points, feats = _scans(gen)
    encoder.encode(points, None, feats).features.square().mean().backward()
    missing = [
        name for name, p in encoder.named_parameters() if p.grad is None or not p.grad.isfinite().all()
    ]
    assert not missing


def test_artifact_round_trip_is_strict(gen: torch.Generator, tmp_path: Path) -> None:
    spec = SceneEncoderSpec.named("tiny", partition="padded")
    encoder = PillarSceneEncoder(spec)
    points, feats = _scans(gen)
    encoder.encode(points, None, feats)  # moves the BatchNorm running statistics
    encoder.eval()
    out = save_module_artifact(tmp_path / "scene", encoder, data=DATA, provenance={"method": "test"})
    meta = read_artifact_meta(out, kind=SCENE_ENCODER_KIND)
    assert meta["spec"] == spec.to_dict()
    assert "scene encoder" in artifact_kind(SCENE_ENCODER_KIND).summary(meta)
    loaded, meta = load_artifact(out, kind=SCENE_ENCODER_KIND)
    assert isinstance(loaded, PillarSceneEncoder)
    assert loaded.spec == spec
    loaded.eval()
    expected = encoder.encode(points, None, feats)
    got = loaded.encode(points, None, feats)
    assert torch.equal(got.features, expected.features)
    assert torch.equal(got.coords, expected.coords)
    typed, _ = load_scene_encoder(out)
    assert isinstance(typed, PillarSceneEncoder)
    with pytest.raises(ArtifactError, match="expected 'point_encoder'"):
        load_artifact(out, kind="point_encoder")
    changed = json.loads((out / "encoder.json").read_text())
    changed["spec"]["depth"] = 2
    (out / "encoder.json").write_text(json.dumps(changed))
    with pytest.raises(WeightsMismatchError):
        load_scene_encoder(out)


@pytest.mark.parametrize("partition", ["flat", "padded"])
def test_runs_under_bfloat16_autocast(gen: torch.Generator, partition: str) -> None:
    encoder = PillarSceneEncoder(SceneEncoderSpec.named("tiny", partition=partition))
    points, feats = _scans(gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder.encode(points, None, feats)
    out.features.float().square().mean().backward()
    assert out.features.isfinite().all()
    assert all(p.grad is not None for p in encoder.parameters())
