"""Frozen parts that an encoder uses but does not save: the state-dict hooks that leave them out.

Parameter-efficient encoders (``any2point``, ``point_adapter``) hold a large frozen model (a source
transformer, a pre-trained pcpt encoder) that is named by a file and its sha256 instead of being copied into
every artifact and checkpoint, and may share one module between several places. :func:`leave_out_of_state`
registers the two hooks that make this transparent: ``state_dict`` drops the listed keys, and loading puts
them back into the incoming dict (the live frozen tensors, or the saved copy of a shared module), so strict
loads (Lightning's resume, artifacts) accept a state without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["leave_out_of_state", "own_tensors"]


def own_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers of ``module`` by every name they have, detached (read past the hooks)."""
    named: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return {key: value.detach() for key, value in named.items()}


class _DropKeys:
    """``state_dict`` post-hook: removes the left-out keys (a plain object, so modules still pickle)."""

    def __init__(self, aliases: Mapping[str, str]) -> None:
        self.aliases = dict(aliases)

    def __call__(self, owner: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
        for key in self.aliases:
            state.pop(prefix + key, None)


class _FillKeys:
    """``load_state_dict`` pre-hook: puts the left-out keys back.

    A frozen tensor comes from the module itself, a shared module's copy from its saved key.
    """

    def __init__(self, aliases: Mapping[str, str]) -> None:
        self.aliases = dict(aliases)

    def __call__(self, owner: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        own = own_tensors(owner)
        for key, saved in self.aliases.items():
            if prefix + key not in state:
                state[prefix + key] = state.get(prefix + saved, own[key]) if saved else own[key]


def leave_out_of_state(module: nn.Module, aliases: Mapping[str, str]) -> None:
    """Leaves keys out of ``module.state_dict()`` and fills them back in when loading.

    Args:
        module: the module whose state dict changes (keys are relative to it).
        aliases: key left out -> the saved key it duplicates (a module shared under two names), or ``""``
            for a frozen tensor, which loading takes from the module itself.

    Hooks are module-level callables (not closures), so the module still pickles (``ddp_spawn``,
    ``torch.save`` of a whole model).
    """
    module.register_state_dict_post_hook(_DropKeys(aliases))
    module.register_load_state_dict_pre_hook(_FillKeys(aliases))
