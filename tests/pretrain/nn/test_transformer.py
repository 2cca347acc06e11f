from __future__ import annotations

import math

import pytest
import torch

from pretrain.nn import Attention, Block, DropPath, Mlp, drop_path_rates


def _attention_reference(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Per-head loops with an explicit softmax."""
    b, n, c = x.shape
    h = attn.num_heads
    dh = c // h
    qkv = x @ attn.qkv.weight.T
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
    out = torch.zeros(b, n, c)
    for head in range(h):
        sl = slice(head * dh, (head + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)
        weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
        out[..., sl] = weights @ v[..., sl]
    return out @ attn.proj.weight.T + attn.proj.bias


def test_attention_matches_explicit_softmax(gen: torch.Generator) -> None:
    attn = Attention(16, 4)
    x = torch.randn(3, 7, 16, generator=gen)
    torch.testing.assert_close(attn(x), _attention_reference(attn, x), atol=1e-5, rtol=1e-5)


def test_attention_has_no_qkv_bias_and_timm_names() -> None:
    attn = Attention(8, 2)
    assert attn.qkv.bias is None
    assert sorted(attn.state_dict()) == ["proj.bias", "proj.weight", "qkv.weight"]
    assert attn.qkv.weight.shape == (24, 8)


def test_attention_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="num_heads=3"):
        Attention(8, 3)


def test_block_names_and_forward_match_reference(gen: torch.Generator) -> None:
    block = Block(8, 2, mlp_ratio=4.0).eval()
    assert sorted(block.state_dict()) == sorted(
        [
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        ]
    )  # fmt: skip
    assert block.mlp.fc1.weight.shape == (32, 8)
    assert block.norm1.eps == 1e-5
    x = torch.randn(2, 5, 8, generator=gen)
    y = x + _attention_reference(
        block.attn, torch.nn.functional.layer_norm(x, (8,), block.norm1.weight, block.norm1.bias)
    )
    z = torch.nn.functional.layer_norm(y, (8,), block.norm2.weight, block.norm2.bias)
    expected = y + block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(z)))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_mlp_shapes() -> None:
    assert Mlp(4, 12)(torch.zeros(2, 3, 4)).shape == (2, 3, 4)


def test_drop_path_rates_are_linspace() -> None:
    assert drop_path_rates(0.1, 3) == pytest.approx([0.0, 0.05, 0.1])
    assert drop_path_rates(0.0, 2) == [0.0, 0.0]


def test_drop_path_drops_whole_samples_in_training() -> None:
    torch.manual_seed(0)
    layer = DropPath(0.5).train()
    x = torch.ones(200, 3, 4)
    y = layer(x)
    per_sample = y.reshape(200, -1)
    # each sample is either dropped entirely or scaled by 1 / (1 - p)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert 0.3 < (per_sample[:, 0] == 0).float().mean() < 0.7


def test_drop_path_is_identity_in_eval_and_at_zero() -> None:
    x = torch.randn(4, 3)
    assert DropPath(0.5).eval()(x) is x
    assert DropPath(0.0).train()(x) is x
    with pytest.raises(ValueError, match="drop path"):
        DropPath(1.0)
