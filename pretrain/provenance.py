"""Provenance of an artifact, built in one place for every path that writes one.

``fit``'s export, ``pcpt-pretrain export`` of a Lightning checkpoint and ``pcpt-pretrain import`` of official
weights all describe where the weights came from with :func:`make_provenance`: ``method``, ``step``,
``epoch`` (epochs fully trained), ``git_sha`` (the commit of the pcpt code), ``config_sha256``,
``data_manifest_sha256``, the library ``versions``, and any extra fields (``source``, ``official``, ...).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["PROVENANCE_KEYS", "git_sha", "make_provenance"]

#: the fields every provenance has (None when unknown).
PROVENANCE_KEYS = ("method", "step", "epoch", "git_sha", "config_sha256", "data_manifest_sha256")


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
        any extra fields; ``git_sha`` defaults to the commit of the running pcpt code.
    """
    out: dict[str, Any] = dict.fromkeys(PROVENANCE_KEYS)
    out.update(provenance or {})
    out.update(extra)
    if out["git_sha"] is None:
        out["git_sha"] = git_sha()
    versions = _versions()
    versions.update(out.get("versions") or {})
    out["versions"] = versions
    return out
