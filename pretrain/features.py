"""Frozen-model outputs over a stack of clouds, batch by batch: the one loop behind every feature extraction.

:func:`map_clouds` runs a model in eval mode without gradients over clouds in batches, checks inputs and
outputs for non-finite values (naming the first bad cloud), reports progress and restores the model's mode;
:func:`extract_features` uses it for the pooled global features (``encoder.pool``: concat[CLS, max] with a
CLS token, else concat[max, mean]). The kNN monitor of pre-training, the probes and few-shot episodes, and
``pcpt-finetune embed`` all go through it. With deterministic FPS (``spec.fps_start`` an int) the results do
not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from datapipes.errors import UserError
from datapipes.progress import Progress
from pretrain.encoders.base import PointEncoder
from pretrain.ops.transforms import normalize_unit_sphere

__all__ = ["BatchStep", "extract_features", "map_clouds"]

#: one batch: (clouds (b, N, 3) float32 on the model's device, generator) -> named outputs, each with b rows.
BatchStep = Callable[[Tensor, torch.Generator | None], Mapping[str, Tensor]]


def map_clouds(
    model: nn.Module,
    step: BatchStep,
    clouds: np.ndarray | Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    normalize: bool = False,
    generator: torch.Generator | None = None,
    desc: str = "features",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Runs ``step`` over batches of clouds with ``model`` frozen and concatenates its outputs.

    ``model`` is moved to ``device`` (it stays there) and switched to eval mode (BatchNorm running
    statistics, no dropout or drop-path) for the duration; its previous mode is restored afterwards. No
    gradients are recorded. Each batch is copied to float32 (a memory-mapped array is read batch by batch).

    Args:
        model: the module ``step`` calls.
        step: computes the outputs of one batch (see :data:`BatchStep`).
        clouds: (S, N, 3) clouds, numpy (also memory-mapped) or torch.
        batch_size: clouds per batch, ``>= 1``.
        device: where to run.
        normalize: unit-sphere normalise each cloud first (``pretrain.ops.normalize_unit_sphere``).
        generator: passed to every ``step`` call (random FPS starts draw from it).
        desc: progress label.
        progress: report progress on stderr when there is more than one batch (a bar on a terminal,
            periodic lines otherwise).

    Returns:
        Output name -> numpy array with S rows: floating outputs as float32, integer outputs as int64. Empty
        (no names) when S = 0.

    Raises:
        ValueError: ``clouds`` is not (S, N, 3) or ``batch_size < 1``.
        UserError: non-finite coordinates, or non-finite outputs (e.g. coordinates too large for float32
            arithmetic); the message names the first bad cloud.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(clouds.shape) != 3 or clouds.shape[-1] != 3:
        raise ValueError(f"xyz must have shape (S, N, 3), got {tuple(clouds.shape)}")
    total = int(clouds.shape[0])
    parts: dict[str, list[np.ndarray]] = {}
    was_training = model.training
    model.to(device)
    model.eval()
    try:
        with (
            torch.no_grad(),
            Progress(total, desc, "cloud", disable=not progress or total <= batch_size) as bar,
        ):
            for start in range(0, total, batch_size):
                xyz = _float_batch(clouds, start, batch_size).to(device)
                outputs = step(normalize_unit_sphere(xyz) if normalize else xyz, generator)
                for name, value in outputs.items():
                    _refuse_non_finite(value, start, f": the model produced non-finite {name}", _HINT)
                    parts.setdefault(name, []).append(_to_numpy(value))
                bar.update(int(xyz.shape[0]))
    finally:
        model.train(was_training)
    return {name: np.concatenate(arrays, axis=0) for name, arrays in parts.items()}


def extract_features(
    encoder: PointEncoder,
    xyz: np.ndarray | Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Pooled features of every cloud, computed with the frozen encoder (see :func:`map_clouds`).

    Args:
        encoder: the encoder; moved to ``device`` (it stays there), its mode is restored.
        xyz: (S, N, 3) clouds, numpy or torch.
        batch_size: clouds per forward pass, ``>= 1``.
        device: where to run the encoder.
        progress: report progress on stderr.
        generator: only used by encoders with ``fps_start="random"``.

    Returns:
        (S, 2D) float32 numpy array, row i for cloud i.

    Raises:
        ValueError: ``xyz`` is not (S, N, 3) or ``batch_size < 1``.
        UserError: non-finite coordinates or features (the message names the first bad cloud).
    """

    def pooled(points: Tensor, gen: torch.Generator | None) -> dict[str, Tensor]:
        return {"features": encoder.pool(encoder.encode(points, generator=gen))}

    out = map_clouds(
        encoder, pooled, xyz, batch_size=batch_size, device=device, generator=generator, progress=progress
    )
    return out.get("features", np.zeros((0, int(encoder.pooled_dim)), dtype=np.float32))


def _float_batch(clouds: np.ndarray | Tensor, start: int, size: int) -> Tensor:
    """Clouds ``start : start + size`` as float32 (a copy of numpy input), refused if not finite.

    Shapes: (b, N, 3).

    Raises:
        UserError: a non-finite coordinate (the first such cloud is named).
    """
    chunk = clouds[start : start + size]
    if isinstance(chunk, Tensor):
        xyz = chunk.to(torch.float32)
    else:
        xyz = torch.from_numpy(np.array(chunk, dtype=np.float32))  # a writable copy
    _refuse_non_finite(xyz, start, " has non-finite coordinates")
    return xyz


#: why a model's outputs may be non-finite for finite input.
_HINT = "coordinates too large for float32 arithmetic? normalise the clouds to the unit sphere"


def _refuse_non_finite(values: Tensor, start: int, problem: str, hint: str = "") -> None:
    """Raises ``UserError("cloud {start + row}{problem} ({hint})")`` for the first non-finite row.

    Shapes:
        values: (b, ...), row i for cloud ``start + i``.
    """
    if not values.is_floating_point():
        return
    finite_rows = torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    if bool(finite_rows.all()):
        return
    bad = start + int(torch.nonzero(~finite_rows)[0, 0])
    raise UserError(f"cloud {bad}{problem}" + (f" ({hint})" if hint else ""))


def _to_numpy(value: Tensor) -> np.ndarray:
    """float32 for floating tensors, int64 otherwise, on the CPU."""
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value.long()).numpy()
