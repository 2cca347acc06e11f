"""LiDAR scans: ``las`` LAS / LAZ point files (ASPRS LAS 1.0-1.4, any point format), read with laspy + lazrs.

SRC is a folder searched recursively for ``*.las`` and ``*.laz`` files (suffix in any case, hidden files
skipped), in sorted path order. Files with a ``test`` or ``testing`` folder in their path go to ``test``, all
others to ``train`` (so ``SRC/{train,test}/*.laz`` and a flat folder of files both work). The key is the
path under SRC without the suffix (``velodyne`` folders dropped, as for ``kitti``); ``a.las`` and ``a.laz``
in one folder clash and the run refuses them.

Stored per sample:

- ``xyz`` float32 ``(N, 3)``: the scaled coordinates (``X * scale + offset``, in the units of the file,
  metres for LiDAR scans). float32 keeps about 7 significant digits, too few for georeferenced coordinates
  (e.g. UTM eastings of 500 km at 1 cm resolution), so on each axis where a float32 value could be off by
  half a LAS quantum (the file's scale) or more, an origin is subtracted: the header's offset for that axis,
  or if that is not close enough, the file's minimum coordinate floored to a whole unit. ``meta.origin``
  ``[ox, oy, oz]`` records what was subtracted (``[0, 0, 0]`` for sensor-frame scans such as KITTI), so
  absolute positions are ``xyz + origin``. A file spanning too much for float32 even then is rejected.
- ``feat`` float32 ``(N, C)``: channel ``intensity`` (the uint16 intensity / 65535, in [0, 1]), and channel
  ``time`` (GPS time minus the file's earliest GPS time, in seconds; ``meta.time_origin`` holds that
  earliest time) when the point format has GPS time (formats 1 and 3-10). The channels are decided once per
  dataset from the first readable file's header; a later file whose point format lacks ``gps_time`` is
  rejected (a file with more dimensions simply contributes the planned channels).

Scenes are not normalised to the unit sphere and not FPS-ordered by default, and all points are kept
(``--points N`` subsamples with a seeded random subset, or by FPS with ``--fps``); estimated normals point
towards the sensor at the origin. The manifest's ``converter`` entry records the units, the normalisation
and the frame. Unreadable, truncated (fewer points than the header declares) and empty files are rejected
with the reason, and the other files convert; header counts that the file cannot hold (VLRs, LAZ chunks,
points) are rejected before laspy or lazrs allocate or loop by them, and points are decoded in bounded
chunks, so a damaged file never ends the run.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from datapipes.converters.base import Converter, ConvertOptions, Plan, RawCloud, Reject, WorkItem
from datapipes.converters.sources import check_file, make_key, require_dir
from datapipes.errors import UserError

SUFFIXES = (".las", ".laz")
"""Accepted file suffixes (compared in lower case)."""

TEST_FOLDERS = frozenset({"test", "testing"})
"""Folder names that send the files under them to the ``test`` split."""

INTENSITY_SCALE = 65535.0
"""Divisor of the uint16 LAS intensity (gives values in [0, 1])."""

CHUNK_BYTES = 64 * 2**20
"""Point records decoded at a time, in bytes (bounds memory whatever count and record size a header says)."""

_HEADER_SIZE_AT, _VLR_COUNT_AT, _VLR_HEADER_BYTES = 94, 100, 54
"""Offsets of the header size (uint16, then the uint32 point data offset) and of the VLR count (uint32) in a
LAS header; bytes of a VLR header."""

_CHANNELS: dict[str, tuple[str, ...]] = {}
"""SRC -> the feature channels planned for it, set by :meth:`Las.plan` (worker processes recompute it)."""


def las_files(src: Path) -> list[Path]:
    """The LAS / LAZ files under ``src``, recursively, in sorted order (hidden files skipped).

    Args:
        src: the source folder.

    Returns:
        Absolute or SRC-relative paths as ``rglob`` gives them, sorted.
    """
    return sorted(
        p
        for p in src.rglob("*")
        if p.suffix.lower() in SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def read_header(path: Path) -> Any:
    """The ``laspy.LasHeader`` of a file (header and VLRs only, not the extended VLRs), checked first.

    Args:
        path: the LAS / LAZ file.

    Returns:
        The header.

    Raises:
        Reject: a missing or empty file, a damaged header, or one laspy cannot read.
    """
    import laspy

    _check_raw_header(path, check_file(path))
    try:
        with _quiet_laspy(), laspy.open(path, read_evlrs=False) as reader:
            return reader.header
    except Exception as err:
        raise Reject(f"not a readable LAS/LAZ file: {_error_text(err)}") from None


@contextmanager
def _quiet_laspy() -> Iterator[None]:
    """Silences laspy's error log lines while reading (the error it raises becomes the rejection reason)."""
    log = logging.getLogger("laspy")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_raw_header(path: Path, size: int) -> None:
    """Rejects header sizes and counts that the file cannot hold, before laspy reads by them.

    laspy reads as many VLRs as the header declares, past the end of the file (a damaged count of billions
    never ends), and reads up to the declared start of the point data in one allocation.

    Args:
        path: the file.
        size: its size in bytes.

    Raises:
        Reject: the header, the declared VLRs or the start of the point data lie beyond the file's end.
    """
    with path.open("rb") as fh:
        head = fh.read(_VLR_COUNT_AT + 4)
    if len(head) < _VLR_COUNT_AT + 4 or not head.startswith(b"LASF"):
        return  # not a LAS header: laspy gives the reason
    header_size, points_at = struct.unpack_from("<HI", head, _HEADER_SIZE_AT)
    (count,) = struct.unpack_from("<I", head, _VLR_COUNT_AT)
    if header_size > size or points_at > size:
        raise Reject(
            f"damaged or truncated LAS file: the header ({header_size} bytes) says the point data starts at "
            f"byte {points_at}, the file has {size} bytes"
        )
    room = (size - header_size) // _VLR_HEADER_BYTES
    if count > room:
        raise Reject(
            f"damaged LAS header: it declares {count} variable length records, the file has room for {room}"
        )


