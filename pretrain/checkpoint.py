"""Encoder artifacts: the handoff between pre-training, import of official weights and transfer.

An artifact is a directory holding ``encoder.safetensors`` (weights) and ``encoder.json``::

    {"format": "pcpt-encoder/1", "kind": "point_encoder", "spec": {...}, "data_contract": {...},
     "provenance": {"method", "step", "epoch", "git_sha", "config_sha256", "data_manifest_sha256",
                    "versions": {"pcpt", "torch", "lightning"}, ...},
     "num_params": N}

:func:`load_encoder` rebuilds the module from the spec alone and loads strictly. Writes are atomic: files go
to a temporary sibling directory that is renamed into place, so an interrupted write never leaves a
directory that looks like a complete artifact. Lightning ``.ckpt`` files are for resuming only;
:func:`export_from_lightning_ckpt` turns one into an artifact.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import uuid
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from datapipes.errors import UserError, one_line
from pretrain.encoders import DataContract, EncoderSpec, PointEncoder, build_encoder

__all__ = [
    "ARTIFACT_FORMAT",
    "CKPT_META_KEY",
    "META_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "WeightsMismatchError",
    "check_artifact_destination",
    "export_from_lightning_ckpt",
    "git_sha",
    "lightning_ckpt_meta",
    "lightning_ckpt_provenance",
    "load_artifact_tensors",
    "load_encoder",
    "load_state_strict",
    "make_provenance",
    "module_from_lightning_ckpt",
    "read_artifact_meta",
    "read_checkpoint_file",
    "save_artifact",
    "save_encoder",
    "save_module_artifact",
]

ARTIFACT_FORMAT = "pcpt-encoder/1"
WEIGHTS_FILE = "encoder.safetensors"
META_FILE = "encoder.json"
#: key under which pcpt LightningModules store plain-data metadata in their checkpoints.
CKPT_META_KEY = "pcpt"
_PROVENANCE_KEYS = ("method", "step", "epoch", "git_sha", "config_sha256", "data_manifest_sha256")

SpecT = TypeVar("SpecT")
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


class ArtifactError(UserError, ValueError):
    """An artifact or checkpoint that cannot be read: missing, malformed, wrong format or kind."""


class WeightsMismatchError(UserError, RuntimeError):
    """Weights that do not fit an encoder spec (missing or unexpected keys, wrong shapes)."""


# ----------------------------------------------------------------------------------------------- provenance


def git_sha(cwd: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` in ``cwd``, or ``"unknown"``.

    The default is the folder that holds the running pcpt source, so provenance names the commit of the
    code that trained the model wherever the command runs from ("unknown" for an installed wheel).
    """
    if cwd is None:
        cwd = Path(__file__).resolve().parents[1]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = result.stdout.strip()
    return sha if result.returncode == 0 and sha else "unknown"


def _versions() -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    from datapipes._version import __version__

    return {"pcpt": __version__, "torch": torch.__version__, "lightning": version("lightning")}


