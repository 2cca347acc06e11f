from __future__ import annotations

from typing import Any

import pytest
import torch

import pretrain.encoders.tokenizer as tokenizer_module
from pretrain.encoders import (
    ENCODER_FAMILIES,
    PointEncoder,
    PointViT,
    PointViTSpec,
    build_encoder,
    register_encoder_family,
    spec_from_dict,
)
from pretrain.encoders.spec import EncoderSpec
from tests.pretrain.encoders.encoder_contract import EncoderContract


class TestPointMAEStyle(EncoderContract):
    """No CLS, no mask token, tokenizer width = embed width (no reduce_dim)."""

    def make(self) -> PointEncoder:
        return build_encoder(PointViTSpec.named("tiny"))


class TestPointBERTStyle(EncoderContract):
    """CLS + mask token + reduce_dim (tokenizer 16 -> 32)."""

    def make(self) -> PointEncoder:
        return build_encoder(PointViTSpec.named("tiny", tokenizer_dim=16, cls_token=True, mask_token=True))


class TestFinetunedStyle(EncoderContract):
    """CLS only, more groups than points per group, three blocks."""

    num_points = 80

    def make(self) -> PointEncoder:
        return build_encoder(PointViTSpec.named("tiny", cls_token=True, depth=3, num_groups=20, group_size=6))