def has_gps_time(header: Any) -> bool:
    """Whether a LAS header's point format has the ``gps_time`` dimension."""
    return "gps_time" in set(header.point_format.dimension_names)


def channels_of(files: Sequence[Path]) -> tuple[str, ...]:
    """The ``feat`` channels of a dataset, from the first file whose header laspy can read.

    Args:
        files: the dataset's files in sorted order.

    Returns:
        ``("intensity", "time")`` when that header's point format has GPS time, else ``("intensity",)``
        (also when no header is readable: every file is then rejected anyway).
    """
    for path in files:
        try:
            header = read_header(path)
        except Reject:  # an unusable file is rejected with the reason by read()
            continue
        return ("intensity", "time") if has_gps_time(header) else ("intensity",)
    return ("intensity",)


def planned_channels(src: str) -> tuple[str, ...]:
    """The channels :meth:`Las.plan` chose for ``src`` (recomputed, once per process, in worker processes)."""
    if src not in _CHANNELS:
        _CHANNELS[src] = channels_of(las_files(Path(src)))
    return _CHANNELS[src]


def scene_info(options: ConvertOptions, frame: str) -> dict[str, Any]:
    """The manifest's description of stored scenes: units, normalisation and coordinate frame.

    Args:
        options: the resolved options (``normalize`` decides the units).
        frame: the coordinate frame of the source.

    Returns:
        ``{"units", "normalized", "frame"}`` for :attr:`~datapipes.converters.base.Plan.info`.
    """
    units = "unit sphere (each scene centred and scaled)" if options.normalize else "metres"
    return {"units": units, "normalized": bool(options.normalize), "frame": frame}


class Las(Converter):
    """LAS / LAZ LiDAR files."""

    name = "las"
    summary = "LAS/LAZ LiDAR files (x,y,z, intensity, GPS time when present), searched recursively under SRC"
    default_normalize = False
    default_fps = False
    orientation = "viewpoint"
    render_source = None  # scenes: no object views

    def plan(self, src: Path, options: ConvertOptions) -> Plan:
        """Lists every ``.las`` / ``.laz`` file under SRC and decides the channels from the first header.

        Raises:
            UserError: SRC is not a folder or holds no LAS / LAZ file.
        """
        require_dir(src, "a folder of .las/.laz files")
        files = las_files(src)
        if not files:
            raise UserError(f"{src}: no .las or .laz files found")
        splits: dict[str, list[WorkItem]] = {}
        for path in files:
            rel = path.relative_to(src)
            split = "test" if TEST_FOLDERS.intersection(rel.parent.parts) else "train"
            parts = [p for p in rel.with_suffix("").parts if p != "velodyne"]
            splits.setdefault(split, []).append(WorkItem(make_key(*parts), split, rel.as_posix(), str(path)))
        channels = channels_of(files)
        _CHANNELS[options.src] = channels
        return Plan(
            splits=splits,
            classes=[],
            channels={"feat": channels},
            info=scene_info(options, "as stored in the LAS files"),
        )

    def read(self, item: WorkItem, options: ConvertOptions) -> RawCloud:
        """Reads one file with the channels planned for the dataset (see :func:`read_las_file`)."""
        return read_las_file(Path(item.path), planned_channels(options.src))