def make_provenance(provenance: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Completes provenance with every standard key (None when unknown) and the library versions.

    Args:
        provenance: known fields, e.g. ``{"method": "PointMAE", "step": 1000}``; extra fields are kept.
        **extra: more fields (override ``provenance``).

    Returns:
        A dict with ``method, step, epoch, git_sha, config_sha256, data_manifest_sha256, versions`` and
        any extra fields.
    """
    out: dict[str, Any] = dict.fromkeys(_PROVENANCE_KEYS)
    out.update(provenance or {})
    out.update(extra)
    versions = _versions()
    versions.update(out.get("versions") or {})
    out["versions"] = versions
    return out


# -------------------------------------------------------------------------------------- generic artifacts


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_artifact(out_dir: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """Writes an artifact directory atomically, never touching files pcpt did not write.

    A new (or empty) ``out_dir`` is written as a temporary sibling directory that is renamed into place. An
    existing artifact is updated in place: its ``encoder.json`` is removed first (so the folder no longer
    looks complete), the new weights and then the new ``encoder.json`` are moved in; other files in the
    folder are kept. A non-empty directory that is not an artifact is refused.

    Args:
        out_dir: destination directory.
        tensors: weights to store in ``encoder.safetensors`` (moved to CPU, made contiguous).
        meta: JSON metadata; must contain ``kind``. ``format`` is set to ``pcpt-encoder/1``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: no ``kind`` in meta or metadata that is not JSON serialisable.
        ArtifactError: ``out_dir`` is a file, or a non-empty directory that is not a pcpt artifact.
    """
    out = Path(out_dir)
    if not meta.get("kind"):
        raise ValueError("artifact meta must name its 'kind'")
    check_artifact_destination(out)
    full_meta = {"format": ARTIFACT_FORMAT, **meta}
    try:
        text = json.dumps(full_meta, indent=2, default=_json_default) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"artifact metadata is not JSON serialisable: {err}") from err
    state = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(state, str(tmp / WEIGHTS_FILE))
        _write_synced(tmp / META_FILE, text)  # the meta file goes last
        if out.is_dir() and any(out.iterdir()):
            (out / META_FILE).unlink(missing_ok=True)  # from here on the folder is an incomplete artifact
            os.replace(tmp / WEIGHTS_FILE, out / WEIGHTS_FILE)
            os.replace(tmp / META_FILE, out / META_FILE)
            tmp.rmdir()
        else:
            if out.is_dir():
                out.rmdir()
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_artifact_destination(out: str | Path) -> None:
    """Refuses an artifact destination that holds something pcpt did not write.

    Allowed: a missing path, an empty directory, or an existing artifact directory (``encoder.json``, or an
    interrupted update that left ``encoder.safetensors`` alone).

    Raises:
        ArtifactError: ``out`` is a file, or a non-empty directory that is not a pcpt artifact.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a directory; choose another artifact path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / META_FILE).is_file() or (out / WEIGHTS_FILE).is_file():
        return
    raise ArtifactError(
        f"{out}: non-empty directory that is not a pcpt artifact (no {META_FILE}); choose another path"
    )


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_artifact_meta(path: str | Path, *, kind: str | None = None) -> dict[str, Any]:
    """Reads and checks ``encoder.json`` of an artifact.

    Args:
        path: artifact directory.
        kind: required ``kind`` (e.g. ``"point_encoder"``), or None for any.

    Raises:
        ArtifactError: missing directory or files, invalid JSON, wrong format or kind.
    """
    src = Path(path)
    if not src.is_dir():
        raise ArtifactError(f"{src}: no such artifact directory")
    meta_path = src / META_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{src}: not a pcpt artifact ({META_FILE} is missing)")
    if not (src / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"{src}: incomplete artifact ({WEIGHTS_FILE} is missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{meta_path}: unreadable artifact metadata: {err}") from err
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_path}: artifact metadata must be a JSON object")
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{meta_path}: unsupported format {meta.get('format')!r}; expected {ARTIFACT_FORMAT!r}"
        )
    if kind is not None and meta.get("kind") != kind:
        raise ArtifactError(f"{meta_path}: artifact kind is {meta.get('kind')!r}, expected {kind!r}")
    return meta


