"""Seeded, class-stratified splits of sample indices (held-out parts of a training split)."""

from __future__ import annotations

import numpy as np

__all__ = ["stratified_split"]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits sample indices into (fit, val) with ``round(fraction·n_c)`` (at least 1) val samples per class.

    A class with a single sample stays entirely in the fit part; every class keeps at least one fit sample.

    Args:
        labels: (S,) integer labels.
        fraction: validation fraction in (0, 1).
        seed: seed of ``np.random.default_rng``.

    Returns:
        ``(fit_idx, val_idx)``, sorted int64 index arrays that partition ``range(S)``.

    Raises:
        ValueError: ``fraction`` outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if members.size < 2:
            continue
        count = min(max(round(fraction * int(members.size)), 1), int(members.size) - 1)
        val_parts.append(rng.permutation(members)[:count])
    val_idx = np.sort(np.concatenate(val_parts)).astype(np.int64) if val_parts else np.zeros(0, np.int64)
    fit_idx = np.setdiff1d(np.arange(labels.size, dtype=np.int64), val_idx)
    return fit_idx, val_idx
