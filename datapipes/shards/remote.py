"""Shard folders in object storage: locations given as URLs (``https://``, ``http://``, ``s3://``, ...).

A shard folder location is a local path or a URL ``<scheme>://...`` that :mod:`fsspec` can open (``http``
and ``https`` through aiohttp, ``s3`` through s3fs, any other installed fsspec protocol alike). Local paths
are read exactly as before; this module serves the URL ones:

- :func:`is_url`, :func:`join`, :func:`location_name`, :func:`shard_label`: naming files of a location;
- :func:`read_url_bytes`: small files (``manifest.json``), with clear errors for an unreachable or missing
  URL;
- :func:`open_verified`: one shard, downloaded once into a temporary file (or the shard cache) while its
  sha256 is computed, and handed to the reader only when it equals the manifest's: no sample of a changed
  shard is ever yielded;
- :func:`download`: one shard into a local file (``pcpt-data inspect`` verifies it there).

Credentials and endpoints come from each fsspec backend's own configuration: for S3 the usual AWS chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for an
S3-compatible store) and fsspec's ``FSSPEC_S3_*`` variables. Setting ``PCPT_SHARD_CACHE`` to a folder keeps
every verified shard there under its sha256 (``<sha256>.tar``), so later epochs and runs read it locally
(re-hashed on every use).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from datapipes.errors import UserError
from datapipes.shards.format import ShardFormatError

__all__ = [
    "CACHE_ENV",
    "as_location",
    "download",
    "is_url",
    "join",
    "list_names",
    "location_name",
    "open_verified",
    "parent",
    "read_url_bytes",
    "shard_label",
    "url_sha256",
]

#: Environment variable naming the folder of verified remote shards (unset: no cache).
CACHE_ENV = "PCPT_SHARD_CACHE"

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BLOCK = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def is_url(location: str | Path) -> bool:
    """Whether ``location`` is a URL (``<scheme>://...``) rather than a local path."""
    return isinstance(location, str) and _URL_RE.match(location) is not None


def as_location(location: str | Path) -> str | Path:
    """A shard folder argument as pcpt keeps it: a URL stays a string, anything else becomes a ``Path``.

    ``Path("https://host/x")`` would fold the ``//`` into ``/``, so URLs must never pass through ``Path``.
    """
    return location if is_url(location) else Path(location)


def join(root: str | Path, name: str) -> str:
    """The location of ``name`` inside the folder ``root`` (a path or a URL), as a string."""
    if is_url(root):
        return f"{str(root).rstrip('/')}/{name}"
    return str(Path(root) / name)


def parent(location: str | Path) -> str:
    """The folder holding ``location`` (a path or a URL), as a string."""
    if is_url(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


def location_name(location: str | Path) -> str:
    """The file name at the end of a path or URL (``.../train-000000.tar`` -> ``train-000000.tar``)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_url(location) else Path(location).name


def shard_label(location: str | Path) -> str:
    """How errors name a shard: its file name when local, the whole URL when remote."""
    return str(location) if is_url(location) else Path(location).name


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem serving ``url`` and the path within it.

    Raises:
        UserError: for a protocol fsspec does not know or whose backend is not installed.
    """
    try:
        import fsspec
    except ImportError as err:  # pragma: no cover - fsspec comes with the datasets dependency
        raise UserError(f"{url}: reading shards from URLs needs fsspec (pip install 'pcpt[remote]')") from err
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        scheme = url.split("://", 1)[0]
        extra = " (pip install 'pcpt[remote]', which brings s3fs)" if scheme in ("s3", "s3a") else ""
        raise UserError(f"{url}: no fsspec backend for {scheme}:// installed{extra}: {err}") from err
    except ValueError as err:
        raise UserError(f"{url}: not a URL fsspec can open ({err})") from err


def _describe(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _open_error(url: str, err: Exception, what: str) -> UserError:
    """The user-facing error for a failed read of ``url`` (``what`` names the file's role)."""
    cause = err.__cause__
    if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):  # fsspec's HTTP wraps these
        return UserError(f"{url}: cannot read {what}: the server is unreachable ({_describe(cause)})")
    if isinstance(err, FileNotFoundError):
        return UserError(f"{url}: not found ({what})")
    if isinstance(err, PermissionError):
        return UserError(f"{url}: access denied ({what}); check the credentials ({_describe(err)})")
    return UserError(f"{url}: cannot read {what}: {type(err).__name__}: {_describe(err)}")


@contextlib.contextmanager
def _opened(url: str, what: str) -> Iterator[IO[bytes]]:
    """``url`` opened for one sequential read; errors of the backend become :class:`UserError`."""
    fs, path = _filesystem(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    # HTTP: one streaming GET (no range requests, which simple servers do not answer).
    options = {"block_size": 0} if {"http", "https"} & set(protocols) else {}
    try:
        f = fs.open(path, "rb", **options)
    except UserError:
        raise
    except Exception as err:  # an I/O boundary: every backend raises its own types
        raise _open_error(url, err, what) from err
    with f:
        yield f


def _copy(url: str, src: IO[bytes], dest: IO[bytes] | None, what: str) -> tuple[str, int]:
    """Reads ``src`` to its end (into ``dest`` if given); returns its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    try:
        while block := src.read(_BLOCK):
            digest.update(block)
            size += len(block)
            if dest is not None:
                dest.write(block)
    except UserError:
        raise
    except Exception as err:  # a connection lost mid-transfer, a backend error
        raise _open_error(url, err, what) from err
    return digest.hexdigest(), size


def read_url_bytes(url: str, *, what: str = "file") -> bytes:
    """The whole content of a small remote file (e.g. ``manifest.json``).

    Raises:
        UserError: naming ``url`` when it is unreachable, missing or denied.
    """
    with _opened(url, what) as f:
        try:
            return bytes(f.read())
        except Exception as err:
            raise _open_error(url, err, what) from err


def url_sha256(url: str) -> str:
    """Hex sha256 of the remote file ``url``, streamed once and not stored.

    Raises:
        ShardFormatError: naming ``url`` when it is unreachable, missing or denied.
    """
    try:
        with _opened(url, "shard") as f:
            return _copy(url, f, None, "shard")[0]
    except ShardFormatError:
        raise
    except UserError as err:
        raise ShardFormatError(str(err)) from err


def download(url: str, dest: Path) -> str:
    """Copies the remote file ``url`` to the local file ``dest``; returns its sha256.

    Raises:
        UserError: naming ``url`` when it is unreachable, missing or denied.
    """
    with _opened(url, "shard") as src, open(dest, "wb") as out:
        return _copy(url, src, out, "shard")[0]


def _mismatch(url: str, got: str) -> ShardFormatError:
    manifest = join(parent(url), "manifest.json")
    return ShardFormatError(
        f"{url}: sha256 {got[:12]}... differs from {manifest} (the shard changed on the server or was "
        "damaged in transfer); refusing to read it"
    )


def _cache_dir() -> Path | None:
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        return None
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"{CACHE_ENV}={folder}: cannot create the shard cache ({err.strerror or err})"
        ) from err
    return path


def _file_sha256(f: IO[bytes]) -> str:
    digest = hashlib.sha256()
    f.seek(0)
    for block in iter(lambda: f.read(_BLOCK), b""):
        digest.update(block)
    f.seek(0)
    return digest.hexdigest()


@contextlib.contextmanager
def open_verified(url: str, sha256: str) -> Iterator[tuple[IO[bytes], int]]:
    """The remote shard ``url`` as a local, seekable file whose sha256 was checked: ``(file, size)``.

    The shard is downloaded once into an anonymous temporary file (or, with ``PCPT_SHARD_CACHE`` set, into
    the cache as ``<sha256>.tar``, kept only after it matched) and hashed while it arrives; the file is
    handed out only when the hash equals ``sha256``. A cached copy is re-hashed before every use and fetched
    again if it changed.

    Raises:
        UserError: naming ``url`` when it is unreachable, missing or denied.
        ShardFormatError: naming ``url`` when its sha256 differs from ``sha256``.
    """
    if not _HEX64.match(sha256):
        raise ShardFormatError(f"{url}: the manifest's sha256 {sha256!r} is not a hex sha256")
    cache = _cache_dir()
    if cache is None:
        with tempfile.TemporaryFile(prefix="pcpt-shard-") as f:
            got, size = _fetch_into(url, f)
            if got != sha256:
                raise _mismatch(url, got)
            f.seek(0)
            yield f, size
        return
    cached = cache / f"{sha256}.tar"
    if not cached.is_file() or _sha256_of(cached) != sha256:
        _fetch_to_cache(url, cached, sha256)
    with open(cached, "rb", buffering=_BLOCK) as f:
        yield f, os.fstat(f.fileno()).st_size


def _fetch_into(url: str, dest: IO[bytes]) -> tuple[str, int]:
    with _opened(url, "shard") as src:
        return _copy(url, src, dest, "shard")


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return _file_sha256(f)


def _fetch_to_cache(url: str, cached: Path, sha256: str) -> None:
    """Downloads ``url`` next to ``cached`` and renames it into place only if its sha256 matches."""
    tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            got, _ = _fetch_into(url, f)
        if got != sha256:
            raise _mismatch(url, got)
        os.replace(tmp, cached)
    finally:
        tmp.unlink(missing_ok=True)


def list_names(root: str) -> set[str] | None:
    """File names directly inside the remote folder ``root``, or ``None`` when it cannot be listed.

    Object stores list their keys; plain HTTP servers only when they serve an index page.
    """
    try:
        fs, path = _filesystem(root)
        entries = fs.ls(path, detail=False)
    except Exception:  # listing is optional: many HTTP servers and some buckets refuse it
        return None
    return {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
