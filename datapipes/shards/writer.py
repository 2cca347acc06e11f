"""Writing a shard folder: :class:`ShardSetWriter`, shard by shard, resumable, one writer at a time.

Each shard is encoded, written atomically (see :mod:`datapipes.shards.tar_write`) and then recorded in
``OUT/.pcpt-progress/<shard>.json`` (its sha256, sample count, fields, labels and rejections); a re-run with
the same options keeps every shard whose file still matches its record and redoes the others. The manifest
is written last, from the records, so a folder with a manifest is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from datapipes._version import __version__
from datapipes.errors import UserError
from datapipes.files import TEMPORARY_RE, printable, sha256_file, write_text_atomic
from datapipes.shards.codecs import dumps
from datapipes.shards.format import (
    FORMAT,
    LOCK_NAME,
    MANIFEST_NAME,
    PROGRESS_DIR,
    REJECTED_NAME,
    SHARD_RE,
    shard_name,
)
from datapipes.shards.manifest import manifest_entries, name_channels, pcpt_manifest
from datapipes.shards.samples import EncodedSample, encode_for_shard, is_encoded
from datapipes.shards.tar_write import write_tar_blocks_atomic
from datapipes.types import Rejection, Sample

__all__ = ["ShardSetWriter"]

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


def _lock_holder(fd: int) -> str:
    """The pid written in a lock file held by another writer (it writes it right after locking)."""
    import time

    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


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
            self.options: dict[str, Any] = printable(json.loads(dumps(dict(options))))
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
                write_text_atomic(options_path, dumps(self.options) + "\n")
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
        if manifest.exists() and pcpt_manifest(manifest) is None:
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
        manifest = pcpt_manifest(self.out / MANIFEST_NAME)
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
        self,
        split: str,
        index: int,
        samples: Sequence[Sample | EncodedSample],
        rejected: Sequence[Rejection],
    ) -> None:
        """Encodes ``samples`` into shard ``index`` of ``split`` atomically, then records the progress.

        A sample may come already encoded (an :class:`~datapipes.shards.samples.EncodedSample` from
        :func:`~datapipes.shards.samples.encode_for_shard`, as conversion workers send them); its blocks are
        appended as they are, so the shard is byte-identical to one written from the plain samples. An
        empty shard (every source item rejected) gets a progress record and no tar, so a re-run does not
        redo it; empty shards are left out of the manifest.

        Raises:
            UserError: another writer holds the folder (after :meth:`close`).
            ValueError: for a malformed sample or rejection, duplicate keys, or samples with different fields.
        """
        self._lock()
        name = shard_name(split, index)
        blocks: list[bytes] = []
        fields: dict[str, Any] | None = None
        labels: Counter[int] = Counter()
        keys: set[str] = set()
        point_counts: list[int] = []
        for sample in samples:
            encoded = (
                cast(EncodedSample, sample) if is_encoded(sample) else encode_for_shard(cast(Sample, sample))
            )
            key = encoded["key"]
            if key in keys:
                raise ValueError(f"{name}: duplicate sample key {key!r}")
            keys.add(key)
            spec = encoded["fields"]
            if fields is None:
                fields = spec
            elif spec != fields:
                raise ValueError(f"{name}: sample {key!r} has fields {spec}, earlier samples have {fields}")
            if "label" in encoded:
                labels[int(encoded["label"])] += 1
            point_counts.append(int(encoded["points"]))
            blocks.append(encoded["tar"])
        rejections = []
        for item in rejected:
            if not all(isinstance(item.get(k), str) for k in ("source", "reason", "split")):
                raise ValueError(f"{name}: a rejection needs string source, reason and split, got {item!r}")
            rejections.append({k: printable(item[k]) for k in ("source", "reason", "split")})
        if not self._manifest_dropped:
            (self.out / MANIFEST_NAME).unlink(missing_ok=True)  # the folder is no longer a finished dataset
            self._manifest_dropped = True
        self._record_path(split, index).unlink(missing_ok=True)
        if blocks:
            sha, size = write_tar_blocks_atomic(self.out / name, blocks)
        else:
            (self.out / name).unlink(missing_ok=True)
            sha, size = None, 0
        record = {
            "shard": name,
            "split": split,
            "index": int(index),
            "samples": len(blocks),
            "keys": len(keys),
            "sha256": sha,
            "bytes": size,
            "fields": fields or {},
            "points": {"min": min(point_counts), "max": max(point_counts)} if point_counts else None,
            "labels": {str(k): v for k, v in sorted(labels.items())},
            "unlabelled": len(blocks) - sum(labels.values()),
            "rejected": rejections,
        }
        write_text_atomic(self._record_path(split, index), dumps(record) + "\n")

    def finalize(
        self,
        *,
        num_shards: Mapping[str, int],
        classes: Sequence[str],
        fps_ordered: bool,
        extra: Mapping[str, Any] | None = None,
        require_samples: bool = False,
        channels: Mapping[str, Sequence[str]] | None = None,
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
            channels: names of the columns of ``feat``, e.g. ``{"feat": ["intensity", "time"]}``; stored with
                the field in the manifest, where batches select channels by name.

        Returns:
            The manifest written.

        Raises:
            UserError: if shards are incomplete, fields differ between shards, a label has no class, or
                there is no sample under ``require_samples``.
            ValueError: if ``extra`` reuses a reserved manifest key, or ``channels`` does not fit the fields.
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
        classes = [printable(str(c)) for c in classes]
        records = {
            split: [self._read_record(split, i) or {} for i in range(n)] for split, n in num_shards.items()
        }
        entries, rejections = manifest_entries(self.out, records, classes)
        if require_samples and not any(info["samples"] for info in entries["splits"].values()):
            write_text_atomic(self.out / REJECTED_NAME, "".join(dumps(r) + "\n" for r in rejections))
            for split, n in num_shards.items():
                for i in range(n):
                    self._record_path(split, i).unlink(missing_ok=True)
            self.close()
            raise UserError(
                f"{self.out}: all {len(rejections)} input items were rejected, no samples to write "
                f"(reasons in {self.out / REJECTED_NAME})"
            )
        entries["fields"] = name_channels(entries["fields"], channels or {})
        manifest: dict[str, Any] = {
            "format": FORMAT,
            **entries,
            "classes": classes,
            "source": self.options,
            "fps_ordered": bool(fps_ordered),
            "rejected": len(rejections),
            "created_by": f"pcpt {__version__}",
            **json.loads(dumps(extra)),
        }
        write_text_atomic(self.out / REJECTED_NAME, "".join(dumps(r) + "\n" for r in rejections))
        write_text_atomic(self.out / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        self._remove_temporaries()
        self.close()
        return manifest

    def _remove_temporaries(self) -> None:
        """Deletes temporary files an interrupted writer left (only names pcpt's own writes use)."""
        for folder, own in ((self.out, True), (self._progress, False)):
            for entry in folder.iterdir() if folder.is_dir() else ():
                match = TEMPORARY_RE.match(entry.name)
                if not match or not entry.is_file():
                    continue
                target = match.group(1)
                if not own or target in (MANIFEST_NAME, REJECTED_NAME) or SHARD_RE.match(target):
                    entry.unlink(missing_ok=True)
