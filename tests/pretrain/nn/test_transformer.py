from __future__ import annotations

import math

import pytest
import torch

from pretrain.nn import Attention, Block, DropPath, Mlp, drop_path_rates
from pretrain.nn.transformer import BlockOptions, CrossAttentionBlock, run_blocks


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


def _ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def test_post_norm_block_with_qkv_bias_and_quick_gelu_matches_reference(gen: torch.Generator) -> None:
    options = BlockOptions(norm_first=False, qkv_bias=True, activation="quick_gelu", norm_eps=1e-12)
    block = Block(8, 2, options=options).eval()
    for p in block.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, generator=gen)
    x = torch.randn(2, 5, 8, generator=gen)
    qkv = x @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = qkv.split(8, dim=-1)
    out = torch.zeros_like(x)
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
        out[..., sl] = w @ v[..., sl]
    y = _ln(x + block.attn.proj(out), block.norm1)
    hidden = block.mlp.fc1(y)
    expected = _ln(y + block.mlp.fc2(hidden * torch.sigmoid(1.702 * hidden)), block.norm2)
    torch.testing.assert_close(block(x), expected, atol=1e-4, rtol=1e-4)


def test_layer_scale_scales_each_branch(gen: torch.Generator) -> None:
    block = Block(8, 2, options=BlockOptions(layer_scale=0.5)).eval()
    assert {"ls1.gamma", "ls2.gamma"} <= set(block.state_dict())
    reference = Block(8, 2).eval()
    state = {k: v for k, v in block.state_dict().items() if not k.startswith("ls")}
    reference.load_state_dict(state)
    x = torch.randn(2, 5, 8, generator=gen)
    y = x + 0.5 * reference.attn(reference.norm1(x))
    expected = y + 0.5 * reference.mlp(reference.norm2(y))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_block_matches_reference(gen: torch.Generator) -> None:
    block = CrossAttentionBlock(8, 2, context_dim=6).eval()
    x, context = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 7, 6, generator=gen)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 4:] = False  # padding of the second sample's context is never attended to
    q = _ln(x, block.norm_q) @ block.attn.q.weight.T
    k, v = (_ln(context, block.norm_kv) @ block.attn.kv.weight.T).split(8, dim=-1)
    out = torch.zeros_like(x)
    for b in range(2):
        m = int(valid[b].sum())
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            w = torch.softmax(q[b, :, sl] @ k[b, :m, sl].T / 2.0, dim=-1)
            out[b, :, sl] = w @ v[b, :m, sl]
    y = x + block.attn.proj(out)
    expected = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(block(x, context=context, context_mask=valid), expected, atol=1e-5, rtol=1e-5)


def test_run_blocks_adds_positions_before_every_block_or_once(gen: torch.Generator) -> None:
    blocks = [Block(8, 2).eval() for _ in range(2)]
    x, pos = torch.randn(1, 4, 8, generator=gen), torch.randn(1, 4, 8, generator=gen)
    every, captured = run_blocks(blocks, x, pos, capture=[0])
    torch.testing.assert_close(every, blocks[1](blocks[0](x + pos) + pos))
    torch.testing.assert_close(captured[0], blocks[0](x + pos))
    once, _ = run_blocks(blocks, x, pos, pos_every_block=False)
    torch.testing.assert_close(once, blocks[1](blocks[0](x + pos)))


@pytest.mark.parametrize(
    "options",
    [
        BlockOptions(),
        BlockOptions(qkv_bias=True, layer_scale=0.5),
        BlockOptions(norm_first=False),
    ],
    ids=["pre-norm", "qkv-bias-layer-scale", "post-norm"],
)
def test_block_tail_is_the_slice_of_the_full_output(options: BlockOptions) -> None:
    torch.manual_seed(0)
    block = Block(16, 4, options=options, drop_path=0.4).train()
    x = torch.randn(3, 9, 16, requires_grad=True)
    torch.manual_seed(5)  # the same drop-path draws in both
    full = block(x)[:, -4:]
    torch.manual_seed(5)
    tail = block.forward_tail(x, 4)
    torch.testing.assert_close(tail, full, atol=1e-6, rtol=1e-5)
    (grad_full,) = torch.autograd.grad(full.square().sum(), x)
    (grad_tail,) = torch.autograd.grad(tail.square().sum(), x)
    torch.testing.assert_close(grad_tail, grad_full, atol=1e-5, rtol=1e-4)


def test_block_tail_with_an_adapter_runs_the_full_block() -> None:
    torch.manual_seed(0)
    block = Block(16, 4).eval()
    block.attach_adapter("output", _ContextFree(torch.nn.Linear(16, 16)))
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(block.forward_tail(x, 3), block(x)[:, -3:])


class _ContextFree(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, context: object) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out
