"""Execution engines for per-item work grouped into shard jobs: in-process, local process pool, Ray Data.

A converter hands an engine a picklable function mapping a chunk of items to one result per item, and a
list of :class:`ShardJob` (one per output shard, items in their fixed order). The engine runs the function
over chunks of every job and yields each job with its results in item order as soon as the whole job is
done, so the driver can write that shard, together with the node that computed each result (for the
report). The function's result for an item must not depend on which other items share its chunk; then
results depend only on the item, never on the engine, the worker count, the chunking, the completion order
or the node.

- :class:`LocalEngine` with ``workers=1`` runs in the calling process; with ``workers>1`` it uses a
  ``spawn`` process pool (safe with open3d and threads) and small chunks inside each job for load balance.
  Its workers exit on their own when the process that started them dies, even by ``SIGKILL``, and each
  runs its native libraries on one thread (:func:`limit_worker_threads`: torch, BLAS/OpenMP through
  threadpoolctl and the ``*_NUM_THREADS`` variables, numba), so ``N`` workers keep ``N`` cores busy instead
  of oversubscribing them; ``workers=1`` keeps the calling process's thread settings.
- :class:`RayEngine` runs the same function through Ray Data (``ray.data.from_items(...).map_batches(...)``)
  on a local Ray instance, or on the cluster at ``address``. Ray is an optional extra
  (``pip install pcpt[ray]``) imported only here. Its worker processes limit their threads like the local
  pool's before their first chunk. Results travel back as ``.npz`` bytes
  (:func:`pack_result`), never as pickles of arrays inside Arrow columns, so the schema is fixed whatever
  the item produced. A chunk whose worker process or node dies is run again on the nodes left (Ray Data
  retries its map tasks after system failures: ``max_retries=-1``, its default, which pcpt keeps); the
  engine keeps the first result of every item and yields every job exactly once, so a retry can neither
  lose nor duplicate a sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple, Protocol

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


@dataclass(frozen=True, order=True)
class Node:
    """The machine (cluster node) that computed a result.

    Attributes:
        id: Ray node id (hex), or ``local`` for :class:`LocalEngine`.
        address: the node's IP address (Ray) or host name (local).
    """

    id: str
    address: str


class JobResult(NamedTuple):
    """One finished shard job.

    Attributes:
        job: the job.
        results: one result dict per item, in item order.
        nodes: the node that computed each result, in item order.
    """

    job: ShardJob
    results: list[dict[str, Any]]
    nodes: tuple[Node, ...]


class Engine(Protocol):
    """Runs a per-item function over shard jobs; see the module docstring."""

    def run(
        self, fn: ChunkFn, jobs: Sequence[ShardJob], progress: ProgressFn | None = None
    ) -> Iterator[JobResult]:
        """Yields a :class:`JobResult` for every job exactly once (in any order), results in item order."""
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


WORKER_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)
"""Environment variables a pool worker sets to ``1``, for native libraries it loads later (open3d, torch)."""

_thread_limits: Any = None
"""The worker's ``threadpoolctl.threadpool_limits`` object, kept alive (and so in force) for its lifetime."""
_threads_limited = False
"""Whether :func:`limit_worker_threads` already ran in this process (it runs once)."""


