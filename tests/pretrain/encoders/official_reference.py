"""An independent, loop-style re-implementation of the official Point-MAE / Point-BERT modules.

Module and parameter names follow the official repositories (``Pang-Yatian/Point-MAE:models/Point_MAE.py``,
``lulutang0608/Point-BERT:models/Point_BERT.py``, ``models/dvae.py``) so that ``state_dict()`` produces the
official checkpoint key layout. Attention is written out with an explicit softmax, the mini-PointNet runs
Conv1d on (B*G, C, K) as the official code does, FPS is a Python loop with the pointnet2 near-origin skip and
kNN is a brute-force sorted search. Used only by tests, to check pcpt's encoder and importers.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

# ------------------------------------------------------------------------------------------ grouping


def fps_reference(xyz: Tensor, n: int, *, skip_near_origin: bool = True) -> Tensor:
    """pointnet2_ops semantics: start at index 0, never pick points with x²+y²+z² <= 1e-3 afterwards."""
    out = torch.empty(xyz.shape[0], n, dtype=torch.long)
    for b in range(xyz.shape[0]):
        pts = xyz[b].tolist()
        temp = [1e10] * len(pts)
        old = 0
        out[b, 0] = 0
        for j in range(1, n):
            best, besti = -1.0, 0
            ox, oy, oz = pts[old]
            for k, (x, y, z) in enumerate(pts):
                if skip_near_origin and x * x + y * y + z * z <= 1e-3:
                    continue
                d = (x - ox) ** 2 + (y - oy) ** 2 + (z - oz) ** 2
                d2 = min(d, temp[k])
                temp[k] = d2
                if d2 > best:
                    best, besti = d2, k
            old = besti
            out[b, j] = old
    return out


def group_reference(xyz: Tensor, num_groups: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Official ``Group``: FPS centres, k nearest input points, centre-relative -> (neighborhood, center)."""
    idx = fps_reference(xyz, num_groups)
    center = torch.stack([xyz[b, idx[b]] for b in range(xyz.shape[0])])
    neighborhood = torch.empty(xyz.shape[0], num_groups, group_size, 3)
    for b in range(xyz.shape[0]):
        for g in range(num_groups):
            d = ((xyz[b] - center[b, g]) ** 2).sum(-1)
            nearest = torch.argsort(d, stable=True)[:group_size]
            neighborhood[b, g] = xyz[b, nearest] - center[b, g]
    return neighborhood, center


# ------------------------------------------------------------------------------------------ layers


class Encoder(nn.Module):
    """Official mini-PointNet ``Encoder`` (``encoder_channel`` = 384 in Point-MAE, 256 in Point-BERT)."""

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
        bs, g, n, _ = point_groups.shape
        point_groups = point_groups.reshape(bs * g, n, 3)
        feature = self.first_conv(point_groups.transpose(2, 1))
        feature_global = torch.max(feature, dim=2, keepdim=True)[0]
        feature = torch.cat([feature_global.expand(-1, -1, n), feature], dim=1)
        feature = self.second_conv(feature)
        feature_global = torch.max(feature, dim=2, keepdim=False)[0]
        return feature_global.reshape(bs, g, self.encoder_channel)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = torch.exp(attn - attn.amax(dim=-1, keepdim=True))
        attn = attn / attn.sum(dim=-1, keepdim=True)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """Official encoder stack: ``blocks.{i}``; the positional embedding is re-added before every block."""

    def __init__(self, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


def pos_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))


# ------------------------------------------------------------------------------------------ Point-MAE


