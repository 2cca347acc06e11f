"""An independent, loop-style re-implementation of the official Point-BERT dVAE (``models/dvae.py``).

Module and parameter names follow the official ``DiscreteVAE`` (``codebook``, ``encoder``, ``dgcnn_1``,
``dgcnn_2``, ``decoder.mlp``, ``decoder.final_conv``), so ``state_dict()`` gives the official checkpoint key
layout. The DGCNN graph is built with a per-point Python loop (brute-force distances, stable sort, the point
itself first) and the edge features are assembled channel-first as the official ``get_graph_feature`` does;
the decoder builds its folding seed with ``linspace``/``expand`` like the official one. Used only by tests.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.pretrain.encoders.official_reference import Encoder, group_reference, randomize


def knn_loop(coords: Tensor, k: int) -> Tensor:
    """(B, N, 3) -> (B, N, k) indices of the k nearest points (itself first), one point at a time."""
    batch, num, _ = coords.shape
    idx = torch.empty(batch, num, k, dtype=torch.long)
    for b in range(batch):
        for i in range(num):
            d = ((coords[b] - coords[b, i]) ** 2).sum(-1)
            idx[b, i] = torch.argsort(d, stable=True)[:k]
    return idx


class DGCNN(nn.Module):
    def __init__(
        self, in_dim: int, out_dim: int, dims: tuple[int, ...] = (128, 256, 512, 512, 1024), k: int = 4
    ):
        super().__init__()
        self.k = k
        self.input_trans = nn.Conv1d(in_dim, dims[0], 1)
        for i in range(1, len(dims)):
            layer = nn.Sequential(
                nn.Conv2d(2 * dims[i - 1], dims[i], kernel_size=1, bias=False),
                nn.GroupNorm(4, dims[i]),
                nn.LeakyReLU(negative_slope=0.2),
            )
            setattr(self, f"layer{i}", layer)
        self.num_edge = len(dims) - 1
        head = nn.Sequential(
            nn.Conv1d(sum(dims[1:]), out_dim, kernel_size=1, bias=False),
            nn.GroupNorm(4, out_dim),
            nn.LeakyReLU(negative_slope=0.2),
        )
        setattr(self, f"layer{len(dims)}", head)

    def graph_feature(self, f: Tensor, idx: Tensor) -> Tensor:
        """f (B, C, N), idx (B, N, k) -> (B, 2C, N, k) = [f_j - f_i, f_i]."""
        batch, channels, num = f.shape
        out = torch.empty(batch, 2 * channels, num, self.k)
        for b in range(batch):
            for i in range(num):
                for slot in range(self.k):
                    j = int(idx[b, i, slot])
                    out[b, :channels, i, slot] = f[b, :, j] - f[b, :, i]
                    out[b, channels:, i, slot] = f[b, :, i]
        return out

    def forward(self, f: Tensor, coor: Tensor) -> Tensor:
        """f (B, G, C), coor (B, G, 3) -> (B, G, out)."""
        idx = knn_loop(coor, self.k)
        f = self.input_trans(f.transpose(1, 2))
        features = []
        for i in range(1, self.num_edge + 1):
            f = getattr(self, f"layer{i}")(self.graph_feature(f, idx)).max(dim=-1)[0]
            features.append(f)
        return getattr(self, f"layer{self.num_edge + 1}")(torch.cat(features, dim=1)).transpose(1, 2)


class Decoder(nn.Module):
    def __init__(self, in_dim: int, num_fine: int, hidden: int = 1024, fold: int = 512):
        super().__init__()
        self.num_fine, self.num_coarse, self.grid_size = num_fine, num_fine // 4, 2
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 3 * self.num_coarse),
        )  # fmt: skip
        self.final_conv = nn.Sequential(
            nn.Conv1d(in_dim + 3 + 2, fold, 1), nn.BatchNorm1d(fold), nn.ReLU(inplace=True),
            nn.Conv1d(fold, fold, 1), nn.BatchNorm1d(fold), nn.ReLU(inplace=True), nn.Conv1d(fold, 3, 1),
        )  # fmt: skip
        g = self.grid_size
        a = torch.linspace(-0.05, 0.05, steps=g).view(1, g).expand(g, g).reshape(1, -1)
        b = torch.linspace(-0.05, 0.05, steps=g).view(g, 1).expand(g, g).reshape(1, -1)
        self.folding_seed = torch.cat([a, b], dim=0).view(1, 2, g**2)

    def forward(self, feature_global: Tensor) -> tuple[Tensor, Tensor]:
        bs, g, c = feature_global.shape
        feature_global = feature_global.reshape(bs * g, c)
        coarse = self.mlp(feature_global).reshape(bs * g, self.num_coarse, 3)
        s = self.grid_size**2
        point_feat = (
            coarse.unsqueeze(2).expand(-1, -1, s, -1).reshape(bs * g, self.num_fine, 3).transpose(2, 1)
        )
        seed = (
            self.folding_seed.unsqueeze(2)
            .expand(bs * g, -1, self.num_coarse, -1)
            .reshape(bs * g, -1, self.num_fine)
        )
        feat = torch.cat([feature_global.unsqueeze(2).expand(-1, -1, self.num_fine), seed, point_feat], dim=1)
        fine = self.final_conv(feat) + point_feat
        return coarse.reshape(bs, g, self.num_coarse, 3), fine.reshape(bs, g, 3, self.num_fine).transpose(
            -1, -2
        )


class DiscreteVAE(nn.Module):
    """Official ``DiscreteVAE`` layout (75 tensors at the official size)."""

    def __init__(
        self, *, encoder_dims: int = 256, num_tokens: int = 8192, tokens_dims: int = 256,
        decoder_dims: int = 256, group_size: int = 32, dims: tuple[int, ...] = (128, 256, 512, 512, 1024),
        hidden: int = 1024, fold: int = 512,
    ) -> None:  # fmt: skip
        super().__init__()
        self.encoder = Encoder(encoder_dims)
        self.dgcnn_1 = DGCNN(encoder_dims, num_tokens, dims)
        self.codebook = nn.Parameter(torch.randn(num_tokens, tokens_dims))
        self.dgcnn_2 = DGCNN(tokens_dims, decoder_dims, dims)
        self.decoder = Decoder(decoder_dims, group_size, hidden, fold)

    def logits(self, neighborhood: Tensor, center: Tensor) -> Tensor:
        return self.dgcnn_1(self.encoder(neighborhood), center)

    def decode(self, soft_one_hot: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        sampled = torch.einsum("bgn,nc->bgc", soft_one_hot, self.codebook)
        return self.decoder(self.dgcnn_2(sampled, center))

    def token_ids(self, xyz: Tensor, num_groups: int, group_size: int) -> tuple[Tensor, Tensor]:
        """-> (argmax token ids (B, G), centres (B, G, 3)), grouping as the official Group."""
        neighborhood, center = group_reference(xyz, num_groups, group_size)
        return self.logits(neighborhood, center).argmax(-1), center


def kl_official(logits: Tensor) -> Tensor:
    """``DiscreteVAE.get_loss`` KL term, as written."""
    softmax = F.softmax(logits, dim=-1)
    log_qy = torch.log(softmax.mean(dim=1))
    log_uniform = torch.log(torch.tensor([1.0 / logits.shape[-1]]))
    return F.kl_div(
        log_qy, log_uniform.expand(log_qy.size(0), log_qy.size(1)), None, None, "batchmean", log_target=True
    )


TINY: dict[str, Any] = {
    "encoder_dims": 16, "num_tokens": 12, "tokens_dims": 8, "decoder_dims": 8, "group_size": 8,
    "dims": (8, 8, 16, 16, 32), "hidden": 16, "fold": 16,
}  # fmt: skip
TINY_SPEC: dict[str, Any] = {
    "num_groups": 16, "group_size": 8, "tokenizer_dim": 16, "codebook_size": 12, "token_dim": 8,
    "decoder_dim": 8, "dgcnn_dims": (8, 8, 16, 16, 32), "decoder_hidden_dim": 16, "fold_dim": 16,
}  # fmt: skip


M = TypeVar("M", bound=nn.Module)


def randomize_dvae(model: M, seed: int = 0) -> M:
    """``official_reference.randomize`` plus GroupNorm scales near 1, so token ids vary between patches."""
    randomize(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.01 * torch.randn(module.bias.shape, generator=gen))
    return model
