"""The official Point-MAE pre-training model, restated from its published equations for CPU benchmarks.

Pang et al., "Masked Autoencoders for Point Cloud Self-supervised Learning", ECCV 2022; the structure, module
names and training step follow the official ``models/Point_MAE.py`` and ``tools/runner_pretrain.py`` as
documented in ``METHODS.md`` §1 and §3. The official code needs three CUDA extensions; they are replaced by
pure-torch stand-ins that do the same arithmetic work:

* ``pointnet2_ops.furthest_point_sample``: an iterative FPS from index 0 over the whole batch (one distance
  update and one arg-max per pick), skipping points with ``x²+y²+z² <= 1e-3`` as the kernel does;
* ``KNN_CUDA`` (``transpose_mode=True``): a Python loop over the batch, brute-force distances and a sorted
  top-k per cloud, as that extension does;
* ``ChamferDistanceL2``: the full squared-distance matrix of each pair of patches and its minima both ways,
  ``mean(d1) + mean(d2)``.

Everything else is the official computation in the official layout: the mini-PointNet as channels-first
``Conv1d`` stacks that concatenate the 256-d global feature to every point and run on **all** 64 patches
(masked ones included, then discarded), a per-sample numpy shuffle for the random mask, timm-0.4.5 blocks with
explicit ``softmax(q kᵀ/√d) v`` attention and ``drop_path`` by a floored random tensor, the decoder over
[visible; mask tokens] with its positional MLP re-added before each block, a Conv1d head, and
``torch.optim.AdamW`` over the official two parameter groups (no decay for 1-D parameters, biases and names
containing ``token``). Parameter names equal the official checkpoint's, so ``state_dict_from_pcpt`` maps a
pcpt :class:`~pretrain.methods.point_mae.PointMAE` onto it (used by the test that this restatement computes
pcpt's loss).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["OfficialPointMAE", "official_optimizer", "state_dict_from_pcpt"]


def fps_standin(xyz: Tensor, count: int) -> Tensor:
    """Furthest point sampling from index 0 with pointnet2_ops' near-origin skip. (B, N, 3) -> (B, count)."""
    batch, num_points, _ = xyz.shape
    eligible = (xyz * xyz).sum(-1) > 1e-3
    dist = torch.full((batch, num_points), 1e10, device=xyz.device)
    chosen = torch.zeros(batch, count, dtype=torch.long, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    last = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    for i in range(1, count):
        step = ((xyz - xyz[rows, last][:, None]) ** 2).sum(-1)
        dist = torch.minimum(dist, step)
        last = torch.where(eligible, dist, torch.full_like(dist, -1.0)).argmax(dim=1)
        chosen[:, i] = last
    return chosen


def knn_standin(ref: Tensor, query: Tensor, k: int) -> Tensor:
    """KNN_CUDA's loop over the batch: brute-force distances, k smallest sorted. -> (B, Q, k) indices."""
    out = []
    for b in range(ref.shape[0]):
        dist = ((query[b][:, None] - ref[b][None]) ** 2).sum(-1)  # (Q, N)
        out.append(dist.topk(k, dim=1, largest=False, sorted=True).indices)
    return torch.stack(out)


def chamfer_l2_standin(x: Tensor, y: Tensor) -> Tensor:
    """ChamferDistanceL2: mean squared NN distance x→y plus y→x over all points. x, y: (P, K, 3)."""
    dist = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)  # (P, Kx, Ky)
    return dist.amin(dim=2).mean() + dist.amin(dim=1).mean()


