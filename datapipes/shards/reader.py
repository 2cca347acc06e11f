"""Reading shards: the samples of one shard (raw or decoded) and of a whole split, checked while read.

Every reader checks what the manifest promises while it reads, so damaged data stops training with an error
naming the shard instead of silently shrinking an epoch: a complete tar, the sample count the manifest lists
per shard, the members of the manifest's fields in every sample, no pickle member, finite point arrays and
labels within the class list. Local file hashes are checked by :func:`~datapipes.shards.check_shard_hashes`;
a shard given by URL is downloaded once and read only if its sha256 equals the manifest's (see
:mod:`~datapipes.shards.remote`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from datapipes.shards.format import MANIFEST_NAME, ShardFormatError, field_of_member, is_pickle_suffix
from datapipes.shards.manifest import manifest_members, manifest_shard_samples, read_manifest, shard_locations
from datapipes.shards.remote import is_url, join, location_name, parent, shard_label
from datapipes.shards.samples import decode_members
from datapipes.shards.tar_read import iter_tar_members

__all__ = ["iter_shard_members", "iter_shard_samples", "iter_split_samples"]


def _split_member(name: str, where: str) -> tuple[str, str]:
    dot = name.find(".", name.rfind("/") + 1)
    if dot <= 0 or dot == len(name) - 1:
        raise ShardFormatError(f"{where}: member {name!r} has no '<key>.<suffix>' name")
    return name[:dot], name[dot + 1 :].lower()


def iter_shard_members(
    path: str | Path,
    *,
    select: Callable[[str], bool] | None = None,
    expected: int | None = None,
    required: Iterable[str] = (),
    sha256: str | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yields ``(key, {suffix: bytes})`` per sample of one tar shard, without decoding anything.

    Args:
        path: the shard.
        select: keep only members whose suffix (``"xyz.npy"``, ...) it accepts; the others are skipped on
            disk (but still checked for pickles).
        expected: the number of samples the manifest lists for this shard (see
            :func:`~datapipes.shards.manifest_shard_samples`); a shard holding more or fewer is an error.
            ``None`` skips the count check.
        required: member suffixes every sample must hold (see :func:`~datapipes.shards.manifest_members`);
            only those that ``select`` accepts are checked.
        sha256: for a shard given by URL, its expected sha256 (default: the one listed in the
            ``manifest.json`` beside it); the shard is downloaded and read only if it matches. Unused for
            local files.

    Raises:
        UserError: naming the URL of a remote shard that is unreachable, missing or denied.
        ShardFormatError: if a remote shard's sha256 differs from the manifest, the file is not a complete,
            readable tar, a member has no key/suffix, a member is a pickle, a member name repeats, a key's
            members are not contiguous, a sample lacks a ``required`` member or the sample count differs from
            ``expected`` (raised when the extra sample starts, or at the end of a short shard).
    """
    where = shard_label(path)
    if is_url(path) and sha256 is None:
        sha256 = _listed_sha256(str(path))
    needed = frozenset(s for s in required if select is None or select(s))
    count = 0
    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    parsed: dict[str, tuple[str, str]] = {}
    decisions: dict[str, bool] = {}  # per suffix: a shard repeats the same few suffixes

    def keep(name: str) -> bool:
        parsed[name] = split = _split_member(name, where)  # parsed once, reused below
        if select is None:
            return True
        decision = decisions.get(split[1])
        if decision is None:
            decision = decisions[split[1]] = bool(select(split[1]))
        return decision

    for name, data in iter_tar_members(path, select=keep, sha256=sha256):
        member_key, suffix = parsed.pop(name)
        if is_pickle_suffix(suffix):
            raise ShardFormatError(
                f"{where}: member {name} is a pickle; pcpt never unpickles shard data (refused)"
            )
        if member_key != key:
            if key is not None:
                if not members.keys() >= needed:
                    raise _missing_members(where, key, needed - members.keys())
                yield key, members
            if member_key in seen:
                raise ShardFormatError(f"{where}: key {member_key!r} appears in two separate runs")
            seen.add(member_key)
            count += 1
            if expected is not None and count > expected:
                raise ShardFormatError(
                    f"{where}: holds more than the {expected} samples its manifest lists (extra key "
                    f"{member_key!r}); the shard was changed after the conversion"
                )
            key, members = member_key, {}
        if suffix in members:
            raise ShardFormatError(f"{where}: duplicate member {name}")
        if data is not None:
            members[suffix] = data
    if key is not None:
        if not members.keys() >= needed:
            raise _missing_members(where, key, needed - members.keys())
        yield key, members
    if expected is not None and count != expected:
        raise ShardFormatError(
            f"{where}: ends after {count} samples, its manifest lists {expected} (a truncated or replaced "
            "shard); re-run the conversion or restore the file"
        )


