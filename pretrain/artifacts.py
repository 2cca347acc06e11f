"""Artifacts: the handoff between pre-training, import of official weights and transfer.

An artifact is a directory holding ``encoder.safetensors`` (weights) and ``encoder.json``::

    {"format": "pcpt-encoder/1", "kind": "point_encoder", "spec": {...}, "data_contract": {...},
     "provenance": {"method", "step", "epoch", "git_sha", "config_sha256", "data_manifest_sha256",
                    "versions": {"pcpt", "torch", "lightning"}, ...},
     "num_params": N}

One registry maps each artifact ``kind`` to the module class it holds, how its spec is read and how the
module is built (:class:`ArtifactKind`, :func:`register_artifact_kind`); :func:`save_module_artifact` writes
any registered module and :func:`load_artifact` rebuilds it from the spec alone and loads it strictly.
Provenance is completed in one place (``pretrain.provenance``); the files themselves are written and read by
``pretrain.artifact_files`` (atomic writes that never touch files pcpt did not write).

Built-in kinds: ``point_encoder`` (every registered encoder family, ``pretrain.encoders``),
``image_encoder`` (ViPFormer's image encoder, ``pretrain.encoders.vipformer``), ``dvae_tokenizer``
(Point-BERT's dVAE, registered by ``pretrain.dvae``) and ``scene_encoder`` (``pretrain.scene_encoder``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.artifact_files import (
    ARTIFACT_FORMAT,
    ENCODER_KIND,
    META_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    WeightsMismatchError,
    check_artifact_destination,
    load_artifact_tensors,
    load_state_strict,
    read_artifact_meta,
    save_artifact,
)
from pretrain.encoders import (
    DataContract,
    PointEncoder,
    ViPFormerImageEncoder,
    ViPFormerImageSpec,
    build_encoder,
    spec_from_dict,
)
from pretrain.provenance import make_provenance

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_KINDS",
    "ENCODER_KIND",
    "IMAGE_ENCODER_KIND",
    "META_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "ArtifactKind",
    "WeightsMismatchError",
    "artifact_kind",
    "check_artifact_destination",
    "load_artifact",
    "load_artifact_tensors",
    "load_encoder",
    "load_image_encoder",
    "load_state_strict",
    "module_spec",
    "read_artifact_meta",
    "register_artifact_kind",
    "save_artifact",
    "save_encoder",
    "save_module_artifact",
]

# ------------------------------------------------------------------------------------------------ kinds


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of artifact: what module it holds and how it is rebuilt from ``meta["spec"]``.

    Attributes:
        name: the ``kind`` written in ``encoder.json``.
        module_class: the class (or base class) of the modules of this kind; :func:`save_module_artifact`
            finds a module's kind by it.
        parse_spec: plain data -> spec (raises ``ValueError``/``TypeError`` when invalid).
        build: spec -> freshly initialised module.
        summary: metadata -> a one-line description (``pcpt-pretrain export|import`` print it).
    """

    name: str
    module_class: type[nn.Module]
    parse_spec: Callable[[Mapping[str, Any]], Any]
    build: Callable[[Any], nn.Module]
    summary: Callable[[Mapping[str, Any]], str]


#: ``kind`` -> :class:`ArtifactKind`.
ARTIFACT_KINDS: dict[str, ArtifactKind] = {}


def register_artifact_kind(kind: ArtifactKind) -> ArtifactKind:
    """Adds a kind to the registry.

    Raises:
        ValueError: the name is already registered.
    """
    if kind.name in ARTIFACT_KINDS:
        raise ValueError(f"artifact kind {kind.name!r} is already registered")
    ARTIFACT_KINDS[kind.name] = kind
    return kind


def _builtin_kinds() -> None:
    import pretrain.dvae  # noqa: F401  (registers dvae_tokenizer)
    from pretrain import scene_encoder  # noqa: F401  (registers scene_encoder)