class Group(nn.Module):
    """FPS centres + kNN patches relative to their centre."""

    def __init__(self, num_group: int, group_size: int) -> None:
        super().__init__()
        self.num_group, self.group_size = num_group, group_size

    def forward(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, 3) -> neighborhood (B, G, K, 3), center (B, G, 3)."""
        batch, num_points, _ = xyz.shape
        center = torch.gather(xyz, 1, fps_standin(xyz, self.num_group)[..., None].expand(-1, -1, 3))
        idx = knn_standin(xyz, center, self.group_size)
        base = torch.arange(batch, device=xyz.device).view(-1, 1, 1) * num_points
        neighborhood = xyz.reshape(batch * num_points, 3)[(idx + base).view(-1)]
        neighborhood = neighborhood.view(batch, self.num_group, self.group_size, 3)
        return neighborhood - center[:, :, None], center


class Encoder(nn.Module):
    """The official mini-PointNet: channels-first Conv1d stacks, the global feature concatenated per point."""

    def __init__(self, encoder_channel: int) -> None:
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Conv1d(512, encoder_channel, 1),
        )

    def forward(self, point_groups: Tensor) -> Tensor:
        """(B, G, K, 3) -> (B, G, C)."""
        batch, groups, k, _ = point_groups.shape
        feature = self.first_conv(point_groups.reshape(batch * groups, k, 3).transpose(2, 1))
        feature_global = torch.max(feature, dim=2, keepdim=True)[0]
        feature = torch.cat([feature_global.expand(-1, -1, k), feature], dim=1)
        feature = self.second_conv(feature)
        return torch.max(feature, dim=2, keepdim=False)[0].reshape(batch, groups, self.encoder_channel)


def drop_path(x: Tensor, prob: float, training: bool) -> Tensor:
    """timm's per-sample stochastic depth."""
    if prob == 0.0 or not training:
        return x
    keep = 1 - prob
    random_tensor = keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    return x.div(keep) * random_tensor.floor_()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        qkv = (
            self.qkv(x)
            .reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out: Tensor = self.proj((attn @ v).transpose(1, 2).reshape(batch, length, dim))
        return out


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.act(self.fc1(x)))
        return out


class Block(nn.Module):
    """timm 0.4.5 pre-norm ViT block (no qkv bias, dropout 0)."""

    def __init__(self, dim: int, num_heads: int, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, dim * 4)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class TransformerStack(nn.Module):
    """``x = block(x + pos)`` for every block (the official ``TransformerEncoder``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, drop_path_rate: float) -> None:
        super().__init__()
        rates = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(Block(dim, num_heads, rate) for rate in rates)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class TransformerDecoder(TransformerStack):
    """The official ``TransformerDecoder``: the blocks, then LayerNorm of the last ``count`` tokens."""

    def __init__(self, dim: int, depth: int, num_heads: int, drop_path_rate: float) -> None:
        super().__init__(dim, depth, num_heads, drop_path_rate)
        self.norm = nn.LayerNorm(dim)

    def decode(self, x: Tensor, pos: Tensor, count: int) -> Tensor:
        out: Tensor = self.norm(self.forward(x, pos)[:, -count:])
        return out


def pos_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))


class MaskTransformer(nn.Module):
    """The official ``MAE_encoder``: random mask, mini-PointNet on all patches, transformer on the visible."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, mask_ratio: float, drop_path_rate: float
    ) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio
        self.encoder = Encoder(dim)
        self.pos_embed = pos_mlp(dim)
        self.blocks = TransformerStack(dim, depth, num_heads, drop_path_rate)
        self.norm = nn.LayerNorm(dim)

    def mask_center_rand(self, center: Tensor, rng: np.random.Generator) -> Tensor:
        """Per sample, exactly ``int(mask_ratio * G)`` patches masked by a numpy shuffle. -> bool (B, G)."""
        batch, groups, _ = center.shape
        num_mask = int(self.mask_ratio * groups)
        overall = np.zeros([batch, groups])
        for i in range(batch):
            mask = np.hstack([np.zeros(groups - num_mask), np.ones(num_mask)])
            rng.shuffle(mask)
            overall[i, :] = mask
        return torch.from_numpy(overall).to(torch.bool).to(center.device)

    def forward(self, neighborhood: Tensor, center: Tensor, mask: Tensor) -> Tensor:
        tokens = self.encoder(neighborhood)  # all patches, masked ones included
        batch, _, dim = tokens.shape
        x_vis = tokens[~mask].reshape(batch, -1, dim)
        pos = self.pos_embed(center[~mask].reshape(batch, -1, 3))
        out: Tensor = self.norm(self.blocks(x_vis, pos))
        return out


