"""Execution engines for per-item work grouped into shard jobs: in-process, local process pool, Ray Data.

A converter hands an engine a picklable function mapping a chunk of items to one result per item, and a
list of :class:`ShardJob` (one per output shard, items in their fixed order). The engine runs the function
over chunks of every job and yields each job with its results in item order as soon as the whole job is
done, so the driver can write that shard. The function's result for an item must not depend on which other
items share its chunk; then results depend only on the item, never on the engine, the worker count, the
chunking or the completion order.

- :class:`LocalEngine` with ``workers=1`` runs in the calling process; with ``workers>1`` it uses a
  ``spawn`` process pool (safe with open3d and threads) and small chunks inside each job for load balance.
  Its workers exit on their own when the process that started them dies, even by ``SIGKILL``.
- :class:`RayEngine` runs the same function through Ray Data (``ray.data.from_items(...).map_batches(...)``)
  on a local Ray instance, or on the cluster at ``address``. Ray is an optional extra
  (``pip install pcpt[ray]``) imported only here. Results travel back as ``.npz`` bytes
  (:func:`pack_result`), never as pickles of arrays inside Arrow columns, so the schema is fixed whatever
  the item produced.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from datapipes.errors import UserError

ChunkFn = Callable[[Sequence[Any]], list[dict[str, Any]]]
"""A picklable function mapping a chunk of items to one dict (a sample or a rejection) per item."""
ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class ShardJob:
    """The items of one output shard, in their fixed order.

    Attributes:
        split: split name, e.g. ``train``.
        index: shard index within the split.
        items: the work items (picklable), in output order.
    """

    split: str
    index: int
    items: tuple[Any, ...]


class Engine(Protocol):
    """Runs a per-item function over shard jobs; see the module docstring."""

    def run(
        self, fn: ChunkFn, jobs: Sequence[ShardJob], progress: ProgressFn | None = None
    ) -> Iterator[tuple[ShardJob, list[dict[str, Any]]]]:
        """Yields ``(job, results)`` for every job (in any order), results in item order."""
        ...

    def close(self) -> None:
        """Releases workers and clusters the engine started."""
        ...


PARENT_POLL_S = 0.2
"""How often a pool worker checks that the process that started it is still alive."""


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # orphaned: nobody will collect this worker's results


def exit_with_parent(parent: int) -> None:
    """Pool-worker initializer: ends the worker as soon as ``parent`` is no longer its parent process.

    A worker blocked on its task queue never notices that the parent was killed (``SIGKILL`` runs no
    cleanup), so a daemon thread polls :func:`os.getppid`, which changes when the parent dies and the worker
    is re-parented.

    Args:
        parent: pid of the process that creates the pool.
    """
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="pcpt-parent-watch", daemon=True).start()


def _run_chunk(fn: ChunkFn, items: Sequence[Any]) -> list[dict[str, Any]]:
    results = fn(items)
    if len(results) != len(items):
        raise ValueError(f"chunk function returned {len(results)} results for {len(items)} items")
    return results


class LocalEngine:
    """In-process (``workers=1``) or ``spawn`` process-pool execution.

    Args:
        workers: number of processes; 1 runs in the calling process.
        chunk_size: items per task sent to a worker (jobs are cut into chunks for load balance).
    """

    def __init__(self, workers: int = 1, *, chunk_size: int = 32) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.workers = workers
        self.chunk_size = chunk_size
        self._pool: ProcessPoolExecutor | None = None

    def run(
        self, fn: ChunkFn, jobs: Sequence[ShardJob], progress: ProgressFn | None = None
    ) -> Iterator[tuple[ShardJob, list[dict[str, Any]]]]:
        """Yields each job with its results in item order (see :class:`Engine`)."""
        if self.workers == 1:
            for job in jobs:
                results: list[dict[str, Any]] = []
                for start in range(0, len(job.items), self.chunk_size):
                    chunk = job.items[start : start + self.chunk_size]
                    results.extend(_run_chunk(fn, chunk))
                    if progress is not None:
                        progress(len(chunk))
                yield job, results
            return
        yield from self._run_pool(fn, jobs, progress)

    def _chunk(self, count: int) -> int:
        """Items per task for a job of ``count`` items: at most ``chunk_size``; small jobs use all workers."""
        return max(1, min(self.chunk_size, -(-count // (2 * self.workers))))

    def _run_pool(
        self, fn: ChunkFn, jobs: Sequence[ShardJob], progress: ProgressFn | None
    ) -> Iterator[tuple[ShardJob, list[dict[str, Any]]]]:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=get_context("spawn"),
                initializer=exit_with_parent,
                initargs=(os.getpid(),),
            )
        pool = self._pool
        sizes = [self._chunk(len(job.items)) for job in jobs]
        chunks = [
            (j, start, job.items[start : start + sizes[j]])
            for j, job in enumerate(jobs)
            for start in range(0, len(job.items), sizes[j])
        ]
        parts: dict[int, dict[int, list[dict[str, Any]]]] = {j: {} for j in range(len(jobs))}
        remaining = {j: len(range(0, len(job.items), sizes[j])) for j, job in enumerate(jobs)}
        for j, left in remaining.items():
            if left == 0:  # an empty job still produces its (empty) shard
                yield jobs[j], []
        pending: dict[Future[list[dict[str, Any]]], tuple[int, int, int]] = {}
        next_chunk = 0
        max_in_flight = 4 * self.workers
        try:
            while next_chunk < len(chunks) or pending:
                while next_chunk < len(chunks) and len(pending) < max_in_flight:
                    j, start, items = chunks[next_chunk]
                    pending[pool.submit(_run_chunk, fn, items)] = (j, start, len(items))
                    next_chunk += 1
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: pending[f][:2]):
                    j, start, count = pending.pop(future)
                    parts[j][start] = future.result()
                    if progress is not None:
                        progress(count)
                    remaining[j] -= 1
                    if remaining[j] == 0:
                        ordered = [r for s in sorted(parts[j]) for r in parts[j][s]]
                        del parts[j]
                        yield jobs[j], ordered
        except BaseException:
            for future in pending:
                future.cancel()
            raise

    def close(self) -> None:
        """Shuts the process pool down (pending tasks are cancelled)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def pack_result(result: Mapping[str, Any]) -> bytes:
    """Serialises a result dict to ``.npz`` bytes without pickle.

    Arrays are stored as arrays, lists of ``bytes`` (images) as uint8 arrays, everything else as one JSON
    document; :func:`unpack_result` inverts it exactly.

    Args:
        result: a dict of ndarrays, lists of bytes and JSON-serialisable values.

    Returns:
        The ``.npz`` bytes.
    """
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, Any] = {}
    byte_lists: dict[str, int] = {}
    for name, value in result.items():
        if isinstance(value, np.ndarray):
            arrays[f"a/{name}"] = value
        elif isinstance(value, list) and value and all(isinstance(v, bytes) for v in value):
            byte_lists[name] = len(value)
            for i, blob in enumerate(value):
                arrays[f"b/{name}/{i}"] = np.frombuffer(blob, dtype=np.uint8)
        else:
            plain[name] = value
    header = json.dumps({"plain": plain, "bytes": byte_lists}, sort_keys=True).encode()
    arrays["__json__"] = np.frombuffer(header, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def unpack_result(blob: bytes) -> dict[str, Any]:
    """Inverse of :func:`pack_result`.

    Args:
        blob: bytes written by :func:`pack_result`.

    Returns:
        The result dict.
    """
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        header = json.loads(npz["__json__"].tobytes().decode())
        result: dict[str, Any] = dict(header["plain"])
        for name, count in header["bytes"].items():
            result[name] = [npz[f"b/{name}/{i}"].tobytes() for i in range(count)]
        for entry in npz.files:
            if entry.startswith("a/"):
                result[entry[2:]] = npz[entry]
    return result


def _item_to_cell(item: Any) -> Any:
    """Dataclass items travel as JSON text (an Arrow-native column); anything else as is."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return json.dumps(dataclasses.asdict(item), sort_keys=True)
    return item


class _RayMapper:
    """The Ray Data batch function: rebuilds the items, runs the chunk function, packs the results."""

    def __init__(self, fn: ChunkFn, item_type: type | None) -> None:
        self.fn = fn
        self.item_type = item_type

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cells = list(batch["item"])
        items = [self.item_type(**json.loads(c)) for c in cells] if self.item_type is not None else cells
        payloads = [pack_result(r) for r in _run_chunk(self.fn, items)]
        return {
            "job": np.asarray(batch["job"], dtype=np.int64),
            "pos": np.asarray(batch["pos"], dtype=np.int64),
            "payload": np.array(payloads, dtype=object),
        }


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


class RayEngine:
    """Runs the per-item function with Ray Data on a local instance or an existing cluster.

    On a cluster (``address`` given), pcpt must be importable on every node (install it there). A local
    instance is started with ``num_cpus`` CPUs and stopped by :meth:`close`.

    Args:
        address: Ray cluster address (``ray://...`` or ``auto``); ``None`` starts a local instance.
        num_cpus: CPUs for a local instance (default: all).
        chunk_size: items per Ray Data batch.

    Raises:
        UserError: Ray is not installed.
    """

    def __init__(
        self, address: str | None = None, *, num_cpus: int | None = None, chunk_size: int = 32
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        try:
            import ray
        except ImportError:
            raise UserError(
                "--engine ray needs Ray Data: pip install 'pcpt[ray]' (or 'ray[data]'), or use --workers N"
            ) from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if address is None:
                pythonpath = os.pathsep.join(p for p in (_project_root(), os.environ.get("PYTHONPATH")) if p)
                kwargs["num_cpus"] = num_cpus
                kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as err:
                raise UserError(f"cannot connect to the Ray cluster at {address!r}: {err}") from None
            self._started = True

    def run(
        self, fn: ChunkFn, jobs: Sequence[ShardJob], progress: ProgressFn | None = None
    ) -> Iterator[tuple[ShardJob, list[dict[str, Any]]]]:
        """Yields each job with its results in item order (see :class:`Engine`)."""
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        first = next((item for job in jobs for item in job.items), None)
        is_dc = dataclasses.is_dataclass(first) and not isinstance(first, type)
        item_type = type(first) if is_dc else None
        rows = [
            {"job": j, "pos": p, "item": _item_to_cell(item) if is_dc else item}
            for j, job in enumerate(jobs)
            for p, item in enumerate(job.items)
        ]
        remaining = {j: len(job.items) for j, job in enumerate(jobs)}
        for j, left in remaining.items():
            if left == 0:
                yield jobs[j], []
        if not rows:
            return
        parts: dict[int, dict[int, dict[str, Any]]] = {j: {} for j in range(len(jobs))}
        mapper = _RayMapper(fn, item_type)
        dataset = ray.data.from_items(rows).map_batches(
            mapper, batch_size=self.chunk_size, batch_format="numpy"
        )
        for row in dataset.iter_rows():
            j, pos = int(row["job"]), int(row["pos"])
            parts[j][pos] = unpack_result(bytes(row["payload"]))
            if progress is not None:
                progress(1)
            remaining[j] -= 1
            if remaining[j] == 0:
                done = parts.pop(j)
                yield jobs[j], [done[p] for p in range(len(jobs[j].items))]

    def close(self) -> None:
        """Stops the local Ray instance this engine started."""
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_engine(engine: str, *, workers: int = 1, ray_address: str | None = None) -> Engine:
    """Builds the engine named on the command line.

    Args:
        engine: ``local`` or ``ray``.
        workers: local processes (``local``) or CPUs of a local Ray instance (``ray``, when > 1).
        ray_address: Ray cluster address for ``ray``.

    Returns:
        The engine; call ``close()`` when done.

    Raises:
        UserError: unknown engine name or Ray missing.
    """
    if engine == "local":
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        return LocalEngine(workers)
    if engine == "ray":
        return RayEngine(ray_address, num_cpus=workers if workers > 1 and ray_address is None else None)
    raise UserError(f"unknown engine {engine!r}; choose local or ray")