def read_las_file(path: Path, channels: Sequence[str]) -> RawCloud:
    """One LAS / LAZ file as the converter stores it: coordinates, the feature channels and their origins.

    Args:
        path: the file.
        channels: feature channels to store, ``("intensity",)`` or ``("intensity", "time")``.

    Returns:
        ``xyz`` float32 (N, 3) minus ``meta["origin"]``, ``feat`` float32 (N, C) and the meta.

    Raises:
        Reject: unreadable, truncated or empty file, a point format without a planned channel, or
            coordinates needing more digits than float32 holds.
    """
    header = read_header(path)
    size = path.stat().st_size
    _check_header(header, size, channels)
    if header.are_points_compressed:
        _check_chunk_table(path, header, size)
    points = _read_points(path, header, with_time="time" in channels)
    bad = int(np.count_nonzero(~np.isfinite(points.xyz)))
    if bad:
        raise Reject(f"non-finite coordinate values ({bad} NaN/inf; check the header's scales and offsets)")
    origin = _origin(points.xyz, np.asarray(header.offsets), np.asarray(header.scales))
    feat = [points.intensity / INTENSITY_SCALE]
    meta: dict[str, Any] = {"origin": origin.tolist(), "point_format": int(header.point_format.id)}
    if points.gps_time is not None:
        time_origin = float(np.min(points.gps_time))
        feat.append(points.gps_time - time_origin)
        meta["time_origin"] = time_origin
    with np.errstate(over="ignore", invalid="ignore"):
        stored = np.stack(feat, axis=1).astype(np.float32)
    if not np.isfinite(stored).all():
        raise Reject(
            "intensity or GPS time values are not finite in float32 (NaN, or a time span over 3e38 s)"
        )
    return RawCloud(xyz=(points.xyz - origin).astype(np.float32), feat=stored, meta=meta)


