"""Lightning checkpoints: resuming only; their metadata makes any of them exportable as an artifact.

Every pcpt training module writes ``checkpoint["pcpt"]`` (:func:`lightning_ckpt_meta`): the method, the
artifact kind, the spec of the module it exports, that module's prefix in ``state_dict``, its data contract
and the config and data checksums. :func:`export_from_lightning_ckpt` rebuilds that module from the metadata
alone (any registered kind) and writes it with the one artifact writer; provenance comes from
``pretrain.provenance``. Checkpoints are read with ``torch.load(weights_only=True)`` only
(:func:`read_checkpoint_file`, also used for official checkpoints).

The artifact API is re-exported here (``pretrain.checkpoint.load_encoder`` is the documented entry point).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datapipes.errors import one_line
from pretrain.artifacts import (
    ARTIFACT_FORMAT,
    ARTIFACT_KINDS,
    ENCODER_KIND,
    META_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    ArtifactKind,
    WeightsMismatchError,
    artifact_kind,
    check_artifact_destination,
    kind_of,
    load_artifact,
    load_artifact_tensors,
    load_encoder,
    load_state_strict,
    module_spec,
    read_artifact_meta,
    register_artifact_kind,
    save_artifact,
    save_encoder,
    save_module_artifact,
)
from pretrain.encoders import DataContract
from pretrain.provenance import git_sha, make_provenance

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_KINDS",
    "CKPT_META_KEY",
    "ENCODER_KIND",
    "META_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "ArtifactKind",
    "WeightsMismatchError",
    "artifact_kind",
    "check_artifact_destination",
    "checkpoint_kind",
    "export_from_lightning_ckpt",
    "git_sha",
    "lightning_ckpt_meta",
    "load_artifact",
    "load_artifact_tensors",
    "load_encoder",
    "load_state_strict",
    "make_provenance",
    "read_artifact_meta",
    "read_checkpoint_file",
    "register_artifact_kind",
    "save_artifact",
    "save_encoder",
    "save_module_artifact",
]

#: key under which pcpt LightningModules store plain-data metadata in their checkpoints.
CKPT_META_KEY = "pcpt"


def lightning_ckpt_meta(
    *,
    method: str,
    module: nn.Module,
    prefix: str,
    data_contract: DataContract,
    config_sha256: str | None = None,
    data_manifest_sha256: str | None = None,
) -> dict[str, Any]:
    """The plain-data dict a pcpt LightningModule stores as ``checkpoint["pcpt"]``.

    Args:
        method: the training method's name.
        module: the module the run exports (an encoder, a dVAE, ...), of a registered artifact kind.
        prefix: its weights' prefix in the LightningModule's ``state_dict`` (e.g. ``"encoder."``).
        data_contract: the data it is trained with.
        config_sha256: checksum of the resolved config.
        data_manifest_sha256: checksum of the data's manifest.
    """
    return {
        "method": method,
        "kind": kind_of(module).name,
        "spec": module_spec(module),
        "prefix": prefix,
        "data_contract": data_contract.to_dict(),
        "config_sha256": config_sha256,
        "data_manifest_sha256": data_manifest_sha256,
    }


def read_checkpoint_file(ckpt_path: str | Path, *, mmap: bool = False) -> tuple[Path, Any]:
    """Reads a pcpt Lightning or official checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    Args:
        ckpt_path: the file.
        mmap: map the tensors' storage instead of reading it (a cheap look at a large checkpoint; falls
            back to reading files saved in the legacy, non-zip format).

    Returns:
        (the path, the loaded object; the caller checks that it is a checkpoint of the kind it wants).

    Raises:
        ArtifactError: no such file, or a file ``weights_only`` loading cannot read.
    """
    src = Path(ckpt_path)
    if not src.is_file():
        raise ArtifactError(f"{src}: no such checkpoint file")
    try:
        try:
            ckpt = torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors all mean "cannot read this file"
        if isinstance(err, pickle.UnpicklingError):
            reason = "not a checkpoint, or it holds objects that only an unsafe pickle load would rebuild"
        else:
            reason = f"{type(err).__name__}: {one_line(str(err))}"
        raise ArtifactError(f"{src}: cannot read checkpoint with weights_only=True ({reason})") from err
    return src, ckpt


def checkpoint_kind(ckpt_path: str | Path) -> str | None:
    """The artifact kind a pcpt Lightning checkpoint exports to, or None for any other file (cheap: mmap)."""
    try:
        _, ckpt = read_checkpoint_file(ckpt_path, mmap=True)
    except ArtifactError:
        return None
    info = ckpt.get(CKPT_META_KEY) if isinstance(ckpt, dict) else None
    return str(info.get("kind", ENCODER_KIND)) if isinstance(info, dict) else None


def _epochs_trained(ckpt: Mapping[str, Any]) -> Any:
    """Epochs fully trained at the checkpoint's weights (see ``pretrain.training.epochs_trained``)."""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        return ckpt.get("epoch")


