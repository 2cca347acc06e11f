"""Optimisation in one place: parameter groups, the default optimiser, and wiring injected optimisers.

Training modules take the optimiser and the learning-rate schedule as callables, the LightningCLI way
(``optimizer: OptimizerCallable``, ``lr_scheduler: LRSchedulerCallable``, given in the YAML as
``class_path`` + ``init_args``). :func:`configure_optimization` builds both for a module: the optimiser over
:func:`param_groups`, the schedule sized from the data (:func:`training_steps`), stepped every optimiser step.
The defaults are the Point-BERT / Point-MAE recipe: :class:`AdamW` (lr 1e-3, weight decay 0.05) and
``pretrain.schedules.WarmupCosineLR``.

The official builder (``tools/builder.py:build_opti_sche``, identical in both repositories) puts a parameter
into the no-decay group when it is 1-D, when its name ends in ``.bias``, or when its name contains ``token``.
So ``cls_token`` and ``mask_token`` are not decayed, while ``cls_pos`` (shape 1×1×C) and the ``pos_embed``
Linear weights are. GeoMAE additionally excludes names containing ``norm``; pass ``no_decay_names=("norm",)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "AdamW",
    "configure_optimization",
    "is_no_decay",
    "param_groups",
    "split_decay_names",
    "training_steps",
]

OFFICIAL_NO_DECAY_SUBSTRINGS: tuple[str, ...] = ("token",)


def is_no_decay(name: str, ndim: int, *, no_decay_names: Iterable[str] = ()) -> bool:
    """Whether the parameter ``name`` with ``ndim`` dimensions is excluded from weight decay.

    Args:
        name: fully qualified parameter name, as yielded by ``named_parameters()``.
        ndim: number of dimensions of the parameter.
        no_decay_names: extra substrings that exclude a name (e.g. ``("norm",)``); ``token`` always does.

    Returns:
        True for 1-D parameters, names ending in ``.bias`` (or equal to ``bias``), parameters whose own name
        (the last dotted component) contains ``token``, and names containing one of ``no_decay_names``. 0-D
        scalars (absent from the official models) count as 1-D, like timm's ``param.ndim <= 1``.

    The official rule tests ``token`` against the whole name, where it only ever matches ``cls_token`` and
    ``mask_token``; pcpt's patch embedding lives in a module named ``tokenizer`` (the official ``encoder``),
    whose weights the official rule decays, so the test is on the parameter's own name.
    """
    if ndim <= 1 or name.endswith(".bias") or name == "bias":
        return True
    own_name = name.rsplit(".", 1)[-1]
    if any(sub in own_name for sub in OFFICIAL_NO_DECAY_SUBSTRINGS):
        return True
    return any(sub in name for sub in no_decay_names)


def split_decay_names(model: nn.Module, *, no_decay_names: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Names of trainable parameters that are decayed and that are not, in ``named_parameters()`` order.

    Parameters with ``requires_grad=False`` are left out of both lists.

    Args:
        model: the module.
        no_decay_names: extra substrings that exclude a name from weight decay.

    Returns:
        ``(decay, no_decay)`` lists of parameter names.
    """
    extra = tuple(no_decay_names)
    decay: list[str] = []
    no_decay: list[str] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param.ndim, no_decay_names=extra) else decay).append(name)
    return decay, no_decay


