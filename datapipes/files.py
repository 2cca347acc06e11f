"""File helpers shared by the data layer (and imported by the model packages): hashing, atomic writes, text.

- :func:`sha256_file`: the one sha256-of-a-file helper of pcpt (shard hashes, manifests, artifacts).
- :func:`atomic_write` / :func:`write_text_atomic`: write through a temporary name in the same folder, fsync,
  then rename, so a reader never sees a partly written file and an interrupted write leaves only a
  temporary (``.<name>.tmp-<pid>``, see :data:`TEMPORARY_RE`) that the next run may delete.
- :func:`printable`: strings made valid Unicode, for file names that are not UTF-8.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["TEMPORARY_RE", "atomic_write", "printable", "sha256_file", "temporary_path", "write_text_atomic"]

#: Names of the temporaries :func:`atomic_write` creates: group 1 is the final file name.
TEMPORARY_RE = re.compile(r"^\.(.+)\.tmp-\d+$")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_path(path: Path) -> Path:
    """The temporary name :func:`atomic_write` uses for ``path`` in this process (matches TEMPORARY_RE)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` only when the ``with`` block ends without an exception.

    The data goes to :func:`temporary_path` first and is fsynced before the rename; on an exception the
    temporary is deleted and ``path`` is left as it was.
    """
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def printable(value: Any) -> Any:
    r"""``value`` with every string made valid Unicode: undecodable file-name bytes become ``\xNN``.

    File names that are not valid UTF-8 reach Python as strings with lone surrogates (``surrogateescape``),
    which cannot be written as UTF-8; they are spelled ``\xff`` instead so manifests, progress records,
    sample metadata and ``rejected.jsonl`` stay valid UTF-8 JSON. Dicts (keys become strings) and lists are
    converted recursively; other values are returned as they are.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:
                return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:
                return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {printable(str(k)): printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(v) for v in value]
    return value