def limit_worker_threads() -> None:
    """Pool-worker initializer part: one thread per worker for every native thread pool it can reach.

    ``N`` pool workers on ``N`` cores each starting one thread per core for BLAS, OpenMP, torch or numba
    would oversubscribe the machine; the parallelism is the pool. So a worker sets the
    :data:`WORKER_THREAD_ENV` variables to ``1`` (libraries loaded later read them: open3d's and torch's
    OpenMP, numba), limits the BLAS/OpenMP libraries already loaded (NumPy's) to one thread with
    ``threadpoolctl`` (when installed; the limit object is kept for the process lifetime), and calls
    ``torch.set_num_threads(1)`` and ``numba.set_num_threads(1)`` if they are already imported (torch is
    not imported just for this: it takes seconds). Only worker processes call it (the local pool's and
    Ray's, before their first chunk), once each; ``LocalEngine(workers=1)`` leaves the calling process as it
    is.
    """
    global _thread_limits, _threads_limited
    if _threads_limited:
        return
    _threads_limited = True
    for name in WORKER_THREAD_ENV:
        os.environ[name] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: the variables above still cover libraries loaded from now on
        pass
    else:
        _thread_limits = threadpool_limits(limits=1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    numba = sys.modules.get("numba")
    if numba is not None:
        with contextlib.suppress(RuntimeError, ValueError):  # no threading layer: numba stays serial anyway
            numba.set_num_threads(1)


def init_pool_worker(parent: int) -> None:
    """Initializer of :class:`LocalEngine`'s pool workers: :func:`exit_with_parent` and one thread each.

    Args:
        parent: pid of the process that creates the pool.
    """
    exit_with_parent(parent)
    limit_worker_threads()


def _run_chunk(fn: ChunkFn, items: Sequence[Any]) -> list[dict[str, Any]]:
    results = fn(items)
    if len(results) != len(items):
        raise ValueError(f"chunk function returned {len(results)} results for {len(items)} items")
    return results


class LocalEngine:
    """In-process (``workers=1``) or ``spawn`` process-pool execution.

    Pool workers (``workers>1``) are started with :func:`init_pool_worker`: each exits when the calling
    process dies and runs torch, BLAS/OpenMP and numba on one thread (:func:`limit_worker_threads`), so
    ``workers`` processes use ``workers`` cores. With ``workers=1`` the function runs in the calling process
    with its own thread settings, unchanged.

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
        self.node = Node("local", socket.gethostname())
        self._pool: ProcessPoolExecutor | None = None

    def run(
        self, fn: ChunkFn, jobs: Sequence[ShardJob], progress: ProgressFn | None = None
    ) -> Iterator[JobResult]:
        """Yields each job with its results in item order (see :class:`Engine`)."""
        if self.workers == 1:
            for job in jobs:
                results: list[dict[str, Any]] = []
                for start in range(0, len(job.items), self.chunk_size):
                    chunk = job.items[start : start + self.chunk_size]
                    results.extend(_run_chunk(fn, chunk))
                    if progress is not None:
                        progress(len(chunk))
                yield self._done(job, results)
            return
        yield from self._run_pool(fn, jobs, progress)

    def _done(self, job: ShardJob, results: list[dict[str, Any]]) -> JobResult:
        return JobResult(job, results, (self.node,) * len(results))

    def _chunk(self, count: int) -> int:
        """Items per task for a job of ``count`` items: at most ``chunk_size``; small jobs use all workers."""
        return max(1, min(self.chunk_size, -(-count // (2 * self.workers))))

    def _run_pool(
        self, fn: ChunkFn, jobs: Sequence[ShardJob], progress: ProgressFn | None
    ) -> Iterator[JobResult]:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=get_context("spawn"),
                initializer=init_pool_worker,
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
                yield self._done(jobs[j], [])
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
                        yield self._done(jobs[j], ordered)
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

    Arrays are stored as arrays, ``bytes`` values (e.g. a sample's pre-encoded tar members) and lists of
    ``bytes`` (images) as uint8 arrays, everything else as one JSON document; :func:`unpack_result` inverts
    it exactly (bytes come back byte for byte).

    Args:
        result: a dict of ndarrays, bytes, lists of bytes and JSON-serialisable values.

    Returns:
        The ``.npz`` bytes.
    """
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, Any] = {}
    byte_lists: dict[str, int] = {}
    for name, value in result.items():
        if isinstance(value, np.ndarray):
            arrays[f"a/{name}"] = value
        elif isinstance(value, bytes):
            arrays[f"c/{name}"] = np.frombuffer(value, dtype=np.uint8)
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
            elif entry.startswith("c/"):
                result[entry[2:]] = npz[entry].tobytes()
    return result


def _item_to_cell(item: Any) -> Any:
    """Dataclass items travel as JSON text (an Arrow-native column); anything else as is."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return json.dumps(dataclasses.asdict(item), sort_keys=True)
    return item


class _RayMapper:
    """The Ray Data batch function: rebuilds the items, runs the chunk function, packs the results.

    Every output row also names the node that computed it (``node``: the Ray node id).
    """

    def __init__(self, fn: ChunkFn, item_type: type | None) -> None:
        self.fn = fn
        self.item_type = item_type

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        limit_worker_threads()  # Ray runs this in its worker processes: one thread each, as in the local pool
        cells = list(batch["item"])
        items = [self.item_type(**json.loads(c)) for c in cells] if self.item_type is not None else cells
        payloads = [pack_result(r) for r in _run_chunk(self.fn, items)]
        node = ray.get_runtime_context().get_node_id()
        return {
            "job": np.asarray(batch["job"], dtype=np.int64),
            "pos": np.asarray(batch["pos"], dtype=np.int64),
            "payload": np.array(payloads, dtype=object),
            "node": np.array([node] * len(payloads), dtype=object),
        }


class JobAssembler:
    """Collects per-item results arriving in any order, possibly twice, into one :class:`JobResult` per job.

    The first result of an item is kept and later ones are ignored, so a chunk that a retry ran twice
    neither duplicates nor replaces a sample; a job is complete (and returned once) when every item has a
    result.

    Args:
        jobs: the jobs; items are addressed as ``(job index, position in the job)``.
    """

    def __init__(self, jobs: Sequence[ShardJob]) -> None:
        self.jobs = list(jobs)
        self._parts: dict[int, dict[int, tuple[dict[str, Any], Node]]] = {
            j: {} for j, job in enumerate(self.jobs) if job.items
        }

    def empty_jobs(self) -> list[JobResult]:
        """Results of the jobs without items (they still produce their empty shard)."""
        return [JobResult(job, [], ()) for job in self.jobs if not job.items]

    def wants(self, j: int, pos: int) -> bool:
        """Whether item ``pos`` of job ``j`` still lacks a result."""
        return j in self._parts and 0 <= pos < len(self.jobs[j].items) and pos not in self._parts[j]

    def add(self, j: int, pos: int, result: dict[str, Any], node: Node) -> JobResult | None:
        """Records an item's result (ignored if it already has one); returns the job once it is complete."""
        if not self.wants(j, pos):
            return None
        parts = self._parts[j]
        parts[pos] = (result, node)
        if len(parts) < len(self.jobs[j].items):
            return None
        del self._parts[j]
        ordered = [parts[p] for p in range(len(parts))]
        return JobResult(self.jobs[j], [r for r, _ in ordered], tuple(n for _, n in ordered))

    def check_complete(self) -> None:
        """Raises ``RuntimeError`` naming how many items of how many jobs never got a result."""
        if self._parts:
            missing = sum(len(self.jobs[j].items) - len(got) for j, got in self._parts.items())
            raise RuntimeError(f"no result for {missing} items of {len(self._parts)} shards")


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


