"""The pcpt shard format (``pcpt-shards/1``): member codecs, resumable writer, reader and verification.

A shard folder ``OUT/`` holds webdataset tar shards ``<split>-NNNNNN.tar``, ``manifest.json`` (written last: a
folder without it is not a finished dataset), ``rejected.jsonl`` and the writer's progress records in
``OUT/.pcpt-progress/``. One sample is a run of tar members sharing a key: ``<key>.xyz.npy``, optional
``<key>.normal.npy``, ``<key>.curv.npy``, ``<key>.feat.npy``, ``<key>.cls.txt``, ``<key>.img.png`` (or
``<key>.img.0.png``, ``<key>.img.1.jpg``, ... for several views) and ``<key>.meta.json``.

Safety: arrays are written with ``np.save(..., allow_pickle=False)`` and read without ever unpickling; a
member with a pickle extension (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``, ``.pt``) makes every reader stop
with an error naming the shard and the member. Tars are written deterministically (fixed mtime, owner and
mode), so the same samples give byte-identical shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from datapipes._version import __version__
from datapipes.errors import UserError
from datapipes.progress import Progress
from datapipes.types import Rejection, Sample

__all__ = [
    "FORMAT",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "PICKLE_SUFFIXES",
    "PROGRESS_DIR",
    "REJECTED_NAME",
    "ShardFormatError",
    "ShardSetWriter",
    "check_shard_hashes",
    "decode_members",
    "decode_npy",
    "decode_png",
    "encode_npy",
    "encode_png",
    "encode_sample",
    "field_of_member",
    "iter_shard_members",
    "iter_shard_samples",
    "iter_split_samples",
    "iter_tar_members",
    "manifest_members",
    "manifest_shard_samples",
    "read_manifest",
    "sha256_file",
    "shard_name",
    "shard_paths",
    "validate_key",
    "verify_shards",
]

FORMAT = "pcpt-shards/1"
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"
PROGRESS_DIR = ".pcpt-progress"
#: Last extension components that mark a pickle payload; never decoded.
PICKLE_SUFFIXES = frozenset({"pyd", "pickle", "pkl", "pth", "pt"})

_ARRAY_MEMBERS = {"xyz": "xyz.npy", "normal": "normal.npy", "curv": "curv.npy", "feat": "feat.npy"}
_MEMBER_TO_FIELD = {member: name for name, member in _ARRAY_MEMBERS.items()}
_IMAGE_RE = re.compile(r"^img(?:\.(\d+))?\.(png|jpg|jpeg)$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_SHARD_RE = re.compile(r"^([A-Za-z0-9_]+)-(\d{6})\.tar$")
_KEY_BAD_CHARS = re.compile(r"[.\\\s\x00-\x1f]")
_TMP_MARK = ".tmp-"
_MTIME = 0  # fixed tar member mtime: identical inputs give identical bytes
_MANIFEST_KEYS = (
    "format",
    "splits",
    "classes",
    "fields",
    "source",
    "fps_ordered",
    "sha256",
    "shard_samples",
    "counts",
    "points",
    "rejected",
    "created_by",
)


class ShardFormatError(UserError):
    """A shard that is damaged, unsafe (a pickle member) or does not follow ``pcpt-shards/1``."""


# ------------------------------------------------------------------------------------------------ naming


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


def shard_paths(root: str | Path, split: str, manifest: Mapping[str, Any] | None = None) -> list[Path]:
    """Paths of the shards of ``split`` listed in the manifest of ``root``.

    Raises:
        UserError: if the manifest is missing/invalid or has no such split.
    """
    root = Path(root)
    manifest = read_manifest(root) if manifest is None else manifest
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"{root}: no split {split!r} in {MANIFEST_NAME} (has {sorted(splits)})")
    return [root / name for name in splits[split]["shards"]]


# ------------------------------------------------------------------------------------------------ codecs


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of a float32 little-endian C-ordered copy of ``array`` (never pickled)."""
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array, dtype="<f4"), allow_pickle=False)
    return out.getvalue()