def artifact_kind(name: str) -> ArtifactKind:
    """The registered kind called ``name``.

    Raises:
        ArtifactError: an unknown kind (the message lists the known ones).
    """
    _builtin_kinds()
    try:
        return ARTIFACT_KINDS[name]
    except KeyError:
        raise ArtifactError(f"unknown artifact kind {name!r}; known: {sorted(ARTIFACT_KINDS)}") from None


def module_spec(module: nn.Module) -> dict[str, Any]:
    """The plain-data spec of a module that is rebuilt from its spec (``module.spec.to_dict()``).

    Raises:
        ValueError: the module has no ``spec`` with ``to_dict``.
    """
    spec = getattr(module, "spec", None)
    if spec is None or not callable(getattr(spec, "to_dict", None)):
        raise ValueError(f"a {type(module).__name__} has no spec to rebuild it from")
    return dict(spec.to_dict())


def kind_of(module: nn.Module) -> ArtifactKind:
    """The registered kind whose ``module_class`` ``module`` is an instance of.

    Raises:
        ValueError: no kind holds modules of this class.
    """
    _builtin_kinds()
    for kind in ARTIFACT_KINDS.values():
        if isinstance(module, kind.module_class):
            return kind
    raise ValueError(f"no artifact kind holds a {type(module).__name__}; register one first")


def _encoder_summary(meta: Mapping[str, Any]) -> str:
    spec = meta.get("spec", {})
    parts = [str(spec.get("arch", "?"))]
    if {"embed_dim", "depth", "num_heads"} <= set(spec):
        parts[0] += f" {spec['embed_dim']}x{spec['depth']} ({spec['num_heads']} heads)"
    if {"embed_dim", "num_cross_layers", "num_sa_layers", "num_heads"} <= set(spec):
        parts[0] += (
            f" {spec['embed_dim']} wide, {spec['num_cross_layers']} cross + {spec['num_sa_layers']} "
            f"self-attention layers ({spec['num_heads']} heads)"
        )
    if {"num_groups", "group_size"} <= set(spec):
        parts.append(f"{spec['num_groups']} groups of {spec['group_size']}")
    if {"num_latents", "group_size"} <= set(spec):
        parts.append(f"{spec['num_latents']} latents of {spec['group_size']} points")
    if {"image_size", "patch_size"} <= set(spec):
        parts.append(f"{spec['image_size']}-pixel images in {spec['patch_size']}-pixel patches")
    if "cls_token" in spec:
        parts.append(f"cls_token={spec['cls_token']}")
    return ", ".join([*parts, f"{meta.get('num_params', 0):,} parameters"])


register_artifact_kind(
    ArtifactKind(
        name=ENCODER_KIND,
        module_class=PointEncoder,
        parse_spec=spec_from_dict,
        build=build_encoder,
        summary=_encoder_summary,
    )
)

#: kind of ViPFormer image encoder artifacts.
IMAGE_ENCODER_KIND = "image_encoder"

register_artifact_kind(
    ArtifactKind(
        name=IMAGE_ENCODER_KIND,
        module_class=ViPFormerImageEncoder,
        parse_spec=ViPFormerImageSpec.from_dict,
        build=ViPFormerImageEncoder,
        summary=_encoder_summary,
    )
)


# -------------------------------------------------------------------------------------- save and load


