from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.nn import Block, BlockOptions
from pretrain.nn.any2point_adapter import (
    BottleneckAdapter,
    CellAttention,
    GuidedAdapter,
    GuidedContext,
    guided_context_1d,
    guided_context_2d,
    make_view_attention,
)
from pretrain.nn.transformer import run_blocks
from pretrain.ops.virtual_projection import (
    cells_1d,
    cells_2d,
    pixels_2d,
    project_to_views,
    raw_positions_1d,
)
from pretrain.ops.voxel_cluster import voxel_cluster

DIM, GROUPS = 8, 10


def _randomize(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random parameters and BatchNorm running statistics (so eval-mode BN is not the identity)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                assert m.running_mean is not None
                assert m.running_var is not None
                m.running_mean.copy_(
                    torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype)
                )
                m.running_var.copy_(
                    torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5
                )
    return module


def _adapter(gen: torch.Generator, reduce_1d: str = "mean") -> GuidedAdapter:
    ad = GuidedAdapter(DIM, attn_dim=6, attn_heads=3, coef=0.3, reduce_1d=reduce_1d)  # type: ignore[arg-type]
    return _randomize(ad.double(), gen)  # type: ignore[return-value]


def _centers(gen: torch.Generator, batch: int) -> torch.Tensor:
    return (torch.rand(batch, GROUPS, 3, generator=gen, dtype=torch.float64) - 0.5) * 1.6


def _context(centers: torch.Tensor, has_cls: bool = True) -> GuidedContext:
    return guided_context_1d(centers, voxel_size=0.4, direction=(-1.0, 0.0, 1.0), cell=8.0, has_cls=has_cls)


# ---------------------------------------------------------------- slow references