@lru_cache(maxsize=512)
def _npy_header(prefix: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """Parses an ``.npy`` header (magic through header dict) with numpy's own safe parser; cached."""
    stream = io.BytesIO(prefix)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    return dtype, tuple(shape), bool(fortran), stream.tell()


def decode_npy(data: bytes, *, where: str = "npy member") -> np.ndarray:
    """Decodes ``.npy`` bytes into a writable array without unpickling.

    Headers are parsed once and cached (clouds of one dataset share a header), so decoding costs one copy.

    Args:
        data: the member bytes.
        where: what to name in error messages (shard and member).

    Raises:
        ShardFormatError: for a malformed, truncated or object (pickle-backed) array.
    """
    try:
        if data[:6] != b"\x93NUMPY" or len(data) < 10:
            raise ValueError("not an .npy payload")
        major = data[6]
        if major == 1:
            end = 10 + struct.unpack("<H", data[8:10])[0]
        elif major == 2:
            end = 12 + struct.unpack("<I", data[8:12])[0]
        else:
            raise ValueError(f"unsupported .npy version {major}")
        dtype, shape, fortran, offset = _npy_header(bytes(data[:end]))
        if dtype.hasobject:
            raise ValueError("object arrays need pickle, which pcpt refuses")
        count = math.prod(shape)
        if len(data) - offset != count * dtype.itemsize:
            raise ValueError(
                f"payload has {len(data) - offset} bytes, header promises {count * dtype.itemsize}"
            )
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        return flat.reshape(shape, order="F" if fortran else "C").copy()
    except ShardFormatError:
        raise
    except Exception as err:
        raise ShardFormatError(f"{where}: undecodable .npy ({err})") from err


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png(image: np.ndarray) -> bytes:
    """Encodes a uint8 image as PNG with no dependency (zlib + struct).

    Args:
        image: ``(H, W)`` grey, or ``(H, W, C)`` with C = 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA).

    Returns:
        PNG bytes (deterministic for a given image).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image must be (H, W) or (H, W, 1|2|3|4), got shape {image.shape}")
    height, width, channels = img.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), img.reshape(height, width * channels)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + _png_chunk(b"IEND", b"")
    )


def _unfilter_rows(raw: np.ndarray, height: int, stride: int, bpp: int) -> np.ndarray:
    """Reverses PNG scanline filters (types 0-4) on ``raw`` of shape ``(H, 1 + stride)``."""
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        kind, line = int(raw[y, 0]), raw[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:  # Sub: running sum per channel, modulo 256
            padded = np.zeros(-(-stride // bpp) * bpp, np.uint8)
            padded[:stride] = line
            cur = np.cumsum(padded.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)[:stride]
        elif kind == 2:  # Up
            cur = line + prev
        elif kind in (3, 4):  # Average / Paeth depend on the reconstructed left neighbour: sequential
            cur = np.zeros(stride, np.uint8)
            left_vals = [0] * stride
            for x in range(stride):
                a = left_vals[x - bpp] if x >= bpp else 0
                b = int(prev[x])
                if kind == 3:
                    pred = (a + b) // 2
                else:
                    c = int(prev[x - bpp]) if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                left_vals[x] = (int(line[x]) + pred) & 0xFF
            cur = np.asarray(left_vals, np.uint8)
        else:
            raise ValueError(f"unknown PNG filter type {kind}")
        out[y] = cur
        prev = cur
    return out


def decode_png(data: bytes) -> np.ndarray:
    """Decodes a non-interlaced PNG (8/16-bit grey, RGB, palette, grey+alpha, RGBA) into ``(H, W, C)`` uint8.

    16-bit samples keep their high byte; palette images become RGB.

    Raises:
        ValueError: for anything that is not a PNG this decoder supports.
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG (bad signature)")
    pos, idat, palette = 8, bytearray(), None
    width = height = depth = colour = interlace = -1
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        payload = data[pos + 8 : pos + 8 + length]
        if len(payload) != length:
            raise ValueError("truncated PNG chunk")
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", payload)
        elif kind == b"PLTE":
            palette = np.frombuffer(payload, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat += payload
        elif kind == b"IEND":
            break
        pos += 12 + length
    if width <= 0 or height <= 0:
        raise ValueError("PNG without a valid IHDR")
    if interlace != 0 or depth not in (8, 16):
        raise ValueError(f"unsupported PNG (bit depth {depth}, interlace {interlace})")
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if channels is None:
        raise ValueError(f"unsupported PNG colour type {colour}")
    bpp = channels * depth // 8
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(bytes(idat)), np.uint8)
    if raw.size != height * (stride + 1):
        raise ValueError("PNG image data has the wrong size")
    pixels = _unfilter_rows(raw.reshape(height, stride + 1), height, stride, bpp)
    if depth == 16:
        pixels = pixels.reshape(height, width * channels, 2)[:, :, 0]
    image = pixels.reshape(height, width, channels)
    if colour == 3:
        if palette is None:
            raise ValueError("palette PNG without PLTE")
        image = palette[image[:, :, 0]]
    return np.ascontiguousarray(image)


def _image_suffix(data: bytes, *, where: str) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    raise ValueError(f"{where}: image bytes are neither PNG nor JPEG")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=_json_default)


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
    unknown = set(sample) - {"key", "xyz", "normal", "curv", "feat", "label", "images", "meta"}
    if unknown:
        raise ValueError(f"sample {key!r}: unknown fields {sorted(unknown)}")
    if "xyz" not in sample:
        raise ValueError(f"sample {key!r}: xyz is required")
    xyz = _float_points("xyz", sample["xyz"], key=key, rows=None)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.shape[0] < 1:
        raise ValueError(f"sample {key!r}: xyz must have shape (N, 3) with N >= 1, got {xyz.shape}")
    members = [("xyz.npy", encode_npy(xyz))]
    n = xyz.shape[0]
    if "normal" in sample:
        normal = _float_points("normal", sample["normal"], key=key, rows=n)
        if normal.shape != (n, 3):
            raise ValueError(f"sample {key!r}: normal must have shape ({n}, 3), got {normal.shape}")
        members.append(("normal.npy", encode_npy(normal)))
    if "curv" in sample:
        curv = _float_points("curv", sample["curv"], key=key, rows=n)
        if curv.shape not in ((n,), (n, 1)):
            raise ValueError(f"sample {key!r}: curv must have shape ({n},) or ({n}, 1), got {curv.shape}")
        members.append(("curv.npy", encode_npy(curv)))
    if "feat" in sample:
        feat = _float_points("feat", sample["feat"], key=key, rows=n)
        if feat.ndim != 2:
            raise ValueError(f"sample {key!r}: feat must have shape ({n}, C), got {feat.shape}")
        members.append(("feat.npy", encode_npy(feat)))
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
            suffix = _image_suffix(bytes(image), where=f"sample {key!r} image {i}")
            name = f"img.{suffix}" if len(images) == 1 else f"img.{i}.{suffix}"
            members.append((name, bytes(image)))
    if "meta" in sample:
        meta = sample["meta"]
        if not isinstance(meta, Mapping):
            raise ValueError(f"sample {key!r}: meta must be a dict, got {type(meta).__name__}")
        try:
            members.append(("meta.json", _dumps(dict(meta)).encode()))
        except (TypeError, ValueError) as err:
            raise ValueError(f"sample {key!r}: meta is not JSON serialisable ({err})") from err
    return key, members


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
    return "images" if _IMAGE_RE.match(suffix) else None


