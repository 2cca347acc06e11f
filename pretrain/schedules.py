"""Learning-rate and hyper-parameter schedules as pure functions of the step.

* :func:`cosine_with_warmup` is the per-step form of the timm ``CosineLRScheduler`` configuration used by
  Point-BERT and Point-MAE (``t_initial=total, lr_min=1e-6, warmup_lr_init=1e-6, warmup_t=warmup,
  cycle_limit=1``): a linear warmup from ``warmup_init_lr`` that *replaces* the first ``warmup_steps`` of a
  single cosine running from step 0 to ``total_steps`` (timm's default ``warmup_prefix=False``), then
  ``min_lr`` from ``total_steps`` on.
* :class:`WarmupCosineLR` wraps it in a resumable :class:`torch.optim.lr_scheduler.LambdaLR` that scales
  every parameter group from its own base learning rate, with the warmup given in epochs.
* :func:`cosine_warm_restarts` is ViPFormer's ``cosine_annealing_warmup.CosineAnnealingWarmupRestarts``
  (linear warmup then cosine, restarted every cycle with the peak decayed by ``gamma``);
  :class:`CosineWarmRestartsLR` is its resumable per-step ``LambdaLR`` with the lengths given in epochs.
* :func:`cosine_ramp`, :func:`gumbel_temperature` and :func:`kl_weight` are the per-iteration schedules of the
  Point-BERT dVAE (Yu et al., CVPR 2022): Gumbel-softmax temperature 1 → 1/16 over 100k iterations and a KL
  weight that stays 0 for 10k iterations, then ramps 0 → 0.1 over 100k iterations.

The official loops step the timm scheduler once per *epoch* with ``scheduler.step(epoch)`` after the epoch;
passing the epoch index as ``step`` gives the same values. Stepping per optimizer step (``interval: step`` in
Lightning) gives the smooth version of the same curve.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "GUMBEL_TEMPERATURE_END",
    "GUMBEL_TEMPERATURE_ITERS",
    "GUMBEL_TEMPERATURE_START",
    "KL_WEIGHT_END",
    "KL_WEIGHT_RAMP_ITERS",
    "KL_WEIGHT_START_IT",
    "CosineWarmRestartsFactor",
    "CosineWarmRestartsLR",
    "WarmupCosineFactor",
    "WarmupCosineLR",
    "cosine_ramp",
    "cosine_warm_restarts",
    "cosine_with_warmup",
    "gumbel_temperature",
    "kl_weight",
]

GUMBEL_TEMPERATURE_START = 1.0
GUMBEL_TEMPERATURE_END = 1.0 / 16.0
GUMBEL_TEMPERATURE_ITERS = 100_000
KL_WEIGHT_START_IT = 10_000
KL_WEIGHT_RAMP_ITERS = 100_000
KL_WEIGHT_END = 0.1


def _check_non_negative_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_schedule(total_steps: int, warmup_steps: int) -> None:
    _check_non_negative_int("total_steps", total_steps)
    _check_non_negative_int("warmup_steps", warmup_steps)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be <= total_steps={total_steps}")


def cosine_with_warmup(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    min_lr: float = 1e-6,
    warmup_init_lr: float = 1e-6,
) -> float:
    """Learning rate at ``step`` of a linear warmup followed by a single cosine decay.

    ``lr = warmup_init_lr + step·(base_lr − warmup_init_lr)/warmup_steps`` for ``step < warmup_steps``;
    ``lr = min_lr + (base_lr − min_lr)·(1 + cos(π·step/total_steps))/2`` for
    ``warmup_steps ≤ step < total_steps``; ``min_lr`` from ``total_steps`` on. The cosine is measured from
    step 0, not from the end of the warmup (timm ``warmup_prefix=False``), so the first post-warmup value is
    slightly below ``base_lr``, exactly as in the official Point-BERT/Point-MAE runs.

    Args:
        step: optimizer step (or epoch, for the official per-epoch stepping), ``>= 0``.
        total_steps: length of the cosine cycle (timm ``t_initial``).
        warmup_steps: linear warmup length (timm ``warmup_t``); 0 disables the warmup.
        base_lr: peak learning rate.
        min_lr: final learning rate (timm ``lr_min``).
        warmup_init_lr: learning rate at step 0 of the warmup (timm ``warmup_lr_init``).

    Returns:
        The learning rate, a float.

    Raises:
        ValueError: negative ``step``, ``warmup_steps > total_steps`` or ``total_steps < 1``.
    """
    _check_non_negative_int("step", step)
    _check_schedule(total_steps, warmup_steps)
    if step < warmup_steps:
        return warmup_init_lr + step * (base_lr - warmup_init_lr) / warmup_steps
    if step >= total_steps:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * step / total_steps))


class WarmupCosineFactor:
    """Multiplicative factor of :func:`cosine_with_warmup` for one parameter group (a ``LambdaLR`` lambda).

    ``factor(step) = cosine_with_warmup(step, base_lr=base_lr, ...) / base_lr``, so ``min_lr`` and
    ``warmup_init_lr`` stay absolute values whatever the group's base learning rate. A group whose base
    learning rate is 0 stays at 0. Being a plain object (not a closure), its fields are saved in and restored
    from ``LambdaLR.state_dict()``.
    """

    def __init__(
        self,
        *,
        base_lr: float,
        total_steps: int,
        warmup_steps: int,
        min_lr: float = 1e-6,
        warmup_init_lr: float = 1e-6,
    ) -> None:
        _check_schedule(total_steps, warmup_steps)
        if base_lr < 0:
            raise ValueError(f"base_lr must be >= 0, got {base_lr}")
        self.base_lr = float(base_lr)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr = float(min_lr)
        self.warmup_init_lr = float(warmup_init_lr)

    def __call__(self, step: int) -> float:
        if self.base_lr == 0.0:
            return 0.0
        lr = cosine_with_warmup(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            base_lr=self.base_lr,
            min_lr=self.min_lr,
            warmup_init_lr=self.warmup_init_lr,
        )
        return lr / self.base_lr


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """The Point-BERT / Point-MAE schedule for every parameter group: linear warmup, then cosine (per step).

    :func:`cosine_with_warmup` with the warmup given in epochs and the run length counted from the data by
    the training module (``pretrain.optim.configure_optimization`` passes ``total_steps`` and
    ``steps_per_epoch``). Each group keeps its own peak learning rate (its ``lr`` when the schedule is built).
    Call ``step()`` once per optimizer step. Resumable through ``state_dict()``.

    Args:
        optimizer: the optimizer; its groups' ``lr`` are the peak learning rates.
        warmup_epochs: warmup length in epochs (converted with ``steps_per_epoch``; at most the run less one
            step).
        min_lr: final learning rate of every group.
        warmup_init_lr: learning rate of every group at step 0.
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch.

    Raises:
        ValueError: a missing or invalid run length, or a negative ``warmup_epochs``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_epochs: float = 10.0,
        min_lr: float = 1e-6,
        warmup_init_lr: float = 1e-6,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        if total_steps is None or steps_per_epoch is None:
            raise ValueError(
                "WarmupCosineLR needs total_steps and steps_per_epoch (the training module passes them)"
            )
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        warmup_steps = max(min(round(warmup_epochs * steps_per_epoch), total_steps - 1), 0)
        _check_schedule(total_steps, warmup_steps)
        factors: list[Any] = [
            WarmupCosineFactor(
                base_lr=float(group.get("initial_lr", group["lr"])),
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                min_lr=min_lr,
                warmup_init_lr=warmup_init_lr,
            )
            for group in optimizer.param_groups
        ]
        super().__init__(optimizer, lr_lambda=factors)


