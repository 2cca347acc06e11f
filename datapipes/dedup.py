"""Near-duplicate shapes in shard folders (``pcpt-data dedup OUT [--against OTHER]``), e.g. split leakage.

Each cloud gets a descriptor that is invariant to rotation and point order and changes little under small
jitter or resampling (:func:`shape_descriptor`): after centring on the centroid and scaling to unit RMS
radius (more stable under jitter than the largest radius),

- the square roots of the covariance eigenvalues, sorted (the extent along the principal axes);
- the cumulative histogram of distances to the centroid;
- the cumulative histograms of ``|coordinate|`` along each principal axis (signs dropped, so the arbitrary
  sign of eigenvectors does not matter).

The vector is L2-normalised; faiss finds every pair closer than ``--threshold``
(:mod:`datapipes.dedup_search`). Within one folder every pair across and within splits is reported; with
``--against`` only pairs between the two folders.

Index (``--index``): ``exact`` compares every cloud with every other (``IndexFlatL2``); ``ivf`` splits the
clouds into ``--nlist`` k-means cells (``IndexIVFFlat``) and searches each cloud's nearest cells only, at
most ``--nprobe``, skipping the cells that provably hold no partner; the report counts the clouds for which
that proof failed (``unverified``; 0 means the result equals the exact search). ``auto`` (default) uses
``exact`` up to 20,000 x 20,000 descriptor comparisons (e.g. one folder of 20,000 clouds) and ``ivf``
above. Memory: about 0.5 KiB per cloud for the descriptors, as much again for the ``ivf`` index, plus
Python's record of each cloud's split and key; nothing grows with the square of the number of clouds.
With a GPU build of faiss and a visible GPU the ``ivf`` k-means and centroid assignment run on the GPU
(the report says so); the range search runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datapipes.cli_common import add_command, positive_int
from datapipes.dedup_search import INDEX_KINDS, default_nlist, default_nprobe, search_near_pairs
from datapipes.errors import UserError
from datapipes.progress import Progress

DEFAULT_THRESHOLD = 0.006
"""Default descriptor distance below which two clouds are reported (jittered copies with σ ≤ 0.005 of the
unit-sphere radius stay below it; distinct ModelNet40 shapes are rarely closer than 0.008)."""
BINS = 32
_RANGE = 2.5  # histogram range in units of RMS radius


def shape_descriptor(xyz: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Rotation- and order-invariant shape descriptor of one cloud (see the module docstring).

    Args:
        xyz: ``(N, 3)`` points, ``N >= 2``, not all equal.
        bins: histogram bins per distribution.

    Returns:
        ``(3 + 4 * bins,)`` float32, unit L2 norm.

    Raises:
        ValueError: wrong shape, too few points, non-finite values or all points equal.
    """
    pts = np.asarray(xyz, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < 2:
        raise ValueError(f"xyz must have shape (N, 3) with N >= 2, got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("xyz contains NaN or infinite values")
    pts = pts - pts.mean(axis=0)
    radius = np.linalg.norm(pts, axis=1)
    rms = float(np.sqrt(np.mean(radius**2)))
    if rms <= 1e-12:
        raise ValueError("all points are equal")
    pts, radius = pts / rms, radius / rms
    eigval, eigvec = np.linalg.eigh(pts.T @ pts / len(pts))
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    n = float(len(pts))
    scale = 1.0 / (n * np.sqrt(bins))

    def cdf(values: np.ndarray) -> np.ndarray:
        return np.cumsum(np.histogram(values, bins=bins, range=(0.0, _RANGE))[0]) * scale

    proj = np.abs(pts @ eigvec)
    parts = [np.sqrt(np.clip(eigval, 0.0, None)), cdf(radius)] + [cdf(proj[:, i]) for i in range(3)]
    vec = np.concatenate(parts)
    return (vec / np.linalg.norm(vec)).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Entry:
    """Where a descriptor came from."""

    root: str
    split: str
    key: str


Loaded = tuple[str | Path, np.ndarray, list[Entry]]
"""A shard folder, its descriptors ``(M, D)`` and their entries (as :func:`load_descriptors` returns them)."""


def load_descriptors(
    root: str | Path, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, list[Entry]]:
    """Descriptors of every cloud of a shard folder, written into one preallocated array.

    Args:
        root: the shard folder (with ``manifest.json``).
        progress: called with the number of clouds just read.

    Returns:
        ``(descriptors (M, D) float32, entries)``.

    Raises:
        UserError: missing/invalid manifest, damaged shard, or a cloud the descriptor cannot use.
    """
    from datapipes.shards import iter_shard_samples, manifest_shard_samples, read_manifest, shard_paths

    root = Path(root)
    name = str(root)
    manifest = read_manifest(root)
    counts = manifest_shard_samples(manifest)
    listed = sum(int(info.get("samples", 0)) for info in manifest["splits"].values())
    out = np.empty((max(listed, 1), 3 + 4 * BINS), np.float32)
    entries: list[Entry] = []
    for split in sorted(manifest["splits"]):
        for path in shard_paths(root, split, manifest):
            for sample in iter_shard_samples(path, fields=("xyz",), expected=counts.get(path.name)):
                try:
                    vector = shape_descriptor(sample["xyz"])
                except ValueError as err:
                    raise UserError(f"{path.name}: sample {sample['key']}: {err}") from None
                if len(entries) == len(out):  # more clouds than the manifest lists
                    out = np.concatenate([out, np.empty_like(out)])
                out[len(entries)] = vector
                entries.append(Entry(name, split, sample["key"]))
                if progress is not None:
                    progress(1)
    return out[: len(entries)], entries


def near_pairs(
    queries: np.ndarray,
    base: np.ndarray | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    index: str = "exact",
    nlist: int | None = None,
    nprobe: int | None = None,
) -> list[tuple[int, int, float]]:
    """All pairs with descriptor distance ``<= threshold`` (see :mod:`datapipes.dedup_search`).

    Args:
        queries: ``(M, D)`` float32 descriptors.
        base: ``(K, D)`` descriptors to search; ``None`` searches ``queries`` against themselves
            (each unordered pair once, no self pairs).
        threshold: largest L2 distance reported.
        index: ``"exact"``, ``"ivf"`` or ``"auto"``.
        nlist: IVF cells (``None``: a default from the size of the base).
        nprobe: most IVF cells scanned per query (``None``: a default from ``nlist``).

    Returns:
        ``(query index, base index, distance)`` sorted by distance, then indices.
    """
    found = search_near_pairs(queries, base, threshold=threshold, index=index, nlist=nlist, nprobe=nprobe)
    return found.as_tuples()


def dedup(
    root: str | Path,
    against: str | Path | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    index: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    progress: Callable[[int], None] | None = None,
    search_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Near-duplicate report for one shard folder, or between two.

    Args:
        root: the shard folder.
        against: another shard folder; ``None`` compares ``root`` with itself.
        threshold: largest descriptor distance reported.
        index: ``"auto"``, ``"exact"`` or ``"ivf"`` (see the module docstring).
        nlist: IVF cells (default from the number of clouds searched).
        nprobe: most IVF cells scanned per cloud (default from ``nlist``).
        progress: called with the number of clouds read.
        search_progress: called with the number of clouds searched.

    Returns:
        ``{"root", "against", "threshold", "samples", "index", "pairs": [{"distance", "a": {"split", "key"},
        "b": {...}}], "counts": {"<split a>/<split b>": n}}``; with ``against`` the ``b`` side of every
        pair is in ``against``. ``index`` says what ran (:class:`~datapipes.dedup_search.SearchInfo`).

    Raises:
        UserError: unreadable shards, or an option the sets do not allow (e.g. ``nlist`` above the number of
            clouds searched).
    """
    desc_a, entries_a = load_descriptors(root, progress)
    other: Loaded | None = None
    if against is not None:
        other = (against, *load_descriptors(against, progress))
    return pair_report(
        (root, desc_a, entries_a), other, threshold=threshold, index=index, nlist=nlist, nprobe=nprobe,
        progress=search_progress,
    )  # fmt: skip


def pair_report(
    loaded: Loaded,
    against: Loaded | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    index: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The :func:`dedup` report of descriptors already loaded (arguments as there).

    Raises:
        UserError: an option the sets do not allow (e.g. ``nlist`` above the number of clouds searched).
    """
    root, desc_a, entries_a = loaded
    desc_b: np.ndarray | None = None
    entries_b = entries_a
    if against is not None:
        _, desc_b, entries_b = against
    try:
        found = search_near_pairs(
            desc_a, desc_b, threshold=threshold, index=index, nlist=nlist, nprobe=nprobe, progress=progress
        )
    except ValueError as err:
        raise UserError(f"dedup: {err}") from None
    counts: Counter[str] = Counter()
    out_pairs = []
    for i, j, dist in found.as_tuples():
        a, b = entries_a[i], entries_b[j]
        splits = (a.split, b.split) if against is not None else tuple(sorted((a.split, b.split)))
        counts["/".join(splits)] += 1
        out_pairs.append(
            {
                "distance": round(dist, 6),
                "a": {"split": a.split, "key": a.key},
                "b": {"split": b.split, "key": b.key},
            }
        )
    return {
        "root": str(root),
        "against": None if against is None else str(against[0]),
        "threshold": threshold,
        "samples": {"root": len(entries_a), **({} if against is None else {"against": len(entries_b)})},
        "index": found.info.to_dict(),
        "pairs": out_pairs,
        "counts": dict(sorted(counts.items())),
    }


def format_index(info: dict[str, Any]) -> str:
    """One line saying which index ran, e.g. ``index: ivf (nlist 512, nprobe 16, ...)``."""
    if info["index"] == "exact":
        return f"index: exact ({info['queries']} x {info['base']} clouds)"
    device = "k-means and assignment on GPU" if info["gpu"] else "cpu"
    return (
        f"index: ivf (nlist {info['nlist']}, nprobe {info['nprobe']}, k-means on {info['train_samples']} "
        f"clouds, {info['cells_per_query']} cells searched per cloud, {device}); "
        f"unverified clouds: {info['unverified']}"
        + (" (some pairs may be missing: raise --nprobe or use --index exact)" if info["unverified"] else "")
    )


def format_dedup(report: dict[str, Any], limit: int = 50) -> str:
    """Human-readable report: counts per split pair, then the closest pairs."""
    target = report["against"] or report["root"]
    lines = [
        f"near-duplicates (distance <= {report['threshold']}) between {report['root']} and {target}: "
        f"{len(report['pairs'])} pair(s)"
    ]
    if "index" in report:
        lines.append("  " + format_index(report["index"]))
    lines += [f"  {name}: {n}" for name, n in report["counts"].items()]
    shown: Sequence[dict[str, Any]] = report["pairs"][:limit]
    if shown:
        lines.append(f"  {'distance':>9}  {'a':<40} b")
        for pair in shown:
            a = f"{pair['a']['split']}/{pair['a']['key']}"
            b = f"{pair['b']['split']}/{pair['b']['key']}"
            lines.append(f"  {pair['distance']:>9.5f}  {a:<40} {b}")
    if len(report["pairs"]) > limit:
        lines.append(f"  ... {len(report['pairs']) - limit} more (use --json for all)")
    return "\n".join(lines)


def add_dedup_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``pcpt-data dedup`` (see :func:`~datapipes.cli_common.add_command`)."""
    summary = "report near-duplicate shapes (e.g. train/test leakage) with faiss"
    p = add_command(subparsers, "dedup", run_dedup, help=summary, description=__doc__ or "")
    p.add_argument("out", metavar="OUT", help="shard folder")
    p.add_argument("--against", metavar="OTHER", help="compare with another shard folder instead of itself")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        metavar="T",
        help=f"largest descriptor distance reported (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--index",
        choices=INDEX_KINDS,
        default="auto",
        help="exact: every pair of clouds (IndexFlatL2); ivf: k-means cells (IndexIVFFlat); auto (default): "
        "exact up to 20,000 x 20,000 comparisons, ivf above",
    )
    p.add_argument(
        "--nlist",
        type=positive_int,
        default=None,
        metavar="N",
        help="ivf cells (default: the power of two nearest 2 sqrt(K), K the clouds indexed: of OUT, or of "
        f"OTHER with --against; e.g. {default_nlist(10**6)} for 1M; at most K); --nlist and --nprobe are "
        "used when the ivf index runs",
    )
    p.add_argument(
        "--nprobe",
        type=positive_int,
        default=None,
        metavar="P",
        help=f"most ivf cells searched per cloud (default nlist/64 within [16, 128], e.g. "
        f"{default_nprobe(default_nlist(10**6))} for 1M clouds); cells that cannot hold a partner are "
        "skipped",
    )
    p.add_argument("--limit", type=int, default=50, metavar="K", help="pairs listed in the text report")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_dedup(args: argparse.Namespace) -> int:
    """Handler of ``pcpt-data dedup``; returns 0 (duplicates are reported, not an error)."""
    if args.threshold < 0:
        raise UserError(f"--threshold must be >= 0, got {args.threshold}")
    if args.index == "exact" and (args.nlist is not None or args.nprobe is not None):
        raise UserError("--nlist and --nprobe apply to --index ivf or auto, not to --index exact")
    from datapipes.shards import read_manifest

    roots = [args.out] if args.against is None else [args.out, args.against]
    sizes = [sum(int(info["samples"]) for info in read_manifest(root)["splits"].values()) for root in roots]
    if args.nlist is not None and args.nlist > sizes[-1]:
        target = "--against folder" if args.against is not None else "folder"
        raise UserError(f"--nlist {args.nlist} is more than the {sizes[-1]} clouds of the {target}")
    with Progress(sum(sizes), "dedup: descriptors", "cloud", disable=args.quiet) as bar:
        loaded: list[Loaded] = [(root, *load_descriptors(root, bar.update)) for root in roots]
    with Progress(sizes[0], "dedup: search", "cloud", disable=args.quiet) as bar:
        report = pair_report(
            loaded[0], loaded[1] if len(loaded) > 1 else None, threshold=args.threshold, index=args.index,
            nlist=args.nlist, nprobe=args.nprobe, progress=bar.update,
        )  # fmt: skip
    print(json.dumps(report, indent=2) if args.json else format_dedup(report, args.limit))
    return 0
