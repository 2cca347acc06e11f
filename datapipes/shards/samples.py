"""One sample <-> its tar members: validation and encoding of a :class:`~datapipes.types.Sample`, decoding.

:func:`encode_sample` validates one sample and turns it into ordered members; :func:`encode_for_shard` goes
on to the sample's ready tar blocks and what the shard writer records about it (an :class:`EncodedSample`,
so conversion workers can do all per-sample encoding and the writer only appends bytes);
:func:`decode_members` turns the members of one sample back into arrays and values and refuses anything
unsafe or damaged, naming the shard and the member: a member with a pickle extension before anything is
decoded, an object array, point arrays that are not finite or not of the shapes pcpt writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict, cast

import numpy as np

from datapipes.files import printable
from datapipes.shards.codecs import decode_npy, dumps, encode_npy, image_suffix
from datapipes.shards.format import (
    ARRAY_MEMBERS,
    IMAGE_MEMBER_RE,
    ShardFormatError,
    is_pickle_suffix,
    validate_key,
)
from datapipes.shards.tar_write import tar_member_blocks
from datapipes.types import Sample

__all__ = ["EncodedSample", "decode_members", "encode_for_shard", "encode_sample", "field_spec", "is_encoded"]

_MEMBER_TO_FIELD = {member: name for name, member in ARRAY_MEMBERS.items()}
_SAMPLE_FIELDS = frozenset({"key", "xyz", "normal", "curv", "feat", "label", "images", "meta"})


def _float_points(name: str, value: Any, *, key: str, rows: int | None) -> np.ndarray:
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"sample {key!r}: {name} must be a float array, got dtype {arr.dtype}")
    if rows is not None and (arr.ndim == 0 or arr.shape[0] != rows):
        raise ValueError(f"sample {key!r}: {name} has shape {arr.shape}, expected {rows} rows like xyz")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"sample {key!r}: {name} contains NaN or infinite values")
    return arr


def encode_sample(sample: Sample) -> tuple[str, list[tuple[str, bytes]]]:
    """Validates one sample and encodes it into ordered tar members.

    Args:
        sample: a :class:`~datapipes.types.Sample` with at least ``key`` and ``xyz``.

    Returns:
        ``(key, [(suffix, bytes), ...])``, suffixes such as ``"xyz.npy"`` and ``"cls.txt"`` in a fixed order.

    Raises:
        ValueError: naming the key and field for a missing, unknown or malformed field.
    """
    key = validate_key(sample.get("key"))
    unknown = set(sample) - _SAMPLE_FIELDS
    if unknown:
        raise ValueError(f"sample {key!r}: unknown fields {sorted(unknown)}")
    if "xyz" not in sample:
        raise ValueError(f"sample {key!r}: xyz is required")
    xyz = _float_points("xyz", sample["xyz"], key=key, rows=None)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.shape[0] < 1:
        raise ValueError(f"sample {key!r}: xyz must have shape (N, 3) with N >= 1, got {xyz.shape}")
    members = [("xyz.npy", encode_npy(xyz))]
    n = xyz.shape[0]
    for name, suffix, tails in _OTHER_POINT_FIELDS:
        if name in sample:
            arr = _float_points(name, sample[name], key=key, rows=n)  # type: ignore[literal-required]
            if (tails is None and arr.ndim != 2) or (tails is not None and arr.shape[1:] not in tails):
                want = f"({n}, C)" if tails is None else " or ".join(str((n, *t)) for t in tails)
                raise ValueError(f"sample {key!r}: {name} must have shape {want}, got {arr.shape}")
            members.append((suffix, encode_npy(arr)))
    if "label" in sample:
        label = sample["label"]
        if isinstance(label, bool) or not isinstance(label, int | np.integer) or int(label) < 0:
            raise ValueError(f"sample {key!r}: label must be a non-negative int, got {label!r}")
        members.append(("cls.txt", str(int(label)).encode()))
    if "images" in sample:
        images = list(sample["images"])
        if not images or not all(isinstance(im, bytes | bytearray) for im in images):
            raise ValueError(f"sample {key!r}: images must be a non-empty list of PNG/JPEG bytes")
        for i, image in enumerate(images):
            suffix = image_suffix(bytes(image), where=f"sample {key!r} image {i}")
            name = f"img.{suffix}" if len(images) == 1 else f"img.{i}.{suffix}"
            members.append((name, bytes(image)))
    if "meta" in sample:
        meta = sample["meta"]
        if not isinstance(meta, Mapping):
            raise ValueError(f"sample {key!r}: meta must be a dict, got {type(meta).__name__}")
        try:
            members.append(("meta.json", dumps(dict(meta)).encode()))
        except (TypeError, ValueError) as err:
            raise ValueError(f"sample {key!r}: meta is not JSON serialisable ({err})") from err
    return key, members


def field_spec(members: Sequence[tuple[str, bytes]], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{field: {dtype, shape}}`` of one encoded sample (``"N"`` marks the per-cloud point count).

    Args:
        members: the sample's ``(suffix, bytes)`` members (:func:`encode_sample`).
        arrays: its per-point arrays by field name (``xyz``, ``normal``, ``curv``, ``feat``).

    Returns:
        The field description the shard writer records and compares between samples.
    """
    spec: dict[str, dict[str, Any]] = {}
    for name, arr in arrays.items():
        spec[name] = {"dtype": "float32", "shape": ["N", *arr.shape[1:]]}
    suffixes = [s for s, _ in members]
    if "cls.txt" in suffixes:
        spec["label"] = {"dtype": "int64", "shape": []}
    images = [s for s in suffixes if IMAGE_MEMBER_RE.match(s)]
    if images:
        kinds = sorted({s.rsplit(".", 1)[-1] for s in images})
        spec["images"] = {"dtype": "/".join(kinds), "shape": [len(images)]}
    if "meta.json" in suffixes:
        spec["meta"] = {"dtype": "json", "shape": []}
    return spec