def test_parameter_names_match_the_official_layout() -> None:
    enc = build_encoder(PointViTSpec.named("tiny", tokenizer_dim=16, cls_token=True, mask_token=True))
    prefixes = {name.split(".")[0] for name in enc.state_dict()}
    assert prefixes == {
        "tokenizer",
        "reduce_dim",
        "pos_embed",
        "blocks",
        "norm",
        "cls_token",
        "cls_pos",
        "mask_token",
    }
    state = enc.state_dict()
    assert state["reduce_dim.weight"].shape == (32, 16)
    assert state["tokenizer.second_conv.3.weight"].shape == (16, 512, 1)
    assert state["blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert "blocks.1.attn.qkv.bias" not in state
    assert state["cls_pos"].shape == (1, 1, 32)


def test_optional_parts_are_absent() -> None:
    enc = build_encoder(PointViTSpec.named("tiny"))
    names = set(enc.state_dict())
    assert not any(n.startswith(("reduce_dim", "cls_token", "cls_pos", "mask_token")) for n in names)


def test_small_has_the_official_parameter_count() -> None:
    d, hidden, depth = 384, 1536, 12
    block = 3 * d * d + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + 4 * d
    tokenizer = (3 * 128 + 128) + 2 * 128 + (128 * 256 + 256) + (512 * 512 + 512) + 2 * 512 + (512 * d + d)
    pos = (3 * 128 + 128) + (128 * d + d)
    expected = depth * block + tokenizer + pos + 2 * d
    enc = build_encoder(PointViTSpec.named("small"))
    assert sum(p.numel() for p in enc.parameters()) == expected == 21_825_024


def test_point_mae_initialisation(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    enc = PointViT(PointViTSpec.named("tiny", cls_token=True, mask_token=True))
    assert torch.equal(enc.norm.weight, torch.ones(32))
    assert torch.equal(enc.blocks[0].attn.proj.bias, torch.zeros(32))
    w = enc.tokenizer.second_conv[0].weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert enc.cls_token is not None
    # trunc_normal_(std=.02) truncates at +-2 absolute (as timm / the official code): effectively N(0, .02)
    assert 0 < enc.cls_token.abs().max() < 0.2


def test_drop_path_rates_increase_linearly() -> None:
    enc = PointViT(PointViTSpec.named("tiny", depth=3, drop_path=0.2))
    rates = [block.drop_path.p for block in enc.blocks]  # type: ignore[union-attr]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_group_uses_the_spec_grouping_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_group_points(xyz: torch.Tensor, num_groups: int, group_size: int, **kwargs: Any) -> Any:
        seen.update(kwargs, num_groups=num_groups, group_size=group_size)
        return "groups"

    monkeypatch.setattr(tokenizer_module, "group_points", fake_group_points)
    gen = torch.Generator()
    spec = PointViTSpec.named("tiny", fps_start="random", fps_skip_near_origin=False)
    assert build_encoder(spec).group(torch.rand(1, 32, 3), generator=gen) == "groups"
    assert seen == {
        "fps_start": "random",
        "skip_near_origin": False,
        "generator": gen,
        "num_groups": 16,
        "group_size": 8,
    }
    build_encoder(PointViTSpec.named("tiny")).group(torch.rand(1, 32, 3))
    assert (seen["fps_start"], seen["skip_near_origin"]) == (0, True)


def test_replace_swaps_in_the_mask_token(gen: torch.Generator) -> None:
    enc = build_encoder(PointViTSpec.named("tiny", mask_token=True)).eval()
    assert isinstance(enc, PointViT)
    assert enc.mask_token is not None
    groups, tokens = enc.tokenize(torch.rand(2, 64, 3, generator=gen))
    replace = torch.zeros(2, 16, dtype=torch.bool)
    replace[:, ::2] = True
    manual = torch.where(replace[..., None], enc.mask_token.expand(2, 16, -1), tokens)
    torch.testing.assert_close(
        enc(tokens, groups.centers, replace=replace).tokens, enc(manual, groups.centers).tokens
    )


def test_registry() -> None:
    family = ENCODER_FAMILIES["point_vit"]
    assert (family.spec_class, family.build) == (PointViTSpec, PointViT)
    spec = PointViTSpec.named("tiny", qkv_bias=True)
    assert spec_from_dict(spec.to_dict()) == spec
    assert (
        spec_from_dict({k: v for k, v in spec.to_dict().items() if k != "arch"}) == spec
    )  # point_vit default
    with pytest.raises(ValueError, match="unknown encoder arch 'nope'"):
        spec_from_dict({"arch": "nope"})
    with pytest.raises(ValueError, match="arch 'point_vit'"):
        PointViTSpec.named("tiny", arch="other")
    with pytest.raises(ValueError, match="already registered"):
        register_encoder_family("point_vit", PointViTSpec, PointViT)
    with pytest.raises(ValueError, match="needs a PointViTSpec"):
        build_encoder(EncoderSpec(arch="point_vit"))


@pytest.mark.parametrize(
    "options",
    [
        {"qkv_bias": True},
        {"norm_first": False},
        {"layer_scale": 0.1},
        {"attn_drop": 0.1, "proj_drop": 0.2, "activation": "quick_gelu"},
        {"pos_every_block": False},
    ],
)
def test_block_options_are_spec_fields_that_survive_the_round_trip(options: dict[str, Any]) -> None:
    spec = PointViTSpec.named("tiny", **options)
    assert spec_from_dict(spec.to_dict()) == spec
    enc = build_encoder(spec)
    keys = set(enc.state_dict())
    assert ("blocks.0.attn.qkv.bias" in keys) == options.get("qkv_bias", False)
    assert ("blocks.0.ls1.gamma" in keys) == ("layer_scale" in options)
    out = enc.eval().encode(torch.rand(2, 64, 3))
    assert torch.isfinite(out.tokens).all()


def test_adapters_receive_each_blocks_context() -> None:
    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[Any] = []

        def forward(self, x: torch.Tensor, context: Any) -> torch.Tensor:
            self.seen.append(context)
            return torch.zeros_like(x)

    enc = build_encoder(PointViTSpec.named("tiny")).eval()
    recorders = [Recorder(), Recorder()]
    for block, recorder in zip(enc.blocks, recorders):
        block.attach_adapter("output", recorder)
    xyz = torch.rand(2, 64, 3)
    plain = enc.encode(xyz).tokens
    with_adapters = enc.encode(xyz, contexts=["first", "second"]).tokens
    torch.testing.assert_close(with_adapters, plain)  # zero residuals change nothing
    assert [r.seen for r in recorders] == [[None, "first"], [None, "second"]]  # no contexts: None
