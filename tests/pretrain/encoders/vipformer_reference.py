"""An independent, deliberately plain re-implementation of the ViPFormer encoders (METHODS.md §5.2, §5.3).

It reads weights by their **official** key names (``group2emb.*``, ``position_emb.*``, ``input_adapter.*``,
``encoder.cross_attn_1.*`` / ``encoder.cross_attn_n.*``, ``encoder.sa_layers.*``, ``patch2emb.1.*``) and
computes the eval-mode forward pass with explicit matmuls, an explicit softmax, explicit LayerNorm /
BatchNorm / exact GELU formulas and Python loops over clouds, patches and heads. Nothing here imports pcpt
model code. Also: official key/shape tables and random official state dicts for tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Weights = dict[str, Tensor]

# ------------------------------------------------------------------------------------------ primitives


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = x @ weight.reshape(weight.shape[0], -1).T
    return out if bias is None else out + bias


def layer_norm(x: Tensor, w: Weights, prefix: str, eps: float = 1e-5) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w[prefix + "weight"] + w[prefix + "bias"]


def batch_norm_eval(x: Tensor, w: Weights, prefix: str, eps: float = 1e-5) -> Tensor:
    """Channels last: (..., C)."""
    mean, var = w[prefix + "running_mean"], w[prefix + "running_var"]
    return (x - mean) / torch.sqrt(var + eps) * w[prefix + "weight"] + w[prefix + "bias"]


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def softmax(x: Tensor) -> Tensor:
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------ trunk


def attention(w: Weights, prefix: str, x_q: Tensor, x_kv: Tensor, heads: int) -> Tensor:
    """x_q (L, D), x_kv (M, C) of one sample -> (L, D)."""
    q = linear(x_q, w[prefix + "q_proj.weight"])
    k = linear(x_kv, w[prefix + "k_proj.weight"])
    v = linear(x_kv, w[prefix + "v_proj.weight"])
    dh = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        probs = softmax(q[:, cols] @ k[:, cols].T / math.sqrt(dh))
        outs.append(probs @ v[:, cols])
    return linear(torch.cat(outs, dim=-1), w[prefix + "o_proj.weight"], w[prefix + "o_proj.bias"])


def mlp(w: Weights, prefix: str, x: Tensor) -> Tensor:
    h = layer_norm(x, w, prefix + "0.")
    h = gelu(linear(h, w[prefix + "1.weight"], w[prefix + "1.bias"]))
    return linear(h, w[prefix + "3.weight"], w[prefix + "3.bias"])


def cross_layer(w: Weights, prefix: str, x: Tensor, memory: Tensor, heads: int) -> Tensor:
    q = layer_norm(x, w, prefix + "0.module.q_norm.")
    kv = layer_norm(memory, w, prefix + "0.module.kv_norm.")
    x = x + attention(w, prefix + "0.module.attention.", q, kv, heads)
    return x + mlp(w, prefix + "1.module.", x)


def sa_layer(w: Weights, prefix: str, x: Tensor, heads: int) -> Tensor:
    h = layer_norm(x, w, prefix + "0.module.norm.")
    x = x + attention(w, prefix + "0.module.attention.", h, h, heads)
    return x + mlp(w, prefix + "1.module.", x)


def num_sa_layers(w: Weights) -> int:
    return len({k.split(".")[2] for k in w if k.startswith("encoder.sa_layers.")})


def encoder(
    w: Weights, latents: Tensor, pos: Tensor, memory: Tensor, heads: int, num_cross: int = 1
) -> tuple[Tensor, list[Tensor]]:
    """Official ``Encoder.forward`` for one sample: pos re-added before every layer. Returns (x, layers)."""
    x = cross_layer(w, "encoder.cross_attn_1.", latents + pos, memory, heads)
    layers = [x]
    for i in range(num_sa_layers(w)):
        if i + 1 < num_cross:
            x = cross_layer(w, "encoder.cross_attn_n.", x + pos, memory, heads)
        x = sa_layer(w, f"encoder.sa_layers.{i}.", x + pos, heads)
        layers.append(x)
    return x, layers


# ------------------------------------------------------------------------------------------ point model


def fps(points: Tensor, count: int) -> list[int]:
    """Start at index 0; next = first index of the largest distance to the chosen set."""
    chosen = [0]
    dist = torch.full((points.shape[0],), math.inf, dtype=points.dtype)
    while len(chosen) < count:
        d = ((points - points[chosen[-1]]) ** 2).sum(dim=-1)
        dist = torch.minimum(dist, d)
        chosen.append(int(torch.argmax(dist)))
    return chosen


def knn(points: Tensor, center: Tensor, k: int) -> list[int]:
    d = ((points - center) ** 2).sum(dim=-1)
    return [int(i) for i in torch.argsort(d, stable=True)[:k]]


def patch_points(points: Tensor, center: Tensor, idx: list[int], official_centering: bool) -> Tensor:
    """(K, 3): every neighbour centred, or (official) only the 3 lowest-index ones; loops over neighbours."""
    lowest = sorted(idx)[:3]
    rows = []
    for i in idx:
        centred = not official_centering or i in lowest
        rows.append(points[i] - center if centred else points[i])
    return torch.stack(rows)


def group2emb(w: Weights, patch: Tensor) -> Tensor:
    """(K, 3) -> (D,): official Group2Emb in channels-last form."""
    f = linear(patch, w["group2emb.first_conv.0.weight"], w["group2emb.first_conv.0.bias"])
    f = torch.relu(batch_norm_eval(f, w, "group2emb.first_conv.1."))
    f = linear(f, w["group2emb.first_conv.3.weight"], w["group2emb.first_conv.3.bias"])
    glob = f.max(dim=0).values
    f = torch.cat([glob.expand_as(f), f], dim=-1)  # global first
    f = linear(f, w["group2emb.second_conv.0.weight"], w["group2emb.second_conv.0.bias"])
    f = torch.relu(batch_norm_eval(f, w, "group2emb.second_conv.1."))
    f = linear(f, w["group2emb.second_conv.3.weight"], w["group2emb.second_conv.3.bias"])
    return f.max(dim=0).values


def point_forward(
    w: Weights,
    xyz: Tensor,
    *,
    num_latents: int,
    group_size: int,
    heads: int,
    official_centering: bool,
    num_cross: int = 1,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Clouds (B, N, 3) -> latents (B, G, D), centres (B, G, 3), [layer outputs (B, G, D)]."""
    all_latents, all_centers, all_layers = [], [], []
    for points in xyz:
        center_idx = fps(points, num_latents)
        centers = points[center_idx]
        tokens = []
        for center in centers:
            idx = knn(points, center, group_size)
            tokens.append(group2emb(w, patch_points(points, center, idx, official_centering)))
        h = gelu(linear(centers, w["position_emb.0.weight"], w["position_emb.0.bias"]))
        pos = linear(h, w["position_emb.2.weight"], w["position_emb.2.bias"])
        m = linear(points, w["input_adapter.point_mlp.0.weight"], w["input_adapter.point_mlp.0.bias"])
        m = torch.relu(layer_norm(m, w, "input_adapter.point_mlp.1."))
        memory = linear(m, w["input_adapter.point_mlp.3.weight"], w["input_adapter.point_mlp.3.bias"])
        x, layers = encoder(w, torch.stack(tokens), pos, memory, heads, num_cross)
        all_latents.append(x)
        all_centers.append(centers)
        all_layers.append(layers)
    stacked = [torch.stack([layers[i] for layers in all_layers]) for i in range(len(all_layers[0]))]
    return torch.stack(all_latents), torch.stack(all_centers), stacked