class OfficialPointMAE(nn.Module):
    """The official ``Point_MAE`` pre-training model (loss ``cdl2``), parameter names as in its checkpoints.

    Args:
        dim: ``trans_dim`` (= ``encoder_dims``).
        depth: encoder depth.
        num_heads: heads of encoder and decoder.
        decoder_depth: decoder depth.
        num_group: patches per cloud.
        group_size: points per patch.
        mask_ratio: fraction of patches masked.
        drop_path_rate: stochastic depth of the last encoder and decoder block.
    """

    def __init__(
        self,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        decoder_depth: int = 4,
        num_group: int = 64,
        group_size: int = 32,
        mask_ratio: float = 0.6,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.group_size = group_size
        self.MAE_encoder = MaskTransformer(dim, depth, num_heads, mask_ratio, drop_path_rate)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = pos_mlp(dim)
        self.MAE_decoder = TransformerDecoder(dim, decoder_depth, num_heads, drop_path_rate)
        self.group_divider = Group(num_group, group_size)
        self.increase_dim = nn.Sequential(nn.Conv1d(dim, 3 * group_size, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(
        self, pts: Tensor, rng: np.random.Generator | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """The ``cdl2`` loss of clouds (B, N, 3); the bool (B, G) mask is drawn from ``rng`` unless given."""
        neighborhood, center = self.group_divider(pts)
        if mask is None:
            mask = self.MAE_encoder.mask_center_rand(center, rng or np.random.default_rng())
        x_vis = self.MAE_encoder(neighborhood, center, mask)
        batch, _, dim = x_vis.shape
        pos_vis = self.decoder_pos_embed(center[~mask]).reshape(batch, -1, dim)
        pos_mask = self.decoder_pos_embed(center[mask]).reshape(batch, -1, dim)
        num_mask = pos_mask.shape[1]
        x_full = torch.cat([x_vis, self.mask_token.expand(batch, num_mask, -1)], dim=1)
        pos_full = torch.cat([pos_vis, pos_mask], dim=1)
        x_rec = self.MAE_decoder.decode(x_full, pos_full, num_mask)
        rebuild = self.increase_dim(x_rec.transpose(1, 2)).transpose(1, 2).reshape(batch * num_mask, -1, 3)
        gt_points = neighborhood[mask].reshape(batch * num_mask, -1, 3)
        return chamfer_l2_standin(rebuild, gt_points)


def official_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """The official builder's AdamW: no decay for 1-D parameters, ``.bias`` and names containing ``token``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith(".bias") or "token" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr)


def state_dict_from_pcpt(pcpt_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Renames a pcpt ``PointMAE`` state dict (point_vit encoder, Point-MAE decoder) to this model's names."""
    renames = (
        ("encoder.tokenizer.", "MAE_encoder.encoder."),
        ("encoder.pos_embed.", "MAE_encoder.pos_embed."),
        ("encoder.blocks.", "MAE_encoder.blocks.blocks."),
        ("encoder.norm.", "MAE_encoder.norm."),
        ("decoder.mask_token", "mask_token"),
        ("decoder.pos_embed.", "decoder_pos_embed."),
        ("decoder.blocks.", "MAE_decoder.blocks."),
        ("decoder.norm.", "MAE_decoder.norm."),
        ("decoder.head.", "increase_dim.0."),
    )
    out = {}
    for key, value in pcpt_state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        else:
            raise KeyError(f"no official name for pcpt parameter {key!r}")
        out[key] = value[..., None] if key == "increase_dim.0.weight" else value
    return out
