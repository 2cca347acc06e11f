from __future__ import annotations

from typing import Any

import pytest
import torch

import pretrain.encoders.base as encoder_base
from pretrain.encoders import ENCODERS, EncoderSpec, PointEncoder, PointViT, build_encoder, register_encoder
from tests.pretrain.encoders.encoder_contract import EncoderContract


class TestPointMAEStyle(EncoderContract):
    """No CLS, no mask token, tokenizer width = embed width (no reduce_dim)."""

    def make(self) -> PointEncoder:
        return build_encoder(EncoderSpec.named("tiny"))


class TestPointBERTStyle(EncoderContract):
    """CLS + mask token + reduce_dim (tokenizer 16 -> 32)."""

    def make(self) -> PointEncoder:
        return build_encoder(EncoderSpec.named("tiny", tokenizer_dim=16, cls_token=True, mask_token=True))


class TestFinetunedStyle(EncoderContract):
    """CLS only, more groups than points per group, three blocks."""

    num_points = 80

    def make(self) -> PointEncoder:
        return build_encoder(EncoderSpec.named("tiny", cls_token=True, depth=3, num_groups=20, group_size=6))


def test_parameter_names_match_the_official_layout() -> None:
    enc = build_encoder(EncoderSpec.named("tiny", tokenizer_dim=16, cls_token=True, mask_token=True))
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
    enc = build_encoder(EncoderSpec.named("tiny"))
    names = set(enc.state_dict())
    assert not any(n.startswith(("reduce_dim", "cls_token", "cls_pos", "mask_token")) for n in names)


def test_small_has_the_official_parameter_count() -> None:
    d, hidden, depth = 384, 1536, 12
    block = 3 * d * d + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + 4 * d
    tokenizer = (3 * 128 + 128) + 2 * 128 + (128 * 256 + 256) + (512 * 512 + 512) + 2 * 512 + (512 * d + d)
    pos = (3 * 128 + 128) + (128 * d + d)
    expected = depth * block + tokenizer + pos + 2 * d
    enc = build_encoder(EncoderSpec.named("small"))
    assert sum(p.numel() for p in enc.parameters()) == expected == 21_825_024


def test_point_mae_initialisation(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    enc = PointViT(EncoderSpec.named("tiny", cls_token=True, mask_token=True))
    assert torch.equal(enc.norm.weight, torch.ones(32))
    assert torch.equal(enc.blocks[0].attn.proj.bias, torch.zeros(32))
    w = enc.tokenizer.second_conv[0].weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert enc.cls_token is not None
    # trunc_normal_(std=.02) truncates at +-2 absolute (as timm / the official code): effectively N(0, .02)
    assert 0 < enc.cls_token.abs().max() < 0.2


def test_drop_path_rates_increase_linearly() -> None:
    enc = PointViT(EncoderSpec.named("tiny", depth=3, drop_path=0.2))
    rates = [block.drop_path.p for block in enc.blocks]  # type: ignore[union-attr]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_group_uses_the_spec_grouping_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_group_points(xyz: torch.Tensor, num_groups: int, group_size: int, **kwargs: Any) -> Any:
        seen.update(kwargs, num_groups=num_groups, group_size=group_size)
        return "groups"

    monkeypatch.setattr(encoder_base, "group_points", fake_group_points)
    gen = torch.Generator()
    spec = EncoderSpec.named("tiny", fps_start="random", fps_skip_near_origin=False)
    assert build_encoder(spec).group(torch.rand(1, 32, 3), generator=gen) == "groups"
    assert seen == {
        "fps_start": "random",
        "skip_near_origin": False,
        "generator": gen,
        "num_groups": 16,
        "group_size": 8,
    }
    build_encoder(EncoderSpec.named("tiny")).group(torch.rand(1, 32, 3))
    assert (seen["fps_start"], seen["skip_near_origin"]) == (0, True)


def test_replace_swaps_in_the_mask_token(gen: torch.Generator) -> None:
    enc = build_encoder(EncoderSpec.named("tiny", mask_token=True)).eval()
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
    assert ENCODERS["point_vit"] is PointViT
    with pytest.raises(ValueError, match="unknown encoder arch 'nope'"):
        build_encoder(EncoderSpec.named("tiny", arch="nope"))
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("point_vit")(PointViT)
    with pytest.raises(ValueError, match="point_vit"):
        PointViT(EncoderSpec.named("tiny", arch="other"))
