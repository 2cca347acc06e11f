"""Point encoders: the :class:`PointEncoder` interface, encoder families and their registry.

Each family is a spec class (``arch`` + everything needed to rebuild it) and a builder, registered under its
``arch``; the built-in families are registered here, explicitly. :func:`build_encoder` turns a spec (for
example one read from an encoder artifact with :func:`spec_from_dict`) into a module.
"""

from __future__ import annotations

from pretrain.encoders.any2point import Any2PointEncoder, Any2PointSpec
from pretrain.encoders.base import EncoderOutput, PointEncoder
from pretrain.encoders.point_adapter import PointAdapterEncoder, PointAdapterSpec
from pretrain.encoders.point_vit import PointViT
from pretrain.encoders.registry import (
    ENCODER_FAMILIES,
    EncoderFamily,
    build_encoder,
    register_encoder_family,
    spec_from_dict,
)
from pretrain.encoders.spec import NAMED_SIZES, DataContract, EncoderSpec, PointViTSpec
from pretrain.encoders.tokenizer import PatchTokenizer, PointTokens
from pretrain.encoders.vipformer import (
    ViPFormerImageEncoder,
    ViPFormerImageSpec,
    ViPFormerPointEncoder,
    ViPFormerPointSpec,
)

__all__ = [
    "ENCODER_FAMILIES",
    "NAMED_SIZES",
    "Any2PointEncoder",
    "Any2PointSpec",
    "DataContract",
    "EncoderFamily",
    "EncoderOutput",
    "EncoderSpec",
    "PatchTokenizer",
    "PointAdapterEncoder",
    "PointAdapterSpec",
    "PointEncoder",
    "PointTokens",
    "PointViT",
    "PointViTSpec",
    "ViPFormerImageEncoder",
    "ViPFormerImageSpec",
    "ViPFormerPointEncoder",
    "ViPFormerPointSpec",
    "build_encoder",
    "register_encoder_family",
    "spec_from_dict",
]

register_encoder_family("point_vit", PointViTSpec, PointViT)
register_encoder_family("vipformer_point", ViPFormerPointSpec, ViPFormerPointEncoder)
register_encoder_family("any2point", Any2PointSpec, Any2PointEncoder)
register_encoder_family("point_adapter", PointAdapterSpec, PointAdapterEncoder)