class RayEngine:
    """Runs the per-item function with Ray Data on a local instance or an existing cluster.

    On a cluster (``address`` given), pcpt must be importable on every node (install it there). A local
    instance is started with ``num_cpus`` CPUs and stopped by :meth:`close`. Jobs are cut into chunks of at
    most ``chunk_size`` items, smaller when there are fewer than two chunks per cluster CPU, so that every
    node gets work. A chunk whose worker or node dies is run again by Ray Data; results that arrive twice
    for an item are dropped, so each job is yielded once with one result per item.

    Args:
        address: Ray cluster address (``HOST:PORT`` of the head, ``ray://...`` or ``auto``); ``None`` starts
            a local instance.
        num_cpus: CPUs for a local instance (default: all).
        chunk_size: most items per Ray Data batch (one Ray task).

    Raises:
        UserError: Ray is not installed, or the cluster at ``address`` cannot be reached or refuses the
            connection.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        chunk_size: int = 32,
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
        self._addresses: dict[str, str] = {}
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
            except (ConnectionError, ray.exceptions.AuthenticationError) as err:
                raise UserError(
                    f"cannot connect to the Ray cluster at {address!r}: {err} (is the address the head's "
                    "HOST:PORT, and RAY_AUTH_TOKEN set when the cluster uses token authentication?)"
                ) from None
            self._started = True

    def _node(self, node_id: str) -> Node:
        """The node with id ``node_id`` and the address it registered with (``?`` if Ray does not know it)."""
        if node_id not in self._addresses:
            self._addresses.update({n["NodeID"]: str(n["NodeManagerAddress"]) for n in self._ray.nodes()})
        return Node(node_id, self._addresses.get(node_id, "?"))

    def _chunk(self, count: int) -> int:
        """Items per batch for ``count`` items: at most ``chunk_size``, at least two batches per CPU."""
        cpus = max(1, int(self._ray.cluster_resources().get("CPU", 1)))
        return max(1, min(self.chunk_size, -(-count // (2 * cpus))))

    def run(
        self, fn: ChunkFn, jobs: Sequence[ShardJob], progress: ProgressFn | None = None
    ) -> Iterator[JobResult]:
        """Yields each job with its results in item order (see :class:`Engine`).

        Raises:
            RuntimeError: Ray Data ended without a result for some item (never expected).
        """
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
        assembler = JobAssembler(jobs)
        yield from assembler.empty_jobs()
        if not rows:
            return
        chunk = self._chunk(len(rows))
        mapper = _RayMapper(fn, item_type)
        dataset = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // chunk)).map_batches(
            mapper, batch_size=chunk, batch_format="numpy"
        )
        for row in dataset.iter_rows():
            j, pos = int(row["job"]), int(row["pos"])
            if not assembler.wants(j, pos):  # a retried chunk's second answer: the first is kept
                continue
            if progress is not None:
                progress(1)
            done = assembler.add(j, pos, unpack_result(bytes(row["payload"])), self._node(str(row["node"])))
            if done is not None:
                yield done
        assembler.check_complete()

    def close(self) -> None:
        """Disconnects from the cluster, or stops the local Ray instance this engine started."""
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
        UserError: unknown engine name, Ray missing, or an unreachable cluster.
    """
    if engine == "local":
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        return LocalEngine(workers)
    if engine == "ray":
        return RayEngine(ray_address, num_cpus=workers if workers > 1 and ray_address is None else None)
    raise UserError(f"unknown engine {engine!r}; choose local or ray")