def cosine_ramp(it: int, *, start_it: int, ramp_iters: int, start_value: float, end_value: float) -> float:
    """Half-cosine from ``start_value`` to ``end_value`` between ``start_it`` and ``start_it + ramp_iters``.

    ``value = end + (start − end)·(1 + cos(π·(it − start_it)/ramp_iters))/2`` inside the ramp,
    ``start_value`` before it and ``end_value`` after it.

    Args:
        it: training iteration, ``>= 0``.
        start_it: first iteration of the ramp.
        ramp_iters: ramp length in iterations, ``>= 1``.
        start_value: value before and at the start of the ramp.
        end_value: value at the end of the ramp and afterwards.

    Returns:
        The scheduled value.

    Raises:
        ValueError: negative ``it`` or ``start_it``, or ``ramp_iters < 1``.
    """
    _check_non_negative_int("it", it)
    _check_non_negative_int("start_it", start_it)
    _check_non_negative_int("ramp_iters", ramp_iters)
    if ramp_iters < 1:
        raise ValueError(f"ramp_iters must be >= 1, got {ramp_iters}")
    t = it - start_it
    if t < 0:
        return start_value
    if t >= ramp_iters:
        return end_value
    return end_value + (start_value - end_value) * (1.0 + math.cos(math.pi * t / ramp_iters)) / 2.0


def gumbel_temperature(it: int) -> float:
    """Point-BERT dVAE Gumbel-softmax temperature at ``it``: cosine 1 → 1/16 over 100k, then 1/16."""
    return cosine_ramp(
        it,
        start_it=0,
        ramp_iters=GUMBEL_TEMPERATURE_ITERS,
        start_value=GUMBEL_TEMPERATURE_START,
        end_value=GUMBEL_TEMPERATURE_END,
    )