class _EncodedRequired(TypedDict):
    key: str
    tar: bytes
    fields: dict[str, Any]
    points: int


class EncodedSample(_EncodedRequired, total=False):
    """A sample turned into its tar blocks plus what the shard writer records (:func:`encode_for_shard`).

    Plain values, ``bytes`` and JSON only, so it travels through process pools and
    :func:`~datapipes.engines.pack_result` unchanged.

    Attributes:
        key: the sample key.
        tar: the sample's tar member blocks (:func:`~datapipes.shards.tar_write.tar_member_blocks`).
        fields: its field description (:func:`field_spec`).
        points: its point count (rows of ``xyz``).
        label: its class label, when it has one.
    """

    label: int


def encode_for_shard(sample: Sample) -> EncodedSample:
    """Validates and encodes one sample into exactly the bytes and record the shard writer produces for it.

    Does everything per sample that :meth:`~datapipes.shards.ShardSetWriter.write_shard` does (metadata
    made printable, :func:`encode_sample`, tar blocks, field description, label, point count), so a
    conversion worker can call it and the writer only appends the blocks; the shard is byte-identical to
    one written from the plain sample.

    Args:
        sample: a :class:`~datapipes.types.Sample`.

    Returns:
        The :class:`EncodedSample`.

    Raises:
        ValueError: naming the key and field for a malformed sample (see :func:`encode_sample`).
    """
    if "meta" in sample:
        sample = cast(Sample, {**sample, "meta": printable(sample["meta"])})
    key, members = encode_sample(sample)
    arrays = {f: np.asarray(sample[f]) for f in ARRAY_MEMBERS if f in sample}  # type: ignore[literal-required]
    encoded: EncodedSample = {
        "key": key,
        "tar": tar_member_blocks(key, members),
        "fields": field_spec(members, arrays),
        "points": int(arrays["xyz"].shape[0]),
    }
    if "label" in sample:
        encoded["label"] = int(sample["label"])
    return encoded


def is_encoded(sample: Mapping[str, Any]) -> bool:
    """Whether ``sample`` is an :class:`EncodedSample` (has its ``tar`` blocks) rather than a plain sample."""
    return "tar" in sample and "xyz" not in sample