def read_scan(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One scan read as ``pcpt-data convert las`` stores it, for tools that take a single file.

    Args:
        path: a ``.las`` / ``.laz`` file.

    Returns:
        (xyz float32 (N, 3), feat float32 (N, C), the C channel names: ``intensity`` and, when the point
        format has GPS time, ``time``).

    Raises:
        UserError: the file cannot be read (the message names it and the reason).
    """
    try:
        channels = channels_of([path])
        raw = read_las_file(path, channels)
    except Reject as err:
        raise UserError(f"{path}: {err}") from None
    if raw.xyz is None or raw.feat is None:  # read_las_file always fills both
        raise UserError(f"{path}: no points read")
    return raw.xyz, raw.feat, channels


@dataclass
class _Points:
    """The dimensions of one file that the converter stores, as float64 arrays.

    Attributes:
        xyz: ``(N, 3)`` scaled coordinates.
        intensity: ``(N,)`` raw uint16 intensities.
        gps_time: ``(N,)`` GPS times, or ``None`` when the time channel is not stored.
    """

    xyz: np.ndarray
    intensity: np.ndarray
    gps_time: np.ndarray | None


def _error_text(err: BaseException) -> str:
    """``Type: message`` of a laspy / lazrs error, on one line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_header(header: Any, size: int, channels: Sequence[str]) -> None:
    """Rejects empty files, bad scales, a missing planned dimension and too short uncompressed files."""
    count = int(header.point_count)
    if count == 0:
        raise Reject("no points (the LAS header's point count is 0)")
    scales = [float(v) for v in header.scales]
    if not all(math.isfinite(v) and v > 0 for v in scales):
        raise Reject(f"invalid LAS header: scales {scales} must be positive and finite")
    if "time" in channels and not has_gps_time(header):
        raise Reject(
            f"point format {header.point_format.id} has no gps_time dimension, but the dataset stores the "
            "channel 'time' (decided from the first file); all files must have the same fields"
        )
    if not header.are_points_compressed:
        record = int(header.point_format.size)
        expected = int(header.offset_to_point_data) + count * record
        if size < expected:
            raise Reject(
                f"truncated LAS file: the header declares {count} points of {record} bytes "
                f"({expected} bytes with the header), the file has {size} bytes"
            )


def _check_chunk_table(path: Path, header: Any, size: int) -> None:
    """Rejects a LAZ chunk table that declares more chunks than the file can hold.

    lazrs allocates the whole table from the declared count, and an allocation failure in Rust aborts the
    process, so a damaged count must not reach it. The table is found as lazrs finds it (the offset at the
    start of the point data, else the one in the last 8 bytes). Each chunk starts with one raw point
    record, so a file holds at most ``size // record_size`` chunks.

    Args:
        path: the LAZ file.
        header: its laspy header.
        size: its size in bytes.

    Raises:
        Reject: the table's chunk count is impossible for the file size.
    """
    start = int(header.offset_to_point_data)
    with path.open("rb") as fh:
        table_at = _read_i64(fh, start)
        if table_at is not None and table_at <= start:  # offset not written: lazrs looks at the file's end
            table_at = _read_i64(fh, size - 8)
        if table_at is None or table_at <= start or table_at + 8 > size:
            return  # no chunk table, or one past the end: lazrs reads sequentially or gives the reason
        fh.seek(table_at + 4)  # version (uint32), then the number of chunks (uint32)
        (chunks,) = struct.unpack("<I", fh.read(4))
    room = size // int(header.point_format.size)
    if chunks > room:
        raise Reject(f"damaged LAZ chunk table: it declares {chunks} chunks, the file has room for {room}")


def _read_i64(fh: BinaryIO, at: int) -> int | None:
    """The little-endian int64 at byte ``at`` of ``fh``, or ``None`` when the file ends before it."""
    if at < 0:
        return None
    fh.seek(at)
    data = fh.read(8)
    return struct.unpack("<q", data)[0] if len(data) == 8 else None


def _read_points(path: Path, header: Any, *, with_time: bool) -> _Points:
    """Reads the stored dimensions in chunks (lazrs for LAZ), so memory follows the points actually present.

    A damaged header can declare billions of points; reading chunk by chunk fails on the missing data instead
    of allocating for the declared count.

    Raises:
        Reject: undecodable point data, or fewer points than the header declares.
    """
    import laspy

    declared = int(header.point_count)
    xyz: list[np.ndarray] = []
    intensity: list[np.ndarray] = []
    gps_time: list[np.ndarray] = []
    try:
        with _quiet_laspy(), laspy.open(path, laz_backend=laspy.LazBackend.Lazrs, read_evlrs=False) as reader:
            for chunk in reader.chunk_iterator(max(1, CHUNK_BYTES // int(header.point_format.size))):
                xyz.append(np.stack([np.asarray(chunk.x), np.asarray(chunk.y), np.asarray(chunk.z)], axis=1))
                intensity.append(np.asarray(chunk.intensity, dtype=np.float64))
                if with_time:
                    gps_time.append(np.asarray(chunk.gps_time, dtype=np.float64))
    except Exception as err:
        raise Reject(f"not a readable LAS/LAZ file: {_error_text(err)}") from None
    count = sum(len(part) for part in xyz)
    if count != declared:
        raise Reject(f"truncated LAS/LAZ file: the header declares {declared} points, {count} could be read")
    return _Points(
        xyz=np.concatenate(xyz),
        intensity=np.concatenate(intensity),
        gps_time=np.concatenate(gps_time) if with_time else None,
    )


def _fits_float32(values: np.ndarray, scale: float) -> bool:
    """Whether float32 rounds every value to within half a LAS quantum (``scale``) of itself."""
    largest = float(np.max(np.abs(values)))
    if not largest < float(np.finfo(np.float32).max):
        return False
    return bool(np.spacing(np.float32(largest)) < scale)


def _origin(xyz: np.ndarray, offsets: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The origin to subtract per axis so that float32 keeps the file's resolution (0 where not needed).

    Args:
        xyz: ``(N, 3)`` float64 scaled coordinates.
        offsets: the header's offsets.
        scales: the header's scales (the coordinate quantum per axis).

    Returns:
        ``(3,)`` float64 origin.

    Raises:
        Reject: an axis spans too much for float32 at the file's scale even after subtracting an origin.
    """
    origin = np.zeros(3)
    for axis, name in enumerate("xyz"):
        values, scale = xyz[:, axis], float(scales[axis])
        if _fits_float32(values, scale):
            continue
        candidates = (float(offsets[axis]), float(math.floor(np.min(values))))
        fitting = [c for c in candidates if _fits_float32(values - c, scale)]
        if not fitting:
            span = float(np.ptp(values))
            raise Reject(
                f"{name} coordinates span {span:.6g} units at the file's resolution {scale:g} (its scale): "
                "more digits than float32 holds"
            )
        origin[axis] = fitting[0]
    return origin
