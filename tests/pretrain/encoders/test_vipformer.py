"""ViPFormer point and image encoders against the plain reference of ``vipformer_reference``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from pretrain.artifacts import (
    ArtifactError,
    WeightsMismatchError,
    load_artifact_tensors,
    load_encoder,
    load_image_encoder,
    read_artifact_meta,
    save_artifact,
    save_module_artifact,
)
from pretrain.encoders import (
    DataContract,
    ViPFormerImageEncoder,
    ViPFormerImageSpec,
    ViPFormerPointEncoder,
    ViPFormerPointSpec,
    build_encoder,
    spec_from_dict,
)
from pretrain.encoders.vipformer import official_partial_centering
from pretrain.features import extract_features
from pretrain.nn.perceiver import PerceiverTrunk, ProjectionHead
from tests.pretrain.encoders import vipformer_reference as ref

ATOL = RTOL = 1e-5


def randomize(module: nn.Module, gen: torch.Generator) -> nn.Module:
    state = module.state_dict()
    module.load_state_dict(
        {k: ref.random_tensor(k, tuple(v.shape), gen).to(v.dtype) for k, v in state.items()}
    )
    return module


def to_official(state: dict[str, Tensor], num_cross: int = 1) -> dict[str, Tensor]:
    """pcpt names -> official names (the inverse of the importer's renames, written independently)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("trunk.cross_attn."):
            rest = key[len("trunk.cross_attn.") :]
            out["encoder.cross_attn_1." + rest] = value
            if num_cross == 1:
                out["encoder.cross_attn_n." + rest] = value
        elif key.startswith("trunk."):
            out["encoder." + key[len("trunk.") :]] = value
        elif key.startswith("tokenizer."):
            out["group2emb." + key[len("tokenizer.") :]] = value
        elif key.startswith("pos_embed."):
            out["position_emb." + key[len("pos_embed.") :]] = value
        elif key == "pos_embed":
            out["position_emb"] = value
        elif key.startswith("patch_embed."):
            out["patch2emb.1." + key[len("patch_embed.") :]] = value
        else:
            out[key] = value
    return out


def point_encoder(gen: torch.Generator, **overrides: object) -> ViPFormerPointEncoder:
    enc = build_encoder(ViPFormerPointSpec.named("tiny", **overrides))
    assert isinstance(enc, ViPFormerPointEncoder)
    return randomize(enc, gen).eval()  # type: ignore[return-value]


def clouds(gen: torch.Generator, batch: int = 2, num_points: int = 64) -> Tensor:
    return torch.rand(batch, num_points, 3, generator=gen) * 2 - 1


def run_reference(enc: ViPFormerPointEncoder, xyz: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    spec = enc.spec
    with torch.no_grad():
        return ref.point_forward(
            to_official(enc.state_dict(), spec.num_cross_layers),
            xyz,
            num_latents=spec.num_latents,
            group_size=spec.group_size,
            heads=spec.num_heads,
            official_centering=spec.official_centering,
            num_cross=spec.num_cross_layers,
        )


# ---------------------------------------------------------------------------------------------- point


@pytest.mark.parametrize("official_centering", [False, True])
def test_point_encoder_matches_reference(gen: torch.Generator, official_centering: bool) -> None:
    enc = point_encoder(gen, official_centering=official_centering)
    xyz = clouds(gen) + 0.3  # off-centre clouds: absolute and relative coordinates differ clearly
    with torch.no_grad():
        out = enc.encode(xyz)
        groups, tokens = enc.tokenize(xyz)
        layered = enc(tokens, groups.centers, memory=enc.point_tokens(xyz), return_layers=(0, 1, -1))
    latents, centers, layers = run_reference(enc, xyz)
    torch.testing.assert_close(out.centers, centers)
    torch.testing.assert_close(out.tokens, latents, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(enc.pool(out), ref.backbone_feats(latents), atol=ATOL, rtol=RTOL)
    assert out.cls is None
    assert out.layers == []
    assert len(layered.layers) == 3
    for got, want in zip(layered.layers, (layers[0], layers[1], layers[2])):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layered.layers[2], out.tokens)


def test_two_cross_attention_layers_follow_the_official_schedule(gen: torch.Generator) -> None:
    enc = point_encoder(gen, num_cross_layers=3, num_sa_layers=2)
    assert enc.trunk.cross_attn_n is not None
    xyz = clouds(gen)
    with torch.no_grad():
        out = enc.encode(xyz)
    latents, _, _ = run_reference(enc, xyz)
    torch.testing.assert_close(out.tokens, latents, atol=ATOL, rtol=RTOL)


def test_official_centering_against_a_loop(gen: torch.Generator) -> None:
    enc = point_encoder(gen, official_centering=True)
    xyz = clouds(gen) + 2.0
    groups = enc.group(xyz)
    got = enc.patches(xyz, groups)
    for b in range(xyz.shape[0]):
        for g in range(groups.idx.shape[1]):
            idx = [int(i) for i in groups.idx[b, g]]
            want = ref.patch_points(xyz[b], groups.centers[b, g], idx, official_centering=True)
            torch.testing.assert_close(got[b, g], want, atol=0, rtol=0)
            centred = (got[b, g] - groups.neighborhoods[b, g]).abs().amax(dim=-1) == 0
            assert int(centred.sum()) == 3
            assert sorted(i for i, c in zip(idx, centred.tolist()) if c) == sorted(idx)[:3]
    # off by default: every neighbour centred
    plain = point_encoder(gen)
    assert torch.equal(plain.patches(xyz, groups), groups.neighborhoods)
    # count >= K centres everything; the tokens differ from full centring otherwise
    assert torch.equal(
        official_partial_centering(xyz, groups, count=enc.spec.group_size), groups.neighborhoods
    )
    with torch.no_grad():
        full = enc.tokenizer(groups.neighborhoods)
        partial = enc.tokenize(xyz).tokens
    assert not torch.allclose(full, partial)


def test_official_centering_is_differentiable(gen: torch.Generator) -> None:
    enc = point_encoder(gen, official_centering=True)
    xyz = clouds(gen).requires_grad_(True)
    enc.encode(xyz).tokens.sum().backward()
    assert xyz.grad is not None
    assert torch.isfinite(xyz.grad).all()
    assert xyz.grad.abs().sum() > 0


def test_every_parameter_gets_a_gradient(gen: torch.Generator) -> None:
    enc = point_encoder(gen, mlp_drop=0.0, cross_attn_drop=0.0, attn_drop=0.0).train()
    out = enc.encode(clouds(gen))
    enc.pool(out).square().mean().backward()
    assert [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_dropout_only_in_training(gen: torch.Generator) -> None:
    enc = point_encoder(gen)
    xyz = clouds(gen)
    torch.testing.assert_close(enc.encode(xyz).tokens, enc.encode(xyz).tokens, atol=0, rtol=0)
    enc.train()
    torch.manual_seed(0)  # dropout draws from the default generator
    first = enc.encode(xyz).tokens
    second = enc.encode(xyz).tokens
    assert not torch.allclose(first, second)


def test_batch_independence_and_pool(gen: torch.Generator) -> None:
    enc = point_encoder(gen)
    xyz = clouds(gen, batch=3)
    with torch.no_grad():
        batched = enc.encode(xyz)
        pooled = enc.pool(batched)
        assert pooled.shape == (3, enc.pooled_dim) == (3, 128)
        torch.testing.assert_close(pooled[:, :64], batched.tokens.amax(dim=1))
        for i in range(3):
            single = enc.encode(xyz[i : i + 1])
            torch.testing.assert_close(single.tokens[0], batched.tokens[i], atol=ATOL, rtol=RTOL)


def test_random_fps_start_comes_from_the_generator(gen: torch.Generator) -> None:
    enc = point_encoder(gen, fps_start="random")
    xyz = clouds(gen)
    a = enc.encode(xyz, generator=torch.Generator().manual_seed(1))
    b = enc.encode(xyz, generator=torch.Generator().manual_seed(1))
    c = enc.encode(xyz, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.tokens, b.tokens, atol=0, rtol=0)
    assert not torch.equal(a.centers, c.centers)


def test_forward_rejects_unsupported_and_bad_inputs(gen: torch.Generator) -> None:
    enc = point_encoder(gen)
    xyz = clouds(gen)
    groups, tokens = enc.tokenize(xyz)
    memory = enc.point_tokens(xyz)
    mask = torch.ones(2, enc.spec.num_latents, dtype=torch.bool)
    for kwargs in ({"keep": mask}, {"replace": mask}, {"contexts": [None] * enc.spec.depth}):
        with pytest.raises(ValueError, match="does not support"):
            enc(tokens, groups.centers, memory=memory, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory="):
        enc(tokens, groups.centers)
    with pytest.raises(ValueError, match="memory"):
        enc(tokens, groups.centers, memory=memory[:1])
    with pytest.raises(ValueError, match="tokens"):
        enc(tokens[..., :-1], groups.centers, memory=memory)
    with pytest.raises(ValueError, match="centers"):
        enc(tokens, groups.centers[:, :-1], memory=memory)
    with pytest.raises(ValueError, match="return_layers"):
        enc(tokens, groups.centers, memory=memory, return_layers=(enc.spec.depth,))
    with pytest.raises(ValueError, match="at least 32"):
        enc.encode(torch.rand(1, 20, 3))


# ----------------------------------------------------------------------------------------------- specs


def test_point_spec_sizes_and_validation() -> None:
    spec = ViPFormerPointSpec()
    assert (spec.embed_dim, spec.num_latents, spec.group_size, spec.num_sa_layers, spec.num_heads) == (
        256,
        128,
        32,
        8,
        4,
    )
    assert (spec.mlp_ratio, spec.mlp_drop, spec.cross_attn_drop, spec.attn_drop) == (2, 0.5, 0.1, 0.1)
    assert spec.official_centering is False
    assert spec.fps_start == 0
    assert spec.fps_skip_near_origin is False
    assert ViPFormerPointSpec.named("h4d256") == spec
    big = ViPFormerPointSpec.named("h6d384")
    assert (big.embed_dim, big.num_heads, big.mlp_ratio, big.num_latents) == (384, 6, 4, 128)
    tiny = ViPFormerPointSpec.named("tiny", official_centering=True)
    assert (tiny.num_groups, tiny.depth) == (32, 3)
    assert spec_from_dict(tiny.to_dict()) == tiny
    assert build_encoder(tiny).min_points == 32
    with pytest.raises(ValueError, match="unknown"):
        ViPFormerPointSpec.named("huge")
    with pytest.raises(ValueError, match="num_heads"):
        ViPFormerPointSpec(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="num_cross_layers"):
        ViPFormerPointSpec(num_cross_layers=3, num_sa_layers=1)
    with pytest.raises(ValueError, match="mlp_drop"):
        ViPFormerPointSpec(mlp_drop=1.0)
    with pytest.raises(ValueError, match="fps_start"):
        ViPFormerPointSpec(fps_start=-1)
    with pytest.raises(ValueError, match="arch"):
        ViPFormerPointSpec(arch="point_vit")  # type: ignore[arg-type]


def test_image_spec_sizes_and_validation() -> None:
    spec = ViPFormerImageSpec()
    assert (spec.image_size, spec.patch_size, spec.num_patches, spec.patch_dim) == (144, 12, 144, 432)
    assert ViPFormerImageSpec.named("h6d384").embed_dim == 384
    assert ViPFormerImageSpec.named("tiny").num_patches == 16
    assert ViPFormerImageSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="patch_size"):
        ViPFormerImageSpec(image_size=100, patch_size=12)


def test_released_point_size_has_the_official_parameter_count() -> None:
    shapes = ref.official_point_shapes(256, 8, 2)
    assert len(shapes) == 174
    kept = {k: s for k, s in shapes.items() if not k.startswith(("latent_head.", "encoder.cross_attn_1."))}
    enc = build_encoder(ViPFormerPointSpec.named("h4d256"))
    assert sum(p.numel() for p in enc.parameters()) + sum(
        b.numel() for n, b in enc.named_buffers() if not n.endswith("num_batches_tracked")
    ) == sum(torch.Size(s).numel() for k, s in kept.items() if not k.endswith("num_batches_tracked"))
    assert {k: tuple(v.shape) for k, v in to_official(enc.state_dict()).items()} == {
        k: s for k, s in shapes.items() if not k.startswith("latent_head.")
    }


# ----------------------------------------------------------------------------------------------- image


def image_encoder(gen: torch.Generator, **overrides: object) -> ViPFormerImageEncoder:
    enc = ViPFormerImageEncoder(ViPFormerImageSpec.named("tiny", **overrides))
    return randomize(enc, gen).eval()  # type: ignore[return-value]


def test_image_encoder_matches_reference(gen: torch.Generator) -> None:
    enc = image_encoder(gen)
    images = torch.randn(2, 3, 48, 48, generator=gen)
    with torch.no_grad():
        tokens = enc(images)
        want = ref.image_forward(to_official(enc.state_dict()), images, heads=enc.spec.num_heads)
        last, layers = enc.encode_layers(images, return_layers=(-1, 0))
    assert tokens.shape == (2, 16, 64)
    torch.testing.assert_close(tokens, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(enc.pool(tokens), ref.backbone_feats(want), atol=ATOL, rtol=RTOL)
    assert enc.pool(tokens).shape == (2, enc.pooled_dim)
    torch.testing.assert_close(layers[0], last, atol=0, rtol=0)
    assert len(layers) == 2


def test_image_patch_order_is_p1_p2_c(gen: torch.Generator) -> None:
    enc = image_encoder(gen)
    images = torch.arange(2 * 3 * 48 * 48, dtype=torch.float32).reshape(2, 3, 48, 48)
    patches = enc.patchify(images)
    assert patches.shape == (2, 16, 432)
    # patch (row 1, col 2) of image 1: pixel (p1, p2) channel c at position (p1 * 12 + p2) * 3 + c
    for p1, p2, c in ((0, 0, 0), (0, 0, 2), (0, 1, 0), (3, 5, 1), (11, 11, 2)):
        assert patches[1, 1 * 4 + 2, (p1 * 12 + p2) * 3 + c] == images[1, c, 12 + p1, 24 + p2]
    with pytest.raises(ValueError, match="images"):
        enc(torch.rand(1, 3, 40, 48))


# --------------------------------------------------------------------------------------------- layers


def test_projection_head_layout() -> None:
    head = ProjectionHead(128, 64)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items() if "num_batches" not in k} == {
        "0.weight": (128,),
        "0.bias": (128,),
        "0.running_mean": (128,),
        "0.running_var": (128,),
        "2.weight": (64, 128),
        "3.weight": (64,),
        "3.bias": (64,),
        "3.running_mean": (64,),
        "3.running_var": (64,),
        "5.weight": (64, 64),
    }
    assert head(torch.rand(4, 128)).shape == (4, 64)


def test_trunk_validates_layer_counts() -> None:
    with pytest.raises(ValueError, match="num_cross_layers"):
        PerceiverTrunk(16, num_heads=2, num_sa_layers=1, num_cross_layers=3)
    with pytest.raises(ValueError, match="num_heads"):
        PerceiverTrunk(15, num_heads=2, num_sa_layers=1)
    assert PerceiverTrunk(16, num_heads=2, num_sa_layers=4).depth == 5


# ------------------------------------------------------------------------------------------- artifacts


def test_point_artifact_round_trip(tmp_path: Path, gen: torch.Generator) -> None:
    enc = point_encoder(gen, official_centering=True)
    save_module_artifact(
        tmp_path / "art", enc, data=DataContract(num_points=64), provenance={"method": "test"}
    )
    meta = read_artifact_meta(tmp_path / "art")
    assert meta["kind"] == "point_encoder"
    assert meta["spec"]["arch"] == "vipformer_point"
    loaded, _ = load_encoder(tmp_path / "art")
    assert isinstance(loaded, ViPFormerPointEncoder)
    assert loaded.spec == enc.spec
    xyz = clouds(gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode(xyz).tokens, enc.encode(xyz).tokens, atol=0, rtol=0)
    # probes / few-shot / embed use the pooled features through the unchanged feature extractor
    feats = extract_features(loaded, xyz.numpy(), batch_size=1)
    assert feats.shape == (2, 128)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(feats), enc.pool(enc.encode(xyz)), atol=ATOL, rtol=RTOL)


def test_image_artifact_round_trip_and_strict_loading(tmp_path: Path, gen: torch.Generator) -> None:
    enc = image_encoder(gen)
    data = DataContract(num_points=48 * 48, normalization="none", channels=("r", "g", "b"))
    save_module_artifact(tmp_path / "img", enc, data=data, provenance={"method": "test"})
    assert read_artifact_meta(tmp_path / "img")["kind"] == "image_encoder"
    loaded, meta = load_image_encoder(tmp_path / "img")
    assert loaded.spec == enc.spec
    assert meta["spec"]["arch"] == "vipformer_image"
    images = torch.randn(1, 3, 48, 48, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), enc(images), atol=0, rtol=0)
    with pytest.raises(ArtifactError, match="image_encoder"):
        load_encoder(tmp_path / "img")
    save_module_artifact(tmp_path / "pts", point_encoder(gen), data=DataContract(), provenance={})
    with pytest.raises(ArtifactError, match="point_encoder"):
        load_image_encoder(tmp_path / "pts")
    tensors, meta = load_artifact_tensors(tmp_path / "img")
    del tensors["trunk.sa_layers.1.0.module.attention.o_proj.bias"]
    save_artifact(tmp_path / "broken", tensors, {k: v for k, v in meta.items() if k != "format"})
    with pytest.raises(WeightsMismatchError, match=r"o_proj\.bias"):
        load_image_encoder(tmp_path / "broken")
