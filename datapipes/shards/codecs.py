"""Member codecs of the shard format: ``.npy`` arrays with NumPy, PNG/JPEG images with Pillow, JSON.

Safety: arrays are written with ``np.save(..., allow_pickle=False)`` and read with NumPy's own reader
(``np.lib.format.read_array(..., allow_pickle=False)``), so an object array is refused instead of unpickled.
Images are decoded by Pillow, restricted to PNG and JPEG.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from datapipes.shards.format import ShardFormatError

__all__ = [
    "PNG_SIGNATURE",
    "decode_image",
    "decode_npy",
    "decode_png",
    "dumps",
    "encode_npy",
    "encode_png",
    "image_pixels",
    "image_suffix",
    "read_npy_header",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"

# ------------------------------------------------------------------------------------------------ arrays


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of a float32 little-endian C-ordered copy of ``array`` (never pickled)."""
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array, dtype="<f4"), allow_pickle=False)
    return out.getvalue()


def read_npy_header(stream: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` from the ``.npy`` header at the start of ``stream`` (NumPy's parser).

    Leaves ``stream`` at the first byte of the array data.

    Raises:
        ValueError: not an ``.npy`` header (NumPy's message).
    """
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


#: Header size of the ``.npy`` members pcpt writes: ``np.save`` pads a header to a multiple of 64 bytes.
_HEADER_BYTES = 128
#: Array layouts NumPy read from 128-byte headers, by header bytes: ``(dtype, shape, fortran order)``.
_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}
_MAX_LAYOUTS = 512


def decode_npy(data: bytes, *, where: str = "npy member") -> np.ndarray:
    """Decodes ``.npy`` bytes into a writable array with NumPy's reader, never unpickling.

    NumPy parses a header with ``ast.literal_eval`` (about 50 µs, ten times the copy of a 2048-point cloud),
    and the clouds of a dataset share a few headers; so the layout NumPy read from a 128-byte header (the
    size ``np.save`` gives the arrays pcpt stores) is remembered by the header's bytes, and a later member
    with the same header is copied straight into that layout after the same payload-size check.

    Args:
        data: the member bytes.
        where: what to name in error messages (shard and member).

    Raises:
        ShardFormatError: for a malformed, truncated or over-long payload, or an object (pickle-backed) array.
    """
    key = bytes(data[:_HEADER_BYTES])
    layout = _LAYOUTS.get(key)
    try:
        if layout is None:
            stream = io.BytesIO(data)
            array = np.lib.format.read_array(stream, allow_pickle=False)
            if stream.tell() != len(data):
                raise ValueError(f"{len(data) - stream.tell()} bytes follow the array data")
            if len(data) - array.nbytes == _HEADER_BYTES:
                if len(_LAYOUTS) >= _MAX_LAYOUTS:
                    _LAYOUTS.clear()
                _LAYOUTS[key] = (array.dtype, array.shape, not array.flags.c_contiguous)
            return array
        dtype, shape, fortran = layout
        count = math.prod(shape)
        if len(data) - _HEADER_BYTES != count * dtype.itemsize:
            raise ValueError(
                f"payload has {len(data) - _HEADER_BYTES} bytes, header promises {count * dtype.itemsize}"
            )
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=_HEADER_BYTES)
        return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ShardFormatError(
                f"{where}: undecodable .npy: an object array needs pickle, which pcpt refuses"
            ) from err
        raise ShardFormatError(f"{where}: undecodable .npy ({err})") from err
    except Exception as err:
        raise ShardFormatError(f"{where}: undecodable .npy ({err})") from err


# ------------------------------------------------------------------------------------------------ images


def encode_png(image: np.ndarray) -> bytes:
    """Encodes a uint8 image as PNG with Pillow; identical images give identical bytes.

    Fixed options (zlib level 9, Pillow's default filters) and no ancillary chunks: no timestamp, text or
    colour profile.

    Args:
        image: ``(H, W)`` grey, or ``(H, W, C)`` with C = 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA).

    Raises:
        ValueError: for another dtype or shape.
    """
    from PIL import Image

    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (2, 3, 4))) or 0 in img.shape[:2]:
        raise ValueError(f"image must be (H, W) or (H, W, 1|2|3|4), got shape {np.shape(image)}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(out, format="PNG", compress_level=9)
    return out.getvalue()


def image_pixels(data: bytes) -> np.ndarray:
    """Decodes PNG or JPEG bytes with Pillow into ``(H, W, C)`` uint8.

    C is 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) as stored; 16-bit samples keep their high byte,
    palette images become RGB (RGBA with transparency), other modes (CMYK, 1-bit, ...) RGB or grey.

    Raises:
        ValueError: for bytes that are neither PNG nor JPEG, or that Pillow cannot decode (truncated,
            damaged).
    """
    from PIL import Image

    if data[:8] != PNG_SIGNATURE and data[:3] != _JPEG_SIGNATURE:
        raise ValueError("image bytes are neither PNG nor JPEG")
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as opened:
            opened.load()
            img: Image.Image = opened
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
            else:
                if mode not in ("L", "LA", "RGB", "RGBA"):
                    target = "L" if mode in ("1", "F") else "RGB"
                    target = "RGBA" if mode in ("PA", "RGBa") or "transparency" in img.info else target
                    img = img.convert(target)
                pixels = np.asarray(img)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"undecodable image ({err})") from err
    return np.ascontiguousarray(pixels[:, :, None] if pixels.ndim == 2 else pixels)


def decode_png(data: bytes) -> np.ndarray:
    """Decodes PNG bytes into ``(H, W, C)`` uint8 (see :func:`image_pixels`).

    Raises:
        ValueError: for bytes that are not a PNG Pillow can decode.
    """
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG (bad signature)")
    return image_pixels(data)


def decode_image(data: bytes, *, where: str) -> np.ndarray:
    """PNG or JPEG bytes -> ``(C, H, W)`` float32 in ``[0, 1]`` (the layout batches hold).

    Raises:
        ShardFormatError: naming ``where`` for bytes that are not a decodable PNG or JPEG.
    """
    try:
        pixels = image_pixels(data)
    except ValueError as err:
        raise ShardFormatError(f"{where}: {err}") from err
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / 255.0


def image_suffix(data: bytes, *, where: str) -> str:
    """``"png"`` or ``"jpg"`` from the signature of image bytes.

    Raises:
        ValueError: naming ``where`` for anything else.
    """
    if data[:8] == PNG_SIGNATURE:
        return "png"
    if data[:3] == _JPEG_SIGNATURE:
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


def dumps(value: Any) -> str:
    """The canonical JSON of pcpt's records: sorted keys, UTF-8 text; numpy values and paths allowed."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=_json_default)
