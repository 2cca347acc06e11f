"""Training-pipeline throughput and memory: pcpt streaming shards vs a file-per-sample map-style Dataset.

The baseline is what the official Point-BERT / Point-MAE loaders do: a map-style Dataset that ``np.load``s one
``.npy`` file per sample from a ``<class>/<split>/<name>.npy`` tree, behind a ``DataLoader`` with the same
batch size, workers, transforms (a random ``num_points`` of the stored points without replacement, then
Point-MAE's ScaleAndTranslate) and the same collate function. Both read the same clouds.

Throughput is measured per full epoch (worker start-up included), the loaders interleaved, the first epoch of
each discarded as warm-up, and reported as the median over ``--repeats`` epochs in samples/s, together with
the CPU time spent per sample by the main process and its workers (user + system, from ``getrusage``), which
is much less sensitive than wall-clock time to other load on a shared machine. Peak memory is
the largest sum of RSS over the main process and its DataLoader workers, sampled every 20 ms during an epoch,
for the same data split into few or many shards.

The decode section (``--decode-only`` runs just it) times the member decoders on their own: ``.npy`` point
arrays read from real shards, decoded by pcpt and, in the same process, by a reference copy of the
hand-rolled decoder pcpt used before it switched to NumPy's reader (a cached header parse and one
``frombuffer`` copy) and by NumPy's reader parsing every header; PNG/JPEG images of several sizes decoded by
``decode_image``; and whole-split reads through ``iter_split_samples`` (samples/s, every field decoded and
checked).

Usage::

    python benchmarks/bench_pipeline.py                                  # synthetic data only
    python benchmarks/bench_pipeline.py --modelnet ../shared/data/ModelNet40   # also real ModelNet40 clouds
    python benchmarks/bench_pipeline.py --decode-only                    # member decoders only (seconds)

Prints one JSON document on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import math
import os
import platform
import resource
import statistics
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datapipes.pipeline import collate, make_train_loader
from datapipes.shards import (
    ShardSetWriter,
    decode_npy,
    iter_shard_members,
    iter_shard_samples,
    iter_split_samples,
    shard_paths,
)
from datapipes.synthetic import write_synthetic
from datapipes.transforms import Compose, ScaleAndTranslate, TakePoints, Transform


def log(message: str) -> None:
    print(f"[bench_pipeline] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ data


def make_synthetic(work: Path, samples: int, points: int, shard_size: int) -> Path:
    classes = 10
    root = work / f"synth-{samples}x{points}-s{shard_size}"
    if not (root / "manifest.json").exists():
        log(f"writing synthetic shards to {root}")
        write_synthetic(
            root,
            classes=classes,
            per_class=samples // classes,
            test_per_class=0,
            points=points,
            shard_size=shard_size,
        )
    return root


def reshard(src: Path, out: Path, shard_size: int) -> Path:
    """The same train samples (xyz + label only) in shards of ``shard_size``."""
    if (out / "manifest.json").exists():
        return out
    samples = [
        s for p in shard_paths(src, "train") for s in iter_shard_samples(p, fields=("xyz", "label", "meta"))
    ]
    writer = ShardSetWriter(out, options={"format": "reshard", "src": str(src), "shard_size": shard_size})
    chunks = [samples[i : i + shard_size] for i in range(0, len(samples), shard_size)]
    for i, chunk in enumerate(chunks):
        if not writer.is_complete("train", i):
            kept = [{k: s[k] for k in ("key", "xyz", "label")} for s in chunk]
            writer.write_shard("train", i, kept, [])  # type: ignore[arg-type]
    classes = json.loads((src / "manifest.json").read_text())["classes"]
    writer.finalize(num_shards={"train": len(chunks)}, classes=classes, fps_ordered=False)
    return out


def export_npy_tree(src: Path, out: Path) -> Path:
    """The same clouds as one ``.npy`` file per sample: ``<class>/train/<key>.npy``."""
    if (out / ".done").exists():
        return out
    log(f"writing the file-per-sample tree to {out}")
    for path in shard_paths(src, "train"):
        for s in iter_shard_samples(path, fields=("xyz", "meta")):
            folder = out / s["meta"]["class"] / "train"
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{s['key']}.npy", s["xyz"])
    (out / ".done").write_text("ok\n")
    return out


def convert_npy_tree(tree: Path, out: Path, shard_size: int) -> Path:
    """A minimal ``<class>/train/*.npy`` -> shards conversion (stored order kept, no FPS)."""
    if (out / "manifest.json").exists():
        return out
    log(f"converting {tree} (train split) to shards in {out}")
    classes = sorted(p.name for p in tree.iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((tree / name / "train").glob("*.npy"))]
    order = np.random.default_rng(0).permutation(len(files))
    files = [files[i] for i in order]
    writer = ShardSetWriter(out, options={"format": "npy-tree", "src": str(tree), "shard_size": shard_size})
    chunks = [files[i : i + shard_size] for i in range(0, len(files), shard_size)]
    for i, chunk in enumerate(chunks):
        if writer.is_complete("train", i):
            continue
        samples = [{"key": f.stem, "xyz": np.load(f).astype(np.float32), "label": c} for f, c in chunk]
        writer.write_shard("train", i, samples, [])  # type: ignore[arg-type]
    writer.finalize(num_shards={"train": len(chunks)}, classes=classes, fps_ordered=False)
    return out


# ------------------------------------------------------------------------------------------------ loaders


class NpyFileDataset(Dataset[dict[str, Any]]):
    """The baseline: one ``np.load`` per sample from a ``<class>/<split>/*.npy`` tree."""

    def __init__(self, tree: Path, split: str, transform: Transform, seed: int = 0) -> None:
        classes = sorted(p.name for p in tree.iterdir() if p.is_dir())
        self.items = [
            (f, c) for c, name in enumerate(classes) for f in sorted((tree / name / split).glob("*.npy"))
        ]
        self.transform, self.seed = transform, seed
        self._rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._rng is None:  # one generator per worker process, like the streaming pipeline
            info = torch.utils.data.get_worker_info()
            self._rng = np.random.default_rng([self.seed, 0 if info is None else info.id])
        path, label = self.items[index]
        xyz = np.load(path).astype(np.float32)
        return self.transform({"key": path.stem, "xyz": xyz, "label": label}, self._rng)


def baseline_loader(
    tree: Path, transform: Transform, batch_size: int, workers: int, persistent: bool
) -> DataLoader[Any]:
    return DataLoader(
        NpyFileDataset(tree, "train", transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=persistent and workers > 0,
    )


def stream_loader(
    root: Path, transform: Transform, batch_size: int, workers: int, batches: int, persistent: bool
) -> Iterable[Any]:
    return make_train_loader(
        shard_paths(root, "train"),
        transform=transform,
        batch_size=batch_size,
        batches_per_epoch=batches,
        num_workers=workers,
        rank=0,
        world_size=1,
        persistent_workers=persistent,
    )


# ------------------------------------------------------------------------------------------------ measuring


def _live_children_cpu() -> dict[int, float]:
    """Cumulative CPU seconds of every live child process (persistent DataLoader workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in _children(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return out


def _cpu_seconds() -> tuple[float, dict[int, float]]:
    """CPU time of this process and its reaped children, and of each live child (see ``_cpu_delta``)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, _live_children_cpu()


def _cpu_delta(start: tuple[float, dict[int, float]], end: tuple[float, dict[int, float]]) -> float:
    """CPU seconds spent between two snapshots by this process and all its workers, live or finished.

    A worker reaped in between shows up in the rusage total with its whole lifetime, so what it had used at
    the start is subtracted whether it is still alive or not.
    """
    return end[0] - start[0] + sum(end[1].values()) - sum(start[1].values())


def epoch_rate(loader: Iterable[Any]) -> tuple[float, float]:
    """One epoch: ``(samples per wall-clock second, CPU microseconds per sample over main + workers)``."""
    gc.collect()
    start, cpu = time.perf_counter(), _cpu_seconds()
    samples = 0
    for batch in loader:
        samples += len(batch)
    wall = time.perf_counter() - start  # the finished iterator is gone: non-persistent workers are joined
    return samples / wall, _cpu_delta(cpu, _cpu_seconds()) / samples * 1e6


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def tree_rss_mib(pid: int) -> float:
    todo, total = [pid], 0
    while todo:
        p = todo.pop()
        total += _rss_kib(p)
        todo += _children(p)
    return total / 1024


def peak_memory(run: Callable[[], Any]) -> float:
    """Peak RSS (MiB) of this process plus its children while ``run()`` executes."""
    peak, done = 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_mib(os.getpid()))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return round(peak, 1)


def compare(
    name: str,
    shards: Path,
    tree: Path,
    *,
    num_points: int,
    batch_size: int,
    workers: list[int],
    repeats: int,
    persistent: bool,
) -> dict[str, Any]:
    transform = Compose((TakePoints(num_points, mode="random"), ScaleAndTranslate()))
    samples = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["samples"]
    batches = samples // batch_size
    results: dict[str, Any] = {}
    for w in workers:
        loaders = {
            "pcpt_stream": stream_loader(shards, transform, batch_size, w, batches, persistent),
            "npy_per_file": baseline_loader(tree, transform, batch_size, w, persistent),
        }
        rates: dict[str, list[float]] = {k: [] for k in loaders}
        cpu: dict[str, list[float]] = {k: [] for k in loaders}
        for loader in loaders.values():  # warm-up epoch (page cache, imports)
            epoch_rate(loader)
        for _ in range(repeats):
            for k, loader in loaders.items():
                rate, cost = epoch_rate(loader)
                rates[k].append(rate)
                cpu[k].append(cost)
        med = {k: statistics.median(v) for k, v in rates.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        results[f"workers={w}"] = {
            "samples_per_s": {k: round(v, 1) for k, v in med.items()},
            "speedup": round(med["pcpt_stream"] / med["npy_per_file"], 2),
            "cpu_us_per_sample": {k: round(v, 1) for k, v in med_cpu.items()},
            "cpu_speedup": round(med_cpu["npy_per_file"] / med_cpu["pcpt_stream"], 2),
            "epochs_samples_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        }
        del loaders  # shut the workers down before the next configuration
        gc.collect()
        entry = results[f"workers={w}"]
        log(
            f"{name} workers={w}: {entry['samples_per_s']} speedup {entry['speedup']}; "
            f"CPU us/sample {entry['cpu_us_per_sample']} speedup {entry['cpu_speedup']}"
        )
    return {"samples": samples, "batches_per_epoch": batches, "num_points": num_points, "results": results}


# ------------------------------------------------------------------------------------------------ decoding


def _reference_decode_npy(data: bytes) -> np.ndarray:
    """The hand-rolled ``.npy`` decoder pcpt used before NumPy's reader, kept here only as a yardstick.

    It parsed the header with numpy's header functions (cached per distinct header), checked the payload size
    and made one copy with ``np.frombuffer``.
    """
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy payload")
    end = 10 + struct.unpack("<H", data[8:10])[0] if data[6] == 1 else 12 + struct.unpack("<I", data[8:12])[0]
    dtype, shape, fortran, offset = _reference_header(bytes(data[:end]))
    if dtype.hasobject:
        raise ValueError("object array")
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError("wrong payload size")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}


def _reference_header(prefix: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    if prefix not in _HEADERS:
        stream = io.BytesIO(prefix)
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        _HEADERS[prefix] = (dtype, tuple(shape), bool(fortran), stream.tell())
    return _HEADERS[prefix]


def _numpy_read_array(data: bytes) -> np.ndarray:
    """NumPy's reader on every member, header parse included (what pcpt does for a header seen once)."""
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def _per_item_us(fn: Callable[[Any], Any], items: list[Any], repeats: int) -> float:
    """Median over ``repeats`` passes of the mean microseconds ``fn`` takes per item."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - start) / len(items) * 1e6)
    return round(statistics.median(times), 2)


def _png_unfiltered(image: np.ndarray) -> bytes:
    """PNG bytes with filter type 0 on every row and no ancillary chunk (what pcpt wrote before Pillow)."""
    height, width, channels = image.shape

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 3: 2, 4: 6}[channels], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def _test_image(size: int, channels: int, seed: int) -> np.ndarray:
    """A smooth image with noise (compresses like a render, not like pure noise)."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(size), np.arange(size)) * (255.0 / (2 * size))
    noise = rng.normal(0.0, 8.0, size=(size, size, channels))
    return np.clip(ramp[:, :, None] + noise, 0, 255).astype(np.uint8)


def bench_decode(root: Path, repeats: int) -> dict[str, Any]:
    """Member decoders on their own: ``.npy`` arrays of ``root``'s train split, and PNG/JPEG images."""
    try:
        from datapipes.shards import decode_image
    except ImportError:  # older layout
        from datapipes.pipeline import decode_image  # type: ignore[attr-defined,no-redef]
    arrays: dict[str, list[bytes]] = {}
    for path in shard_paths(root, "train"):
        for _, members in iter_shard_members(path):
            for suffix, data in members.items():
                if suffix.endswith(".npy"):
                    arrays.setdefault(suffix, []).append(data)
    npy: dict[str, Any] = {}
    for suffix, payloads in sorted(arrays.items()):
        for data in payloads[:20]:  # both decoders agree before anything is timed
            np.testing.assert_array_equal(decode_npy(data), _reference_decode_npy(data))
        shape = list(_reference_decode_npy(payloads[0]).shape)
        npy[suffix] = {
            "members": len(payloads),
            "shape": shape,
            "us_per_member": {
                "pcpt": _per_item_us(decode_npy, payloads, repeats),
                "reference_hand_rolled": _per_item_us(_reference_decode_npy, payloads, repeats),
                "numpy_read_array_every_header": _per_item_us(_numpy_read_array, payloads, repeats),
            },
        }
        log(f"decode {suffix} {shape}: {npy[suffix]['us_per_member']}")
    images: dict[str, Any] = {}
    for size, channels in ((32, 1), (64, 3), (224, 3)):
        pixels = [_test_image(size, channels, seed) for seed in range(16)]
        kinds: dict[str, list[bytes]] = {"png_unfiltered": [_png_unfiltered(p) for p in pixels]}
        try:
            from PIL import Image

            for fmt, name in (("PNG", "png_filtered"), ("JPEG", "jpeg")):
                encoded = []
                for p in pixels:
                    buf = io.BytesIO()
                    Image.fromarray(p[:, :, 0] if channels == 1 else p).save(buf, format=fmt)
                    encoded.append(buf.getvalue())
                kinds[name] = encoded
        except ImportError:
            pass
        entry = {}
        for name, blobs in kinds.items():
            entry[name] = _per_item_us(lambda b: decode_image(b, where="bench"), blobs, max(1, repeats // 2))
        images[f"{size}x{size}x{channels}"] = {"us_per_image": entry}
        log(f"decode images {size}x{size}x{channels}: {entry}")
    rates = []
    for _ in range(max(1, repeats // 4)):
        start, count = time.perf_counter(), 0
        for _sample in iter_split_samples(root, "train"):
            count += 1
        rates.append(count / (time.perf_counter() - start))
    split = {"samples": count, "samples_per_s": round(statistics.median(rates), 1)}
    log(f"iter_split_samples: {split}")
    return {"npy": npy, "images": images, "iter_split_samples": split}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/pcpt-bench", help="scratch folder for shards and npy trees")
    parser.add_argument("--samples", type=int, default=2000, help="synthetic training samples")
    parser.add_argument("--points", type=int, default=2048, help="stored points per synthetic cloud")
    parser.add_argument("--num-points", type=int, default=1024, help="points per cloud in a batch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="measured epochs per loader (median)")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--memory-shards", type=int, nargs=2, default=[4, 64], help="few and many shards")
    parser.add_argument(
        "--persistent",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="persistent DataLoader workers for both loaders (default; --no-persistent: fork every epoch)",
    )
    parser.add_argument(
        "--demo-layout", action="store_true", help="also time the demo shards (with normals and metadata)"
    )
    parser.add_argument("--modelnet", default=None, help="ModelNet40 npy tree (1024 points per cloud)")
    parser.add_argument("--modelnet-num-points", type=int, default=512)
    parser.add_argument("--decode-only", action="store_true", help="only the member-decoder section")
    parser.add_argument("--decode-repeats", type=int, default=20, help="passes per decoder timing (median)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    report: dict[str, Any] = {
        "benchmark": "bench_pipeline",
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "work"},
    }
    synth = make_synthetic(work, args.samples, args.points, args.shard_size)
    report["decode"] = bench_decode(synth, args.decode_repeats)
    if args.decode_only:
        report["machine"]["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        print(json.dumps(report, indent=2))
        return 0
    tree = export_npy_tree(synth, work / f"{synth.name}-npy")
    # Same content on both sides (xyz + label); the demo layout also stores normals and metadata.
    lean = reshard(synth, work / f"{synth.name}-xyz", args.shard_size)
    runs = {"synthetic": lean, "synthetic_demo_layout": synth} if args.demo_layout else {"synthetic": lean}
    loaders = {"batch_size": args.batch_size, "workers": args.workers, "persistent": args.persistent}
    for name, shards in runs.items():
        report[name] = compare(
            name, shards, tree, num_points=args.num_points, repeats=args.repeats, **loaders
        )
    if args.demo_layout:
        report["synthetic_demo_layout"]["note"] = (
            "shards also hold normal.npy and meta.json, the npy files do not"
        )

    transform = Compose((TakePoints(args.num_points, mode="random"), ScaleAndTranslate()))
    memory: dict[str, Any] = {}
    for count in args.memory_shards:
        size = -(-args.samples // count)
        root = reshard(synth, work / f"{synth.name}-{count}shards", size)
        batches = args.samples // args.batch_size
        loader = stream_loader(root, transform, args.batch_size, 2, batches, args.persistent)
        epoch_rate(loader)  # warm-up
        peak = peak_memory(lambda loader=loader: epoch_rate(loader))  # type: ignore[misc]
        memory[f"{count}_shards"] = {"shard_samples": size, "peak_rss_mib": peak}
        log(f"memory {count} shards: {memory[f'{count}_shards']}")
        del loader  # its (persistent) workers must not count in the next measurement
        gc.collect()
    baseline = baseline_loader(tree, transform, args.batch_size, 2, args.persistent)
    epoch_rate(baseline)
    memory["npy_per_file_baseline"] = {"peak_rss_mib": peak_memory(lambda b=baseline: epoch_rate(b))}  # type: ignore[misc]
    del baseline
    gc.collect()
    report["memory_workers=2"] = memory

    if args.modelnet:
        modelnet = Path(args.modelnet)
        if (modelnet / "airplane" / "train").is_dir():
            shards = convert_npy_tree(modelnet, work / "modelnet40-train", 500)
            points = args.modelnet_num_points
            report["modelnet40"] = compare(
                "modelnet40", shards, modelnet, num_points=points, repeats=args.repeats, **loaders
            )
            report["modelnet40"]["note"] = (
                f"stored clouds have 1024 points; batches take {args.modelnet_num_points}"
            )
        else:
            log(f"{modelnet}: not a ModelNet40 npy tree, skipped")
    report["machine"]["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
