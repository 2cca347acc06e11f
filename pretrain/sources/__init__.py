"""Frozen source transformers from other modalities (Any2Point), loaded offline from local files.

:func:`load_source` reads a BERT (Hugging Face), OpenAI CLIP text or DINOv2 / timm ViT checkpoint into a
frozen :class:`SourceTransformer` made of pcpt's own blocks (key remaps in :mod:`pretrain.sources.layouts`);
:func:`write_random_source` writes small random files in the same layouts for tests and tiny configs.
"""

from pretrain.sources.layouts import LAYOUTS, Remapped, SourceError, SourceLayout, SourceSpec, remap
from pretrain.sources.source import SourceTransformer, load_source, read_source_state, source_info
from pretrain.sources.synthetic import random_source_state, write_random_source, write_torchscript_state

__all__ = [
    "LAYOUTS",
    "Remapped",
    "SourceError",
    "SourceLayout",
    "SourceSpec",
    "SourceTransformer",
    "load_source",
    "random_source_state",
    "read_source_state",
    "remap",
    "source_info",
    "write_random_source",
    "write_torchscript_state",
]
