"""The artifact's files: ``encoder.safetensors`` + ``encoder.json``, written atomically, read with checks.

Low-level and kind-agnostic; ``pretrain.artifacts`` builds on it (kinds, modules, provenance). Writes go to a
temporary sibling directory that is renamed into place, so an interrupted write never leaves a directory that
looks like a complete artifact, and files pcpt did not write are never touched. Every write also renders the
artifact's model card (``README.md``, ``pretrain.model_card``) from the metadata; :func:`record_evaluation`
appends an evaluation result to ``encoder.json`` and re-renders the card without touching the weights.

Updates of an existing artifact (an in-place :func:`save_artifact`, :func:`record_evaluation`) hold an
exclusive lock on the artifact folder (:func:`artifact_lock`), so two evaluations finishing at the same time
both end up in ``encoder.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from datapipes.errors import UserError
from pretrain.model_card import CARD_FILE, is_model_card, render_model_card

__all__ = [
    "ARTIFACT_FORMAT",
    "ENCODER_KIND",
    "LOCK_FILE",
    "META_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "WeightsMismatchError",
    "artifact_lock",
    "check_artifact_destination",
    "load_artifact_tensors",
    "load_state_strict",
    "read_artifact_meta",
    "record_evaluation",
    "save_artifact",
    "state_mismatch",
]

ARTIFACT_FORMAT = "pcpt-encoder/1"
WEIGHTS_FILE = "encoder.safetensors"
META_FILE = "encoder.json"
ENCODER_KIND = "point_encoder"
LOCK_FILE = ".encoder.lock"  # only where folders cannot be locked (Windows)
LOCK_TIMEOUT_S = 300.0


class ArtifactError(UserError, ValueError):
    """An artifact or checkpoint that cannot be read: missing, malformed, wrong format or kind."""


class WeightsMismatchError(UserError, RuntimeError):
    """Weights that do not fit an encoder spec (missing or unexpected keys, wrong shapes)."""


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
    looks complete), the new weights, the new model card and then the new ``encoder.json`` are moved in;
    other files in the folder are kept. A non-empty directory that is not an artifact is refused.

    The model card (``README.md``, :func:`pretrain.model_card.render_model_card`) is written with the
    artifact and replaces the card of an earlier write; a ``README.md`` that is not a pcpt card (the user's
    own notes) is kept and no card is written.

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
    text = _meta_text({"format": ARTIFACT_FORMAT, **meta})
    card = _card_text(out, json.loads(text))
    state = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(state, str(tmp / WEIGHTS_FILE))
        if card is not None:
            _write_synced(tmp / CARD_FILE, card)
        _write_synced(tmp / META_FILE, text)  # the meta file goes last
        if out.is_dir() and any(out.iterdir()):
            with artifact_lock(out):
                (out / META_FILE).unlink(missing_ok=True)  # from here on the folder is an incomplete artifact
                os.replace(tmp / WEIGHTS_FILE, out / WEIGHTS_FILE)
                if card is not None:
                    os.replace(tmp / CARD_FILE, out / CARD_FILE)
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


def _meta_text(meta: Mapping[str, Any]) -> str:
    """``encoder.json``'s text.

    Raises:
        ValueError: metadata that is not JSON serialisable.
    """
    try:
        return json.dumps(meta, indent=2, default=_json_default) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"artifact metadata is not JSON serialisable: {err}") from err


def _card_text(out: Path, meta: Mapping[str, Any]) -> str | None:
    """The model card to write into ``out``, or None when ``out`` holds a README that is not a pcpt card."""
    existing = out / CARD_FILE
    if existing.exists():
        try:
            if not existing.is_file() or not is_model_card(existing.read_text(encoding="utf-8")):
                return None
        except (OSError, UnicodeDecodeError):
            return None
    return render_model_card(meta, folder=out.resolve().name)


def record_evaluation(path: str | Path, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Appends an evaluation result to an artifact's ``encoder.json`` and re-renders its model card.

    ``meta["evaluations"]`` gets ``entry`` appended. The new ``encoder.json`` and card are written to
    temporary files in the artifact folder first and then moved over the old ones (``os.replace``), the
    metadata first; the weights file is never touched, and a ``README.md`` that is not a pcpt card is kept.

    Args:
        path: artifact directory.
        entry: the result (plain data: protocol, data, numbers, date, ...).

    Returns:
        The updated metadata.

    Raises:
        ArtifactError: not a readable artifact, or another process still holds its update lock after
            :data:`LOCK_TIMEOUT_S` seconds.
        ValueError: an entry that is not JSON serialisable.
        OSError: the artifact cannot be written (read-only folder or file system); nothing is changed.
    """
    src = Path(path)
    with artifact_lock(src):
        meta = read_artifact_meta(src)  # read under the lock: an entry recorded meanwhile is kept
        meta["evaluations"] = [*(meta.get("evaluations") or []), dict(entry)]
        text = _meta_text(meta)
        card = _card_text(src, json.loads(text))
        pending = [(src / META_FILE, text)] + ([(src / CARD_FILE, card)] if card is not None else [])
        temporary: list[Path] = []
        try:
            for target, content in pending:
                temporary.append(target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"))
                _write_synced(temporary[-1], content)
            for tmp, (target, _) in zip(temporary, pending):
                os.replace(tmp, target)
        finally:
            for tmp in temporary:
                tmp.unlink(missing_ok=True)
    return meta


@contextlib.contextmanager
def artifact_lock(folder: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Holds the exclusive update lock of an existing artifact folder.

    On POSIX the lock is ``flock`` on the folder itself, so nothing is left in the artifact and the lock ends
    with the process that holds it (written here because ``filelock`` locks only files, and a lock file kept
    in the folder would travel with every copy and upload of the artifact). Where folders cannot be locked
    (Windows) ``filelock`` locks ``.encoder.lock`` inside the folder instead.

    Args:
        folder: the artifact directory (must exist).
        timeout: seconds to wait for another process's update to finish.

    Raises:
        ArtifactError: ``folder`` is not a directory, or the lock was not released within ``timeout``
            seconds.
    """
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact directory")
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        from filelock import FileLock, Timeout

        lock = FileLock(str(folder / LOCK_FILE), timeout=timeout)
        try:
            lock.acquire()
        except Timeout as err:
            raise _lock_timeout(folder, timeout) from err
        try:
            yield
        finally:
            lock.release()
        return
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _lock_timeout(folder, timeout) from None
                time.sleep(0.05)
        yield  # closing the descriptor below releases the lock
    finally:
        os.close(fd)


def _lock_timeout(folder: Path, timeout: float) -> ArtifactError:
    return ArtifactError(
        f"{folder}: another process is still updating this artifact after {timeout:.0f} s "
        "(it holds the artifact's update lock, which ends with that process)"
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


def state_mismatch(
    expected: Mapping[str, Tensor],
    given: Mapping[str, Any],
    *,
    expected_missing: frozenset[str] | set[str] = frozenset(),
) -> list[str]:
    """How a state dict differs from the one a module expects, one phrase per kind of problem.

    Args:
        expected: the module's ``state_dict()``.
        given: the weights to load (non-tensor entries are ignored).
        expected_missing: keys allowed to be absent from ``given``.

    Returns:
        ``[]`` when every key matches in name and shape; else phrases naming the first few missing keys,
        unexpected keys and keys of other shapes (``"other shapes for ['k (2, 3) (spec: (4, 3))']"``).
    """
    want = {k: tuple(v.shape) for k, v in expected.items()}
    got = {k: tuple(v.shape) for k, v in given.items() if isinstance(v, Tensor)}
    missing = sorted(set(want) - set(got) - set(expected_missing))
    unexpected = sorted(set(got) - set(want))
    shapes = [f"{k} {got[k]} (spec: {want[k]})" for k in sorted(set(want) & set(got)) if want[k] != got[k]]

    def some(items: list[str]) -> str:
        return repr(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    return [
        f"{label} {some(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("other shapes for", shapes),
        )
        if items
    ]


def load_state_strict(
    module: torch.nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str | Path,
    expected_missing: frozenset[str] | set[str] = frozenset(),
) -> None:
    """``load_state_dict`` that fails on unexpected keys, unexpected missing keys or shape mismatches.

    Raises:
        WeightsMismatchError: a RuntimeError naming ``source`` and the differing keys (see
            :func:`state_mismatch`).
    """
    problems = state_mismatch(module.state_dict(), state, expected_missing=expected_missing)
    if problems:
        raise WeightsMismatchError(f"{source}: weights do not fit the spec: {'; '.join(problems)}")
    module.load_state_dict(dict(state), strict=False)
