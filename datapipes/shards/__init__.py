"""The pcpt shard format (``pcpt-shards/1``): codecs, tar reading and writing, manifest, writer, checks.

A shard folder ``OUT/`` holds webdataset tar shards ``<split>-NNNNNN.tar``, ``manifest.json`` (written last: a
folder without it is not a finished dataset), ``rejected.jsonl`` and the writer's progress records in
``OUT/.pcpt-progress/``. One sample is a run of tar members sharing a key: ``<key>.xyz.npy``, optional
``<key>.normal.npy``, ``<key>.curv.npy``, ``<key>.feat.npy``, ``<key>.cls.txt``, ``<key>.img.png`` (or
``<key>.img.0.png``, ``<key>.img.1.jpg``, ... for several views) and ``<key>.meta.json``.

Safety: arrays are written with ``np.save(..., allow_pickle=False)`` and read with NumPy's reader without
ever unpickling; a member with a pickle extension (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``, ``.pt``) makes
every reader stop with an error naming the shard and the member. Tars are written deterministically (fixed
mtime, owner and mode), so the same samples give byte-identical shards.

Modules, one job each:

- :mod:`~datapipes.shards.format`: file and member names, sample keys, :class:`ShardFormatError`;
- :mod:`~datapipes.shards.codecs`: ``.npy`` (NumPy), PNG/JPEG (Pillow) and JSON member codecs;
- :mod:`~datapipes.shards.samples`: one sample <-> its members (validation, decoding checks);
- :mod:`~datapipes.shards.tar_read`: the fast, strict streaming tar reader;
- :mod:`~datapipes.shards.tar_write`: deterministic, atomic, hashed tar writes;
- :mod:`~datapipes.shards.manifest`: ``manifest.json`` reading, checking and assembly;
- :mod:`~datapipes.shards.remote`: shard folders given by URL (``https://``, ``s3://``; fsspec), each shard
  downloaded once and read only if its sha256 equals the manifest's;
- :mod:`~datapipes.shards.reader`: samples of a shard or split, checked against the manifest;
- :mod:`~datapipes.shards.writer`: :class:`ShardSetWriter` (resume, lock, atomic writes);
- :mod:`~datapipes.shards.verify`: :func:`verify_shards` and :func:`check_shard_hashes`.
"""

from datapipes.files import sha256_file
from datapipes.shards.codecs import decode_image, decode_npy, decode_png, encode_npy, encode_png, image_pixels
from datapipes.shards.format import (
    FORMAT,
    LOCK_NAME,
    MANIFEST_NAME,
    PICKLE_SUFFIXES,
    PROGRESS_DIR,
    REJECTED_NAME,
    ShardFormatError,
    field_of_member,
    shard_name,
    validate_key,
)
from datapipes.shards.manifest import (
    manifest_members,
    manifest_sha256,
    manifest_shard_samples,
    read_manifest,
    shard_locations,
    shard_paths,
)
from datapipes.shards.reader import iter_shard_members, iter_shard_samples, iter_split_samples
from datapipes.shards.remote import as_location, is_url
from datapipes.shards.samples import decode_members, encode_sample
from datapipes.shards.tar_read import iter_tar_members
from datapipes.shards.verify import check_shard_hashes, verify_shards
from datapipes.shards.writer import ShardSetWriter

__all__ = [
    "FORMAT",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "PICKLE_SUFFIXES",
    "PROGRESS_DIR",
    "REJECTED_NAME",
    "ShardFormatError",
    "ShardSetWriter",
    "as_location",
    "check_shard_hashes",
    "decode_image",
    "decode_members",
    "decode_npy",
    "decode_png",
    "encode_npy",
    "encode_png",
    "encode_sample",
    "field_of_member",
    "image_pixels",
    "is_url",
    "iter_shard_members",
    "iter_shard_samples",
    "iter_split_samples",
    "iter_tar_members",
    "manifest_members",
    "manifest_sha256",
    "manifest_shard_samples",
    "read_manifest",
    "sha256_file",
    "shard_locations",
    "shard_name",
    "shard_paths",
    "validate_key",
    "verify_shards",
]
