"""Near-duplicate shapes in shard folders (``pcpt-data dedup OUT [--against OTHER]``), e.g. split leakage.

Each cloud gets a descriptor that is invariant to rotation and point order and changes little under small
jitter or resampling (:func:`shape_descriptor`): after centring on the centroid and scaling to unit RMS
radius (more stable under jitter than the largest radius),

- the square roots of the covariance eigenvalues, sorted (the extent along the principal axes);
- the cumulative histogram of distances to the centroid;
- the cumulative histograms of ``|coordinate|`` along each principal axis (signs dropped, so the arbitrary
  sign of eigenvectors does not matter).

The vector is L2-normalised; faiss finds every pair closer than ``--threshold`` (exact range search).
Within one folder every pair across and within splits is reported; with ``--against`` only pairs between
the two folders.
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

from datapipes.cli_common import add_command
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


@dataclass(frozen=True)
class Entry:
    """Where a descriptor came from."""

    root: str
    split: str
    key: str


def load_descriptors(
    root: str | Path, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, list[Entry]]:
    """Descriptors of every cloud of a shard folder.

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
    manifest = read_manifest(root)
    counts = manifest_shard_samples(manifest)
    vectors: list[np.ndarray] = []
    entries: list[Entry] = []
    for split in sorted(manifest["splits"]):
        for path in shard_paths(root, split, manifest):
            for sample in iter_shard_samples(path, fields=("xyz",), expected=counts.get(path.name)):
                try:
                    vectors.append(shape_descriptor(sample["xyz"]))
                except ValueError as err:
                    raise UserError(f"{path.name}: sample {sample['key']}: {err}") from None
                entries.append(Entry(str(root), split, sample["key"]))
                if progress is not None:
                    progress(1)
    dim = 3 + 4 * BINS
    return (np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)), entries


def near_pairs(
    queries: np.ndarray, base: np.ndarray | None = None, *, threshold: float = DEFAULT_THRESHOLD
) -> list[tuple[int, int, float]]:
    """All pairs with descriptor distance ``<= threshold`` (exact faiss range search).

    Args:
        queries: ``(M, D)`` float32 descriptors.
        base: ``(K, D)`` descriptors to search; ``None`` searches ``queries`` against themselves
            (each unordered pair once, no self pairs).
        threshold: largest L2 distance reported.

    Returns:
        ``(query index, base index, distance)`` sorted by distance, then indices.
    """
    import faiss

    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    same = base is None
    ref = queries if base is None else np.ascontiguousarray(base, dtype=np.float32)
    if len(queries) == 0 or len(ref) == 0:
        return []
    index = faiss.IndexFlatL2(ref.shape[1])
    index.add(ref)
    lims, dist2, ids = index.range_search(queries, float(threshold) ** 2 + 1e-12)
    pairs: list[tuple[int, int, float]] = []
    for i in range(len(queries)):
        for d2, j in zip(dist2[lims[i] : lims[i + 1]], ids[lims[i] : lims[i + 1]]):
            j = int(j)
            if same and j <= i:
                continue
            pairs.append((i, j, float(np.sqrt(max(float(d2), 0.0)))))
    pairs.sort(key=lambda p: (p[2], p[0], p[1]))
    return pairs


def dedup(
    root: str | Path,
    against: str | Path | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Near-duplicate report for one shard folder, or between two.

    Args:
        root: the shard folder.
        against: another shard folder; ``None`` compares ``root`` with itself.
        threshold: largest descriptor distance reported.
        progress: called with the number of clouds read.

    Returns:
        ``{"root", "against", "threshold", "samples", "pairs": [{"distance", "a": {"split", "key"},
        "b": {...}}], "counts": {"<split a>/<split b>": n}}``; with ``against`` the ``b`` side of every
        pair is in ``against``.
    """
    desc_a, entries_a = load_descriptors(root, progress)
    if against is None:
        desc_b, entries_b = None, entries_a
    else:
        desc_b, entries_b = load_descriptors(against, progress)
    pairs = near_pairs(desc_a, desc_b, threshold=threshold)
    counts: Counter[str] = Counter()
    out_pairs = []
    for i, j, dist in pairs:
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
        "against": None if against is None else str(against),
        "threshold": threshold,
        "samples": {"root": len(entries_a), **({} if against is None else {"against": len(entries_b)})},
        "pairs": out_pairs,
        "counts": dict(sorted(counts.items())),
    }


def format_dedup(report: dict[str, Any], limit: int = 50) -> str:
    """Human-readable report: counts per split pair, then the closest pairs."""
    target = report["against"] or report["root"]
    lines = [
        f"near-duplicates (distance <= {report['threshold']}) between {report['root']} and {target}: "
        f"{len(report['pairs'])} pair(s)"
    ]
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
    p.add_argument("--limit", type=int, default=50, metavar="K", help="pairs listed in the text report")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_dedup(args: argparse.Namespace) -> int:
    """Handler of ``pcpt-data dedup``; returns 0 (duplicates are reported, not an error)."""
    if args.threshold < 0:
        raise UserError(f"--threshold must be >= 0, got {args.threshold}")
    from datapipes.shards import read_manifest

    roots = [args.out] if args.against is None else [args.out, args.against]
    total = sum(int(info["samples"]) for root in roots for info in read_manifest(root)["splits"].values())
    with Progress(total, "dedup", "cloud", disable=args.quiet) as bar:
        report = dedup(args.out, args.against, threshold=args.threshold, progress=bar.update)
    print(json.dumps(report, indent=2) if args.json else format_dedup(report, args.limit))
    return 0
