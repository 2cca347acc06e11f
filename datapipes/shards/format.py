"""Names of the ``pcpt-shards/1`` format: files of a shard folder, member suffixes, sample keys, the error.

A shard folder ``OUT/`` holds webdataset tar shards ``<split>-NNNNNN.tar``, ``manifest.json`` (written last: a
folder without it is not a finished dataset), ``rejected.jsonl`` and the writer's progress records in
``OUT/.pcpt-progress/``. One sample is a run of tar members sharing a key: ``<key>.xyz.npy``, optional
``<key>.normal.npy``, ``<key>.curv.npy``, ``<key>.feat.npy``, ``<key>.cls.txt``, ``<key>.img.png`` (or
``<key>.img.0.png``, ``<key>.img.1.jpg``, ... for several views) and ``<key>.meta.json``.
"""

from __future__ import annotations

import re

import numpy as np

from datapipes.errors import UserError

__all__ = [
    "ARRAY_MEMBERS",
    "FORMAT",
    "IMAGE_MEMBER_RE",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "PICKLE_SUFFIXES",
    "PROGRESS_DIR",
    "REJECTED_NAME",
    "SHARD_RE",
    "ShardFormatError",
    "field_of_member",
    "is_pickle_suffix",
    "shard_name",
    "validate_key",
]

FORMAT = "pcpt-shards/1"
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"
PROGRESS_DIR = ".pcpt-progress"
LOCK_NAME = "lock"
"""The writer's lock file in ``OUT/.pcpt-progress/`` (an advisory ``flock``; it holds the writer's pid)."""
#: Last extension components that mark a pickle payload; never decoded.
PICKLE_SUFFIXES = frozenset({"pyd", "pickle", "pkl", "pth", "pt"})

#: Per-point array fields and their members, in the order members are written.
ARRAY_MEMBERS = {"xyz": "xyz.npy", "normal": "normal.npy", "curv": "curv.npy", "feat": "feat.npy"}
_MEMBER_TO_FIELD = {member: name for name, member in ARRAY_MEMBERS.items()}
#: Image members: ``img.png`` / ``img.jpg`` (one view) or ``img.<view>.<png|jpg|jpeg>``.
IMAGE_MEMBER_RE = re.compile(r"^img(?:\.(\d+))?\.(png|jpg|jpeg)$")
#: Shard file names: group 1 is the split, group 2 the index.
SHARD_RE = re.compile(r"^([A-Za-z0-9_]+)-(\d{6})\.tar$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_KEY_BAD_CHARS = re.compile(r"[.\\\s\x00-\x1f]")


class ShardFormatError(UserError):
    """A shard that is damaged, unsafe (a pickle member) or does not follow ``pcpt-shards/1``."""


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``: ``f"{split}-{index:06d}.tar"``.

    Raises:
        ValueError: for a split name outside ``[A-Za-z0-9_]+`` or a negative / too large index.
    """
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(f"split must match [A-Za-z0-9_]+, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= int(index) < 10**6:
        raise ValueError(f"shard index must be an int in [0, 999999], got {index!r}")
    return f"{split}-{int(index):06d}.tar"


def validate_key(key: object) -> str:
    """Returns ``key`` if it is a valid webdataset sample key, else raises ``ValueError``.

    A key is a non-empty string with no dots (webdataset splits member names at the first dot), no
    whitespace, control characters or backslashes, not starting with ``/`` or ``__`` (reserved for metadata).
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    if _KEY_BAD_CHARS.search(key) or key.startswith(("/", "__")) or key.endswith("/"):
        raise ValueError(
            f"sample key {key!r} is not webdataset-safe: no dots, whitespace or backslashes, "
            "and no leading '/' or '__'"
        )
    return key


def field_of_member(suffix: str) -> str | None:
    """The sample field a member suffix holds (``"xyz.npy"`` -> ``"xyz"``, ``"img.1.png"`` -> ``"images"``).

    Returns ``None`` for a suffix outside the format.
    """
    if suffix in _MEMBER_TO_FIELD:
        return _MEMBER_TO_FIELD[suffix]
    if suffix == "cls.txt":
        return "label"
    if suffix == "meta.json":
        return "meta"
    return "images" if IMAGE_MEMBER_RE.match(suffix) else None


def is_pickle_suffix(suffix: str) -> bool:
    """Whether a suffix ends in a pickle extension (:data:`PICKLE_SUFFIXES`), refused by every reader."""
    return suffix.rsplit(".", 1)[-1].lower() in PICKLE_SUFFIXES