def _listed_sha256(url: str) -> str:
    """The sha256 that the manifest beside the remote shard ``url`` lists for it."""
    folder, name = parent(url), location_name(url)
    listed = (read_manifest(folder).get("sha256") or {}).get(name)
    if not isinstance(listed, str):
        raise ShardFormatError(f"{url}: no sha256 for {name} in {join(folder, MANIFEST_NAME)}")
    return listed


def _missing_members(where: str, key: str, missing: Iterable[str]) -> ShardFormatError:
    names = ", ".join(f"{key}.{suffix}" for suffix in sorted(missing))
    return ShardFormatError(f"{where}: sample {key} lacks member(s) {names} that its manifest lists")


def iter_shard_samples(
    path: str | Path,
    *,
    fields: Iterable[str] | None = None,
    expected: int | None = None,
    required: Iterable[str] = (),
    sha256: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard: ``{"key", "xyz", ..., "label", "images", "meta"}`` (see decode_members).

    Args:
        path: the shard.
        fields: decode only these fields (``None``: all).
        expected: the sample count the manifest lists for the shard (see
            :func:`~datapipes.shards.manifest_shard_samples`); ``None`` skips the count check.
            :func:`iter_split_samples` passes it for every shard.
        required: member suffixes every sample must hold (see :func:`~datapipes.shards.manifest_members`);
            only those of the decoded ``fields`` are checked.
        sha256: a remote shard's expected sha256 (see :func:`iter_shard_members`).

    Raises:
        UserError: naming the URL of a remote shard that is unreachable, missing or denied.
        ShardFormatError: naming the shard (and member) for a pickle member, damaged or non-finite data, a
            missing member, a truncated file or a sample count other than ``expected``.
    """
    wanted = None if fields is None else frozenset(fields)
    name = shard_label(path)
    select = None if wanted is None else (lambda suffix: field_of_member(suffix) in wanted)
    for key, members in iter_shard_members(
        path, select=select, expected=expected, required=required, sha256=sha256
    ):
        yield decode_members(key, members, where=name, fields=wanted)


def iter_split_samples(
    root: str | Path,
    split: str,
    *,
    fields: Iterable[str] | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of every shard of ``split``, in manifest order, checked against the manifest.

    Each shard must hold the number of samples its manifest lists and end with a complete tar; every sample
    must hold the members of the manifest's fields, every point array must be finite (see
    :func:`decode_members`) and every label index a class of the manifest. For a manifest without per-shard
    counts the split's total is checked after its last shard. Local file hashes are not checked here (see
    :func:`~datapipes.shards.check_shard_hashes`); the shards of a URL are read only when their sha256 equals
    the manifest's.

    Args:
        root: the shard folder (a local path or a URL).
        split: the split to read.
        fields: decode only these fields (``None``: all).
        manifest: the folder's manifest, if already read.

    Raises:
        UserError: for a missing or invalid manifest or split.
        ShardFormatError: naming the shard for a damaged, truncated or unsafe shard or a wrong sample count.
    """
    manifest = read_manifest(root) if manifest is None else manifest
    paths = shard_locations(root, split, manifest)
    counts = manifest_shard_samples(manifest, split)
    required = manifest_members(manifest)
    classes = len(manifest.get("classes") or [])
    shas = manifest.get("sha256") or {}
    total = 0
    for path in paths:
        name = location_name(path)
        sha256 = shas.get(name) if is_url(path) else None
        if is_url(path) and not isinstance(sha256, str):
            raise ShardFormatError(f"{path}: no sha256 for {name} in {join(root, MANIFEST_NAME)}")
        for sample in iter_shard_samples(
            path, fields=fields, expected=counts.get(name), required=required, sha256=sha256
        ):
            if classes and sample.get("label", 0) >= classes:
                raise ShardFormatError(
                    f"{shard_label(path)}: sample {sample['key']} has label {sample['label']}, but the "
                    f"manifest lists {classes} classes"
                )
            total += 1
            yield sample
    want = int(manifest["splits"][split]["samples"])
    if total != want:
        names = ", ".join(location_name(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise ShardFormatError(
            f"{root if is_url(root) else Path(root)}: split {split!r} holds {total} samples in its shards "
            f"({names}), its manifest lists {want}; run pcpt-data inspect to find the damaged shard"
        )
