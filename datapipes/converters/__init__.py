"""Raw dataset -> shard converters (``pcpt-data convert FORMAT SRC OUT``).

One module per format family; every converter lists work items and reads one item, and the shared driver
in :mod:`datapipes.converters.base` does the rest (sampling, normalisation, normals, FPS order, sharding,
resume). :data:`CONVERTERS` maps each format name to its converter class.
"""

from __future__ import annotations

from datapipes.converters import h5, hf, lidar, meshes, npy, text
from datapipes.converters.base import (
    Converter,
    ConvertOptions,
    ConvertReport,
    Plan,
    RawCloud,
    Reject,
    WorkItem,
    convert,
    process_item,
)
from datapipes.errors import UserError

CONVERTERS: dict[str, type[Converter]] = {
    cls.name: cls for module in (npy, meshes, text, h5, lidar, hf) for cls in module.FORMATS
}
"""Format name -> converter class, in the order of the design table."""

_ORDER = (
    "npy-tree",
    "modelnet-off",
    "modelnet-resampled",
    "modelnet-h5",
    "shapenet55",
    "scanobjectnn",
    "mesh-folder",
    "kitti",
    "hf",
)
CONVERTERS = {name: CONVERTERS[name] for name in _ORDER}


def get_converter(name: str) -> Converter:
    """Returns a converter instance by format name.

    Raises:
        UserError: unknown format (the message lists the known ones).
    """
    try:
        return CONVERTERS[name]()
    except KeyError:
        raise UserError(f"unknown format {name!r}; choose one of: {', '.join(CONVERTERS)}") from None


__all__ = [
    "CONVERTERS",
    "ConvertOptions",
    "ConvertReport",
    "Converter",
    "Plan",
    "RawCloud",
    "Reject",
    "WorkItem",
    "convert",
    "get_converter",
    "process_item",
]
