"""Writing shard tars: deterministic members, written atomically and hashed on the way to disk.

Every member gets a fixed mtime (0), owner (0/0, no names) and mode (0644) and the tar is a GNU-format
stream, so the same samples always give byte-identical shards (resume compares hashes, and the local and Ray
engines must agree). The file appears under its final name only once complete (see
:func:`datapipes.files.atomic_write`).

A sample's members do not depend on where they end up in the tar (headers hold no offsets), so
:func:`tar_member_blocks` can build a sample's header and padded data blocks in a conversion worker and
:func:`write_tar_blocks_atomic` only appends those ready blocks, the end-of-archive blocks and the final
record padding, hashing on the way: the same bytes as :func:`write_tar_atomic` (``tarfile``) gives.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from datapipes.files import atomic_write

__all__ = ["tar_member_blocks", "write_tar_atomic", "write_tar_blocks_atomic"]

_MTIME = 0  # fixed tar member mtime: identical inputs give identical bytes


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


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_member_info(name, len(data)), io.BytesIO(data))


def tar_member_blocks(key: str, members: Sequence[tuple[str, bytes]]) -> bytes:
    """The tar blocks of one sample's members, exactly as :func:`write_tar_atomic` writes them.

    Per member ``<key>.<suffix>``: its GNU header block(s) (a long name adds a ``././@LongLink`` header),
    then the data padded with zeros to a multiple of 512 bytes, the way :meth:`tarfile.TarFile.addfile`
    writes a member.

    Args:
        key: the sample key.
        members: ``(suffix, bytes)`` in member order.

    Returns:
        The concatenated blocks (a multiple of 512 bytes).
    """
    parts: list[bytes] = []
    for suffix, data in members:
        info = _member_info(f"{key}.{suffix}", len(data))
        parts.append(info.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape"))
        parts.append(data)
        remainder = len(data) % tarfile.BLOCKSIZE
        if remainder:
            parts.append(tarfile.NUL * (tarfile.BLOCKSIZE - remainder))
    return b"".join(parts)


def write_tar_blocks_atomic(path: Path, blocks: Sequence[bytes]) -> tuple[str, int]:
    """Writes samples already turned into tar blocks (:func:`tar_member_blocks`) as the tar ``path``.

    Appends the blocks in order, then the two zero end-of-archive blocks and the zero padding to a whole
    record (10240 bytes), as :mod:`tarfile` does; the file is the one :func:`write_tar_atomic` writes for
    the same samples.

    Args:
        path: the shard file.
        blocks: per sample, its member blocks.

    Returns:
        ``(sha256 hex digest, size in bytes)`` of the file written.
    """
    with atomic_write(path) as raw:
        sink = _HashingWriter(raw)
        for blob in blocks:
            if len(blob) % tarfile.BLOCKSIZE:
                raise ValueError(f"{path}: tar blocks of {len(blob)} bytes are not a multiple of 512")
            sink.write(blob)
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
        remainder = (sink.size + len(end)) % tarfile.RECORDSIZE
        sink.write(end + (tarfile.NUL * (tarfile.RECORDSIZE - remainder) if remainder else b""))
    return sink.digest.hexdigest(), sink.size


def write_tar_atomic(path: Path, samples: Sequence[tuple[str, list[tuple[str, bytes]]]]) -> tuple[str, int]:
    """Writes ``(key, [(suffix, bytes), ...])`` samples as the tar ``path``; returns ``(sha256, size)``.

    Members are named ``<key>.<suffix>`` in the given order.
    """
    with atomic_write(path) as raw:
        sink = _HashingWriter(raw)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.GNU_FORMAT) as tar:  # type: ignore[call-overload]
            for key, members in samples:
                for suffix, data in members:
                    _add_member(tar, f"{key}.{suffix}", data)
    return sink.digest.hexdigest(), sink.size
