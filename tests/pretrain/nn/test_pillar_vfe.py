from __future__ import annotations

import pytest
import torch

from pretrain.nn.pillar_vfe import DynamicScatterVFE, scatter_max, scatter_mean


def _vfe_reference(vfe: DynamicScatterVFE, points: torch.Tensor, pillar: torch.Tensor, centers: torch.Tensor):
    """Per-pillar Python loops for the mean and the max; layers applied to all points at once (BatchNorm)."""
    num = len(centers)
    members = [[i for i in range(len(points)) if int(pillar[i]) == p] for p in range(num)]
    offsets = torch.zeros(len(points), 6)
    for p, rows in enumerate(members):
        mean = points[rows, :3].mean(0)
        for i in rows:
            offsets[i, :3] = points[i, :3] - mean
            offsets[i, 3:] = points[i, :3] - centers[p]
    x = torch.cat([points, offsets], 1)
    for k, layer in enumerate(vfe.vfe_layers):
        x = torch.relu(layer.norm(layer.linear(x)))
        pooled = torch.stack([x[rows].max(0).values if rows else torch.zeros(x.shape[1]) for rows in members])
        if k < len(vfe.vfe_layers) - 1:
            x = torch.cat([x, pooled[pillar]], 1)
    return pooled


def _case(gen: torch.Generator, num_points: int = 60, num_pillars: int = 9, channels: int = 5):
    pillar = torch.cat(
        [torch.arange(num_pillars), torch.randint(0, num_pillars, (num_points - num_pillars,), generator=gen)]
    )
    pillar = pillar[torch.randperm(num_points, generator=gen)]
    centers = torch.randn(num_pillars, 3, generator=gen) * 3
    points = torch.randn(num_points, channels, generator=gen)
    points[:, :3] = centers[pillar] + 0.1 * points[:, :3]
    return points, pillar, centers


def _randomize_bn(vfe: DynamicScatterVFE, gen: torch.Generator) -> None:
    with torch.no_grad():
        for layer in vfe.vfe_layers:
            layer.norm.running_mean.copy_(torch.randn(layer.norm.num_features, generator=gen) * 0.1)
            layer.norm.running_var.copy_(torch.rand(layer.norm.num_features, generator=gen) + 0.5)
            layer.norm.weight.copy_(torch.rand(layer.norm.num_features, generator=gen) + 0.5)
            layer.norm.bias.copy_(torch.randn(layer.norm.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize("training", [False, True])
def test_vfe_matches_loop_reference(gen: torch.Generator, training: bool) -> None:
    vfe = DynamicScatterVFE(5, (16, 24, 32))
    _randomize_bn(vfe, gen)
    vfe.train(training)
    points, pillar, centers = _case(gen)
    state = {k: v.clone() for k, v in vfe.state_dict().items()}
    out = vfe(points, pillar, centers)
    vfe.load_state_dict(state)  # the reference sees the same running statistics
    expected = _vfe_reference(vfe, points, pillar, centers)
    assert out.shape == (9, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_vfe_names_shapes_and_batchnorm_settings() -> None:
    vfe = DynamicScatterVFE(5)
    assert vfe.out_channels == 128
    shapes = {k: tuple(v.shape) for k, v in vfe.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert shapes == {
        "vfe_layers.0.linear.weight": (64, 11),
        "vfe_layers.0.norm.weight": (64,),
        "vfe_layers.0.norm.bias": (64,),
        "vfe_layers.0.norm.running_mean": (64,),
        "vfe_layers.0.norm.running_var": (64,),
        "vfe_layers.1.linear.weight": (128, 128),
        "vfe_layers.1.norm.weight": (128,),
        "vfe_layers.1.norm.bias": (128,),
        "vfe_layers.1.norm.running_mean": (128,),
        "vfe_layers.1.norm.running_var": (128,),
    }
    norm = vfe.vfe_layers[0].norm
    assert (norm.eps, norm.momentum) == (1e-3, 0.01)


def test_vfe_gradients_and_edge_cases(gen: torch.Generator) -> None:
    vfe = DynamicScatterVFE(4, (8, 8))
    points, pillar, centers = _case(gen, channels=4)
    points.requires_grad_(True)
    vfe(points, pillar, centers).sum().backward()
    assert points.grad is not None
    assert points.grad.isfinite().all()
    assert all(p.grad is not None for p in vfe.parameters())
    assert vfe(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(3, 3)).shape == (3, 8)
    with pytest.raises(ValueError, match=r"\(M, 4\)"):
        vfe(torch.zeros(5, 3), torch.zeros(5, dtype=torch.int64), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="in_channels"):
        DynamicScatterVFE(2)
    with pytest.raises(ValueError, match="dims"):
        DynamicScatterVFE(4, ())


def test_scatter_max_and_mean(gen: torch.Generator) -> None:
    src = -torch.rand(7, 3, generator=gen) - 1.0  # all negative: the max must not be clipped at 0
    index = torch.tensor([0, 2, 2, 0, 2, 3, 0])
    expected_max = torch.stack(
        [src[index == g].max(0).values if (index == g).any() else torch.zeros(3) for g in range(4)]
    )
    torch.testing.assert_close(scatter_max(src, index, 4), expected_max)
    expected_mean = torch.stack(
        [src[index == g].mean(0) if (index == g).any() else torch.zeros(3) for g in range(4)]
    )
    torch.testing.assert_close(scatter_mean(src, index, 4), expected_mean)
