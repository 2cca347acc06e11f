"""The adapter options of the ``any2point`` and ``point_adapter`` families, and the adapters they build.

Both families put Any2Point's adapters on frozen transformer blocks: a bottleneck adapter on every block's
MLP branch and the any-to-3D guided adapter after every block, whose per-view local attention (``attn1``,
``norm3``) is one module pair shared by all blocks, as in the official encoder. The fields and their checks
live here once (:class:`AdapterOptions`, a base of both specs), and so do the construction
(:func:`build_adapters`) and the state-dict aliases of the shared attention
(:func:`shared_attention_aliases`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import nn

from pretrain.nn.any2point_adapter import BottleneckAdapter, GuidedAdapter, make_view_attention
from pretrain.ops.virtual_projection import NUM_VIEWS

__all__ = ["AdapterOptions", "Adapters", "build_adapters", "shared_attention_aliases"]


@dataclass(frozen=True)
class AdapterOptions:
    """Adapter fields of the any2point and point_adapter specs (a base class of both).

    Attributes:
        adapter_dim: bottleneck width of the MLP-branch adapters (0: none).
        adapter_scale: their output scale ``s``.
        adapter_dropout: their dropout.
        guided: add the any-to-3D guided adapter after every block.
        attn_dim: inner width of the guided adapters' per-view local attention (shared by all blocks).
        attn_heads: its heads.
        reduce_1d: its per-cell pooling (``"mean"`` or ``"maxmean"``).
        voxel_size: voxel size of the 3-D prior branch (in the clouds' units).
        translation: the views' z translation (TRANS; the camera distance).
        direction: the 1-D projection direction (``pos_cor``).
        cell_1d: 1-D local-attention cell length, in positions of the line the views are projected on.
        fusion_coef: scale of the guided adapters' fused view features (``coef_pro``).
    """

    adapter_dim: int = 8
    adapter_scale: float = 1.0
    adapter_dropout: float = 0.1
    guided: bool = True
    attn_dim: int = 12
    attn_heads: int = 6
    reduce_1d: Literal["mean", "maxmean"] = "mean"
    voxel_size: float = 0.16
    translation: float = -1.4
    direction: tuple[float, float, float] = (1.0, -1.0, 0.0)
    cell_1d: float = 2.0
    fusion_coef: float = 0.1

    def check_adapter_options(self) -> None:
        """Validates the adapter fields (called by the specs' ``__post_init__``).

        Raises:
            ValueError: naming the field and the bad value.
        """
        dim = self.adapter_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ValueError(f"adapter_dim must be an int >= 0, got {dim!r}")
        for name in ("attn_dim", "attn_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.reduce_1d not in ("mean", "maxmean"):
            raise ValueError(f"reduce_1d must be mean or maxmean, got {self.reduce_1d!r}")
        if len(self.direction) != 3 or not any(self.direction):
            raise ValueError(f"direction must be 3 numbers, not all zero, got {self.direction}")
        for name in ("voxel_size", "cell_1d"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")


class Adapters(NamedTuple):
    """The adapters of ``num_blocks`` blocks (see :func:`build_adapters`).

    Attributes:
        mlp: one bottleneck adapter per block (empty when ``adapter_dim`` is 0).
        attn1: the per-view local attention shared by all guided adapters (empty without them).
        norm3: its per-view LayerNorms (empty without guided adapters).
        guided: one guided adapter per block, all holding ``attn1`` / ``norm3`` (empty when not ``guided``).
    """

    mlp: list[BottleneckAdapter]
    attn1: nn.ModuleList
    norm3: nn.ModuleList
    guided: list[GuidedAdapter]


def build_adapters(options: AdapterOptions, dim: int, num_blocks: int) -> Adapters:
    """Builds the adapters of ``num_blocks`` frozen blocks of width ``dim`` as ``options`` say.

    The shared attention is created only with guided adapters (nothing to train otherwise).
    """
    mlp = [
        BottleneckAdapter(dim, options.adapter_dim, options.adapter_scale, dropout=options.adapter_dropout)
        for _ in range(num_blocks if options.adapter_dim > 0 else 0)
    ]
    if not options.guided:
        return Adapters(mlp, nn.ModuleList(), nn.ModuleList(), [])
    attn1, norm3 = make_view_attention(dim, NUM_VIEWS, options.attn_dim, options.attn_heads)
    guided = [
        GuidedAdapter(
            dim,
            attn_dim=options.attn_dim,
            attn_heads=options.attn_heads,
            coef=options.fusion_coef,
            reduce_1d=options.reduce_1d,
            attn1=attn1,
            norm3=norm3,
        )
        for _ in range(num_blocks)
    ]
    return Adapters(mlp, attn1, norm3, guided)


def shared_attention_aliases(adapters: Adapters, guided_prefixes: Iterable[str]) -> dict[str, str]:
    """State-dict aliases of the shared attention: every guided adapter's copy -> the one saved key.

    Args:
        adapters: from :func:`build_adapters`, registered as ``attn1`` / ``norm3`` on the encoder.
        guided_prefixes: where each guided adapter sits in the encoder, e.g. ``"guided.0."``.

    Returns:
        ``{"<prefix>attn1.<key>": "attn1.<key>", ...}`` for every prefix and shared tensor.
    """
    shared = [f"attn1.{key}" for key in adapters.attn1.state_dict()]
    shared += [f"norm3.{key}" for key in adapters.norm3.state_dict()]
    return {f"{prefix}{key}": key for prefix in guided_prefixes for key in shared}