def save_module_artifact(
    out_dir: str | Path,
    module: nn.Module,
    *,
    data: DataContract,
    provenance: Mapping[str, Any],
    extra_tensors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Writes a module of any registered kind as an artifact, atomically (the one artifact writer).

    The kind comes from the module's class; the spec is ``module.spec.to_dict()``.

    Args:
        out_dir: destination directory (an existing artifact there is updated, other files are kept).
        module: the module; its full ``state_dict`` (BatchNorm buffers included) is stored.
        data: the data contract the module was trained with.
        provenance: method, step, epoch, ...; completed by :func:`make_provenance`.
        extra_tensors: more tensors stored alongside (names must not clash with the module's keys); their
            names are listed in ``meta["extra_tensors"]`` and skipped when loading the module.

    Returns:
        ``out_dir`` as a Path. ``num_params`` in the metadata counts parameters (not buffers).

    Raises:
        ValueError: a module of no registered kind, or ``extra_tensors`` names that clash with its weights.
        ArtifactError: see :func:`check_artifact_destination`.
    """
    kind = kind_of(module)
    state = dict(module.state_dict())
    extra = dict(extra_tensors or {})
    clash = sorted(set(extra) & set(state))
    if clash:
        raise ValueError(f"extra_tensors names clash with the module's weights: {clash}")
    meta = {
        "kind": kind.name,
        "spec": module_spec(module),
        "data_contract": data.to_dict(),
        "provenance": make_provenance(provenance),
        "num_params": sum(p.numel() for p in module.parameters()),
    }
    if extra:
        meta["extra_tensors"] = sorted(extra)
    return save_artifact(out_dir, {**state, **extra}, meta)


#: Encoders are written like every other kind.
save_encoder = save_module_artifact


def load_artifact(
    path: str | Path,
    *,
    kind: str | None = None,
    expected_missing: frozenset[str] | set[str] = frozenset(),
    spec_overrides: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuilds the module of an artifact from its spec alone and loads its weights strictly.

    Args:
        path: artifact directory.
        kind: required kind, or None for any registered one.
        expected_missing: keys allowed to be absent from the weights (they keep their initialisation), e.g.
            ``{"cls_token", "cls_pos"}`` together with ``spec_overrides={"cls_token": True}``.
        spec_overrides: spec fields to change before building (e.g. ``drop_path``).
        map_location: device of the returned module.

    Returns:
        (module in train mode, metadata).

    Raises:
        ArtifactError: unreadable artifact, another kind, or an invalid spec.
        WeightsMismatchError: unexpected keys, missing keys outside ``expected_missing`` or shape mismatches;
            the message names the keys and the weights file.
    """
    src = Path(path)
    tensors, meta = load_artifact_tensors(src, kind=kind)
    found = artifact_kind(str(meta.get("kind")))
    try:
        spec = found.parse_spec({**meta.get("spec", {}), **(spec_overrides or {})})
        module = found.build(spec)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{src / META_FILE}: invalid {found.name} spec: {err}") from err
    for name in meta.get("extra_tensors", []):
        tensors.pop(name, None)
    load_state_strict(module, tensors, source=src / WEIGHTS_FILE, expected_missing=expected_missing)
    return module.to(map_location), meta


def load_encoder(
    path: str | Path,
    *,
    expected_missing: frozenset[str] | set[str] = frozenset(),
    spec_overrides: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[PointEncoder, dict[str, Any]]:
    """:func:`load_artifact` of a ``point_encoder`` artifact (any registered encoder family).

    Returns:
        (encoder in train mode, metadata).
    """
    module, meta = load_artifact(
        path,
        kind=ENCODER_KIND,
        expected_missing=expected_missing,
        spec_overrides=spec_overrides,
        map_location=map_location,
    )
    if not isinstance(module, PointEncoder):
        raise ArtifactError(f"{path}: the {meta.get('kind')!r} artifact does not hold a point encoder")
    return module, meta


def load_image_encoder(
    path: str | Path,
    *,
    spec_overrides: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[ViPFormerImageEncoder, dict[str, Any]]:
    """:func:`load_artifact` of an ``image_encoder`` artifact (strict: every key must match).

    Returns:
        (image encoder in train mode, metadata).

    Raises:
        ArtifactError: unreadable artifact, another kind, or an invalid spec.
        WeightsMismatchError: missing, unexpected or reshaped keys (named in the message).
    """
    module, meta = load_artifact(
        path, kind=IMAGE_ENCODER_KIND, spec_overrides=spec_overrides, map_location=map_location
    )
    if not isinstance(module, ViPFormerImageEncoder):
        raise ArtifactError(f"{path}: the {meta.get('kind')!r} artifact does not hold an image encoder")
    return module, meta
