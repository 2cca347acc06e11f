"""The naive baseline the benchmarks run side by side with pcpt: the same models and weights, with the pieces
pcpt engineers replaced by their plain research-code formulations.

* attention as explicit ``softmax(q kᵀ / √d) v`` matmuls instead of ``F.scaled_dot_product_attention``;
* grouping with a per-sample Python-loop FPS (start index 0) and per-sample distance-matrix kNN instead of the
  batched ops;
* the mini-PointNet as the official channels-first Conv1d stacks with the global feature concatenated to
  every point, instead of channels-last matmuls that apply the global half of the 512-wide layer once per
  patch.

``make_naive(module)`` patches every such submodule of a model in place (encoders, dVAE tokenizers, momentum
copies). Imported by the benchmark scripts, which run from this folder.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.nn.pointnet import MiniPointNet
from pretrain.nn.transformer import Attention
from pretrain.ops.grouping import PatchGroups

__all__ = ["make_naive", "naive_fps"]


def naive_attention_forward(self: Attention, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    if attn_mask is not None:
        raise NotImplementedError("the naive baseline has no attention masks")
    batch, length, dim = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (dim // self.num_heads) ** -0.5
    out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, dim)
    result: Tensor = self.proj(out)
    return result


def naive_mini_pointnet_forward(self: MiniPointNet, patches: Tensor) -> Tensor:
    batch, groups, k, channels = patches.shape
    x = patches.reshape(batch * groups, k, channels).transpose(1, 2)
    feat = self.first_conv(x)
    feat = torch.cat([feat.amax(dim=2, keepdim=True).expand(-1, -1, k), feat], dim=1)
    return self.second_conv(feat).amax(dim=2).reshape(batch, groups, self.out_dim)


def naive_fps(xyz: Tensor, n: int) -> Tensor:
    """Plain per-sample loop FPS (start index 0), as in research codebases. Shapes: (B, N, 3) -> (B, n)."""
    out = []
    for cloud in xyz:
        dist = torch.full((cloud.shape[0],), float("inf"), device=cloud.device)
        chosen = [0]
        for _ in range(n - 1):
            dist = torch.minimum(dist, ((cloud - cloud[chosen[-1]]) ** 2).sum(-1))
            chosen.append(int(dist.argmax()))
        out.append(torch.tensor(chosen, device=cloud.device))
    return torch.stack(out)


def naive_group(self: Any, xyz: Tensor, *, generator: torch.Generator | None = None) -> PatchGroups:
    spec = self.spec
    center_idx = naive_fps(xyz, spec.num_groups)
    centers, neigh, idx = [], [], []
    for b in range(xyz.shape[0]):
        c = xyz[b, center_idx[b]]
        d = torch.cdist(c, xyz[b])
        i = d.topk(spec.group_size, dim=1, largest=False).indices
        centers.append(c)
        neigh.append(xyz[b, i] - c[:, None])
        idx.append(i)
    return PatchGroups(
        centers=torch.stack(centers),
        neighborhoods=torch.stack(neigh),
        idx=torch.stack(idx),
        center_idx=center_idx,
    )


def make_naive(model: nn.Module) -> nn.Module:
    """Patches attention, mini-PointNets and grouping (modules with ``group`` and a ``spec``) in place."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(naive_attention_forward, module)  # type: ignore[method-assign]
        elif isinstance(module, MiniPointNet):
            module.forward = types.MethodType(naive_mini_pointnet_forward, module)  # type: ignore[method-assign]
        if callable(getattr(module, "group", None)) and hasattr(getattr(module, "spec", None), "group_size"):
            module.group = types.MethodType(naive_group, module)  # type: ignore[method-assign]
    return model
