"""Writing shard tars: deterministic members, written atomically and hashed on the way to disk.

Every member gets a fixed mtime (0), owner (0/0, no names) and mode (0644) and the tar is a GNU-format
stream, so the same samples always give byte-identical shards (resume compares hashes, and the local and Ray
engines must agree). The file appears under its final name only once complete (see
:func:`datapipes.files.atomic_write`).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from datapipes.files import atomic_write

__all__ = ["write_tar_atomic"]

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


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


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