class MAEMaskTransformer(nn.Module):
    """``Point_MAE.MAE_encoder``: visible tokens only, no CLS, no mask token."""

    def __init__(self, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.encoder = Encoder(dim)
        self.pos_embed = pos_mlp(dim)
        self.blocks = TransformerEncoder(dim, depth, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, neighborhood: Tensor, center: Tensor, mask: Tensor) -> Tensor:
        tokens = self.encoder(neighborhood)
        b, _, c = tokens.shape
        x_vis = tokens[~mask].reshape(b, -1, c)
        pos = self.pos_embed(center[~mask].reshape(b, -1, 3))
        return self.norm(self.blocks(x_vis, pos))


class MAEDecoder(nn.Module):
    """``Point_MAE.MAE_decoder``: note ``blocks.{i}`` directly (no ``blocks.blocks``)."""

    def __init__(self, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)


class PointMAE(nn.Module):
    """``Point_MAE`` pre-training model (key layout of ``base_model``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, group_size: int, decoder_depth: int = 1) -> None:
        super().__init__()
        self.MAE_encoder = MAEMaskTransformer(dim, depth, num_heads)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim))
        self.decoder_pos_embed = pos_mlp(dim)
        self.MAE_decoder = MAEDecoder(dim, decoder_depth, num_heads)
        self.increase_dim = nn.Sequential(nn.Conv1d(dim, 3 * group_size, 1))


class PointTransformer(nn.Module):
    """Finetuned classifier ``PointTransformer``: Point-MAE head, or Point-BERT head with ``reduce_dim``."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, *, encoder_dims: int | None = None, num_classes: int = 5
    ) -> None:
        super().__init__()
        encoder_dims = encoder_dims or dim
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, dim))
        self.encoder = Encoder(encoder_dims)
        if encoder_dims != dim:
            self.reduce_dim = nn.Linear(encoder_dims, dim)
            self.cls_head_finetune = nn.Sequential(
                nn.Linear(2 * dim, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, num_classes)
            )
        else:
            self.cls_head_finetune = nn.Sequential(
                nn.Linear(2 * dim, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                nn.Linear(256, num_classes),
            )  # fmt: skip
        self.pos_embed = pos_mlp(dim)
        self.blocks = TransformerEncoder(dim, depth, num_heads)
        self.norm = nn.LayerNorm(dim)

    def features(self, neighborhood: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        """-> (all outputs after norm incl. CLS (B, 1+G, D), concat[CLS, max] (B, 2D))."""
        tokens = self.encoder(neighborhood)
        if hasattr(self, "reduce_dim"):
            tokens = self.reduce_dim(tokens)
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(center)], dim=1)
        x = self.norm(self.blocks(x, pos))
        return x, torch.cat([x[:, 0], x[:, 1:].max(1)[0]], dim=-1)


# ------------------------------------------------------------------------------------------ Point-BERT


class BERTMaskTransformer(nn.Module):
    """``Point_BERT.transformer_q``: 256-d tokenizer + ``reduce_dim``, CLS, mask token, LM and cls heads."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, *, encoder_dims: int = 16, vocab: int = 8
    ) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, dim))
        self.encoder = Encoder(encoder_dims)
        self.reduce_dim = nn.Linear(encoder_dims, dim)
        self.pos_embed = pos_mlp(dim)
        self.blocks = TransformerEncoder(dim, depth, num_heads)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)
        self.cls_head = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, 16))

    def forward(self, neighborhood: Tensor, center: Tensor, bool_masked_pos: Tensor) -> Tensor:
        """-> outputs after the final norm, CLS first (B, 1+G, D)."""
        tokens = self.reduce_dim(self.encoder(neighborhood))
        b = tokens.shape[0]
        w = bool_masked_pos.unsqueeze(-1).type_as(tokens)
        x = tokens * (1 - w) + self.mask_token.expand(b, tokens.shape[1], -1) * w
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(center)], dim=1)
        return self.norm(self.blocks(x, pos))


class DiscreteVAEStub(nn.Module):
    """A few tensors in the dVAE key layout (``codebook``, ``encoder.*``, ``dgcnn_1.*``, ``decoder.*``)."""

    def __init__(self) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(8, 16))
        self.encoder = Encoder(16)
        self.dgcnn_1 = nn.Sequential(nn.Conv1d(16, 8, 1), nn.GroupNorm(4, 8))
        self.decoder = nn.Sequential(nn.Linear(16, 24))


class PointBERT(nn.Module):
    """``Point_BERT`` masked point modelling model (key layout of ``base_model``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, *, encoder_dims: int = 16) -> None:
        super().__init__()
        self.transformer_q = BERTMaskTransformer(dim, depth, num_heads, encoder_dims=encoder_dims)
        self.transformer_k = BERTMaskTransformer(dim, depth, num_heads, encoder_dims=encoder_dims)
        self.dvae = DiscreteVAEStub()
        self.register_buffer("queue", torch.randn(16, 32))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


# ------------------------------------------------------------------------------------------ helpers


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every parameter and BatchNorm buffer non-trivial values, so a wrong mapping shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.ndim > 1 else 0.1))
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.add_(1.0)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                assert m.running_mean is not None
                assert m.running_var is not None
                assert m.num_batches_tracked is not None
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(7)
    return module


def save_official(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    data_parallel: bool = True,
    container: str = "base_model",
) -> None:
    """Writes a checkpoint like the official ``builder.save_checkpoint`` (DataParallel-wrapped by default)."""
    wrapped = nn.DataParallel(model) if data_parallel else model
    state = wrapped.state_dict()
    if container == "bare":
        torch.save(state, path)
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.save(
        {
            container: state,
            "optimizer": optimizer.state_dict(),
            "epoch": 300,
            "metrics": {"acc": 91.5},
            "best_metrics": {"acc": 92.0},
        },
        path,
    )
