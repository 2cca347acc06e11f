"""``manifest.json`` of a shard folder: reading and checking it, and what it promises about the shards.

The manifest is written last by :class:`~datapipes.shards.ShardSetWriter`, so a folder without one is not a
finished dataset. Its ``fields`` entry describes every sample (``{"xyz": {"dtype": "float32", "shape": ["N",
3]}, "label": ..., "images": {"dtype": "png", "shape": [views]}}``, ``"N"`` standing for the cloud's point
count); ``feat`` may name its channels (``"feat": {..., "shape": ["N", 2], "channels": ["intensity",
"time"]}``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datapipes.errors import UserError
from datapipes.files import sha256_file
from datapipes.shards.format import ARRAY_MEMBERS, FORMAT, MANIFEST_NAME, PROGRESS_DIR
from datapipes.shards.remote import is_url, join, read_url_bytes

__all__ = [
    "expected_members",
    "manifest_entries",
    "manifest_members",
    "manifest_sha256",
    "manifest_shard_samples",
    "name_channels",
    "pcpt_manifest",
    "read_manifest",
    "shard_locations",
    "shard_paths",
]


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Reads and checks ``root/manifest.json`` (``root`` a local folder or a URL, see :func:`is_url`).

    Raises:
        UserError: naming the file if the folder or manifest is missing or unreachable, not JSON, or not
            ``pcpt-shards/1``.
    """
    if is_url(root):
        url = join(root, MANIFEST_NAME)
        try:
            data = read_url_bytes(url, what="the shard folder's manifest")
        except UserError as err:
            if str(err).startswith(f"{url}: not found"):
                raise UserError(f"{url}: not found, so {root} is not a finished pcpt shard folder") from err
            raise
        try:
            manifest = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise UserError(f"{url}: unreadable or invalid JSON ({err})") from err
        return _checked(manifest, url)
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise UserError(f"{root}: no such shard folder")
    if not path.is_file():
        hint = " (an unfinished conversion: re-run it to finish)" if (root / PROGRESS_DIR).is_dir() else ""
        raise UserError(f"{path}: not found, so {root} is not a finished pcpt shard folder{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: unreadable or invalid JSON ({err})") from err
    return _checked(manifest, path)


def _checked(manifest: Any, path: str | Path) -> dict[str, Any]:
    """``manifest`` if it is a valid ``pcpt-shards/1`` manifest; errors name ``path``."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path}: format {got!r} is not {FORMAT!r}")
    missing = [k for k in ("splits", "classes", "fields", "sha256") if k not in manifest]
    if missing or not isinstance(manifest["splits"], dict):
        raise UserError(f"{path}: missing or invalid keys {missing or ['splits']}")
    for split, info in manifest["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list) or "samples" not in info:
            raise UserError(f"{path}: split {split!r} needs 'shards' (list) and 'samples'")
        if not _is_count(info["samples"]) or not all(isinstance(n, str) for n in info["shards"]):
            raise UserError(f"{path}: split {split!r} needs shard names and an integer sample count")
    counts = manifest.get("shard_samples", {})
    if not isinstance(counts, dict) or not all(_is_count(n) for n in counts.values()):
        raise UserError(f"{path}: 'shard_samples' must map shard names to integer sample counts")
    return manifest


def manifest_sha256(root: str | Path) -> str:
    """Hex sha256 of the bytes of ``root/manifest.json`` (identifies the exact data), local or remote.

    Raises:
        UserError: naming the file if it is missing or unreachable.
    """
    if is_url(root):
        return hashlib.sha256(read_url_bytes(join(root, MANIFEST_NAME), what="manifest")).hexdigest()
    path = Path(root) / MANIFEST_NAME
    try:
        return sha256_file(path)
    except OSError as err:
        raise UserError(f"{path}: unreadable ({err.strerror or err})") from err


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def pcpt_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path`` if it is one pcpt wrote (``pcpt-shards/1``, ``created_by: pcpt ...``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    created_by = data.get("created_by")
    return data if isinstance(created_by, str) and created_by.startswith("pcpt ") else None


def shard_paths(root: str | Path, split: str, manifest: Mapping[str, Any] | None = None) -> list[Path]:
    """Paths of the shards of ``split`` listed in the manifest of the local folder ``root``.

    Raises:
        UserError: if the manifest is missing/invalid or has no such split, or ``root`` is a URL (use
            :func:`shard_locations`).
    """
    if is_url(root):
        raise UserError(f"{root}: a URL; this command reads local shard folders only")
    return [Path(p) for p in shard_locations(root, split, manifest)]


def shard_locations(root: str | Path, split: str, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Locations of the shards of ``split``: local paths or URLs (when ``root`` is a URL), as strings.

    Raises:
        UserError: if the manifest is missing/invalid or has no such split.
    """
    manifest = read_manifest(root) if manifest is None else manifest
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"{root}: no split {split!r} in {MANIFEST_NAME} (has {sorted(splits)})")
    return [join(root, name) for name in splits[split]["shards"]]


