"""Raw dataset -> shard converters (``pcpt-data convert FORMAT SRC OUT``).

One module per format family; every converter implements :class:`~datapipes.converters.base.Converter`
(list the work items, read one item). The shared per-item processing (:mod:`datapipes.converters.process`:
sampling, normalisation, normals, FPS order) and the driver (:mod:`datapipes.converters.driver`: sharding,
resume, report) do the rest. :data:`CONVERTERS` maps each format name to its converter class.
"""

from __future__ import annotations

from datapipes.converters import h5, hf, las, lidar, meshes, npy, shapenet_render, text
from datapipes.converters.base import Converter, ConvertOptions, Plan, RawCloud, Reject, WorkItem
from datapipes.converters.driver import ConvertReport, convert, resolve_options
from datapipes.converters.process import is_rejection, process_item, process_items
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
        las.Las,
        shapenet_render.ShapeNetRender,
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
    "is_rejection",
    "process_item",
    "process_items",
    "resolve_options",
]
