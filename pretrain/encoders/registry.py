"""The registry of encoder families: ``arch`` -> (spec class, builder).

An encoder artifact stores its spec as plain data with an ``arch`` field; :func:`spec_from_dict` finds the
family's spec class from it and :func:`build_encoder` builds the module, so :func:`pretrain.checkpoint.
load_encoder` rebuilds any registered family from the artifact alone. A new family registers itself with
:func:`register_encoder_family` (the built-in ones are registered in ``pretrain.encoders``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pretrain.encoders.spec import EncoderSpec

if TYPE_CHECKING:
    from pretrain.encoders.base import PointEncoder

__all__ = [
    "ENCODER_FAMILIES",
    "EncoderFamily",
    "build_encoder",
    "register_encoder_family",
    "spec_from_dict",
]


@dataclass(frozen=True)
class EncoderFamily:
    """One encoder architecture: the spec class that describes it and the function that builds it."""

    arch: str
    spec_class: type[EncoderSpec]
    build: Callable[[Any], PointEncoder]


#: ``arch`` -> family.
ENCODER_FAMILIES: dict[str, EncoderFamily] = {}


def register_encoder_family(
    arch: str, spec_class: type[EncoderSpec], build: Callable[[Any], PointEncoder]
) -> EncoderFamily:
    """Registers an encoder family.

    Args:
        arch: the family's name, the default of its spec's ``arch`` field.
        spec_class: a frozen dataclass subclassing :class:`~pretrain.encoders.spec.EncoderSpec`.
        build: spec -> freshly initialised encoder (usually the encoder class itself).

    Raises:
        ValueError: ``arch`` is already registered, or the spec class's default ``arch`` differs.
    """
    if arch in ENCODER_FAMILIES:
        raise ValueError(f"encoder arch {arch!r} is already registered")
    default = spec_class.__dataclass_fields__["arch"].default
    if default != arch:
        raise ValueError(f"{spec_class.__name__}.arch defaults to {default!r}, not {arch!r}")
    family = EncoderFamily(arch, spec_class, build)
    ENCODER_FAMILIES[arch] = family
    return family


def _family(arch: object) -> EncoderFamily:
    try:
        return ENCODER_FAMILIES[str(arch)]
    except KeyError:
        raise ValueError(f"unknown encoder arch {arch!r}; known: {sorted(ENCODER_FAMILIES)}") from None


def spec_from_dict(data: Mapping[str, Any], default_arch: str = "point_vit") -> EncoderSpec:
    """The spec an artifact's plain data describes, of the class its ``arch`` names.

    Raises:
        ValueError: not a mapping, an unknown ``arch``, unknown fields or invalid values.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"an encoder spec must be a mapping, got {type(data).__name__}")
    return _family(data.get("arch", default_arch)).spec_class.from_dict(data)


def build_encoder(spec: EncoderSpec) -> PointEncoder:
    """Builds the encoder a spec describes.

    Raises:
        ValueError: unknown ``spec.arch`` (the message lists the known ones), or a spec of another class
            than the family's.
    """
    family = _family(spec.arch)
    if not isinstance(spec, family.spec_class):
        raise ValueError(
            f"arch {spec.arch!r} needs a {family.spec_class.__name__}, got {type(spec).__name__}"
        )
    return family.build(spec)
