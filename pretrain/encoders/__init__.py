"""Point encoders: the :class:`PointEncoder` interface, specs, and the ``ENCODERS`` registry.

The registry lists the built-in architectures explicitly; :func:`build_encoder` turns a spec (for example
one read from an encoder artifact) into a module.
"""

from __future__ import annotations

from collections.abc import Callable

from pretrain.encoders.base import EncoderOutput, PointEncoder
from pretrain.encoders.point_vit import PointViT
from pretrain.encoders.spec import NAMED_SIZES, DataContract, EncoderSpec

__all__ = [
    "ENCODERS",
    "NAMED_SIZES",
    "DataContract",
    "EncoderFactory",
    "EncoderOutput",
    "EncoderSpec",
    "PointEncoder",
    "PointViT",
    "build_encoder",
    "register_encoder",
]

EncoderFactory = Callable[[EncoderSpec], PointEncoder]

#: architecture name (``EncoderSpec.arch``) -> constructor taking the spec.
ENCODERS: dict[str, EncoderFactory] = {"point_vit": PointViT}


def register_encoder(arch: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator adding an encoder constructor under ``arch``.

    Raises:
        ValueError: ``arch`` is already registered.
    """

    def decorator(factory: EncoderFactory) -> EncoderFactory:
        if arch in ENCODERS:
            raise ValueError(f"encoder arch {arch!r} is already registered")
        ENCODERS[arch] = factory
        return factory

    return decorator


def build_encoder(spec: EncoderSpec) -> PointEncoder:
    """Builds the encoder a spec describes.

    Raises:
        ValueError: unknown ``spec.arch`` (the message lists the known ones).
    """
    try:
        factory = ENCODERS[spec.arch]
    except KeyError:
        raise ValueError(f"unknown encoder arch {spec.arch!r}; known: {sorted(ENCODERS)}") from None
    return factory(spec)
