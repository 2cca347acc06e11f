"""The Point-BERT discrete VAE tokenizer (Yu et al., CVPR 2022) and its ``dvae_tokenizer`` artifact.

:class:`DiscreteVAE` turns each of the ``G`` patches of a cloud into one of ``V`` codebook entries:
mini-PointNet per patch (``encoder``) → DGCNN over the patch centres (``dgcnn_1``) giving logits over the
codebook → Gumbel-softmax (soft while training, straight-through one-hot at evaluation) → codebook
mixture → second DGCNN (``dgcnn_2``) → FoldingNet-style decoder (``decoder``) reconstructing every patch in
centre-relative coordinates. Token ids for masked point modelling are the argmax of the ``dgcnn_1`` logits
(no noise).

Parameter names follow the official ``DiscreteVAE`` (``codebook``, ``encoder.first_conv.*``,
``dgcnn_1.input_trans.*``, ``dgcnn_1.layer{1..5}.*``, ``dgcnn_2.*``, ``decoder.mlp.*``,
``decoder.final_conv.*``), so an official checkpoint loads after stripping the DataParallel ``module.``
prefix.

The artifact is a directory like an encoder artifact (``encoder.safetensors`` + ``encoder.json``) with
``"kind": "dvae_tokenizer"`` and the :class:`DVAESpec` as ``spec``; this module registers that kind, so the
one artifact writer and loader of ``pretrain.artifacts`` handle it (:func:`load_dvae` is the loader
with the kind and the class checked).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.artifacts import ArtifactError, ArtifactKind, load_artifact, register_artifact_kind
from pretrain.encoders.spec import PlainData, check_fps_start, check_positive_int
from pretrain.encoders.tokenizer import group_by_spec
from pretrain.nn.dgcnn import DGCNN, OFFICIAL_DGCNN_DIMS
from pretrain.nn.folding import FoldingDecoder
from pretrain.nn.pointnet import MiniPointNet
from pretrain.ops import PatchGroups

__all__ = [
    "DVAE_KIND",
    "DVAEOutput",
    "DVAESpec",
    "DiscreteVAE",
    "gumbel_softmax",
    "infer_dvae_spec",
    "load_dvae",
]

DVAE_KIND = "dvae_tokenizer"


@dataclass(frozen=True)
class DVAESpec(PlainData):
    """Architecture of a :class:`DiscreteVAE`; everything needed to rebuild it.

    The defaults are the official ``cfgs/ShapeNet55_models/dvae.yaml``.

    Attributes:
        num_groups: patches G per cloud (64 for 1024 points).
        group_size: points K per patch (32); also the fine points decoded per patch, a multiple of 4.
        tokenizer_dim: mini-PointNet output width (``encoder_dims``, 256).
        codebook_size: codebook entries V (``num_tokens``, 8192).
        token_dim: codebook entry width (``tokens_dims``, 256).
        decoder_dim: ``dgcnn_2`` output width fed to the decoder (``decoder_dims``, 256).
        dgcnn_k: neighbours per centre in both DGCNNs, the centre included (4).
        dgcnn_dims: DGCNN widths: input transform, then the edge convolutions (128, 256, 512, 512, 1024).
        decoder_hidden_dim: width of the decoder's coarse MLP (1024).
        fold_dim: width of the decoder's folding convolutions (512).
        fps_start: index of the first FPS centre, or ``"random"``.
        fps_skip_near_origin: pointnet2 FPS parity (never pick points with x²+y²+z² ≤ 1e-3 after the first).
    """

    num_groups: int = 64
    group_size: int = 32
    tokenizer_dim: int = 256
    codebook_size: int = 8192
    token_dim: int = 256
    decoder_dim: int = 256
    dgcnn_k: int = 4
    dgcnn_dims: tuple[int, ...] = OFFICIAL_DGCNN_DIMS
    decoder_hidden_dim: int = 1024
    fold_dim: int = 512
    fps_start: int | Literal["random"] = 0
    fps_skip_near_origin: bool = True

    tuple_fields: ClassVar[tuple[str, ...]] = ("dgcnn_dims",)

    def __post_init__(self) -> None:
        names = (
            "num_groups",
            "group_size",
            "tokenizer_dim",
            "codebook_size",
            "token_dim",
            "decoder_dim",
            "dgcnn_k",
            "decoder_hidden_dim",
            "fold_dim",
        )
        for name in names:
            check_positive_int(name, getattr(self, name))
        if isinstance(self.dgcnn_dims, list):
            object.__setattr__(self, "dgcnn_dims", tuple(self.dgcnn_dims))
        if len(self.dgcnn_dims) < 2 or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.dgcnn_dims
        ):
            raise ValueError(f"dgcnn_dims must be >= 2 positive ints, got {self.dgcnn_dims!r}")
        if self.group_size % 4:
            raise ValueError(f"group_size must be a multiple of 4 (2x2 folding), got {self.group_size}")
        if self.dgcnn_k > self.num_groups:
            raise ValueError(f"dgcnn_k={self.dgcnn_k} must be <= num_groups={self.num_groups}")
        check_fps_start(self.fps_start)


torch.serialization.add_safe_globals([DVAESpec])


def gumbel_softmax(
    logits: Tensor, temperature: float, *, hard: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Gumbel-softmax over the last axis with an explicit random source (``F.gumbel_softmax`` semantics).

    ``softmax((logits + g) / temperature)`` with ``g = -log(e)``, ``e ~ Exp(1)``; with ``hard`` the forward
    value is the one-hot of its argmax and the gradient is the soft one's (straight-through).

    Args:
        logits: unnormalised log-probabilities.
        temperature: softmax temperature, ``> 0``.
        hard: return straight-through one-hot samples.
        generator: random source (its device is where the noise is drawn); None uses torch's default.

    Shapes:
        logits: (..., V). returns: (..., V).

    Raises:
        ValueError: a non-positive temperature.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = generator.device if generator is not None else logits.device
    exp = torch.empty(logits.shape, dtype=logits.dtype, device=device).exponential_(generator=generator)
    soft = F.softmax((logits - exp.log().to(logits.device)) / temperature, dim=-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


@dataclass
class DVAEOutput:
    """What :meth:`DiscreteVAE.forward` returns.

    Attributes:
        logits: (B, G, V) codebook logits of ``dgcnn_1``.
        codes: (B, G, V) the (soft or straight-through one-hot) codebook weights used.
        coarse: (B, G, K/4, 3) coarse reconstruction per patch, centre-relative.
        fine: (B, G, K, 3) fine reconstruction per patch, centre-relative.
    """

    logits: Tensor
    codes: Tensor
    coarse: Tensor
    fine: Tensor


class DiscreteVAE(nn.Module):
    """Point-BERT's discrete VAE, built from a :class:`DVAESpec`.

    Args:
        spec: the architecture.
    """

    def __init__(self, spec: DVAESpec) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = MiniPointNet(spec.tokenizer_dim)
        self.dgcnn_1 = DGCNN(spec.tokenizer_dim, spec.codebook_size, k=spec.dgcnn_k, dims=spec.dgcnn_dims)
        self.codebook = nn.Parameter(torch.randn(spec.codebook_size, spec.token_dim))
        self.dgcnn_2 = DGCNN(spec.token_dim, spec.decoder_dim, k=spec.dgcnn_k, dims=spec.dgcnn_dims)
        self.decoder = FoldingDecoder(
            spec.decoder_dim, spec.group_size, hidden_dim=spec.decoder_hidden_dim, fold_dim=spec.fold_dim
        )

    def group(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PatchGroups:
        """Splits clouds (B, N, 3) into the spec's G patches of K points (FPS centres + kNN)."""
        return group_by_spec(xyz, self.spec, generator=generator)

    def logits(self, neighborhoods: Tensor, centers: Tensor) -> Tensor:
        """Codebook logits. Shapes: neighborhoods (B, G, K, 3), centers (B, G, 3) -> (B, G, V)."""
        out: Tensor = self.dgcnn_1(self.encoder(neighborhoods), centers)
        return out

    def token_ids(self, neighborhoods: Tensor, centers: Tensor) -> Tensor:
        """Deterministic token ids (argmax of the logits, no noise). Shapes: -> (B, G) long."""
        return self.logits(neighborhoods, centers).argmax(dim=-1)

    @torch.no_grad()
    def discrete_tokens(
        self, xyz: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[PatchGroups, Tensor]:
        """Groups clouds (B, N, 3) and returns ``(groups, token ids (B, G))``, without gradients."""
        groups = self.group(xyz, generator=generator)
        return groups, self.token_ids(groups.neighborhoods, groups.centers)

    def decode(self, codes: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstructs patches from codebook weights.

        Args:
            codes: (B, G, V) weights over the codebook (one-hot for hard codes).
            centers: (B, G, 3) patch centres (the DGCNN graph).

        Returns:
            ``(coarse (B, G, K/4, 3), fine (B, G, K, 3))``, centre-relative.
        """
        embedded = codes @ self.codebook  # (B, G, token_dim)
        return self.decoder(self.dgcnn_2(embedded, centers))

    def forward(
        self,
        neighborhoods: Tensor,
        centers: Tensor,
        *,
        temperature: float = 1.0,
        hard: bool = False,
        generator: torch.Generator | None = None,
    ) -> DVAEOutput:
        """Encodes patches to codebook logits, samples codes with Gumbel-softmax and decodes them.

        Args:
            neighborhoods: (B, G, K, 3) centre-relative patch points.
            centers: (B, G, 3) patch centres.
            temperature: Gumbel-softmax temperature.
            hard: straight-through one-hot codes (evaluation) instead of soft ones (training).
            generator: random source of the Gumbel noise.

        Returns:
            :class:`DVAEOutput` with logits, codes, coarse and fine reconstructions.
        """
        logits = self.logits(neighborhoods, centers)
        codes = gumbel_softmax(logits, temperature, hard=hard, generator=generator)
        coarse, fine = self.decode(codes, centers)
        return DVAEOutput(logits=logits, codes=codes, coarse=coarse, fine=fine)


# ------------------------------------------------------------------------------------------- artifacts


def _summary(meta: Mapping[str, Any]) -> str:
    spec = meta.get("spec", {})
    return (
        f"dVAE tokenizer, {spec.get('codebook_size')} codes of width {spec.get('token_dim')}, "
        f"{spec.get('num_groups')} groups of {spec.get('group_size')}, "
        f"{meta.get('num_params', 0):,} parameters"
    )


register_artifact_kind(
    ArtifactKind(
        name=DVAE_KIND,
        module_class=DiscreteVAE,
        parse_spec=DVAESpec.from_dict,
        build=DiscreteVAE,
        summary=_summary,
    )
)


def load_dvae(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> tuple[DiscreteVAE, dict[str, Any]]:
    """Rebuilds a :class:`DiscreteVAE` from a ``dvae_tokenizer`` artifact and loads it strictly.

    Returns:
        (dVAE in eval mode, metadata).

    Raises:
        ArtifactError: unreadable artifact, wrong kind or invalid spec.
        WeightsMismatchError: missing, unexpected or mis-shaped weights (named in the message).
    """
    module, meta = load_artifact(path, kind=DVAE_KIND, map_location=map_location)
    if not isinstance(module, DiscreteVAE):
        raise ArtifactError(f"{path}: the artifact does not hold a DiscreteVAE")
    return module.eval(), meta


def _max_layer(state: Mapping[str, Tensor], prefix: str) -> int:
    found = [
        int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}layer(\d+)\.0\.weight$", k))
    ]
    if not found:
        raise ValueError(f"cannot infer the dVAE spec: no {prefix}layer*.0.weight tensors")
    return max(found)


def infer_dvae_spec(
    state: Mapping[str, Tensor], *, num_groups: int = 64, group_size: int | None = None, dgcnn_k: int = 4
) -> DVAESpec:
    """Infers a :class:`DVAESpec` from weights in the official / pcpt key layout.

    Widths, codebook size and depth of the DGCNNs come from tensor shapes; the group size is the decoder's
    fine point count (4 × coarse). The number of groups and ``k`` are not stored in weights. FPS settings are
    the official ones (start 0, near-origin skip).

    Args:
        state: ``DiscreteVAE`` weights (no ``module.`` prefix).
        num_groups: patches per cloud.
        group_size: expected points per patch; checked against the decoder when given.
        dgcnn_k: DGCNN neighbours.

    Raises:
        ValueError: missing tensors or inconsistent shapes (a ``group_size`` the decoder does not produce).
    """
    required = (
        "codebook",
        "encoder.second_conv.3.weight",
        "dgcnn_1.input_trans.weight",
        "dgcnn_2.input_trans.weight",
        "decoder.mlp.0.weight",
        "decoder.mlp.4.weight",
        "decoder.final_conv.0.weight",
    )
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"cannot infer the dVAE spec: missing tensors {missing}")
    last = _max_layer(state, "dgcnn_1.")
    dims = [int(state["dgcnn_1.input_trans.weight"].shape[0])]
    dims += [int(state[f"dgcnn_1.layer{i}.0.weight"].shape[0]) for i in range(1, last)]
    inferred_group = 4 * int(state["decoder.mlp.4.weight"].shape[0]) // 3
    if group_size is not None and group_size != inferred_group:
        raise ValueError(
            f"group_size={group_size} does not match the decoder, which produces {inferred_group} points "
            "per patch"
        )
    codebook_size, token_dim = (int(s) for s in state["codebook"].shape)
    return DVAESpec(
        num_groups=num_groups,
        group_size=inferred_group,
        tokenizer_dim=int(state["encoder.second_conv.3.weight"].shape[0]),
        codebook_size=codebook_size,
        token_dim=token_dim,
        decoder_dim=int(state[f"dgcnn_2.layer{_max_layer(state, 'dgcnn_2.')}.0.weight"].shape[0]),
        dgcnn_k=dgcnn_k,
        dgcnn_dims=tuple(dims),
        decoder_hidden_dim=int(state["decoder.mlp.0.weight"].shape[0]),
        fold_dim=int(state["decoder.final_conv.0.weight"].shape[0]),
        fps_start=0,
        fps_skip_near_origin=True,
    )