def export_from_lightning_ckpt(ckpt_path: str | Path, out_dir: str | Path, **provenance: Any) -> Path:
    """Writes the exported module of a pcpt Lightning checkpoint (any registered kind) as an artifact.

    The module is rebuilt from ``checkpoint["pcpt"]`` alone (also the layout of older pcpt checkpoints:
    ``encoder_spec`` / ``tokenizer_spec`` and ``encoder_prefix``) and loaded strictly. Companion modules the
    checkpoint names (``"companions"``: e.g. ViPFormer's image encoder) are written as artifacts in
    subfolders ``out_dir/<name>``. Provenance: the method
    and checksums stored in the checkpoint, ``step`` (``global_step``), ``epoch`` (epochs fully trained),
    ``git_sha`` and ``source``; ``provenance`` overrides them.

    Args:
        ckpt_path: Lightning ``.ckpt`` file.
        out_dir: artifact directory to write.
        **provenance: fields that override the collected provenance (e.g. ``git_sha="..."``).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ArtifactError: unreadable file, not a pcpt checkpoint, invalid metadata or an unknown kind.
        WeightsMismatchError: weights that do not fit the stored spec.
    """
    src, ckpt = read_checkpoint_file(ckpt_path)
    info = ckpt.get(CKPT_META_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(info, dict):
        raise ArtifactError(f"{src}: not a pcpt Lightning checkpoint (no {CKPT_META_KEY!r} metadata)")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ArtifactError(f"{src}: checkpoint has no 'state_dict'")
    try:
        data = DataContract.from_dict(info.get("data_contract") or {})
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{src}: invalid pcpt metadata: {err}") from err
    module = _module_from_ckpt(src, ckpt["state_dict"], info)
    collected = {
        "method": info.get("method"),
        "step": ckpt.get("global_step"),
        "epoch": _epochs_trained(ckpt),
        "config_sha256": info.get("config_sha256"),
        "data_manifest_sha256": info.get("data_manifest_sha256"),
        "source": str(src),
    }
    out = save_module_artifact(out_dir, module, data=data, provenance={**collected, **provenance})
    companions = info.get("companions") or {}
    if not isinstance(companions, dict):
        raise ArtifactError(f"{src}: invalid pcpt metadata: 'companions' is not a mapping")
    for name, companion in companions.items():
        if not isinstance(companion, dict):
            raise ArtifactError(f"{src}: invalid pcpt metadata for companion {name!r}")
        module = _module_from_ckpt(src, ckpt["state_dict"], companion)
        save_module_artifact(out / str(name), module, data=data, provenance={**collected, **provenance})
    return out


def _module_from_ckpt(src: Path, state_dict: dict[str, Any], info: dict[str, Any]) -> nn.Module:
    """The module ``info`` (kind, spec, prefix) describes, rebuilt and loaded strictly from ``state_dict``."""
    kind = artifact_kind(str(info.get("kind", ENCODER_KIND)))
    legacy = {"point_encoder": ("encoder_spec", "encoder."), "dvae_tokenizer": ("tokenizer_spec", "dvae.")}
    spec_key, default_prefix = legacy.get(kind.name, ("spec", ""))
    prefix = str(info.get("prefix", info.get("encoder_prefix", default_prefix)))
    state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not state:
        raise ArtifactError(f"{src}: no weights under prefix {prefix!r} in the checkpoint's state_dict")
    try:
        module = kind.build(kind.parse_spec(info["spec"] if "spec" in info else info[spec_key]))
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{src}: invalid pcpt metadata: {err}") from err
    load_state_strict(module, state, source=src)
    return module
