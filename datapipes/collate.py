"""Batching finished samples into a :class:`~datapipes.types.PointBatch`: stacking, or padding ragged clouds.

Collation runs in DataLoader workers. Every tensor leaving a worker costs a shared-memory segment and a
file-descriptor hand-over (about half a millisecond), so small per-cloud vectors (labels, lengths) cross the
worker boundary as numpy arrays and become tensors in the main process (:func:`finish_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from datapipes.transforms import Arrays
from datapipes.types import PAD_VALUE, PointBatch

__all__ = ["collate", "collate_for_transfer", "finish_batch"]


def collate(samples: Sequence[Arrays], *, ragged: bool = False) -> PointBatch:
    """Batches finished samples (see :mod:`datapipes.decode`) into a :class:`PointBatch`.

    Args:
        samples: ``{"key", "xyz" (N_i, 3), "label"?, "normal"?, "feats"?, "feat_names"?, "images"? (V, C, H,
            W), "views"? (V, N_i, 3)}`` dicts.
        ragged: pad clouds of different sizes to the largest one with
            :data:`~datapipes.types.PAD_VALUE` and record ``lengths``; otherwise every cloud must have the
            same point count.

    Raises:
        ValueError: for clouds of different sizes (not ragged), a field some samples lack, labelled and
            unlabelled samples together, different feature channels, or images of different sizes.
    """
    return finish_batch(collate_for_transfer(samples, ragged=ragged))


def collate_for_transfer(samples: Sequence[Arrays], *, ragged: bool = False) -> PointBatch:
    """:func:`collate`, but labels and lengths stay small numpy arrays (see :func:`finish_batch`)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    counts = [int(s["xyz"].shape[0]) for s in samples]
    if not ragged and len(set(counts)) != 1:
        raise ValueError(
            f"cannot batch clouds with different point counts {sorted(set(counts))}; use TakePoints, or "
            "BatchFields(ragged=True) for padded batches"
        )
    labels = [s.get("label") for s in samples]
    if any(label is None for label in labels) and not all(label is None for label in labels):
        raise ValueError("cannot batch labelled and unlabelled samples together")
    names = {tuple(s.get("feat_names", ())) for s in samples}
    if len(names) != 1:
        raise ValueError(f"cannot batch samples with different feature channels {sorted(names)}")
    pad = max(counts) if ragged else None
    points = _stack(samples, "xyz", pad, axis=0)
    if points is None:
        raise ValueError("cannot batch samples without xyz")
    return PointBatch(
        points=points,
        normals=_stack(samples, "normal", pad, axis=0),
        feats=_stack(samples, "feats", pad, axis=0),
        images=_stack(samples, "images", None, axis=0),
        label=None if labels[0] is None else np.asarray(labels, dtype=np.int64),  # type: ignore[arg-type]
        key=[str(s.get("key", "")) for s in samples],
        views=_stack(samples, "views", pad, axis=1),
        lengths=np.asarray(counts, dtype=np.int64) if ragged else None,  # type: ignore[arg-type]
        feat_names=names.pop(),
    )


def finish_batch(batch: PointBatch) -> PointBatch:
    """Turns the numpy labels and lengths of a transferred batch into tensors (in the main process)."""
    if isinstance(batch.label, np.ndarray):
        batch.label = torch.from_numpy(batch.label)
    if isinstance(batch.lengths, np.ndarray):
        batch.lengths = torch.from_numpy(batch.lengths)
    return batch


def _stack(samples: Sequence[Arrays], name: str, pad: int | None, *, axis: int) -> torch.Tensor | None:
    """``name`` of every sample stacked along a new batch axis; with ``pad``, ``axis`` padded to ``pad``."""
    present = [name in s for s in samples]
    if not any(present):
        return None
    if not all(present):
        key = samples[present.index(False)].get("key")
        raise ValueError(f"cannot batch: sample {key!r} has no {name!r} while others do")
    arrays = [np.asarray(s[name], dtype=np.float32) for s in samples]
    if pad is None:
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"cannot batch {name!r} of different shapes {sorted({a.shape for a in arrays})}")
        return torch.from_numpy(np.stack(arrays))
    shape = list(arrays[0].shape)
    shape[axis] = pad
    out = np.full((len(arrays), *shape), PAD_VALUE, dtype=np.float32)
    for row, arr in zip(out, arrays):
        row[(slice(None),) * axis + (slice(0, arr.shape[axis]),)] = arr
    return torch.from_numpy(out)