def _slow_bn(rows: torch.Tensor, bn: nn.BatchNorm1d, training: bool) -> torch.Tensor:
    if training:
        mean, var = rows.mean(0), rows.var(0, unbiased=False)
    else:
        assert bn.running_mean is not None
        assert bn.running_var is not None
        mean, var = bn.running_mean, bn.running_var
    return (rows - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _slow_voxel_branch(
    ad: GuidedAdapter, tokens: torch.Tensor, ids: torch.Tensor, training: bool
) -> torch.Tensor:
    """Per-cluster max + mean in Python over the occupied clusters of the batch, BN, GELU, broadcast."""
    batch, groups, dim = tokens.shape
    keys, rows = [], []
    for b in range(batch):
        for k in sorted(set(ids[b].tolist())):
            members = [g for g in range(groups) if int(ids[b, g]) == k]
            feats = [[float(tokens[b, g, c]) for g in members] for c in range(dim)]
            rows.append(torch.tensor([max(f) + sum(f) / len(f) for f in feats], dtype=tokens.dtype))
            keys.append((b, members))
    bn = ad.out_transform_3d[0]
    assert isinstance(bn, nn.BatchNorm1d)
    out_rows = _gelu(_slow_bn(torch.stack(rows), bn, training))
    out = torch.full_like(tokens, float("nan"))
    for (b, members), row in zip(keys, out_rows):
        for g in members:
            out[b, g] = row
    return out


def _slow_cell_attention(attn: CellAttention, x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The official Attention1 written out: explicit scores, −1e5 added outside the cell, per-head softmax."""
    n, g, _ = x.shape
    heads, inner = attn.num_heads, attn.attn_dim
    dh = inner // heads
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    out = torch.zeros(n, g, inner, dtype=x.dtype)
    for s in range(n):
        for h in range(heads):
            q = qkv[s, :, h * dh : (h + 1) * dh]
            k = qkv[s, :, inner + h * dh : inner + (h + 1) * dh]
            v = qkv[s, :, 2 * inner + h * dh : 2 * inner + (h + 1) * dh]
            for i in range(g):
                scores = torch.stack([q[i] @ k[j] * inner**-0.5 for j in range(g)])
                scores = scores + torch.tensor(
                    [0.0 if cells[s, i] == cells[s, j] else -1e5 for j in range(g)], dtype=x.dtype
                )
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[s, i, h * dh : (h + 1) * dh] = sum(weights[j] * v[j] for j in range(g))
    return out @ attn.proj.weight.T + attn.proj.bias


def _slow_view_branch(
    ad: GuidedAdapter, tokens: torch.Tensor, view_cells: torch.Tensor, num_cells: int, training: bool
) -> torch.Tensor:
    batch, groups, dim = tokens.shape
    out = torch.zeros(batch, ad.num_views, groups, dim, dtype=tokens.dtype)
    for v in range(ad.num_views):
        cells = view_cells[:, v]
        norm = ad.norm3[v]
        assert isinstance(norm, nn.LayerNorm)
        normed = F.layer_norm(tokens, (dim,), norm.weight, norm.bias, norm.eps)
        attn = ad.attn1[v]
        assert isinstance(attn, CellAttention)
        h = tokens + _slow_cell_attention(attn, normed, cells)
        rows = torch.zeros(batch, num_cells, dim, dtype=tokens.dtype)  # empty cells stay zero rows
        for b in range(batch):
            for c in range(num_cells):
                members = [g for g in range(groups) if int(cells[b, g]) == c]
                if members:
                    feats = h[b, members]
                    mean = feats.mean(0)
                    rows[b, c] = mean + feats.amax(0) if ad.reduce_1d == "maxmean" else mean
        transform = ad.out_transform_1d[v]
        assert isinstance(transform, nn.Sequential)
        bn = transform[0]
        assert isinstance(bn, nn.BatchNorm1d)
        pooled = _gelu(_slow_bn(rows.reshape(-1, dim), bn, training)).view(batch, num_cells, dim)
        for b in range(batch):
            for g in range(groups):
                out[b, v, g] = pooled[b, int(cells[b, g])]
    return out


@torch.no_grad()
def _slow_forward(ad: GuidedAdapter, x: torch.Tensor, ctx: GuidedContext, training: bool) -> torch.Tensor:
    tokens = x[:, 1:] if ctx.has_cls else x
    assert ctx.num_cells is not None
    x3d = _slow_voxel_branch(ad, tokens, ctx.voxel_ids, training)
    xv = _slow_view_branch(ad, tokens, ctx.view_cells, ctx.num_cells, training)
    res = torch.zeros_like(tokens)
    for b in range(tokens.shape[0]):
        for g in range(tokens.shape[1]):
            sims = []
            for v in range(ad.num_views):
                a, c = xv[b, v, g], x3d[b, g]
                sims.append((float(a @ c) / (float(a.norm()) * float(c.norm())) + 1) / 2)
            total = sum(sims)
            res[b, g] = ad.coef * sum(sims[v] / total * xv[b, v, g] for v in range(ad.num_views))
    if ctx.has_cls:
        res = torch.cat([torch.zeros_like(res[:, :1]), res], dim=1)
    return res


# ---------------------------------------------------------------- bottleneck adapter


def test_bottleneck_adapter_formula_and_init(gen: torch.Generator) -> None:
    ad = BottleneckAdapter(16, 4, 0.3).eval()
    bound = math.sqrt(6 / (16 + 4))
    assert ad.down.weight.abs().max() <= bound
    assert ad.up.weight.abs().max() <= bound
    assert 0 < ad.down.bias.abs().max() < 1e-4
    assert BottleneckAdapter(16, 4, 0.3, bias_std=0.0).up.bias.abs().max() == 0
    x = torch.randn(2, 5, 16, generator=gen)
    hidden = x @ ad.down.weight.T + ad.down.bias
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU
    torch.testing.assert_close(ad(x, "ignored"), 0.3 * (hidden @ ad.up.weight.T + ad.up.bias))
    assert sorted(n for n, _ in ad.named_parameters()) == ["down.bias", "down.weight", "up.bias", "up.weight"]
    ad.train()
    torch.manual_seed(0)
    assert not torch.equal(ad(x), ad(x))  # dropout 0.1 in training


def test_bottleneck_adapter_in_block_mlp_site(gen: torch.Generator) -> None:
    """x ← x + Attn + FFN + s · Adapter(FFN) (the official CLIP block with the adapter)."""
    block = Block(16, 2)
    ad = BottleneckAdapter(16, 4, 0.5)
    block.attach_adapter("mlp", ad)
    block.eval()
    x = torch.randn(2, 5, 16, generator=gen)
    h = x + block.attn(block.norm1(x))
    ffn = block.mlp(block.norm2(h))
    torch.testing.assert_close(block(x), h + ffn + ad(ffn))


def test_bottleneck_adapter_after_layer_scale_and_drop_path(gen: torch.Generator) -> None:
    """The official DINOv2 block: x_ffn = ls2(drop_path(FFN)); x ← x + x_ffn + s · Adapter(x_ffn).

    The adapter sees the LayerScale'd branch and its output is added unscaled and never dropped.
    """
    block = Block(16, 2, options=BlockOptions(layer_scale=0.5), drop_path=0.5)
    with torch.no_grad():
        block.ls1.gamma.copy_(torch.rand(16, generator=gen) + 0.1)
        block.ls2.gamma.copy_(torch.rand(16, generator=gen) + 0.1)
    ad = BottleneckAdapter(16, 4, 0.5, dropout=0.0)
    block.attach_adapter("mlp", ad)
    x = torch.randn(8, 5, 16, generator=gen)
    block.train()
    torch.manual_seed(3)
    out = block(x)
    torch.manual_seed(3)  # the same two drop-path draws, in the block's order
    keep_attn = torch.empty(8, 1, 1).bernoulli_(0.5) / 0.5
    keep_ffn = torch.empty(8, 1, 1).bernoulli_(0.5) / 0.5
    h = x + block.ls1.gamma * (keep_attn * block.attn(block.norm1(x)))
    x_ffn = block.ls2.gamma * (keep_ffn * block.mlp(block.norm2(h)))
    torch.testing.assert_close(out, h + x_ffn + ad(x_ffn))
    assert keep_ffn.min() == 0  # the seed drops some samples' branch ...
    assert keep_ffn.max() > 0  # ... but not all


# ---------------------------------------------------------------- guided adapter


def test_cell_attention_matches_official_attention1(gen: torch.Generator) -> None:
    attn = _randomize(CellAttention(DIM, 6, 3).double(), gen)
    assert isinstance(attn, CellAttention)
    x = torch.randn(3, 7, DIM, generator=gen, dtype=torch.float64)
    cells = torch.randint(0, 3, (3, 7), generator=gen)
    torch.testing.assert_close(
        attn(x, cells.unsqueeze(2) == cells.unsqueeze(1)), _slow_cell_attention(attn, x, cells)
    )
    with pytest.raises(ValueError, match="divide"):
        CellAttention(DIM, 12, 5)


@pytest.mark.parametrize("training", [False, True])
def test_voxel_branch_matches_loop_reference(gen: torch.Generator, training: bool) -> None:
    ad = _adapter(gen).train(training)
    centers = _centers(gen, 3)
    ids = voxel_cluster(centers, 0.4)
    assert int(ids.max()) >= 2  # several clusters
    tokens = torch.randn(3, GROUPS, DIM, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ad.voxel_branch(tokens, ids), _slow_voxel_branch(ad, tokens, ids, training))


@pytest.mark.parametrize("reduce_1d", ["mean", "maxmean"])
@pytest.mark.parametrize("training", [False, True])
def test_guided_adapter_matches_loop_reference(gen: torch.Generator, training: bool, reduce_1d: str) -> None:
    ad = _adapter(gen, reduce_1d).train(training)
    ctx = _context(_centers(gen, 2))
    x = torch.randn(2, GROUPS + 1, DIM, generator=gen, dtype=torch.float64)
    out = ad(x, ctx)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _slow_forward(ad, x, ctx, training))
    assert out[:, 0].abs().max() == 0  # CLS bypass


def test_guided_adapter_2d_context_and_no_cls(gen: torch.Generator) -> None:
    ad = _adapter(gen).eval()
    centers = _centers(gen, 2)
    ctx = guided_context_2d(
        centers, voxel_size=0.4, canvas=(304, 192), cell=64, translation=-1.4, has_cls=False
    )
    assert ctx.num_cells == 3 * 5
    x = torch.randn(2, GROUPS, DIM, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ad(x, ctx), _slow_forward(ad, x, ctx, training=False))


def test_contexts_are_built_from_raw_positions_and_pixels(gen: torch.Generator) -> None:
    centers = _centers(gen, 2)
    ctx = guided_context_1d(centers, voxel_size=0.3, direction=(1.0, -1.0, 0.0), translation=-1.4, cell=2.0)
    views = project_to_views(centers, -1.4)
    torch.testing.assert_close(ctx.view_cells, cells_1d(raw_positions_1d(views, (1.0, -1.0, 0.0)), 2.0))
    torch.testing.assert_close(ctx.voxel_ids, voxel_cluster(centers, 0.3))
    assert ctx.num_cells == 39
    assert ctx.has_cls
    ctx2 = guided_context_2d(centers, voxel_size=0.3, canvas=(518, 518), cell=26, translation=-1.8)
    expected = cells_2d(pixels_2d(project_to_views(centers, -1.8), (518, 518)), 26, (518, 518))
    torch.testing.assert_close(ctx2.view_cells, expected)
    assert ctx2.num_cells == 400


def test_eval_output_does_not_depend_on_batch_mates(gen: torch.Generator) -> None:
    ad = _adapter(gen).eval()
    centers = _centers(gen, 4)
    x = torch.randn(4, GROUPS + 1, DIM, generator=gen, dtype=torch.float64)
    together = ad(x, _context(centers))
    for b in range(4):
        alone = ad(x[b : b + 1], _context(centers[b : b + 1]))
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-12, atol=1e-12)
    # other batch-mates, same sample 0
    others = torch.cat([x[:1], torch.randn(3, GROUPS + 1, DIM, generator=gen, dtype=torch.float64)])
    centers2 = torch.cat([centers[:1], _centers(gen, 3)])
    torch.testing.assert_close(ad(others, _context(centers2))[:1], together[:1], rtol=1e-12, atol=1e-12)


def test_training_mode_batch_norm_mixes_samples(gen: torch.Generator) -> None:
    """BatchNorm in training mode uses batch statistics over clusters and cells (official behaviour)."""
    ad = _adapter(gen).train()
    centers = _centers(gen, 4)
    x = torch.randn(4, GROUPS + 1, DIM, generator=gen, dtype=torch.float64)
    together = ad(x, _context(centers))
    alone = ad(x[:2], _context(centers[:2]))
    assert (together[:2] - alone).abs().max() > 1e-6


def test_gradients_reach_every_adapter_parameter(gen: torch.Generator) -> None:
    ad = _adapter(gen).train()
    ctx = _context(_centers(gen, 3))
    x = torch.randn(3, GROUPS + 1, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    ad(x, ctx).pow(2).sum().backward()
    for name, p in ad.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None
    assert x.grad[:, 1:].abs().sum() > 0
    names = {n.split(".")[0] for n, _ in ad.named_parameters()}
    assert names == {"attn1", "norm3", "out_transform_3d", "out_transform_1d"}


def test_block_with_both_adapters_and_shared_view_attention(gen: torch.Generator) -> None:
    """Frozen blocks with Any2Point adapters: only adapters train; attn1 / norm3 shared across blocks."""
    attn1, norm3 = make_view_attention(DIM, 6, 6, 3)
    guided = [GuidedAdapter(DIM, coef=0.5, attn1=attn1, norm3=norm3) for _ in range(2)]
    blocks = nn.ModuleList()
    for adapter in guided:
        block = Block(DIM, 2)
        block.requires_grad_(False)
        block.attach_adapter("mlp", BottleneckAdapter(DIM, 4, 0.3))
        block.attach_adapter("output", adapter)
        blocks.append(block)
    assert guided[0].attn1 is guided[1].attn1
    ctx = guided_context_1d(_centers(gen, 3).float(), voxel_size=0.4, direction=(-1.0, 0.0, 1.0))
    x = torch.randn(3, GROUPS + 1, DIM, generator=gen)
    pos = torch.randn(3, GROUPS + 1, DIM, generator=gen)
    out, _ = run_blocks(blocks, x, pos, contexts=[ctx, ctx])
    assert out.shape == x.shape
    out.sum().backward()
    trainable = {n for n, p in blocks.named_parameters() if p.grad is not None}
    assert trainable
    assert all(".adapters." in n for n in trainable)
    assert any("attn1" in n for n in trainable)
    assert sum(1 for _ in blocks.parameters()) < len(dict(blocks.named_parameters(remove_duplicate=False)))


def test_context_and_adapter_validation(gen: torch.Generator) -> None:
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="does not match"):
        GuidedContext(voxel_ids=ids, view_cells=torch.zeros(2, 6, 4, dtype=torch.long), has_cls=True)
    with pytest.raises(ValueError, match="num_cells"):
        GuidedContext(voxel_ids=ids, view_cells=torch.full((2, 6, 5), 3), has_cls=True, num_cells=3)
    ad = GuidedAdapter(DIM)
    ctx = GuidedContext(voxel_ids=ids, view_cells=torch.zeros(2, 6, 5, dtype=torch.long), has_cls=True)
    with pytest.raises(ValueError, match="do not match"):
        ad(torch.randn(2, 5, DIM), ctx)
    with pytest.raises(TypeError, match="GuidedContext"):
        ad(torch.randn(2, 6, DIM), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="both"):
        GuidedAdapter(DIM, attn1=make_view_attention(DIM)[0])
    with pytest.raises(ValueError, match="views"):
        GuidedAdapter(DIM, num_views=4).eval()(torch.randn(2, 6, DIM), ctx)
