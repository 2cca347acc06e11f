"""pcpt's encoder against an independent re-implementation of the official forward, from the same weights."""

from __future__ import annotations

import pytest
import torch

from pretrain.encoders import PointEncoder, PointViTSpec, build_encoder
from tests.pretrain.encoders import official_reference as ref


def _to_pcpt(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Official module keys -> pcpt keys by prefix edits (written independently of pretrain.importers)."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if key.startswith(("lm_head.", "cls_head.", "cls_head_finetune.")):
            continue
        key = key.replace("blocks.blocks.", "blocks.", 1)
        if key.startswith("encoder."):
            key = "tokenizer." + key[len("encoder.") :]
        out[key] = value
    return out


def _load(spec: PointViTSpec, official: torch.nn.Module, prefix: str = "") -> PointEncoder:
    enc = build_encoder(spec)
    enc.load_state_dict(_to_pcpt(official.state_dict(), prefix), strict=True)
    return enc


def _clouds(gen: torch.Generator, batch: int = 2, n: int = 64) -> torch.Tensor:
    return torch.rand(batch, n, 3, generator=gen) * 2 - 1


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-batchnorm"])
def test_point_mae_encoder_with_visible_tokens(gen: torch.Generator, train: bool) -> None:
    official = ref.randomize(ref.MAEMaskTransformer(32, 2, 2)).train(train)
    enc = _load(PointViTSpec.named("tiny", drop_path=0.0), official).train(train)
    neighborhood, center = ref.group_reference(_clouds(gen), 16, 8)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, torch.randperm(16, generator=gen)[:10]] = True
    mask[1, torch.randperm(16, generator=gen)[:10]] = True
    expected = official(neighborhood, center, mask)
    out = enc(enc.embed(neighborhood), center, keep=~mask)
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-5)
    assert out.cls is None


def test_point_bert_encoder_with_mask_tokens(gen: torch.Generator) -> None:
    official = ref.randomize(ref.BERTMaskTransformer(32, 2, 2, encoder_dims=16)).eval()
    spec = PointViTSpec.named("tiny", tokenizer_dim=16, cls_token=True, mask_token=True, drop_path=0.0)
    enc = _load(spec, official).eval()
    neighborhood, center = ref.group_reference(_clouds(gen), 16, 8)
    masked = torch.rand(2, 16, generator=gen) < 0.4
    expected = official(neighborhood, center, masked)
    out = enc(enc.embed(neighborhood), center, replace=masked)
    assert out.cls is not None
    torch.testing.assert_close(out.cls, expected[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, expected[:, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder_dims", [32, 16], ids=["mae-head", "bert-reduce-dim"])
def test_finetuned_classifier_features(gen: torch.Generator, encoder_dims: int) -> None:
    official = ref.randomize(ref.PointTransformer(32, 2, 2, encoder_dims=encoder_dims)).eval()
    spec = PointViTSpec.named("tiny", tokenizer_dim=encoder_dims, cls_token=True)
    enc = _load(spec, official).eval()
    neighborhood, center = ref.group_reference(_clouds(gen), 16, 8)
    all_tokens, concat = official.features(neighborhood, center)
    out = enc(enc.embed(neighborhood), center)
    torch.testing.assert_close(out.tokens, all_tokens[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.pool(out), concat, atol=1e-5, rtol=1e-5)


def test_return_layers_match_official_block_outputs(gen: torch.Generator) -> None:
    official = ref.randomize(ref.PointTransformer(32, 2, 2)).eval()
    enc = _load(PointViTSpec.named("tiny", cls_token=True), official).eval()
    neighborhood, center = ref.group_reference(_clouds(gen), 16, 8)
    b = neighborhood.shape[0]
    x = torch.cat([official.cls_token.expand(b, -1, -1), official.encoder(neighborhood)], dim=1)
    pos = torch.cat([official.cls_pos.expand(b, -1, -1), official.pos_embed(center)], dim=1)
    first = official.blocks.blocks[0](x + pos)
    out = enc(enc.embed(neighborhood), center, return_layers=(0,))
    torch.testing.assert_close(out.layers[0], first[:, 1:], atol=1e-5, rtol=1e-5)


def _shell_with_points_at_origin(gen: torch.Generator, batch: int = 2, n: int = 64) -> torch.Tensor:
    xyz = torch.randn(batch, n, 3, generator=gen)
    xyz = xyz / xyz.norm(dim=-1, keepdim=True)
    xyz[:, 5] = 0.01  # |p|² = 3e-4 <= 1e-3: pointnet2's FPS never picks it after the first centre
    xyz[:, 9] = torch.tensor([0.0, 0.02, -0.01])
    return xyz


def test_end_to_end_with_official_grouping(gen: torch.Generator) -> None:
    """encode(xyz) = official Group (FPS start 0 with the near-origin skip, kNN) + official forward."""
    official = ref.randomize(ref.PointTransformer(32, 2, 2)).eval()
    enc = _load(PointViTSpec.named("tiny", cls_token=True), official).eval()
    xyz = _shell_with_points_at_origin(gen)
    neighborhood, center = ref.group_reference(xyz, 16, 8)
    out = enc.encode(xyz)
    torch.testing.assert_close(out.centers, center)
    _, concat = official.features(neighborhood, center)
    torch.testing.assert_close(enc.pool(out), concat, atol=1e-5, rtol=1e-5)
    # the skip matters on this cloud: plain FPS would pick a point at the origin
    plain = ref.fps_reference(xyz, 16, skip_near_origin=False)
    assert ((plain == 5) | (plain == 9)).any()