def load_artifact_tensors(
    path: str | Path, *, kind: str | None = None, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reads every tensor and the metadata of an artifact (any kind).

    Returns:
        (tensors by name, metadata).

    Raises:
        ArtifactError: see :func:`read_artifact_meta`, or an unreadable weights file.
    """
    src = Path(path)
    meta = read_artifact_meta(src, kind=kind)
    try:
        tensors = load_file(str(src / WEIGHTS_FILE), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{src / WEIGHTS_FILE}: unreadable weights: {err}") from err
    return tensors, meta


# --------------------------------------------------------------------------------------- encoder artifacts


def save_module_artifact(
    out_dir: str | Path,
    module: torch.nn.Module,
    *,
    kind: str,
    spec: Mapping[str, Any],
    data: DataContract,
    provenance: Mapping[str, Any],
    extra_tensors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Writes a module rebuilt from its spec alone (an encoder, a tokenizer, ...) as an artifact, atomically.

    Args:
        out_dir: destination directory (an existing artifact there is replaced).
        module: the module; its full ``state_dict`` (BatchNorm buffers included) is stored.
        kind: artifact kind, e.g. ``"point_encoder"``.
        spec: plain-data architecture the module is rebuilt from (``meta["spec"]``).
        data: the data contract the module was trained with.
        provenance: method, step, epoch, ...; completed by :func:`make_provenance`.
        extra_tensors: more tensors stored alongside (names must not clash with the module's keys); their
            names are listed in ``meta["extra_tensors"]``.

    Returns:
        ``out_dir`` as a Path. ``num_params`` in the metadata counts parameters (not buffers).

    Raises:
        ValueError: ``extra_tensors`` names that clash with the module's weights (see also
            :func:`save_artifact`).
    """
    state = dict(module.state_dict())
    extra = dict(extra_tensors or {})
    clash = sorted(set(extra) & set(state))
    if clash:
        raise ValueError(f"extra_tensors names clash with encoder weights: {clash}")
    meta = {
        "kind": kind,
        "spec": dict(spec),
        "data_contract": data.to_dict(),
        "provenance": make_provenance(provenance),
        "num_params": sum(p.numel() for p in module.parameters()),
    }
    if extra:
        meta["extra_tensors"] = sorted(extra)
    return save_artifact(out_dir, {**state, **extra}, meta)


def save_encoder(
    out_dir: str | Path,
    encoder: PointEncoder,
    *,
    data: DataContract,
    provenance: Mapping[str, Any],
    kind: str = "point_encoder",
    extra_tensors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Writes an encoder artifact atomically.

    Args:
        out_dir: destination directory (an existing artifact there is replaced).
        encoder: the encoder; its ``spec`` and full ``state_dict`` (BatchNorm buffers included) are stored.
        data: the data contract the encoder was trained with.
        provenance: method, step, epoch, ...; completed by :func:`make_provenance`.
        kind: artifact kind.
        extra_tensors: more tensors stored alongside (names must not clash with encoder keys); their names
            are listed in ``meta["extra_tensors"]`` and skipped by :func:`load_encoder`.

    Returns:
        ``out_dir`` as a Path. ``num_params`` in the metadata counts parameters (not buffers).
    """
    return save_module_artifact(
        out_dir,
        encoder,
        kind=kind,
        spec=encoder.spec.to_dict(),
        data=data,
        provenance=provenance,
        extra_tensors=extra_tensors,
    )


def load_encoder(
    path: str | Path,
    *,
    expected_missing: frozenset[str] | set[str] = frozenset(),
    spec_overrides: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[PointEncoder, dict[str, Any]]:
    """Rebuilds an encoder from an artifact's spec and loads its weights strictly.

    Args:
        path: artifact directory.
        expected_missing: keys allowed to be absent from the weights (they keep their initialisation), e.g.
            ``{"cls_token", "cls_pos"}`` together with ``spec_overrides={"cls_token": True}``.
        spec_overrides: spec fields to change before building (e.g. ``drop_path``).
        map_location: device of the returned module.

    Returns:
        (encoder in train mode, metadata).

    Raises:
        ArtifactError: unreadable artifact or invalid spec.
        RuntimeError: unexpected keys, missing keys outside ``expected_missing`` or shape mismatches; the
            message names the keys and the weights file.
    """
    src = Path(path)
    tensors, meta = load_artifact_tensors(src, kind="point_encoder")
    try:
        spec = EncoderSpec.from_dict({**meta.get("spec", {}), **(spec_overrides or {})})
        encoder = build_encoder(spec)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{src / META_FILE}: invalid encoder spec: {err}") from err
    for name in meta.get("extra_tensors", []):
        tensors.pop(name, None)
    load_state_strict(encoder, tensors, source=src / WEIGHTS_FILE, expected_missing=expected_missing)
    return encoder.to(map_location), meta


def load_state_strict(
    module: torch.nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str | Path,
    expected_missing: frozenset[str] | set[str] = frozenset(),
) -> None:
    """``load_state_dict`` that fails on unexpected keys, unexpected missing keys or shape mismatches.

    Raises:
        WeightsMismatchError: a RuntimeError naming ``source``, the missing and the unexpected keys.
    """
    own = module.state_dict()
    shapes = [
        f"{key} {tuple(value.shape)} (spec: {tuple(own[key].shape)})"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if shapes:
        listed = ", ".join(shapes[:3]) + (f" and {len(shapes) - 3} more" if len(shapes) > 3 else "")
        raise WeightsMismatchError(
            f"{source}: weights do not fit the encoder spec: other shapes for {listed}"
        )
    result = module.load_state_dict(dict(state), strict=False)
    missing = sorted(set(result.missing_keys) - set(expected_missing))
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise WeightsMismatchError(
            f"{source}: weights do not match the encoder spec: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )


# ------------------------------------------------------------------------------------ Lightning checkpoints


def lightning_ckpt_meta(
    *,
    method: str,
    encoder_spec: EncoderSpec,
    data_contract: DataContract,
    config_sha256: str | None = None,
    data_manifest_sha256: str | None = None,
    encoder_prefix: str = "encoder.",
    kind: str = "point_encoder",
) -> dict[str, Any]:
    """The plain-data dict a pcpt LightningModule stores as ``checkpoint["pcpt"]`` in ``on_save_checkpoint``.

    The module must hold its encoder as attribute ``encoder`` (weights ``encoder.*`` in ``state_dict``).
    """
    return {
        "method": method,
        "kind": kind,
        "encoder_spec": encoder_spec.to_dict(),
        "data_contract": data_contract.to_dict(),
        "encoder_prefix": encoder_prefix,
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


def module_from_lightning_ckpt(
    src: Path,
    ckpt: Mapping[str, Any],
    *,
    spec_key: str,
    parse_spec: Callable[[Any], SpecT],
    build: Callable[[SpecT], ModuleT],
    default_prefix: str,
) -> tuple[ModuleT, DataContract]:
    """Rebuilds the exported module of a pcpt Lightning checkpoint and loads its weights strictly.

    Args:
        src: the checkpoint file (named in messages).
        ckpt: the loaded checkpoint, with ``ckpt["pcpt"]`` (see :func:`lightning_ckpt_meta`).
        spec_key: key of the module's spec in ``ckpt["pcpt"]`` (``encoder_spec``, ``tokenizer_spec``).
        parse_spec: plain data -> spec (raises KeyError, TypeError or ValueError when invalid).
        build: spec -> freshly initialised module.
        default_prefix: prefix of the module's weights in ``state_dict`` when the metadata names none.

    Returns:
        (the module with the checkpoint's weights, the data contract stored with it).

    Raises:
        ArtifactError: no weights under the prefix, or invalid metadata.
        RuntimeError: weights that do not fit the stored spec.
    """
    info = ckpt[CKPT_META_KEY]
    prefix = str(info.get("encoder_prefix", default_prefix))
    state = {k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state:
        raise ArtifactError(f"{src}: no weights under prefix {prefix!r} in the checkpoint's state_dict")
    try:
        spec = parse_spec(info[spec_key])
        data = DataContract.from_dict(info.get("data_contract") or {})
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{src}: invalid pcpt metadata: {err}") from err
    module = build(spec)
    load_state_strict(module, state, source=src)
    return module, data


def _epochs_trained(ckpt: Mapping[str, Any]) -> Any:
    """Epochs fully trained at the checkpoint's weights (see ``pretrain.training.epochs_trained``)."""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        return ckpt.get("epoch")


def lightning_ckpt_provenance(
    src: Path, ckpt: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Provenance of a module exported from a pcpt Lightning checkpoint.

    ``step`` (``global_step``), ``epoch`` (epochs fully trained), ``git_sha`` (of the current directory, best
    effort), the method and the checksums stored in ``ckpt["pcpt"]``, and ``source``; ``overrides`` win.
    """
    info = ckpt[CKPT_META_KEY]
    return {
        "method": info.get("method"),
        "step": ckpt.get("global_step"),
        "epoch": _epochs_trained(ckpt),
        "git_sha": git_sha(),
        "config_sha256": info.get("config_sha256"),
        "data_manifest_sha256": info.get("data_manifest_sha256"),
        "source": str(src),
        **overrides,
    }


def export_from_lightning_ckpt(ckpt_path: str | Path, out_dir: str | Path, **provenance: Any) -> Path:
    """Writes the encoder of a pcpt Lightning checkpoint as an artifact.

    The checkpoint is read with ``torch.load(weights_only=True)``; it must carry ``checkpoint["pcpt"]`` (see
    :func:`lightning_ckpt_meta`). Provenance gets ``step`` (``global_step``), ``epoch``, ``git_sha`` (of the
    current directory, best effort), the method and the checksums stored in the checkpoint, and ``source``.

    Args:
        ckpt_path: Lightning ``.ckpt`` file.
        out_dir: artifact directory to write.
        **provenance: fields that override the collected provenance (e.g. ``git_sha="..."``).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ArtifactError: unreadable file or not a pcpt checkpoint.
        RuntimeError: encoder weights that do not match the stored spec.
    """
    src, ckpt = read_checkpoint_file(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(CKPT_META_KEY), dict):
        raise ArtifactError(f"{src}: not a pcpt Lightning checkpoint (no {CKPT_META_KEY!r} metadata)")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ArtifactError(f"{src}: checkpoint has no 'state_dict'")
    kind = ckpt[CKPT_META_KEY].get("kind", "point_encoder")
    if kind != "point_encoder":
        raise ArtifactError(f"{src}: export of kind {kind!r} is not supported here (only 'point_encoder')")
    encoder, data = module_from_lightning_ckpt(
        src,
        ckpt,
        spec_key="encoder_spec",
        parse_spec=EncoderSpec.from_dict,
        build=build_encoder,
        default_prefix="encoder.",
    )
    prov = lightning_ckpt_provenance(src, ckpt, provenance)
    return save_encoder(out_dir, encoder, data=data, provenance=prov)
