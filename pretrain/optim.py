"""Optimizer parameter groups with the Point-BERT / Point-MAE weight-decay exclusion rule.

The official builder (``tools/builder.py:build_opti_sche``, identical in both repositories) puts a parameter
into the no-decay group when it is 1-D, when its name ends in ``.bias``, or when its name contains ``token``.
So ``cls_token`` and ``mask_token`` are not decayed, while ``cls_pos`` (shape 1×1×C) and the ``pos_embed``
Linear weights are. GeoMAE additionally excludes names containing ``norm``; pass ``no_decay_names=("norm",)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["is_no_decay", "param_groups", "split_decay_names"]

OFFICIAL_NO_DECAY_SUBSTRINGS: tuple[str, ...] = ("token",)


def is_no_decay(name: str, ndim: int, *, no_decay_names: Iterable[str] = ()) -> bool:
    """Whether the parameter ``name`` with ``ndim`` dimensions is excluded from weight decay.

    Args:
        name: fully qualified parameter name, as yielded by ``named_parameters()``.
        ndim: number of dimensions of the parameter.
        no_decay_names: extra substrings that exclude a name (e.g. ``("norm",)``); ``token`` always does.

    Returns:
        True for 1-D parameters, names ending in ``.bias`` (or equal to ``bias``) and names containing
        ``token`` or one of ``no_decay_names``. 0-D scalars (absent from the official models) count as 1-D,
        like timm's ``param.ndim <= 1``.
    """
    if ndim <= 1 or name.endswith(".bias") or name == "bias":
        return True
    return any(sub in name for sub in (*OFFICIAL_NO_DECAY_SUBSTRINGS, *no_decay_names))


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
    model: nn.Module, weight_decay: float, *, no_decay_names: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: decayed with ``weight_decay`` and not decayed (``weight_decay=0``).

    Frozen parameters (``requires_grad=False``) are skipped; an empty group is left out. Each group carries a
    ``"group"`` key (``"decay"`` or ``"no_decay"``) for logging; torch optimizers keep extra keys.

    Args:
        model: the module whose parameters are optimized.
        weight_decay: decay of the first group, ``>= 0``.
        no_decay_names: extra substrings that exclude a name from weight decay (official rule: 1-D,
            ``.bias``, ``token``; GeoMAE adds ``"norm"``).

    Returns:
        A list of one or two dicts with ``params`` and ``weight_decay``, ready for ``torch.optim.AdamW``.

    Raises:
        ValueError: negative ``weight_decay`` or a model without trainable parameters.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay_names, no_decay_names_list = split_decay_names(model, no_decay_names=no_decay_names)
    if not decay_names and not no_decay_names_list:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    params = dict(model.named_parameters())
    groups: list[dict[str, Any]] = []
    if decay_names:
        groups.append(
            {
                "params": [params[n] for n in decay_names],
                "weight_decay": float(weight_decay),
                "group": "decay",
            }
        )
    if no_decay_names_list:
        groups.append(
            {"params": [params[n] for n in no_decay_names_list], "weight_decay": 0.0, "group": "no_decay"}
        )
    return groups
