"""Official ViPFormer state dicts (METHODS.md §5.6 key names) -> pcpt artifacts, against a reference."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import Tensor

from datapipes.errors import UserError
from pretrain import cli
from pretrain.artifacts import load_encoder, load_image_encoder, read_artifact_meta
from pretrain.encoders import ViPFormerPointEncoder, build_encoder
from pretrain.importers import (
    REMAPS,
    import_official,
    infer_vipformer_image_spec,
    infer_vipformer_point_spec,
    remap_vipformer_image,
    remap_vipformer_point,
)
from tests.cli_helpers import assert_one_error_line
from tests.pretrain.encoders import official_reference as mae_ref
from tests.pretrain.encoders import vipformer_reference as ref

_one_error_line = partial(assert_one_error_line, "pcpt-pretrain")
ATOL = RTOL = 1e-5
TINY = ["--num-heads", "4", "--num-groups", "32", "--group-size", "16", "--num-points", "64"]


def official_point(gen: torch.Generator, dim: int = 64, num_sa: int = 2, ratio: int = 2) -> dict[str, Tensor]:
    return ref.random_official_state(ref.official_point_shapes(dim, num_sa, ratio), gen)


def official_image(gen: torch.Generator) -> dict[str, Tensor]:
    return ref.random_official_state(ref.official_image_shapes(64, 2, 2, num_patches=16, patch=12), gen)


def clouds(gen: torch.Generator) -> Tensor:
    return torch.rand(2, 64, 3, generator=gen) * 2 - 1 + 0.3


def reference_latents(state: dict[str, Tensor], xyz: Tensor, num_cross: int = 1) -> Tensor:
    latents, _, _ = ref.point_forward(
        state, xyz, num_latents=32, group_size=16, heads=4, official_centering=True, num_cross=num_cross
    )
    return latents


# ---------------------------------------------------------------------------------------------- remaps


def test_official_layout_has_174_tensors_at_the_released_size() -> None:
    shapes = ref.official_point_shapes(256, 8, 2)
    assert len(shapes) == 174
    assert sum(math.prod(s) for s in shapes.values()) == 5_656_068  # "5.66 M floats" of the dump (§5.2)
    assert len(ref.official_point_shapes(64, 2, 2)) == 174 - 6 * 13


def test_point_remap(gen: torch.Generator) -> None:
    official = official_point(gen)
    result = REMAPS["vipformer"](official)
    assert result.layout == "vipformer point encoder"
    assert result.kind == "point_encoder"
    assert result.dropped == sorted(
        k for k in official if k.startswith(("latent_head.", "encoder.cross_attn_1."))
    )
    assert result.unexpected_dropped() == []
    assert len(result.state) + len(result.dropped) == len(official)
    assert result.spec_hints == {"official_centering": True, "num_cross_layers": 1}
    assert torch.equal(
        result.state["trunk.cross_attn.0.module.attention.q_proj.weight"],
        official["encoder.cross_attn_n.0.module.attention.q_proj.weight"],
    )
    assert torch.equal(
        result.state["tokenizer.second_conv.3.weight"], official["group2emb.second_conv.3.weight"]
    )
    assert torch.equal(result.state["pos_embed.2.bias"], official["position_emb.2.bias"])
    spec = infer_vipformer_point_spec(
        result.state, num_heads=4, num_latents=32, group_size=16, **result.spec_hints
    )
    assert (spec.embed_dim, spec.num_sa_layers, spec.num_cross_layers, spec.mlp_ratio) == (64, 2, 1, 2)
    assert spec.official_centering
    assert spec.fps_start == 0
    enc = build_encoder(spec)
    assert sorted(enc.state_dict()) == sorted(result.state)


def test_image_remap(gen: torch.Generator) -> None:
    official = official_image(gen)
    result = remap_vipformer_image(official)
    assert result.kind == "image_encoder"
    assert result.unexpected_dropped() == []
    assert torch.equal(result.state["pos_embed"], official["position_emb"])
    assert torch.equal(result.state["patch_embed.weight"], official["patch2emb.1.weight"])
    spec = infer_vipformer_image_spec(result.state, num_heads=4, **result.spec_hints)
    assert (spec.image_size, spec.patch_size, spec.embed_dim, spec.num_sa_layers) == (48, 12, 64, 2)
    assert REMAPS["vipformer"](official).kind == "image_encoder"


def test_remaps_refuse_other_layouts(gen: torch.Generator) -> None:
    mae = mae_ref.PointMAE(32, 1, 2, group_size=8).state_dict()
    with pytest.raises(ValueError, match="not a ViPFormer checkpoint"):
        REMAPS["vipformer"](mae)
    with pytest.raises(ValueError, match="not a ViPFormer point checkpoint"):
        remap_vipformer_point(official_image(gen))
    with pytest.raises(ValueError, match="not a ViPFormer image checkpoint"):
        remap_vipformer_image(official_point(gen))
    broken = official_point(gen)
    broken["encoder.cross_attn_1.0.module.q_norm.weight"] = (
        broken["encoder.cross_attn_1.0.module.q_norm.weight"] + 1
    )
    with pytest.raises(ValueError, match="neither one shared module"):
        remap_vipformer_point(broken)
    del broken["encoder.cross_attn_1.0.module.q_norm.weight"]
    with pytest.raises(ValueError, match="different keys"):
        remap_vipformer_point(broken)
    extra = {**official_point(gen), "encoder.extra.weight": torch.zeros(1)}
    assert remap_vipformer_point(extra).unexpected_dropped() == ["encoder.extra.weight"]


# --------------------------------------------------------------------------------------------- imports


def test_import_point_matches_reference(tmp_path: Path, gen: torch.Generator) -> None:
    official = official_point(gen)
    torch.save(official, tmp_path / "pc_model_best.pth")
    summary = import_official(
        "vipformer",
        tmp_path / "pc_model_best.pth",
        tmp_path / "art",
        num_heads=4,
        num_groups=32,
        group_size=16,
    )
    assert summary["kind"] == "point_encoder"
    assert summary["dropped"] == 12 + 15
    assert summary["spec"]["official_centering"] is True
    enc, meta = load_encoder(tmp_path / "art")
    assert isinstance(enc, ViPFormerPointEncoder)
    assert meta["provenance"]["source_layout"] == "vipformer point encoder"
    xyz = clouds(gen)
    with torch.no_grad():
        out = enc.eval().encode(xyz)
        want = reference_latents(official, xyz)
    torch.testing.assert_close(out.tokens, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(enc.pool(out), ref.backbone_feats(want), atol=ATOL, rtol=RTOL)


def test_import_image_matches_reference(tmp_path: Path, gen: torch.Generator) -> None:
    official = official_image(gen)
    torch.save(official, tmp_path / "img_model_best.pth")
    summary = import_official("vipformer", tmp_path / "img_model_best.pth", tmp_path / "img", num_heads=4)
    assert summary["kind"] == "image_encoder"
    enc, meta = load_image_encoder(tmp_path / "img")
    assert meta["data_contract"]["channels"] == ["r", "g", "b"]
    images = torch.randn(2, 3, 48, 48, generator=gen)
    with torch.no_grad():
        got = enc.eval()(images)
        want = ref.image_forward(official, images, heads=4)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_import_separate_cross_attention_layers(tmp_path: Path, gen: torch.Generator) -> None:
    official = official_point(gen)
    for key in [k for k in official if k.startswith("encoder.cross_attn_1.")]:
        official[key] = ref.random_tensor(key, tuple(official[key].shape), gen)  # no longer shared
    torch.save(official, tmp_path / "two.pth")
    kwargs = {"num_heads": 4, "num_groups": 32, "group_size": 16}
    with pytest.raises(UserError, match="--num-cross-layers"):
        import_official("vipformer", tmp_path / "two.pth", tmp_path / "art", **kwargs)  # type: ignore[arg-type]
    import_official("vipformer", tmp_path / "two.pth", tmp_path / "art", num_cross_layers=2, **kwargs)  # type: ignore[arg-type]
    enc, _ = load_encoder(tmp_path / "art")
    assert enc.spec.num_cross_layers == 2  # type: ignore[attr-defined]
    xyz = clouds(gen)
    with torch.no_grad():
        torch.testing.assert_close(
            enc.eval().encode(xyz).tokens, reference_latents(official, xyz, num_cross=2), atol=ATOL, rtol=RTOL
        )


def test_heads_default_to_the_released_configuration(tmp_path: Path, gen: torch.Generator) -> None:
    torch.save(official_point(gen, dim=256, num_sa=1), tmp_path / "d256.pth")
    summary = import_official("vipformer", tmp_path / "d256.pth", tmp_path / "art")
    assert (summary["spec"]["num_heads"], summary["spec"]["num_latents"], summary["spec"]["group_size"]) == (
        4,
        128,
        32,
    )
    torch.save(official_point(gen), tmp_path / "d64.pth")
    with pytest.raises(UserError, match="--num-heads"):
        import_official("vipformer", tmp_path / "d64.pth", tmp_path / "art2")
    assert not (tmp_path / "art2").exists()


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_import_point(tmp_path: Path, gen: torch.Generator, capsys: pytest.CaptureFixture[str]) -> None:
    official = official_point(gen)
    torch.save(official, tmp_path / "pc_model_best.pth")
    out = tmp_path / "art"
    assert (
        cli.main(["import", "vipformer", str(tmp_path / "pc_model_best.pth"), str(out), *TINY, "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["artifact"] == str(out)
    assert summary["layout"] == "vipformer point encoder"
    assert summary["spec"]["arch"] == "vipformer_point"
    assert summary["spec"]["official_centering"] is True
    assert read_artifact_meta(out)["data_contract"]["num_points"] == 64
    enc, _ = load_encoder(out)
    xyz = clouds(gen)
    with torch.no_grad():
        torch.testing.assert_close(
            enc.eval().encode(xyz).tokens, reference_latents(official, xyz), atol=ATOL, rtol=RTOL
        )
    assert (
        cli.main(["import", "vipformer", str(tmp_path / "pc_model_best.pth"), str(tmp_path / "b"), *TINY])
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith(
        f"wrote {tmp_path / 'b'}: vipformer_point 64 wide, 1 cross + 2 self-attention layers (4 heads), "
        "32 latents of 16 points"
    )


def test_cli_import_image(tmp_path: Path, gen: torch.Generator, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(official_image(gen), tmp_path / "img.pth")
    assert (
        cli.main(
            ["import", "vipformer", str(tmp_path / "img.pth"), str(tmp_path / "img"), "--num-heads", "4"]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert "vipformer_image 64 wide" in line
    assert "48-pixel images in 12-pixel patches" in line


def test_cli_rejects_a_state_dict_that_is_not_vipformer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mae_ref.save_official(tmp_path / "mae.pth", mae_ref.PointMAE(32, 1, 2, group_size=8), container="bare")
    assert cli.main(["import", "vipformer", str(tmp_path / "mae.pth"), str(tmp_path / "art"), *TINY]) == 2
    _one_error_line(capsys.readouterr().err, "mae.pth", "not a ViPFormer checkpoint", "group2emb")
    assert not (tmp_path / "art").exists()


def test_cli_rejects_unexpected_keys(
    tmp_path: Path, gen: torch.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({**official_point(gen), "encoder.extra.weight": torch.zeros(1)}, tmp_path / "x.pth")
    assert cli.main(["import", "vipformer", str(tmp_path / "x.pth"), str(tmp_path / "art"), *TINY]) == 2
    _one_error_line(capsys.readouterr().err, "encoder.extra.weight", "vipformer point encoder")