def expected_members(fields: Mapping[str, Any]) -> set[str]:
    """Member suffixes (images aside) every sample must have, given the manifest's fields."""
    expected = {ARRAY_MEMBERS[name] for name in fields if name in ARRAY_MEMBERS}
    if "label" in fields:
        expected.add("cls.txt")
    if "meta" in fields:
        expected.add("meta.json")
    return expected


def manifest_members(manifest: Mapping[str, Any]) -> frozenset[str]:
    """Member suffixes every sample must hold according to the manifest's ``fields`` (images aside)."""
    fields = manifest.get("fields")
    return frozenset(expected_members(fields if isinstance(fields, Mapping) else {}))


def manifest_shard_samples(manifest: Mapping[str, Any], split: str | None = None) -> dict[str, int]:
    """The sample count the manifest lists for each shard (of ``split``, or of every split).

    Read from ``shard_samples``; a manifest written before it existed gives the split total for a split of
    one shard, and nothing for the shards of larger splits (:func:`~datapipes.shards.iter_split_samples`
    then checks the split total).
    """
    listed = manifest.get("shard_samples")
    listed = listed if isinstance(listed, Mapping) else {}
    counts: dict[str, int] = {}
    for name, info in manifest["splits"].items():
        if split is not None and name != split:
            continue
        shards = info["shards"]
        for shard in shards:
            if shard in listed:
                counts[shard] = int(listed[shard])
            elif len(shards) == 1:
                counts[shard] = int(info["samples"])
    return counts


def manifest_entries(
    out: Path, records: Mapping[str, Sequence[Mapping[str, Any]]], classes: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The manifest entries summed up from the writer's per-shard progress records, and the rejections.

    Args:
        out: the shard folder (named in errors).
        records: split -> the progress record of each of its shards, in index order (``{}`` for none).
        classes: class names (labels index into it; may be empty).

    Returns:
        ``({"splits", "sha256", "shard_samples", "counts", "fields", "points"}, rejections)``; shards
        without samples are left out.

    Raises:
        UserError: if fields differ between shards or a label has no class.
    """
    splits: dict[str, dict[str, Any]] = {}
    shas: dict[str, str] = {}
    shard_samples: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    fields: dict[str, Any] | None = None
    fields_from = ""
    pmin, pmax = None, None
    rejections: list[dict[str, str]] = []
    for split, shard_records in records.items():
        names: list[str] = []
        total = 0
        per_class: Counter[str] = Counter(dict.fromkeys(classes, 0))
        for record in shard_records:
            rejections.extend(record.get("rejected", []))
            if not record.get("samples"):
                continue
            name = record["shard"]
            if fields is None:
                fields, fields_from = record["fields"], name
            elif record["fields"] != fields:
                raise UserError(f"{out}: {name} has fields {record['fields']}, {fields_from} has {fields}")
            for label, count in record.get("labels", {}).items():
                if classes and int(label) >= len(classes):
                    raise UserError(f"{out}: {name} has label {label} but only {len(classes)} classes")
                per_class[classes[int(label)] if classes else label] += count
            names.append(name)
            shas[name] = record["sha256"]
            shard_samples[name] = record["samples"]
            total += record["samples"]
            pts = record["points"]
            pmin = pts["min"] if pmin is None else min(pmin, pts["min"])
            pmax = pts["max"] if pmax is None else max(pmax, pts["max"])
        splits[split] = {"shards": names, "samples": total}
        counts[split] = dict(per_class)
    entries = {
        "splits": splits,
        "sha256": shas,
        "shard_samples": shard_samples,
        "counts": counts,
        "fields": fields or {},
        "points": {"min": pmin, "max": pmax},
    }
    return entries, rejections


_CHANNEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def name_channels(fields: Mapping[str, Any], channels: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """``fields`` with ``"channels": [names]`` added to ``feat`` (the one field whose channels have names).

    Raises:
        ValueError: for another field or no stored ``feat``, a count other than its ``C`` columns, repeated
            names, names that are not identifiers or that are field names.
    """
    out = {name: dict(spec) for name, spec in fields.items()}
    for name, names in channels.items():
        spec = out.get(name)
        names = [str(n) for n in names]
        shape = spec.get("shape") if spec is not None and name == "feat" else None
        if not isinstance(shape, list) or len(shape) != 2 or shape[0] != "N":
            raise ValueError(f"channels: only a stored feat (N, C) field has named channels, got {name!r}")
        if len(names) != shape[1] or len(set(names)) != len(names):
            raise ValueError(f"channels: {name!r} has {shape[1]} channels, got the names {names}")
        bad = [n for n in names if not _CHANNEL_RE.match(n) or n in ARRAY_MEMBERS]
        if bad:
            raise ValueError(f"channels: names must be identifiers other than field names, got {bad}")
        out[name]["channels"] = names
    return out
