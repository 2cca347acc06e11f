"""Verifying a shard folder against its manifest: file hashes and a full check of every member.

Both work on a local folder or a URL (see :mod:`~datapipes.shards.remote`): remote shards are streamed
through the hash, or downloaded one at a time into a temporary folder for the full check.

:func:`check_shard_hashes` compares each shard's sha256 with the manifest (what ``verify=True`` of the data
modules runs); :func:`verify_shards` also decodes every member (what ``pcpt-data inspect`` runs).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from datapipes.errors import UserError
from datapipes.files import sha256_file
from datapipes.progress import Progress
from datapipes.shards.codecs import image_pixels
from datapipes.shards.format import ARRAY_MEMBERS, IMAGE_MEMBER_RE, MANIFEST_NAME, SHARD_RE, ShardFormatError
from datapipes.shards.manifest import expected_members, read_manifest, shard_locations
from datapipes.shards.reader import iter_shard_members
from datapipes.shards.remote import download, is_url, join, list_names, location_name, shard_label, url_sha256
from datapipes.shards.samples import decode_members

__all__ = ["check_shard_hashes", "verify_shards"]


def check_shard_hashes(
    root: str | Path,
    splits: Iterable[str] | None = None,
    *,
    manifest: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> None:
    """Hashes every shard of ``splits`` and compares it with the manifest's sha256; stops at the first bad.

    The readers already check each shard's structure, sample count and finite point arrays while reading;
    this full check also catches changed bytes that still decode (e.g. a moved coordinate), at the cost of
    reading the whole dataset once.

    Args:
        root: the shard folder (a local path or a URL).
        splits: the splits to check (``None``: every split of the manifest).
        manifest: the folder's manifest, if already read.
        progress: report progress on stderr (a bar on a terminal, periodic lines otherwise).

    Raises:
        UserError: for a missing or invalid manifest or split.
        ShardFormatError: naming the first shard that is missing, unreadable or whose sha256 differs (its
            URL when remote).
    """
    manifest = read_manifest(root) if manifest is None else manifest
    names = list(manifest["splits"]) if splits is None else list(dict.fromkeys(splits))
    paths = [path for split in names for path in shard_locations(root, split, manifest)]
    shas = manifest.get("sha256") or {}
    listing = join(root, MANIFEST_NAME)
    with Progress(len(paths), f"sha256 {location_name(root)}", "shard", disable=not progress) as bar:
        for path in paths:
            name = location_name(path)
            expected = shas.get(name)
            if not isinstance(expected, str):
                raise ShardFormatError(f"{name}: no sha256 in {listing}")
            if is_url(path):
                digest = url_sha256(path)
            else:
                try:
                    digest = sha256_file(path)
                except OSError as err:
                    raise ShardFormatError(
                        f"{path}: missing or unreadable shard ({err.strerror or err})"
                    ) from err
            if digest != expected:
                raise ShardFormatError(
                    f"{shard_label(path)}: sha256 differs from {listing} (the file changed or is "
                    "damaged); run pcpt-data inspect for details"
                )
            bar.update()


def _member_problem(key: str, suffixes: Iterable[str], fields: Mapping[str, Any]) -> str | None:
    expected = expected_members(fields)
    got = set(suffixes)
    images = {s for s in got if IMAGE_MEMBER_RE.match(s)}
    extra = sorted(got - expected - images)
    missing = sorted(expected - got)
    if "images" in fields:
        views = int(fields["images"].get("shape", [1])[0])
        if len(images) != views:
            return f"sample {key} has {len(images)} image member(s), manifest says {views}"
    elif images:
        extra = sorted(set(extra) | images)
    if extra:
        return f"sample {key} has unexpected member(s) {', '.join(f'{key}.{s}' for s in extra)}"
    if missing:
        return f"sample {key} lacks member(s) {', '.join(f'{key}.{s}' for s in missing)}"
    return None


def verify_shards(root: str | Path, *, on_shard: Callable[[str], None] | None = None) -> list[str]:
    """Hashes and fully decodes every shard listed in the manifest and checks it against the manifest.

    Args:
        root: the shard folder (a local path or a URL; a remote folder is checked for unlisted shard files
            only when its server lists it).
        on_shard: called with each shard name after it is checked (progress reporting).

    Returns:
        One line per problem (missing shard, sha256 mismatch, sample count mismatch, undecodable or pickle
        member, unexpected or missing member, duplicate key, unlisted shard file); ``[]`` when all is good.
    """
    try:
        manifest = read_manifest(root)
    except UserError as err:
        return [str(err)]
    problems: list[str] = []
    listed: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="pcpt-verify-") as tmp:
        for split, info in manifest["splits"].items():
            problems += _verify_split(root, split, info, manifest, listed, Path(tmp), on_shard)
    present = list_names(str(root)) if is_url(root) else {entry.name for entry in Path(root).iterdir()}
    for entry in sorted(present or ()):
        match = SHARD_RE.match(entry)
        if match and match.group(1) in manifest["splits"] and entry not in listed:
            problems.append(f"{entry}: shard file not listed in {MANIFEST_NAME}")
    return problems


def _local_copy(root: str | Path, name: str, tmp: Path) -> Path | str:
    """Shard ``name`` of ``root`` as a local file (a URL's is downloaded into ``tmp``), or the problem."""
    if not is_url(root):
        path = Path(root) / name
        return path if path.is_file() else f"{name}: missing shard"
    url = join(root, name)
    try:
        download(url, tmp / name)
    except UserError as err:
        return f"{name}: missing shard" if str(err).startswith(f"{url}: not found") else f"{name}: {err}"
    return tmp / name


def _verify_split(
    root: str | Path,
    split: str,
    info: Mapping[str, Any],
    manifest: Mapping[str, Any],
    listed: set[str],
    tmp: Path,
    on_shard: Callable[[str], None] | None,
) -> list[str]:
    """The problems of one split's shards (their names are added to ``listed``)."""
    fields = manifest.get("fields", {})
    shas = manifest.get("sha256", {})
    counts = manifest.get("shard_samples", {})
    problems: list[str] = []
    keys: set[str] = set()
    total = 0
    for name in info["shards"]:
        listed.add(name)
        path = _local_copy(root, name, tmp)
        if isinstance(path, str):
            problems.append(path)
            continue
        n = 0
        try:
            if shas.get(name) != sha256_file(path):
                problems.append(f"{name}: sha256 mismatch (the file changed or is damaged)")
            try:
                for key, members in iter_shard_members(path):
                    n += 1
                    if key in keys:
                        problems.append(f"{name}: duplicate key {key!r} in split {split!r}")
                    keys.add(key)
                    issue = _member_problem(key, members, fields)
                    if issue:
                        problems.append(f"{name}: {issue}")
                    decoded = decode_members(key, members, where=name)
                    shape_issue = _shape_problem(decoded, fields)
                    if shape_issue:
                        problems.append(f"{name}: sample {key}: {shape_issue}")
                    for i, image in enumerate(decoded.get("images", [])):
                        try:
                            image_pixels(image)
                        except ValueError as err:
                            problems.append(f"{name}: sample {key}: image {i}: {err}")
            except ShardFormatError as err:
                problems.append(f"undecodable: {err}")
        finally:
            if is_url(root):
                path.unlink(missing_ok=True)
        total += n
        if name in counts and counts[name] != n:
            problems.append(f"{name}: {n} samples, manifest says {counts[name]}")
        if on_shard is not None:
            on_shard(name)
    if total != info["samples"]:
        problems.append(f"split {split!r}: {total} samples in shards, manifest says {info['samples']}")
    return problems


def _shape_problem(decoded: Mapping[str, Any], fields: Mapping[str, Any]) -> str | None:
    n = decoded["xyz"].shape[0]
    for name in ARRAY_MEMBERS:
        if name not in decoded or name not in fields:
            continue
        arr = decoded[name]
        want = [n if dim == "N" else dim for dim in fields[name].get("shape", [])]
        if list(arr.shape) != want or str(arr.dtype) != fields[name].get("dtype", "float32"):
            return f"{name} has {arr.dtype} {tuple(arr.shape)}, manifest says {fields[name]}"
    return None
