"""Shared layers: transformer blocks, mini-PointNet, positional embeddings, the ViPFormer Perceiver trunk."""

from pretrain.nn.any2point_adapter import (
    BottleneckAdapter,
    CellAttention,
    GuidedAdapter,
    GuidedContext,
    guided_context_1d,
    guided_context_2d,
    make_view_attention,
)
from pretrain.nn.mae_decoder import MAEDecoder
from pretrain.nn.perceiver import PerceiverTrunk, PointInputAdapter, ProjectionHead
from pretrain.nn.point_pn import PointPN
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
    "BottleneckAdapter",
    "CellAttention",
    "CenterPosEmbed",
    "CrossAttention",
    "CrossAttentionBlock",
    "DropPath",
    "GuidedAdapter",
    "GuidedContext",
    "MAEDecoder",
    "MiniPointNet",
    "Mlp",
    "PerceiverTrunk",
    "PointInputAdapter",
    "PointPN",
    "ProjectionHead",
    "drop_path_rates",
    "guided_context_1d",
    "guided_context_2d",
    "make_view_attention",
    "run_blocks",
]