def backbone_feats(latents: Tensor) -> Tensor:
    return torch.cat([latents.max(dim=1).values, latents.mean(dim=1)], dim=-1)


# ------------------------------------------------------------------------------------------ image model


def image_forward(w: Weights, images: Tensor, *, heads: int, num_cross: int = 1) -> Tensor:
    """Images (B, 3, H, W) -> tokens (B, L, D); patches flattened in (p1, p2, c) order by loops."""
    _dim, patch_dim = w["patch2emb.1.weight"].shape
    p = math.isqrt(patch_dim // 3)
    out = []
    for image in images:
        rows = []
        for i in range(image.shape[1] // p):
            for j in range(image.shape[2] // p):
                vec = [
                    image[c, i * p + p1, j * p + p2] for p1 in range(p) for p2 in range(p) for c in range(3)
                ]
                rows.append(torch.stack(vec))
        tokens = linear(torch.stack(rows), w["patch2emb.1.weight"], w["patch2emb.1.bias"])
        x, _ = encoder(w, tokens, w["position_emb"][0], tokens, heads, num_cross)
        out.append(x)
    return torch.stack(out)


# ------------------------------------------------------------------------------------ official layouts


def _trunk_shapes(
    dim: int, num_sa: int, ratio: int, cross_prefixes: tuple[str, ...]
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def mlp_shapes(prefix: str) -> None:
        shapes.update(
            {
                prefix + "0.weight": (dim,),
                prefix + "0.bias": (dim,),
                prefix + "1.weight": (ratio * dim, dim),
                prefix + "1.bias": (ratio * dim,),
                prefix + "3.weight": (dim, ratio * dim),
                prefix + "3.bias": (dim,),
            }
        )

    def attn_shapes(prefix: str) -> None:
        for name in ("q", "k", "v"):
            shapes[f"{prefix}{name}_proj.weight"] = (dim, dim)
        shapes[prefix + "o_proj.weight"] = (dim, dim)
        shapes[prefix + "o_proj.bias"] = (dim,)

    for cross in cross_prefixes:
        for norm in ("q_norm", "kv_norm"):
            shapes[f"{cross}0.module.{norm}.weight"] = (dim,)
            shapes[f"{cross}0.module.{norm}.bias"] = (dim,)
        attn_shapes(cross + "0.module.attention.")
        mlp_shapes(cross + "1.module.")
    for i in range(num_sa):
        prefix = f"encoder.sa_layers.{i}."
        shapes[prefix + "0.module.norm.weight"] = (dim,)
        shapes[prefix + "0.module.norm.bias"] = (dim,)
        attn_shapes(prefix + "0.module.attention.")
        mlp_shapes(prefix + "1.module.")
    return shapes


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {prefix + n: (channels,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        prefix + "num_batches_tracked": ()
    }


def _head_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    return (
        _bn("latent_head.0.", 2 * dim)
        | {"latent_head.2.weight": (dim, 2 * dim)}
        | _bn("latent_head.3.", dim)
        | {"latent_head.5.weight": (dim, dim)}
    )


def official_point_shapes(dim: int, num_sa: int, ratio: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official point model (``CrossFormer_pc_mp``, one cross-attention layer)."""
    shapes: dict[str, tuple[int, ...]] = {
        "group2emb.first_conv.0.weight": (64, 3, 1),
        "group2emb.first_conv.0.bias": (64,),
        **_bn("group2emb.first_conv.1.", 64),
        "group2emb.first_conv.3.weight": (128, 64, 1),
        "group2emb.first_conv.3.bias": (128,),
        "group2emb.second_conv.0.weight": (256, 256, 1),
        "group2emb.second_conv.0.bias": (256,),
        **_bn("group2emb.second_conv.1.", 256),
        "group2emb.second_conv.3.weight": (dim, 256, 1),
        "group2emb.second_conv.3.bias": (dim,),
        "position_emb.0.weight": (128, 3),
        "position_emb.0.bias": (128,),
        "position_emb.2.weight": (dim, 128),
        "position_emb.2.bias": (dim,),
        "input_adapter.point_mlp.0.weight": (64, 3),
        "input_adapter.point_mlp.0.bias": (64,),
        "input_adapter.point_mlp.1.weight": (64,),
        "input_adapter.point_mlp.1.bias": (64,),
        "input_adapter.point_mlp.3.weight": (dim, 64),
        "input_adapter.point_mlp.3.bias": (dim,),
    }
    shapes.update(_trunk_shapes(dim, num_sa, ratio, ("encoder.cross_attn_n.", "encoder.cross_attn_1.")))
    shapes.update(_head_shapes(dim))
    return shapes


def official_image_shapes(
    dim: int, num_sa: int, ratio: int, num_patches: int, patch: int
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official image model (``CrossFormer_img_mp``, one cross-attention layer)."""
    shapes: dict[str, tuple[int, ...]] = {
        "position_emb": (1, num_patches, dim),
        "patch2emb.1.weight": (dim, patch * patch * 3),
        "patch2emb.1.bias": (dim,),
    }
    shapes.update(_trunk_shapes(dim, num_sa, ratio, ("encoder.cross_attn_n.", "encoder.cross_attn_1.")))
    shapes.update(_head_shapes(dim))
    return shapes


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """A well-scaled random value for a weight of this name and shape."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(7)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if key.endswith(("running_mean", "bias")):
        return 0.1 * torch.randn(shape, generator=gen)
    if key in ("position_emb", "pos_embed"):
        return 0.5 * torch.randn(shape, generator=gen)
    if len(shape) == 1:  # LayerNorm / BatchNorm scale
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def random_official_state(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> Weights:
    """Random weights; ``encoder.cross_attn_1.*`` are the same tensors as ``encoder.cross_attn_n.*``."""
    state: Weights = {}
    for key in sorted(shapes):
        if key.startswith("encoder.cross_attn_1."):
            continue
        state[key] = random_tensor(key, shapes[key], gen)
    for key in shapes:
        if key.startswith("encoder.cross_attn_1."):
            state[key] = state["encoder.cross_attn_n." + key[len("encoder.cross_attn_1.") :]]
    return {k: state[k] for k in shapes}
