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
    process_items,
)
from datapipes.errors import UserError

CONVERTERS: dict[str, type[Converter]] = {
    cls.name: cls
    for cls in (
        npy.NpyTree,
        meshes.ModelNetOff,
        text.ModelNetResampled,
        h5.ModelNetH5,
        npy.ShapeNet55,
        h5.ScanObjectNN,
        meshes.MeshFolder,
        lidar.Kitti,
        hf.HuggingFace,
    )
}
"""Format name -> converter class, in the order of the design table."""


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
    "process_items",
]
