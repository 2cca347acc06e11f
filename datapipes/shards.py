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
from typing import Any, BinaryIO

import numpy as np

from datapipes._version import __version__
from datapipes.errors import UserError
from datapipes.types import Rejection, Sample

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "PICKLE_SUFFIXES",
    "PROGRESS_DIR",
    "REJECTED_NAME",
    "ShardFormatError",
    "ShardSetWriter",
    "decode_members",
    "decode_npy",
    "decode_png",
    "encode_npy",
    "encode_png",
    "encode_sample",
    "field_of_member",
    "iter_shard_members",
    "iter_shard_samples",
    "iter_tar_members",
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
        ShardFormatError: for a pickle member (always checked, whatever ``fields``) or an undecodable member.
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
                    out["label"] = int(bytes(data).decode().strip())
                except (UnicodeDecodeError, ValueError) as err:
                    raise ShardFormatError(f"{where}: member {key}.{suffix} is not an integer label") from err
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
    return out


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
    small members.

    Args:
        path: the tar file.
        select: members whose name it rejects are skipped on disk and yielded with ``data=None``.

    Raises:
        ShardFormatError: naming the file for a damaged or truncated archive.
    """
    where = Path(path).name
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            long_name: bytes | None = None
            pax: dict[str, str] = {}
            while True:
                header = f.read(512)
                if not header or header == _ZERO_BLOCK:
                    return
                if len(header) < 512:
                    raise ShardFormatError(f"{where}: truncated tar header")
                if _tar_number(header[148:156]) != _header_sum(header):
                    raise ShardFormatError(
                        f"{where}: damaged tar header at byte {f.tell() - 512} (bad checksum)"
                    )
                kind = header[156:157]
                size = int(pax["size"]) if "size" in pax else _tar_number(header[124:136])
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
    path: str | Path, *, select: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yields ``(key, {suffix: bytes})`` per sample of one tar shard, without decoding anything.

    Args:
        path: the shard.
        select: keep only members whose suffix (``"xyz.npy"``, ...) it accepts; the others are skipped on
            disk (but still checked for pickles).

    Raises:
        ShardFormatError: if the file is not a readable tar, a member has no key/suffix, a member is a
            pickle, a member name repeats or a key's members are not contiguous.
    """
    where = Path(path).name
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
                yield key, members
            if member_key in seen:
                raise ShardFormatError(f"{where}: key {member_key!r} appears in two separate runs")
            seen.add(member_key)
            key, members = member_key, {}
        if suffix in members:
            raise ShardFormatError(f"{where}: duplicate member {name}")
        if data is not None:
            members[suffix] = data
    if key is not None:
        yield key, members


def iter_shard_samples(path: str | Path, *, fields: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard: ``{"key", "xyz", ..., "label", "images", "meta"}`` (see decode_members).

    Raises:
        ShardFormatError: naming the shard and member for a pickle member or damaged data.
    """
    wanted = None if fields is None else frozenset(fields)
    name = Path(path).name
    select = None if wanted is None else (lambda suffix: field_of_member(suffix) in wanted)
    for key, members in iter_shard_members(path, select=select):
        yield decode_members(key, members, where=name, fields=wanted)


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
    return manifest


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


class ShardSetWriter:
    """Writes a shard folder shard by shard, so an interrupted conversion resumes where it stopped.

    Args:
        out: the shard folder (created if missing).
        options: the conversion's source description (format, source path, points, normals, fps, seed, ...);
            stored as the manifest's ``source``. A folder holding a run with different options is refused.

    Raises:
        UserError: if ``out`` is a file, holds a run with different options (naming the differing keys), or
            holds tar files not written by pcpt.
        ValueError: if ``options`` is not JSON-serialisable.
    """

    def __init__(self, out: str | Path, *, options: Mapping[str, Any]) -> None:
        self.out = Path(out)
        try:
            self.options: dict[str, Any] = json.loads(_dumps(dict(options)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"options must be JSON-serialisable: {err}") from err
        self._progress = self.out / PROGRESS_DIR
        self._manifest_dropped = False
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder")
        previous = self._previous_options()
        if previous is None and self.out.is_dir():
            strays = sorted(p.name for p in self.out.glob("*.tar"))
            if strays:
                raise UserError(
                    f"{self.out}: holds tar files not written by a pcpt conversion ({strays[0]}, ...); "
                    "choose an empty or new output folder"
                )
        if previous is not None and previous != self.options:
            differing = sorted(
                k for k in set(previous) | set(self.options) if previous.get(k) != self.options.get(k)
            )
            raise UserError(
                f"{self.out}: holds a conversion with different options ({', '.join(differing)}); "
                "choose another output folder, or delete this one to start over"
            )
        self._progress.mkdir(parents=True, exist_ok=True)
        options_path = self._progress / "options.json"
        if not options_path.is_file():
            _write_text_atomic(options_path, _dumps(self.options) + "\n")

    def _previous_options(self) -> dict[str, Any] | None:
        for path, pick in ((self._progress / "options.json", None), (self.out / MANIFEST_NAME, "source")):
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as err:
                raise UserError(f"{path}: unreadable ({err}); delete {self.out} to start over") from err
            value = data.get(pick) if pick and isinstance(data, dict) else data
            if isinstance(value, dict):
                return value
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
            ValueError: for a malformed sample or rejection, duplicate keys, or samples with different fields.
        """
        name = shard_name(split, index)
        encoded: list[tuple[str, list[tuple[str, bytes]]]] = []
        fields: dict[str, Any] | None = None
        labels: Counter[int] = Counter()
        keys: set[str] = set()
        point_counts: list[int] = []
        for sample in samples:
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
            rejections.append({"source": item["source"], "reason": item["reason"], "split": item["split"]})
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
    ) -> dict[str, Any]:
        """Checks every expected shard, then writes ``rejected.jsonl`` and ``manifest.json`` (last).

        Args:
            num_shards: shards per split, e.g. ``{"train": 12, "test": 3}``.
            classes: class names; labels index into it (may be empty for unlabelled data).
            fps_ordered: whether every cloud is stored in farthest-point order.
            extra: more top-level manifest entries (must not reuse reserved keys).

        Returns:
            The manifest written.

        Raises:
            UserError: if shards are incomplete, fields differ between shards or a label has no class.
            ValueError: if ``extra`` reuses a reserved manifest key.
        """
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
        classes = list(classes)
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
        for folder in (self.out, self._progress):
            for stray in folder.glob(f".*{_TMP_MARK}*"):
                stray.unlink(missing_ok=True)
        return manifest