def decode_members(
    key: str,
    members: Mapping[str, bytes],
    *,
    where: str,
    fields: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Decodes the members of one sample (suffix -> bytes) into arrays and values.

    Args:
        key: the sample key.
        members: member suffix (``"xyz.npy"``, ``"cls.txt"``, ...) to bytes.
        where: shard name for error messages.
        fields: decode only these fields (``"xyz"``, ``"normal"``, ``"curv"``, ``"feat"``, ``"label"``,
            ``"images"``, ``"meta"``); ``None`` decodes everything. Unknown members are ignored.

    Returns:
        ``{"key": str, "xyz": (N, 3) float32, ...}`` with ``label`` an int, ``images`` a list of raw
        PNG/JPEG bytes (in view order) and ``meta`` a dict.

    Raises:
        ShardFormatError: naming ``where`` and the member, for a pickle member (always checked, whatever
            ``fields``), an undecodable member, a negative label, or point arrays that are not finite floats
            of the shapes pcpt writes (``xyz`` and ``normal`` ``(N, 3)``, ``curv`` ``(N,)`` or ``(N, 1)``,
            ``feat`` ``(N, C)``).
    """
    for suffix in members:
        if is_pickle_suffix(suffix):
            raise ShardFormatError(
                f"{where}: member {key}.{suffix} is a pickle; pcpt never unpickles shard data (refused)"
            )
    wanted = None if fields is None else set(fields)
    out: dict[str, Any] = {"key": key}
    views: list[tuple[int, bytes]] = []
    for suffix, data in members.items():
        name = _MEMBER_TO_FIELD.get(suffix)
        if name is not None:
            if wanted is None or name in wanted:
                out[name] = decode_npy(data, where=f"{where}: member {key}.{suffix}")
        elif suffix == "cls.txt":
            if wanted is None or "label" in wanted:
                try:
                    out["label"] = label = int(bytes(data).decode().strip())
                except (UnicodeDecodeError, ValueError) as err:
                    raise ShardFormatError(f"{where}: member {key}.{suffix} is not an integer label") from err
                if label < 0:
                    raise ShardFormatError(f"{where}: member {key}.{suffix} holds a negative label ({label})")
        elif suffix == "meta.json":
            if wanted is None or "meta" in wanted:
                try:
                    out["meta"] = json.loads(bytes(data).decode())
                except (UnicodeDecodeError, ValueError) as err:
                    raise ShardFormatError(f"{where}: member {key}.{suffix} is not valid JSON") from err
        elif (match := IMAGE_MEMBER_RE.match(suffix)) is not None and (wanted is None or "images" in wanted):
            views.append((int(match.group(1) or 0), bytes(data)))
    if views:
        out["images"] = [data for _, data in sorted(views, key=lambda v: v[0])]
    if (wanted is None or "xyz" in wanted) and "xyz" not in out:
        raise ShardFormatError(f"{where}: sample {key} has no xyz.npy member")
    _check_points(key, out, where)
    return out


#: per-point fields besides xyz: (field, member suffix, allowed trailing shapes; None: (N, C) for any C).
_OTHER_POINT_FIELDS: tuple[tuple[str, str, tuple[tuple[int, ...], ...] | None], ...] = (
    ("normal", "normal.npy", ((3,),)),
    ("curv", "curv.npy", ((), (1,))),
    ("feat", "feat.npy", None),
)


def _check_points(key: str, sample: Mapping[str, Any], where: str) -> None:
    """Refuses decoded point fields that are not finite floating-point arrays of the shapes pcpt writes.

    A damaged byte in a payload can turn a coordinate into NaN or infinity; that is reported here, naming the
    shard and member, instead of as a NaN loss later. Cheap enough for the training hot path (one
    ``isfinite`` pass per array).
    """
    xyz = sample.get("xyz")
    rows = None
    if xyz is not None:
        shape = xyz.shape
        if len(shape) != 2 or shape[1] != 3 or shape[0] < 1 or xyz.dtype.kind != "f":
            raise ShardFormatError(
                f"{where}: member {key}.xyz.npy holds {xyz.dtype} {shape}, expected float (N, 3)"
            )
        if np.count_nonzero(np.isfinite(xyz)) != xyz.size:  # cheaper than np.isfinite(xyz).all()
            raise _not_finite(where, key, "xyz.npy")
        rows = shape[0]
    for name, suffix, tails in _OTHER_POINT_FIELDS:
        arr = sample.get(name)
        if arr is None:
            continue
        shape = arr.shape
        if (
            arr.dtype.kind != "f"
            or not shape
            or (rows is not None and shape[0] != rows)
            or (tails is not None and shape[1:] not in tails)
            or (tails is None and len(shape) != 2)
        ):
            raise ShardFormatError(
                f"{where}: member {key}.{suffix} holds {arr.dtype} {shape}, which does not fit xyz "
                f"{None if xyz is None else xyz.shape}"
            )
        if np.count_nonzero(np.isfinite(arr)) != arr.size:
            raise _not_finite(where, key, suffix)


def _not_finite(where: str, key: str, suffix: str) -> ShardFormatError:
    return ShardFormatError(f"{where}: member {key}.{suffix} holds NaN or infinite values (a damaged shard)")
