"""Layers shared by pcpt encoders and methods: transformer blocks, mini-PointNet, positional embeddings."""

from pretrain.nn.mae_decoder import MAEDecoder
from pretrain.nn.pos_embed import CenterPosEmbed
from pretrain.nn.tokenizer import MiniPointNet
from pretrain.nn.transformer import Attention, Block, DropPath, Mlp, drop_path_rates

__all__ = [
    "Attention",
    "Block",
    "CenterPosEmbed",
    "DropPath",
    "MAEDecoder",
    "MiniPointNet",
    "Mlp",
    "drop_path_rates",
]