def _is_pickle_suffix(suffix: str) -> bool:
    return suffix.rsplit(".", 1)[-1].lower() in PICKLE_SUFFIXES


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
        if _is_pickle_suffix(suffix):
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
        elif (match := _IMAGE_RE.match(suffix)) is not None and (wanted is None or "images" in wanted):
            views.append((int(match.group(1) or 0), bytes(data)))
    if views:
        out["images"] = [data for _, data in sorted(views, key=lambda v: v[0])]
    if (wanted is None or "xyz" in wanted) and "xyz" not in out:
        raise ShardFormatError(f"{where}: sample {key} has no xyz.npy member")
    _check_points(key, out, where)
    return out


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


#: per-point fields besides xyz: (field, member suffix, allowed trailing shapes; None: (N, C) for any C).
_OTHER_POINT_FIELDS: tuple[tuple[str, str, tuple[tuple[int, ...], ...] | None], ...] = (
    ("normal", "normal.npy", ((3,),)),
    ("curv", "curv.npy", ((), (1,))),
    ("feat", "feat.npy", None),
)


def _not_finite(where: str, key: str, suffix: str) -> ShardFormatError:
    return ShardFormatError(f"{where}: member {key}.{suffix} holds NaN or infinite values (a damaged shard)")


# ------------------------------------------------------------------------------------------------ tar io


class _HashingWriter:
    """A write-only file wrapper that feeds everything written into sha256."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_tar_atomic(path: Path, samples: Sequence[tuple[str, list[tuple[str, bytes]]]]) -> tuple[str, int]:
    """Writes a tar through a temporary name, fsyncs, renames; returns ``(sha256, size)``."""
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            sink = _HashingWriter(raw)
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.GNU_FORMAT) as tar:  # type: ignore[call-overload]
                for key, members in samples:
                    for suffix, data in members:
                        _add_member(tar, f"{key}.{suffix}", data)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sink.digest.hexdigest(), sink.size


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_ZERO_BLOCK = bytes(512)


def _tar_number(field: bytes) -> int:
    """A numeric tar header field: octal text, or GNU base-256 when the high bit is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _byte_sum(data: bytes) -> int:
    """Sum of up to 256 bytes, at C speed: adler32's low half is 1 + the byte sum (mod 65521 > 256 * 255)."""
    return (zlib.adler32(data) & 0xFFFF) - 1


def _header_sum(header: bytes) -> int:
    """Tar header checksum: byte sum with the 8-byte checksum field counted as spaces."""
    return _byte_sum(header[:148]) + 256 + _byte_sum(header[156:356]) + _byte_sum(header[356:])


