"""Shared layers: transformer blocks, mini-PointNet, positional embeddings, the ViPFormer Perceiver trunk."""

from pretrain.nn.mae_decoder import MAEDecoder
from pretrain.nn.perceiver import PerceiverTrunk, PointInputAdapter, ProjectionHead
from pretrain.nn.pointnet import MiniPointNet
from pretrain.nn.pos_embed import CenterPosEmbed
from pretrain.nn.transformer import (
    Attention,
    Block,
    BlockOptions,
    CrossAttention,
    CrossAttentionBlock,
    DropPath,
    Mlp,
    drop_path_rates,
    run_blocks,
)

__all__ = [
    "Attention",
    "Block",
    "BlockOptions",
    "CenterPosEmbed",
    "CrossAttention",
    "CrossAttentionBlock",
    "DropPath",
    "MAEDecoder",
    "MiniPointNet",
    "Mlp",
    "PerceiverTrunk",
    "PointInputAdapter",
    "ProjectionHead",
    "drop_path_rates",
    "run_blocks",
]