def param_groups(
    model: nn.Module, weight_decay: float | None = None, *, no_decay_names: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: decayed, and not decayed (``weight_decay=0``).

    Frozen parameters (``requires_grad=False``) are skipped; an empty group is left out. Each group carries a
    ``"group"`` key (``"decay"`` or ``"no_decay"``) for logging; torch optimizers keep extra keys.

    Args:
        model: the module whose parameters are optimized.
        weight_decay: decay of the first group, ``>= 0``; None leaves it to the optimiser's own setting.
        no_decay_names: extra substrings that exclude a name from weight decay (official rule: 1-D,
            ``.bias``, ``token``; GeoMAE adds ``"norm"``).

    Returns:
        A list of one or two dicts with ``params`` (and ``weight_decay`` where set), ready for an optimiser.

    Raises:
        ValueError: negative ``weight_decay`` or a model without trainable parameters.
    """
    if weight_decay is not None and weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay_names, no_decay_names_list = split_decay_names(model, no_decay_names=no_decay_names)
    if not decay_names and not no_decay_names_list:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    params = dict(model.named_parameters())
    groups: list[dict[str, Any]] = []
    if decay_names:
        group: dict[str, Any] = {"params": [params[n] for n in decay_names], "group": "decay"}
        if weight_decay is not None:
            group["weight_decay"] = float(weight_decay)
        groups.append(group)
    if no_decay_names_list:
        groups.append(
            {"params": [params[n] for n in no_decay_names_list], "weight_decay": 0.0, "group": "no_decay"}
        )
    return groups


FUSED_ADAMW_DEVICES: tuple[str, ...] = ("cpu", "cuda")


def _materialised(group: Any) -> Any:
    """A parameter group whose ``params`` is a list (an iterator would be used up by inspecting it)."""
    if not isinstance(group, dict):
        return group
    inner = group["params"]
    return {**group, "params": [inner] if isinstance(inner, torch.Tensor) else list(inner)}


def _fused_supported(params: list[Any]) -> bool:
    """Whether every parameter is a floating-point tensor on a device with a fused AdamW kernel."""
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    return bool(tensors) and all(
        isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type in FUSED_ADAMW_DEVICES
        for t in tensors
    )


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with the Point-BERT / Point-MAE recipe as defaults (lr 1e-3, weight decay 0.05).

    By default the update runs as torch's fused kernel (one pass over each parameter's state instead of a
    dozen elementwise ops: 23 instead of 83 ms per step for the official Point-MAE on a 2-core CPU,
    ``docs/benchmarks.md``) wherever all parameters live on a device that has one (CPU, CUDA); it computes
    the same update as the op-by-op form up to float rounding.

    Args:
        params: parameters or parameter groups.
        lr: peak learning rate.
        weight_decay: decoupled weight decay (the no-decay group of :func:`param_groups` overrides it with 0).
        betas: Adam's moment coefficients.
        eps: Adam's epsilon.
        fused: use the fused kernel; None: when the parameters' devices support it.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
    ) -> None:
        params = [_materialised(group) for group in params]
        if fused is None:
            fused = _fused_supported(params)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)


def training_steps(trainer: pl.Trainer) -> tuple[int, int]:
    """``(optimizer steps of the whole run, optimizer steps per epoch)``, counted from the data.

    A data module with ``train_batches_per_epoch()`` (pcpt's do) gives the batches per epoch on this rank
    without building a loader, so the training loader is first built by the fit loop after a checkpoint is
    restored (which lets it resume inside an epoch). Other data modules fall back to Lightning's count of the
    training loader. ``limit_train_batches``, gradient accumulation, ``max_epochs`` and ``max_steps`` are
    applied as Lightning applies them; the run ends at whichever of the two limits comes first.

    Raises:
        ValueError: neither ``max_epochs`` nor ``max_steps`` bounds the run.
    """
    datamodule = getattr(trainer, "datamodule", None)
    counter = getattr(datamodule, "train_batches_per_epoch", None)
    if callable(counter):
        batches = int(counter())
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None and float(limit) < 1.0:
            batches = int(batches * float(limit))
    else:
        _ = trainer.estimated_stepping_batches  # builds the loader so that its length is known
        batches = int(trainer.num_training_batches)
    per_epoch = max(math.ceil(batches / max(int(trainer.accumulate_grad_batches), 1)), 1)
    limits = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        limits.append(per_epoch * int(trainer.max_epochs))
    if trainer.max_steps is not None and trainer.max_steps > 0:
        limits.append(int(trainer.max_steps))
    if not limits:
        raise ValueError("the run needs max_epochs or max_steps to size its learning-rate schedule")
    return min(limits), per_epoch


def _build_scheduler(
    factory: Callable[..., LRScheduler], optimizer: torch.optim.Optimizer, total: int, per_epoch: int
) -> LRScheduler:
    """Calls a schedule factory with the run length when it takes it (pcpt's), without otherwise."""
    try:
        return factory(optimizer, total_steps=total, steps_per_epoch=per_epoch)
    except TypeError as err:
        if "total_steps" not in str(err) and "steps_per_epoch" not in str(err):
            raise
    return factory(optimizer)


def configure_optimization(
    module: pl.LightningModule,
    optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer],
    lr_scheduler: Callable[..., LRScheduler] | None,
    *,
    no_decay_names: Iterable[str] = (),
) -> dict[str, Any]:
    """The ``configure_optimizers`` return value of every pcpt training module.

    The optimiser gets :func:`param_groups` of the module's trainable parameters (the no-decay group has
    weight decay 0, the other the optimiser's setting). The schedule is stepped every optimiser step; a
    schedule that takes ``total_steps`` and ``steps_per_epoch`` (``pretrain.schedules.WarmupCosineLR``) gets
    them from :func:`training_steps`, any other (a torch scheduler) is built with the optimiser alone.

    Args:
        module: the LightningModule, attached to its trainer.
        optimizer: parameter groups -> optimiser.
        lr_scheduler: optimiser -> schedule, or None for a constant learning rate.
        no_decay_names: extra parameter-name substrings excluded from weight decay.
    """
    built = optimizer(param_groups(module, no_decay_names=no_decay_names))
    if lr_scheduler is None:
        return {"optimizer": built}
    total, per_epoch = training_steps(module.trainer)
    scheduler = _build_scheduler(lr_scheduler, built, total, per_epoch)
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
