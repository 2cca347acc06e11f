from __future__ import annotations

import copy

import pytest
import torch

from pretrain.nn import CenterPosEmbed, MiniPointNet


def _mini_pointnet_reference(net: MiniPointNet, patches: torch.Tensor) -> torch.Tensor:
    """Point by point, group by group, with the BatchNorm formula written out (eval mode)."""

    def conv(layer: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:  # x (K, C)
        return x @ layer.weight[:, :, 0].T + layer.bias

    def bn(layer: torch.nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
        assert layer.running_mean is not None
        assert layer.running_var is not None
        return (x - layer.running_mean) / torch.sqrt(
            layer.running_var + layer.eps
        ) * layer.weight + layer.bias

    b, g, _, _ = patches.shape
    out = torch.empty(b, g, net.out_dim)
    f1, f2 = net.first_conv, net.second_conv
    for i in range(b):
        for j in range(g):
            pts = patches[i, j]
            feat = conv(f1[3], torch.relu(bn(f1[1], conv(f1[0], pts))))  # (K, 256)
            glob = feat.max(dim=0).values.expand_as(feat)
            feat = torch.cat([glob, feat], dim=1)
            feat = conv(f2[3], torch.relu(bn(f2[1], conv(f2[0], feat))))
            out[i, j] = feat.max(dim=0).values
    return out


@pytest.fixture
def net(gen: torch.Generator) -> MiniPointNet:
    net = MiniPointNet(24)
    with torch.no_grad():
        for bn in (net.first_conv[1], net.second_conv[1]):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    return net.eval()


def test_matches_pointwise_reference(net: MiniPointNet, gen: torch.Generator) -> None:
    patches = torch.randn(2, 3, 5, 3, generator=gen)
    torch.testing.assert_close(net(patches), _mini_pointnet_reference(net, patches), atol=1e-5, rtol=1e-5)


def _official_conv1d_forward(net: MiniPointNet, patches: torch.Tensor) -> torch.Tensor:
    """The official formulation: channels-first Conv1d, the global feature concatenated to every point."""
    b, g, k, c = patches.shape
    x = patches.reshape(b * g, k, c).transpose(1, 2)
    feat = net.first_conv(x)
    feat = torch.cat([feat.amax(dim=2, keepdim=True).expand(-1, -1, k), feat], dim=1)
    return net.second_conv(feat).amax(dim=2).reshape(b, g, net.out_dim)


def test_training_mode_matches_official_conv1d_formulation(gen: torch.Generator) -> None:
    """Outputs, BatchNorm running statistics and gradients agree with the literal Conv1d computation."""
    fast = MiniPointNet(24).train()
    official = copy.deepcopy(fast)
    patches = torch.randn(3, 4, 7, 3, generator=gen)
    out_fast, out_official = fast(patches), _official_conv1d_forward(official, patches)
    torch.testing.assert_close(out_fast, out_official, atol=1e-5, rtol=1e-5)
    weights = torch.randn(out_fast.shape, generator=gen)
    (out_fast * weights).sum().backward()
    (out_official * weights).sum().backward()
    for (name, a), (_, b) in zip(fast.named_parameters(), official.named_parameters(), strict=True):
        assert a.grad is not None
        assert b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, a), (_, b) in zip(fast.named_buffers(), official.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_official_names_and_conv_shapes() -> None:
    state = MiniPointNet(384).state_dict()
    assert state["first_conv.0.weight"].shape == (128, 3, 1)
    assert state["first_conv.3.weight"].shape == (256, 128, 1)
    assert state["second_conv.0.weight"].shape == (512, 512, 1)
    assert state["second_conv.3.weight"].shape == (384, 512, 1)
    assert "first_conv.1.running_mean" in state
    assert "second_conv.1.num_batches_tracked" in state


def test_invariant_to_point_order(net: MiniPointNet, gen: torch.Generator) -> None:
    patches = torch.randn(1, 4, 6, 3, generator=gen)
    perm = torch.randperm(6, generator=gen)
    torch.testing.assert_close(net(patches), net(patches[:, :, perm]), atol=1e-6, rtol=1e-6)


def test_rejects_bad_shapes(net: MiniPointNet) -> None:
    with pytest.raises(ValueError, match=r"\(B, G, K, 3\)"):
        net(torch.zeros(2, 5, 3))


def test_pos_embed_names_and_shape(gen: torch.Generator) -> None:
    pos = CenterPosEmbed(16)
    assert sorted(pos.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert pos[0].weight.shape == (128, 3)
    centers = torch.randn(2, 5, 3, generator=gen)
    expected = pos[2](torch.nn.functional.gelu(pos[0](centers)))
    torch.testing.assert_close(pos(centers), expected)
    assert pos(centers).shape == (2, 5, 16)
