from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.nn.window_attention import WindowAttentionLayer, WindowTransformer, sine_pos_embed_2d
from pretrain.ops.windows import Partition, flat_groups, in_window_position, window_groups
from tests.pretrain.ops.test_windows import sparse_coords


def _randomize(module: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def _sine_reference(pos: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    out = torch.zeros(len(pos), dim)
    for i in range(len(pos)):
        for axis in range(2):
            for j in range(half):
                angle = float(pos[i, axis]) / temperature ** (2 * (j // 2) / half)
                out[i, axis * half + j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return out


def _layer_reference(layer: WindowAttentionLayer, x: torch.Tensor, pos: torch.Tensor, parts: list[Partition]):
    """Loops over groups and heads with explicit softmax over the valid tokens of each group."""
    dim = x.shape[1]
    heads = layer.win_attn.num_heads
    dh = dim // heads
    w, b = layer.win_attn.self_attn.in_proj_weight, layer.win_attn.self_attn.in_proj_bias
    attn = torch.full_like(x, float("nan"))
    for part in parts:
        for g in range(part.index.shape[0]):
            idx = part.index[g][part.valid[g]]
            q = (x[idx] + pos[idx]) @ w[:dim].T + b[:dim]
            k = (x[idx] + pos[idx]) @ w[dim : 2 * dim].T + b[dim : 2 * dim]
            v = x[idx] @ w[2 * dim :].T + b[2 * dim :]
            out = torch.zeros(len(idx), dim)
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                scores = q[:, sl] @ k[:, sl].T / math.sqrt(dh)
                weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
                out[:, sl] = weights @ v[:, sl]
            attn[idx] = out
    attn = attn @ layer.win_attn.self_attn.out_proj.weight.T + layer.win_attn.self_attn.out_proj.bias
    x = F.layer_norm(x + attn, (dim,), layer.norm1.weight, layer.norm1.bias)
    ffn = (
        F.gelu(x @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias
    )
    return F.layer_norm(x + ffn, (dim,), layer.norm2.weight, layer.norm2.bias)


def _tokens(gen: torch.Generator, coords: torch.Tensor, dim: int, window=(4, 3), shift=False):
    x = torch.randn(len(coords), dim, generator=gen)
    pos = sine_pos_embed_2d(in_window_position(coords, window=window, shift=shift), dim)
    return x, pos


def test_sine_embedding_matches_sst_formula(gen: torch.Generator) -> None:
    pos = torch.randint(-6, 6, (9, 2), generator=gen).float()
    torch.testing.assert_close(sine_pos_embed_2d(pos, 16), _sine_reference(pos, 16), atol=1e-5, rtol=1e-5)
    assert sine_pos_embed_2d(pos, 128).shape == (9, 128)
    with pytest.raises(ValueError, match="multiple of 4"):
        sine_pos_embed_2d(pos, 18)
    with pytest.raises(ValueError, match=r"\(P, 2\)"):
        sine_pos_embed_2d(pos[:, :1], 16)


@pytest.mark.parametrize("kind", ["flat", "padded"])
def test_layer_matches_slow_per_group_reference(gen: torch.Generator, kind: str) -> None:
    layer = _randomize(WindowAttentionLayer(16, 4, 24), gen).eval()
    coords = sparse_coords(gen, counts=(23, 0, 40))
    x, pos = _tokens(gen, coords, 16, shift=True)
    if kind == "flat":
        parts = [flat_groups(coords, window=(4, 3), group_size=5, axis="y", shift=True)]
    else:
        parts = window_groups(coords, window=(4, 3), shift=True, buckets=(3, 6, 12))
    torch.testing.assert_close(
        layer(x, pos, parts), _layer_reference(layer, x, pos, parts), atol=1e-5, rtol=1e-5
    )


def test_layer_matches_sst_layer_built_on_torch_multihead_attention(gen: torch.Generator) -> None:
    """SST's EncoderLayer: nn.MultiheadAttention(q=k=x+pos, v=x, key_padding_mask), post-norm, GELU FFN."""
    layer = _randomize(WindowAttentionLayer(16, 4, 32), gen).eval()
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    mha.load_state_dict(
        {k.removeprefix("win_attn.self_attn."): v for k, v in layer.state_dict().items() if "self_attn" in k}
    )
    coords = sparse_coords(gen, counts=(50, 30))
    x, pos = _tokens(gen, coords, 16)
    (part,) = window_groups(coords, window=(4, 3), shift=False, buckets=(12,))
    xg, pg = x[part.index], pos[part.index]
    attn, _ = mha(xg + pg, xg + pg, xg, key_padding_mask=~part.valid, need_weights=False)
    src = x.clone()
    src[part.index[part.valid]] = attn[part.valid]
    src = layer.norm1(x + src)
    expected = layer.norm2(src + layer.linear2(F.gelu(layer.linear1(src))))
    torch.testing.assert_close(layer(x, pos, [part]), expected, atol=1e-5, rtol=1e-5)


def test_padding_slots_never_influence_valid_outputs(gen: torch.Generator) -> None:
    layer = _randomize(WindowAttentionLayer(16, 2, 16), gen).eval()
    coords = sparse_coords(gen, counts=(31, 9))
    x, pos = _tokens(gen, coords, 16)
    part = flat_groups(coords, window=(4, 3), group_size=8, axis="x", shift=False)
    assert not part.valid.all()
    other = torch.randint(0, len(coords), part.index.shape, generator=gen)
    scrambled = Partition(index=torch.where(part.valid, part.index, other), valid=part.valid)
    torch.testing.assert_close(layer(x, pos, [scrambled]), layer(x, pos, [part]), atol=1e-6, rtol=1e-6)


def test_layer_names_follow_sst() -> None:
    layer = WindowAttentionLayer(8, 2, 16)
    assert sorted(layer.state_dict()) == [
        "linear1.bias", "linear1.weight", "linear2.bias", "linear2.weight",
        "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight",
        "win_attn.self_attn.in_proj_bias", "win_attn.self_attn.in_proj_weight",
        "win_attn.self_attn.out_proj.bias", "win_attn.self_attn.out_proj.weight",
    ]  # fmt: skip
    assert layer.win_attn.self_attn.in_proj_weight.shape == (24, 8)
    with pytest.raises(ValueError, match="num_heads=3"):
        WindowAttentionLayer(8, 3, 16)


def test_layer_configs_alternate_axis_and_shift() -> None:
    flat = WindowTransformer(8, 6, 2, 16, (4, 4), "flat", 8)
    assert [flat.layer_config(i) for i in range(6)] == [
        ("x", False), ("y", False), ("x", True), ("y", True), ("x", False), ("y", False)
    ]  # fmt: skip
    padded = WindowTransformer(8, 4, 2, 16, (4, 4), "padded", buckets=(8, 16))
    assert [padded.layer_config(i)[1] for i in range(4)] == [False, True, False, True]


@pytest.mark.parametrize("kind", ["flat", "padded"])
def test_transformer_equals_its_layers_on_their_partitions(gen: torch.Generator, kind: str) -> None:
    model = _randomize(WindowTransformer(16, 4, 2, 32, (4, 3), kind, 6, (4, 12)), gen).eval()  # type: ignore[arg-type]
    coords = sparse_coords(gen, counts=(40, 17))
    x = torch.randn(len(coords), 16, generator=gen)
    expected = x
    for i, layer in enumerate(model.layers):
        axis, shift = model.layer_config(i)
        pos = sine_pos_embed_2d(in_window_position(coords, window=(4, 3), shift=shift), 16)
        if kind == "flat":
            parts = [flat_groups(coords, window=(4, 3), group_size=6, axis=axis, shift=shift)]
        else:
            parts = window_groups(coords, window=(4, 3), shift=shift, buckets=(4, 12))
        expected = _layer_reference(layer, expected, pos, parts)  # type: ignore[arg-type]
    torch.testing.assert_close(model(x, coords), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["flat", "padded"])
def test_permuting_tokens_permutes_outputs(gen: torch.Generator, kind: str) -> None:
    model = _randomize(WindowTransformer(16, 4, 2, 32, (4, 3), kind, 6, (4, 12)), gen).eval()  # type: ignore[arg-type]
    coords = sparse_coords(gen, counts=(40, 17))
    x = torch.randn(len(coords), 16, generator=gen)
    perm = torch.randperm(len(coords), generator=gen)
    torch.testing.assert_close(model(x[perm], coords[perm]), model(x, coords)[perm], atol=1e-5, rtol=1e-5)


def test_flat_and_padded_agree_when_windows_are_the_groups(gen: torch.Generator) -> None:
    ix, iy = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    one = torch.stack([ix.flatten(), iy.flatten()], 1)
    coords = torch.cat(
        [torch.cat([torch.full((64, 1), b), one], 1) for b in range(2)]
    )  # full, aligned windows
    flat = _randomize(WindowTransformer(16, 1, 2, 32, (4, 4), "flat", group_size=16), gen).eval()
    padded = WindowTransformer(16, 1, 2, 32, (4, 4), "padded", buckets=(8, 16)).eval()
    padded.load_state_dict(flat.state_dict())
    x = torch.randn(len(coords), 16, generator=gen)
    torch.testing.assert_close(flat(x, coords), padded(x, coords), atol=1e-5, rtol=1e-5)
    assert flat.padding_overhead(coords) == padded.padding_overhead(coords) == 0.0


def test_padding_overhead_of_flat_groups_is_small(gen: torch.Generator) -> None:
    coords = sparse_coords(gen, counts=(150, 90), grid=(40, 40))
    flat = WindowTransformer(16, 4, 2, 32, (6, 6), "flat", group_size=18)
    padded = WindowTransformer(16, 4, 2, 32, (6, 6), "padded", buckets=(12, 36))
    assert 0.0 <= flat.padding_overhead(coords) < padded.padding_overhead(coords)
    assert flat.padding_overhead(coords) <= 2 * 17 / 240


def test_transformer_gradients_and_empty_input(gen: torch.Generator) -> None:
    model = WindowTransformer(16, 4, 2, 32, (4, 3), "flat", 6)
    coords = sparse_coords(gen, counts=(20, 11))
    x = torch.randn(len(coords), 16, generator=gen, requires_grad=True)
    model(x, coords).square().sum().backward()
    assert x.grad is not None
    assert x.grad.isfinite().all()
    assert all(p.grad is not None for p in model.parameters())
    empty = model(torch.zeros(0, 16), torch.zeros(0, 3, dtype=torch.int64))
    assert empty.shape == (0, 16)
    with pytest.raises(ValueError, match="coords"):
        model(torch.zeros(3, 16), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="partition"):
        WindowTransformer(16, 1, 2, 32, (4, 4), "dense")  # type: ignore[arg-type]
