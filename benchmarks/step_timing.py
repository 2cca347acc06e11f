"""Timing of training steps shared by the step benchmarks: warm-up, device sync, samples/s, peak memory."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(
    step: Callable[[int], object], *, batch_size: int, steps: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Runs ``step(i)`` ``warmup`` times, then times ``steps`` more (synchronising CUDA around the timing).

    Returns:
        ``{"samples_per_s", "s_per_step", "peak_memory_mb"}`` (peak memory since the CUDA stats reset here).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {
        "samples_per_s": batch_size * steps / elapsed,
        "s_per_step": elapsed / steps,
        "peak_memory_mb": peak_memory_mb(device),
    }