def kl_weight(it: int) -> float:
    """Point-BERT dVAE KL weight at iteration ``it``: 0 for 10k, cosine 0 → 0.1 over 100k, then 0.1."""
    return cosine_ramp(
        it,
        start_it=KL_WEIGHT_START_IT,
        ramp_iters=KL_WEIGHT_RAMP_ITERS,
        start_value=0.0,
        end_value=KL_WEIGHT_END,
    )


def _check_restarts(cycle_steps: int, warmup_steps: int, gamma: float, cycle_mult: float) -> None:
    _check_non_negative_int("cycle_steps", cycle_steps)
    _check_non_negative_int("warmup_steps", warmup_steps)
    if cycle_steps < 1:
        raise ValueError(f"cycle_steps must be >= 1, got {cycle_steps}")
    if warmup_steps >= cycle_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be < cycle_steps={cycle_steps}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if cycle_mult < 1:
        raise ValueError(f"cycle_mult must be >= 1, got {cycle_mult}")


def cosine_warm_restarts(
    step: int,
    *,
    cycle_steps: int,
    warmup_steps: int,
    max_lr: float,
    min_lr: float = 0.0,
    gamma: float = 1.0,
    cycle_mult: float = 1.0,
) -> float:
    """Learning rate at ``step`` of ``cosine_annealing_warmup.CosineAnnealingWarmupRestarts`` (ViPFormer).

    The package's schedule as a pure function of the step. Cycle ``c`` (from 0) lasts ``L_c`` steps:
    ``L_0 = cycle_steps`` and ``L_{c+1} = int((L_c − warmup_steps) · cycle_mult) + warmup_steps``; its peak
    is ``max_c = max_lr · gamma^c``. At step ``t`` of cycle ``c``:

    * ``t < warmup_steps``: ``min_lr + (max_c − min_lr) · t / warmup_steps`` (linear from ``min_lr``);
    * otherwise: ``min_lr + (max_c − min_lr) · (1 + cos(π (t − warmup_steps) / (L_c − warmup_steps))) / 2``,

    so the last step of a cycle is still slightly above ``min_lr`` and the next step restarts the warmup at
    ``min_lr``. (One quirk is not reproduced: with ``warmup_steps=0`` the package's constructor overwrites
    the very first learning rate with ``min_lr``; here step 0 is the formula's value, the peak.)
    ViPFormer: ``cycle_steps=100`` epochs, ``warmup_steps=5``, ``max_lr=1e-3``, ``min_lr=0``,
    ``gamma=0.6``, ``cycle_mult=1``, stepped once per epoch (three cycles in 300 epochs, peaks 1e-3, 6e-4,
    3.6e-4).

    Args:
        step: scheduler step (an epoch for the official per-epoch stepping), ``>= 0``.
        cycle_steps: length of the first cycle (the package's ``first_cycle_steps``), ``>= 1``.
        warmup_steps: warmup length of every cycle, ``< cycle_steps``.
        max_lr: peak of the first cycle.
        min_lr: start of every warmup and floor of every cosine.
        gamma: peak decay per cycle.
        cycle_mult: growth of the cosine part per cycle, ``>= 1`` (1 keeps every cycle ``cycle_steps`` long).

    Returns:
        The learning rate, a float.

    Raises:
        ValueError: negative ``step``, ``warmup_steps >= cycle_steps``, ``cycle_steps < 1``, negative
            ``gamma`` or ``cycle_mult < 1``.
    """
    _check_non_negative_int("step", step)
    _check_restarts(cycle_steps, warmup_steps, gamma, cycle_mult)
    length = cycle_steps
    if cycle_mult == 1.0:
        cycle, t = divmod(step, cycle_steps)
    else:
        cycle, t = 0, step
        while t >= length:
            t -= length
            cycle += 1
            length = int((length - warmup_steps) * cycle_mult) + warmup_steps
    peak = max_lr * gamma**cycle
    if t < warmup_steps:
        return min_lr + (peak - min_lr) * t / warmup_steps
    progress = (t - warmup_steps) / (length - warmup_steps)
    return min_lr + (peak - min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0


class CosineWarmRestartsFactor:
    """Multiplicative factor of :func:`cosine_warm_restarts` for one parameter group (a ``LambdaLR`` lambda).

    ``factor(step) = cosine_warm_restarts(step // stride, max_lr=base_lr, ...) / base_lr``: ``stride`` is 1
    for a schedule that moves every step and the steps per epoch for the official staircase (lengths then
    count epochs). ``min_lr`` stays absolute whatever the group's base learning rate; a group whose base
    learning rate is 0 stays at 0. A plain object, so its fields are saved in ``LambdaLR.state_dict()``.
    """

    def __init__(
        self,
        *,
        base_lr: float,
        cycle_steps: int,
        warmup_steps: int,
        min_lr: float = 0.0,
        gamma: float = 1.0,
        cycle_mult: float = 1.0,
        stride: int = 1,
    ) -> None:
        _check_restarts(cycle_steps, warmup_steps, gamma, cycle_mult)
        if base_lr < 0:
            raise ValueError(f"base_lr must be >= 0, got {base_lr}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        self.base_lr = float(base_lr)
        self.cycle_steps = cycle_steps
        self.warmup_steps = warmup_steps
        self.min_lr = float(min_lr)
        self.gamma = float(gamma)
        self.cycle_mult = float(cycle_mult)
        self.stride = stride

    def __call__(self, step: int) -> float:
        if self.base_lr == 0.0:
            return 0.0
        lr = cosine_warm_restarts(
            step // self.stride,
            cycle_steps=self.cycle_steps,
            warmup_steps=self.warmup_steps,
            max_lr=self.base_lr,
            min_lr=self.min_lr,
            gamma=self.gamma,
            cycle_mult=self.cycle_mult,
        )
        return lr / self.base_lr


class CosineWarmRestartsLR(torch.optim.lr_scheduler.LambdaLR):
    """ViPFormer's schedule for every parameter group: warm restarts of a linear warmup and a cosine.

    :func:`cosine_warm_restarts` (``cosine_annealing_warmup.CosineAnnealingWarmupRestarts``) with its lengths
    given in epochs and converted to optimizer steps with the ``steps_per_epoch`` the training module passes
    (``pretrain.optim.configure_optimization`` passes ``total_steps`` and ``steps_per_epoch``, as for
    :class:`WarmupCosineLR`). Each group's peak in the first cycle is its own ``lr`` when the schedule is
    built (the package has one ``max_lr`` for all groups; ViPFormer has one group). Call ``step()`` once per
    optimizer step. Resumable through ``state_dict()``.

    The cycles have a fixed length, independent of the run length (ViPFormer: 3 cycles of 100 epochs in a
    300-epoch run); ``cycle_epochs=None`` makes the whole run (``total_steps``) one cycle. The official run
    steps once per epoch (the learning rate is constant within an epoch and 0 during the first epoch);
    ``per_epoch=True`` reproduces that staircase, the default moves every step along the same curve.

    Args:
        optimizer: the optimizer; its groups' ``lr`` are the peaks of the first cycle.
        cycle_epochs: length of every cycle in epochs (cycle multiplier 1); None: one cycle over the run.
        warmup_epochs: warmup length at the start of every cycle, in epochs (at most the cycle less one step).
        min_lr: start of every warmup and floor of every cosine, for every group.
        gamma: peak decay per cycle.
        per_epoch: keep the learning rate constant within each epoch (the official per-epoch stepping;
            lengths are then rounded to whole epochs).
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch.

    Raises:
        ValueError: a missing or invalid run length, or invalid cycle lengths.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cycle_epochs: float | None = 100.0,
        warmup_epochs: float = 5.0,
        min_lr: float = 0.0,
        gamma: float = 0.6,
        per_epoch: bool = False,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        if total_steps is None or steps_per_epoch is None:
            raise ValueError(
                "CosineWarmRestartsLR needs total_steps and steps_per_epoch (the training module passes them)"
            )
        _check_non_negative_int("total_steps", total_steps)
        _check_non_negative_int("steps_per_epoch", steps_per_epoch)
        if total_steps < 1 or steps_per_epoch < 1:
            raise ValueError(
                f"total_steps and steps_per_epoch must be >= 1, got {total_steps}, {steps_per_epoch}"
            )
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if cycle_epochs is not None and not cycle_epochs > 0:
            raise ValueError(f"cycle_epochs must be > 0 or None, got {cycle_epochs}")
        units = 1 if per_epoch else steps_per_epoch  # schedule units (epochs or steps) per epoch
        stride = steps_per_epoch if per_epoch else 1
        if cycle_epochs is None:
            cycle = max(math.ceil(total_steps / stride), 1)
        else:
            cycle = max(round(cycle_epochs * units), 1)
        warmup = max(min(round(warmup_epochs * units), cycle - 1), 0)
        factors: list[Any] = [
            CosineWarmRestartsFactor(
                base_lr=float(group.get("initial_lr", group["lr"])),
                cycle_steps=cycle,
                warmup_steps=warmup,
                min_lr=min_lr,
                gamma=gamma,
                stride=stride,
            )
            for group in optimizer.param_groups
        ]
        super().__init__(optimizer, lr_lambda=factors)