def _pax_records(data: bytes) -> dict[str, str]:
    """Records of a pax extended header: ``<length> <key>=<value>`` lines."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "replace")
        pos += length
    return records


def iter_tar_members(
    path: str | Path, *, select: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """Yields ``(name, data)`` for every regular member of a tar file, in order.

    A small streaming reader (header checksums verified; ustar, GNU long names and pax paths/sizes
    understood; directories and links skipped), several times faster than :mod:`tarfile` on shards of many
    small members. It is strict: a file must end with the end-of-archive zero block that every tar writer
    (pcpt's included) appends, so a file cut at a member boundary is reported as truncated, not read as a
    shorter archive.

    Args:
        path: the tar file.
        select: members whose name it rejects are skipped on disk and yielded with ``data=None``.

    Raises:
        ShardFormatError: naming the file for a damaged or truncated archive.
    """
    where = Path(path).name
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            file_size = os.fstat(f.fileno()).st_size
            long_name: bytes | None = None
            pax: dict[str, str] = {}
            while True:
                header = f.read(512)
                if header == _ZERO_BLOCK:
                    return
                if not header:
                    raise ShardFormatError(
                        f"{where}: truncated: the file ends at byte {file_size} without the tar "
                        "end-of-archive blocks"
                    )
                if len(header) < 512:
                    raise ShardFormatError(f"{where}: truncated tar header at byte {f.tell() - len(header)}")
                if _tar_number(header[148:156]) != _header_sum(header):
                    raise ShardFormatError(
                        f"{where}: damaged tar header at byte {f.tell() - 512} (bad checksum)"
                    )
                kind = header[156:157]
                size = int(pax["size"]) if "size" in pax else _tar_number(header[124:136])
                if not 0 <= size <= file_size:  # a damaged size field: never allocate for it
                    raise ShardFormatError(
                        f"{where}: truncated tar member at byte {f.tell() - 512} ({size} bytes announced, "
                        f"the file has {file_size})"
                    )
                pad = -size % 512
                if kind in (b"L", b"x", b"g"):
                    data = f.read(size)
                    if len(data) != size:
                        raise ShardFormatError(f"{where}: truncated tar member")
                    f.seek(pad, 1)
                    if kind == b"L":
                        long_name = data.split(b"\0", 1)[0]
                    elif kind == b"x":
                        pax = _pax_records(data)
                    continue
                raw = header[:100].split(b"\0", 1)[0]
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
                if prefix:
                    raw = prefix + b"/" + raw
                name = pax["path"] if "path" in pax else (long_name or raw).decode("utf-8")
                long_name, pax = None, {}
                if kind not in (b"0", b"\0", b"7"):  # directories, links, devices: no sample data
                    f.seek(size + pad, 1)
                    continue
                if select is not None and not select(name):
                    f.seek(size + pad, 1)
                    yield name, None
                    continue
                data = f.read(size)
                if len(data) != size:
                    raise ShardFormatError(f"{where}: truncated tar member {name}")
                f.seek(pad, 1)
                yield name, data
    except ShardFormatError:
        raise
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardFormatError(f"{where}: damaged tar header ({err})") from err
    except OSError as err:
        raise ShardFormatError(f"{where}: cannot read ({err.strerror or err})") from err


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
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yields ``(key, {suffix: bytes})`` per sample of one tar shard, without decoding anything.

    Args:
        path: the shard.
        select: keep only members whose suffix (``"xyz.npy"``, ...) it accepts; the others are skipped on
            disk (but still checked for pickles).
        expected: the number of samples the manifest lists for this shard (see
            :func:`manifest_shard_samples`); a shard holding more or fewer is an error. ``None`` skips the
            count check.
        required: member suffixes every sample must hold (see :func:`manifest_members`); only those that
            ``select`` accepts are checked.

    Raises:
        ShardFormatError: if the file is not a complete, readable tar, a member has no key/suffix, a member is
            a pickle, a member name repeats, a key's members are not contiguous, a sample lacks a ``required``
            member or the sample count differs from ``expected`` (raised when the extra sample starts, or at
            the end of a short shard).
    """
    where = Path(path).name
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

    for name, data in iter_tar_members(path, select=keep):
        member_key, suffix = parsed.pop(name)
        if _is_pickle_suffix(suffix):
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


def _missing_members(where: str, key: str, missing: Iterable[str]) -> ShardFormatError:
    names = ", ".join(f"{key}.{suffix}" for suffix in sorted(missing))
    return ShardFormatError(f"{where}: sample {key} lacks member(s) {names} that its manifest lists")


def iter_shard_samples(
    path: str | Path,
    *,
    fields: Iterable[str] | None = None,
    expected: int | None = None,
    required: Iterable[str] = (),
) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard: ``{"key", "xyz", ..., "label", "images", "meta"}`` (see decode_members).

    Args:
        path: the shard.
        fields: decode only these fields (``None``: all).
        expected: the sample count the manifest lists for the shard (see :func:`manifest_shard_samples`);
            ``None`` skips the count check. :func:`iter_split_samples` passes it for every shard.
        required: member suffixes every sample must hold (see :func:`manifest_members`); only those of the
            decoded ``fields`` are checked.

    Raises:
        ShardFormatError: naming the shard (and member) for a pickle member, damaged or non-finite data, a
            missing member, a truncated file or a sample count other than ``expected``.
    """
    wanted = None if fields is None else frozenset(fields)
    name = Path(path).name
    select = None if wanted is None else (lambda suffix: field_of_member(suffix) in wanted)
    for key, members in iter_shard_members(path, select=select, expected=expected, required=required):
        yield decode_members(key, members, where=name, fields=wanted)


def manifest_members(manifest: Mapping[str, Any]) -> frozenset[str]:
    """Member suffixes every sample must hold according to the manifest's ``fields`` (images aside)."""
    fields = manifest.get("fields")
    return frozenset(_expected_members(fields if isinstance(fields, Mapping) else {}))


def manifest_shard_samples(manifest: Mapping[str, Any], split: str | None = None) -> dict[str, int]:
    """The sample count the manifest lists for each shard (of ``split``, or of every split).

    Read from ``shard_samples``; a manifest written before it existed gives the split total for a split of
    one shard, and nothing for the shards of larger splits (:func:`iter_split_samples` then checks the
    split total).
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
    counts the split's total is checked after its last shard. File hashes are
    not checked here (see :func:`check_shard_hashes`).

    Args:
        root: the shard folder.
        split: the split to read.
        fields: decode only these fields (``None``: all).
        manifest: the folder's manifest, if already read.

    Raises:
        UserError: for a missing or invalid manifest or split.
        ShardFormatError: naming the shard for a damaged, truncated or unsafe shard or a wrong sample count.
    """
    manifest = read_manifest(root) if manifest is None else manifest
    paths = shard_paths(root, split, manifest)
    counts = manifest_shard_samples(manifest, split)
    required = manifest_members(manifest)
    classes = len(manifest.get("classes") or [])
    total = 0
    for path in paths:
        expected = counts.get(path.name)
        for sample in iter_shard_samples(path, fields=fields, expected=expected, required=required):
            if classes and sample.get("label", 0) >= classes:
                raise ShardFormatError(
                    f"{path.name}: sample {sample['key']} has label {sample['label']}, but the manifest "
                    f"lists {classes} classes"
                )
            total += 1
            yield sample
    want = int(manifest["splits"][split]["samples"])
    if total != want:
        names = ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise ShardFormatError(
            f"{Path(root)}: split {split!r} holds {total} samples in its shards ({names}), its manifest "
            f"lists {want}; run pcpt-data inspect to find the damaged shard"
        )


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
        root: the shard folder.
        splits: the splits to check (``None``: every split of the manifest).
        manifest: the folder's manifest, if already read.
        progress: report progress on stderr (a bar on a terminal, periodic lines otherwise).

    Raises:
        UserError: for a missing or invalid manifest or split.
        ShardFormatError: naming the first shard that is missing, unreadable or whose sha256 differs.
    """
    root = Path(root)
    manifest = read_manifest(root) if manifest is None else manifest
    names = list(manifest["splits"]) if splits is None else list(dict.fromkeys(splits))
    paths = [path for split in names for path in shard_paths(root, split, manifest)]
    shas = manifest.get("sha256") or {}
    with Progress(len(paths), f"sha256 {root.name}", "shard", disable=not progress) as bar:
        for path in paths:
            expected = shas.get(path.name)
            if not isinstance(expected, str):
                raise ShardFormatError(f"{path.name}: no sha256 in {root / MANIFEST_NAME}")
            try:
                digest = sha256_file(path)
            except OSError as err:
                raise ShardFormatError(
                    f"{path}: missing or unreadable shard ({err.strerror or err})"
                ) from err
            if digest != expected:
                raise ShardFormatError(
                    f"{path.name}: sha256 differs from {root / MANIFEST_NAME} (the file changed or is "
                    "damaged); run pcpt-data inspect for details"
                )
            bar.update()


# ------------------------------------------------------------------------------------------------ manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Reads and checks ``root/manifest.json``.

    Raises:
        UserError: naming the file if the folder or manifest is missing, not JSON, or not ``pcpt-shards/1``.
    """
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


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _expected_members(fields: Mapping[str, Any]) -> set[str]:
    """Member suffixes (images aside) every sample must have, given the manifest's fields."""
    expected = {_ARRAY_MEMBERS[name] for name in fields if name in _ARRAY_MEMBERS}
    if "label" in fields:
        expected.add("cls.txt")
    if "meta" in fields:
        expected.add("meta.json")
    return expected


def _member_problem(key: str, suffixes: Iterable[str], fields: Mapping[str, Any]) -> str | None:
    expected = _expected_members(fields)
    got = set(suffixes)
    images = {s for s in got if _IMAGE_RE.match(s)}
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
        root: the shard folder.
        on_shard: called with each shard name after it is checked (progress reporting).

    Returns:
        One line per problem (missing shard, sha256 mismatch, sample count mismatch, undecodable or pickle
        member, unexpected or missing member, duplicate key, unlisted shard file); ``[]`` when all is good.
    """
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except UserError as err:
        return [str(err)]
    problems: list[str] = []
    fields = manifest.get("fields", {})
    shas = manifest.get("sha256", {})
    counts = manifest.get("shard_samples", {})
    listed: set[str] = set()
    for split, info in manifest["splits"].items():
        keys: set[str] = set()
        total = 0
        for name in info["shards"]:
            listed.add(name)
            path = root / name
            if not path.is_file():
                problems.append(f"{name}: missing shard")
                continue
            if shas.get(name) != sha256_file(path):
                problems.append(f"{name}: sha256 mismatch (the file changed or is damaged)")
            n = 0
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
                        if image[:8] == b"\x89PNG\r\n\x1a\n":
                            try:
                                decode_png(image)
                            except (ValueError, zlib.error) as err:
                                problems.append(f"{name}: sample {key}: image {i} undecodable ({err})")
            except ShardFormatError as err:
                problems.append(f"undecodable: {err}")
            total += n
            if name in counts and counts[name] != n:
                problems.append(f"{name}: {n} samples, manifest says {counts[name]}")
            if on_shard is not None:
                on_shard(name)
        if total != info["samples"]:
            problems.append(f"split {split!r}: {total} samples in shards, manifest says {info['samples']}")
    for entry in sorted(root.iterdir()):
        match = _SHARD_RE.match(entry.name)
        if match and match.group(1) in manifest["splits"] and entry.name not in listed:
            problems.append(f"{entry.name}: shard file not listed in {MANIFEST_NAME}")
    return problems


def _shape_problem(decoded: Mapping[str, Any], fields: Mapping[str, Any]) -> str | None:
    n = decoded["xyz"].shape[0]
    for name in _ARRAY_MEMBERS:
        if name not in decoded or name not in fields:
            continue
        arr = decoded[name]
        want = [n if dim == "N" else dim for dim in fields[name].get("shape", [])]
        if list(arr.shape) != want or str(arr.dtype) != fields[name].get("dtype", "float32"):
            return f"{name} has {arr.dtype} {tuple(arr.shape)}, manifest says {fields[name]}"
    return None


# ------------------------------------------------------------------------------------------------ writer


def _field_spec(members: Sequence[tuple[str, bytes]], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{field: {dtype, shape}}`` of one encoded sample (``"N"`` marks the per-cloud point count)."""
    spec: dict[str, dict[str, Any]] = {}
    for name, arr in arrays.items():
        spec[name] = {"dtype": "float32", "shape": ["N", *arr.shape[1:]]}
    suffixes = [s for s, _ in members]
    if "cls.txt" in suffixes:
        spec["label"] = {"dtype": "int64", "shape": []}
    images = [s for s in suffixes if _IMAGE_RE.match(s)]
    if images:
        kinds = sorted({s.rsplit(".", 1)[-1] for s in images})
        spec["images"] = {"dtype": "/".join(kinds), "shape": [len(images)]}
    if "meta.json" in suffixes:
        spec["meta"] = {"dtype": "json", "shape": []}
    return spec


LOCK_NAME = "lock"
"""The writer's lock file in ``OUT/.pcpt-progress/`` (an advisory ``flock``; it holds the writer's pid)."""


def _lock_holder(fd: int) -> str:
    """The pid written in a lock file held by another writer (it writes it right after locking)."""
    import time

    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


_TMP_RE = re.compile(r"^\.(.+)\.tmp-\d+$")


def _valid_text(value: Any) -> Any:
    r"""``value`` with every string made valid Unicode: undecodable file-name bytes become ``\xNN``.

    Paths built from non-UTF-8 file names carry lone surrogates (``surrogateescape``), which cannot be
    written as UTF-8; they are spelled ``\xff`` instead so manifests, progress records and
    ``rejected.jsonl`` stay valid UTF-8 JSON.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:
                raw = value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                return value.encode("utf-8", "backslashreplace").decode("utf-8")
            return raw.decode("utf-8", "backslashreplace")
        return value
    if isinstance(value, dict):
        return {_valid_text(k): _valid_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_valid_text(v) for v in value]
    return value


def _pcpt_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path`` if it is one pcpt wrote (``pcpt-shards/1``, ``created_by: pcpt ...``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    created_by = data.get("created_by")
    return data if isinstance(created_by, str) and created_by.startswith("pcpt ") else None


def _listing(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ShardSetWriter:
    """Writes a shard folder shard by shard, so an interrupted conversion resumes where it stopped.

    The writer only ever replaces its own files (shards, ``manifest.json``, ``rejected.jsonl``,
    ``.pcpt-progress/``). It accepts a new or empty folder, or a folder holding a pcpt conversion with the
    same options (which it resumes); it refuses any other non-empty folder before writing anything. A
    folder is a pcpt one when it has ``.pcpt-progress/options.json`` or a manifest written by pcpt.

    While it exists (until :meth:`finalize` or :meth:`close`, also usable as a context manager) the writer
    holds an advisory lock on ``OUT/.pcpt-progress/lock``, so a second writer on the same folder is
    refused instead of doing the same work again. The operating system releases the lock when the process
    ends, however it ends; a lock file left behind is harmless.

    Args:
        out: the shard folder (created if missing).
        options: the conversion's source description (format, source path, points, normals, fps, seed, ...);
            stored as the manifest's ``source``. A folder holding a run with different options is refused.

    Raises:
        UserError: if ``out`` is a file, holds files not written by pcpt, holds a run with different options
            (naming the differing keys), or another writer is writing there (naming its pid).
        ValueError: if ``options`` is not JSON-serialisable.
    """

    def __init__(self, out: str | Path, *, options: Mapping[str, Any]) -> None:
        self.out = Path(out)
        try:
            self.options: dict[str, Any] = _valid_text(json.loads(_dumps(dict(options))))
        except (TypeError, ValueError) as err:
            raise ValueError(f"options must be JSON-serialisable: {err}") from err
        self._progress = self.out / PROGRESS_DIR
        self._manifest_dropped = False
        self._lock_fd: int | None = None
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder")
        self._check_folder()  # before writing anything: a refused folder is left untouched
        self._progress.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._check_folder()  # again under the lock: another writer may have started in between
            options_path = self._progress / "options.json"
            if not options_path.is_file():
                _write_text_atomic(options_path, _dumps(self.options) + "\n")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also at interpreter exit, when modules may be gone
            self.close()

    def close(self) -> None:
        """Releases the folder lock (idempotent; :meth:`finalize` calls it)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def _lock(self) -> None:
        """Takes the folder lock, or raises :class:`UserError` naming the pid of the writer holding it."""
        if self._lock_fd is not None or os.name != "posix":
            return
        import fcntl

        fd = os.open(self._progress / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise UserError(f"{self.out}: another conversion is writing here (pid {holder})") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _check_folder(self) -> None:
        """Refuses a folder that is not empty and not a pcpt one, or a pcpt run with other options."""
        if not self.out.is_dir():
            return
        previous = self._previous_options()
        manifest = self.out / MANIFEST_NAME
        if previous is None:
            foreign = sorted(p.name for p in self.out.iterdir() if p.name != PROGRESS_DIR)
            if foreign:
                raise UserError(
                    f"{self.out}: not empty and not a pcpt output folder: holds files not written by a pcpt "
                    f"conversion ({_listing(foreign)}); choose an empty or new output folder"
                )
            return
        if manifest.exists() and _pcpt_manifest(manifest) is None:
            raise UserError(
                f"{manifest}: not a manifest written by pcpt; move it out of {self.out} or choose another "
                "output folder"
            )
        if previous != self.options:
            differing = sorted(
                k for k in set(previous) | set(self.options) if previous.get(k) != self.options.get(k)
            )
            raise UserError(
                f"{self.out}: holds a conversion with different options ({', '.join(differing)}); "
                "choose another output folder, or delete this one to start over"
            )

    def _previous_options(self) -> dict[str, Any] | None:
        """The options of the pcpt run in the folder (progress record first, then manifest), or ``None``."""
        path = self._progress / "options.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as err:
                raise UserError(f"{path}: unreadable ({err}); delete {self.out} to start over") from err
            if isinstance(data, dict):
                return data
            raise UserError(f"{path}: not a JSON object; delete {self.out} to start over")
        manifest = _pcpt_manifest(self.out / MANIFEST_NAME)
        if manifest is not None and isinstance(manifest.get("source"), dict):
            return dict(manifest["source"])
        return None

    def _record_path(self, split: str, index: int) -> Path:
        return self._progress / (shard_name(split, index) + ".json")

    def _read_record(self, split: str, index: int) -> dict[str, Any] | None:
        path = self._record_path(split, index)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def is_complete(self, split: str, index: int) -> bool:
        """True if the shard exists, its progress record exists and the shard's sha256 matches the record."""
        record = self._read_record(split, index)
        path = self.out / shard_name(split, index)
        if record is None or record.get("split") != split or record.get("index") != index:
            return False
        if record.get("samples") == 0:
            return not path.exists()  # empty shards have a record and no tar
        return path.is_file() and record.get("sha256") == sha256_file(path)

    def write_shard(
        self, split: str, index: int, samples: Sequence[Sample], rejected: Sequence[Rejection]
    ) -> None:
        """Encodes ``samples`` into shard ``index`` of ``split`` atomically, then records the progress.

        An empty shard (every source item rejected) gets a progress record and no tar, so a re-run does not
        redo it; empty shards are left out of the manifest.

        Raises:
            UserError: another writer holds the folder (after :meth:`close`).
            ValueError: for a malformed sample or rejection, duplicate keys, or samples with different fields.
        """
        self._lock()
        name = shard_name(split, index)
        encoded: list[tuple[str, list[tuple[str, bytes]]]] = []
        fields: dict[str, Any] | None = None
        labels: Counter[int] = Counter()
        keys: set[str] = set()
        point_counts: list[int] = []
        for sample in samples:
            if "meta" in sample:
                sample = cast(Sample, {**sample, "meta": _valid_text(sample["meta"])})
            key, members = encode_sample(sample)
            if key in keys:
                raise ValueError(f"{name}: duplicate sample key {key!r}")
            keys.add(key)
            arrays = {f: np.asarray(sample[f]) for f in _ARRAY_MEMBERS if f in sample}  # type: ignore[literal-required]
            spec = _field_spec(members, arrays)
            if fields is None:
                fields = spec
            elif spec != fields:
                raise ValueError(f"{name}: sample {key!r} has fields {spec}, earlier samples have {fields}")
            if "label" in sample:
                labels[int(sample["label"])] += 1
            point_counts.append(int(arrays["xyz"].shape[0]))
            encoded.append((key, members))
        rejections = []
        for item in rejected:
            if not all(isinstance(item.get(k), str) for k in ("source", "reason", "split")):
                raise ValueError(f"{name}: a rejection needs string source, reason and split, got {item!r}")
            rejections.append({k: _valid_text(item[k]) for k in ("source", "reason", "split")})
        if not self._manifest_dropped:
            (self.out / MANIFEST_NAME).unlink(missing_ok=True)  # the folder is no longer a finished dataset
            self._manifest_dropped = True
        self._record_path(split, index).unlink(missing_ok=True)
        if encoded:
            sha, size = _write_tar_atomic(self.out / name, encoded)
        else:
            (self.out / name).unlink(missing_ok=True)
            sha, size = None, 0
        record = {
            "shard": name,
            "split": split,
            "index": int(index),
            "samples": len(encoded),
            "keys": len(keys),
            "sha256": sha,
            "bytes": size,
            "fields": fields or {},
            "points": {"min": min(point_counts), "max": max(point_counts)} if point_counts else None,
            "labels": {str(k): v for k, v in sorted(labels.items())},
            "unlabelled": len(encoded) - sum(labels.values()),
            "rejected": rejections,
        }
        _write_text_atomic(self._record_path(split, index), _dumps(record) + "\n")

    def finalize(
        self,
        *,
        num_shards: Mapping[str, int],
        classes: Sequence[str],
        fps_ordered: bool,
        extra: Mapping[str, Any] | None = None,
        require_samples: bool = False,
    ) -> dict[str, Any]:
        """Checks every expected shard, then writes ``rejected.jsonl`` and ``manifest.json`` (last).

        Releases the folder lock when done (see :meth:`close`).

        Args:
            num_shards: shards per split, e.g. ``{"train": 12, "test": 3}``.
            classes: class names; labels index into it (may be empty for unlabelled data).
            fps_ordered: whether every cloud is stored in farthest-point order.
            extra: more top-level manifest entries (must not reuse reserved keys).
            require_samples: a set without any sample is a failure: ``rejected.jsonl`` is written (the
                reasons), no manifest, and the progress records of the empty shards are dropped so that a
                re-run (e.g. after fixing the inputs) reads every item again.

        Returns:
            The manifest written.

        Raises:
            UserError: if shards are incomplete, fields differ between shards, a label has no class, or
                there is no sample under ``require_samples``.
            ValueError: if ``extra`` reuses a reserved manifest key.
        """
        self._lock()
        extra = dict(extra or {})
        clash = sorted(set(extra) & set(_MANIFEST_KEYS))
        if clash:
            raise ValueError(f"extra must not override manifest keys {clash}")
        missing = [
            shard_name(split, i)
            for split, n in num_shards.items()
            for i in range(n)
            if not self.is_complete(split, i)
        ]
        if missing:
            listed = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise UserError(
                f"{self.out}: {len(missing)} shard(s) not complete ({listed}); re-run the conversion"
            )
        classes = [_valid_text(str(c)) for c in classes]
        splits: dict[str, dict[str, Any]] = {}
        shas: dict[str, str] = {}
        shard_samples: dict[str, int] = {}
        counts: dict[str, dict[str, int]] = {}
        fields: dict[str, Any] | None = None
        fields_from = ""
        pmin, pmax = None, None
        rejections: list[dict[str, str]] = []
        for split, n in num_shards.items():
            names: list[str] = []
            total = 0
            per_class: Counter[str] = Counter(dict.fromkeys(classes, 0))
            for i in range(n):
                record = self._read_record(split, i) or {}
                rejections.extend(record.get("rejected", []))
                if not record.get("samples"):
                    continue
                name = record["shard"]
                if fields is None:
                    fields, fields_from = record["fields"], name
                elif record["fields"] != fields:
                    raise UserError(
                        f"{self.out}: {name} has fields {record['fields']}, {fields_from} has {fields}"
                    )
                for label, count in record.get("labels", {}).items():
                    if classes and int(label) >= len(classes):
                        raise UserError(
                            f"{self.out}: {name} has label {label} but only {len(classes)} classes"
                        )
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
        if require_samples and not any(info["samples"] for info in splits.values()):
            _write_text_atomic(self.out / REJECTED_NAME, "".join(_dumps(r) + "\n" for r in rejections))
            for split, n in num_shards.items():
                for i in range(n):
                    self._record_path(split, i).unlink(missing_ok=True)
            self.close()
            raise UserError(
                f"{self.out}: all {len(rejections)} input items were rejected, no samples to write "
                f"(reasons in {self.out / REJECTED_NAME})"
            )
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "splits": splits,
            "classes": classes,
            "fields": fields or {},
            "source": self.options,
            "fps_ordered": bool(fps_ordered),
            "sha256": shas,
            "shard_samples": shard_samples,
            "counts": counts,
            "points": {"min": pmin, "max": pmax},
            "rejected": len(rejections),
            "created_by": f"pcpt {__version__}",
            **json.loads(_dumps(extra)),
        }
        _write_text_atomic(self.out / REJECTED_NAME, "".join(_dumps(r) + "\n" for r in rejections))
        _write_text_atomic(self.out / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        self._remove_temporaries()
        self.close()
        return manifest

    def _remove_temporaries(self) -> None:
        """Deletes temporary files an interrupted writer left (only names pcpt's own writes use)."""
        for folder, own in ((self.out, True), (self._progress, False)):
            for entry in folder.iterdir() if folder.is_dir() else ():
                match = _TMP_RE.match(entry.name)
                if not match or not entry.is_file():
                    continue
                target = match.group(1)
                if not own or target in (MANIFEST_NAME, REJECTED_NAME) or _SHARD_RE.match(target):
                    entry.unlink(missing_ok=True)
