"""Image views of converted samples: ``--render-views K`` rendering and the manifest's ``images`` entry.

With ``--render-views K`` every sample gets ``K`` PNG views ``img.0.png`` ... ``img.<K-1>.png`` of
``--render-size`` pixels, rendered in the per-item worker function (so ``--workers`` and ``--engine ray``
give the same bytes) by :mod:`datapipes.render` from the cameras of a :class:`~datapipes.render.CameraRing`
around the format's up axis (``--render-up``): a mesh item is ray-cast from its mesh (``mesh_render``), a
point item is splatted from its stored points, shaded by its normals when the sample stores normals, by
depth otherwise (``point_splat``). The views show the object in the unit-sphere frame of its stored cloud
(centred on the centroid, farthest point at distance 1, as ``--normalize`` stores it), so
:meth:`~datapipes.render.Camera.project` of a stored (normalised) cloud gives each point's pixel.

The manifest records where images come from: ``"images": {"views": K, "size": S, "source": "mesh_render" |
"point_splat" | "rendering", ...}`` (plus, for rendered views, the up axis and camera ring); each rendered
sample's ``meta.image_source`` says how its own views were made (``mesh-folder`` may mix meshes and
point-cloud ``.ply`` files).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, cast

import numpy as np

from datapipes.converters.base import Converter, ConvertOptions, Plan
from datapipes.errors import UserError
from datapipes.geometry import normalize_unit_sphere
from datapipes.render import CameraRing, UpAxis, render_mesh_views, splat_points
from datapipes.shards.codecs import encode_png

__all__ = [
    "IMAGE_SOURCES",
    "MAX_RENDER_VIEWS",
    "RENDER_SIZE_RANGE",
    "images_entry",
    "render_item",
    "render_ring",
    "resolve_render_options",
]

IMAGE_SOURCES = ("mesh_render", "point_splat", "rendering")
"""Values of the manifest's ``images.source``: rendered meshes, splatted points, the source's own."""
MAX_RENDER_VIEWS = 64
"""Largest ``--render-views``."""
RENDER_SIZE_RANGE = (16, 1024)
"""Smallest and largest ``--render-size``."""


def resolve_render_options(
    converter: Converter, options: ConvertOptions, *, size_given: bool, up_given: str | None
) -> ConvertOptions:
    """Checks the image options against the format and fills in the format's up axis.

    Args:
        converter: the format.
        options: options with ``render_views`` and ``render_size`` set.
        size_given: ``--render-size`` was given.
        up_given: the ``--render-up`` value, if given.

    Returns:
        The options with ``render_up`` set (``None`` when nothing is rendered).

    Raises:
        UserError: an image option out of range, given without ``--render-views``, or ``--render-views``
            for a format that cannot render (scenes, formats with their own images).
    """
    views, size = options.render_views, options.render_size
    if not 0 <= views <= MAX_RENDER_VIEWS:
        raise UserError(f"--render-views must be in [0, {MAX_RENDER_VIEWS}], got {views}")
    low, high = RENDER_SIZE_RANGE
    if not low <= size <= high:
        raise UserError(f"--render-size must be in [{low}, {high}], got {size}")
    if up_given is not None and up_given not in ("x", "y", "z"):
        raise UserError(f"--render-up must be x, y or z, got {up_given!r}")
    if not views:
        if size_given or up_given is not None:
            flag = "--render-size" if size_given else "--render-up"
            raise UserError(f"{flag} needs --render-views K (K >= 1)")
        return replace(options, render_up=None)
    if converter.render_source is None:
        raise UserError(
            f"--render-views does not apply to format {converter.name!r} "
            "(scenes are not rendered, and formats with their own images store those)"
        )
    return replace(options, render_up=up_given or converter.render_up)


def render_ring(options: ConvertOptions) -> CameraRing:
    """The camera ring of ``--render-views`` (the default ring about ``options.render_up``)."""
    return CameraRing(up=cast(UpAxis, options.render_up or "y"))


def images_entry(converter: Converter, options: ConvertOptions, plan: Plan) -> dict[str, Any] | None:
    """The manifest's ``images`` entry: rendered views (``--render-views``), the source's own, or ``None``."""
    if options.render_views:
        ring = render_ring(options)
        return {
            "views": options.render_views,
            "size": options.render_size,
            "source": converter.render_source,
            "format": "png",
            "channels": 3,
            "camera": {"model": "ring", **asdict(ring)},
        }
    return None if plan.images is None else dict(plan.images)


def render_item(
    xyz: np.ndarray,
    normal: np.ndarray | None,
    mesh: tuple[np.ndarray, np.ndarray] | None,
    frame: tuple[np.ndarray, float] | None,
    options: ConvertOptions,
) -> tuple[list[bytes], str]:
    """Renders the ``--render-views`` PNG views of one item.

    Args:
        xyz: the stored cloud ``(N, 3)``.
        normal: its stored normals, if any (shading of splats).
        mesh: the item's mesh ``(vertices, faces)`` in source coordinates, if it has one.
        frame: ``(centre, scale)`` that normalised the source into ``xyz`` (``--normalize``), or ``None``
            when ``xyz`` is in source coordinates.
        options: conversion options (``render_views``, ``render_size``, ``render_up``).

    Returns:
        ``(PNG bytes per view, "mesh_render" | "point_splat")``.

    Raises:
        ValueError: a mesh or cloud the renderer cannot use.
    """
    pts = np.asarray(xyz, dtype=np.float64)
    if frame is None:
        _, centre, scale = normalize_unit_sphere(pts)
        centre = np.asarray(centre, dtype=np.float64)
        pts = (pts - centre) / scale
    else:
        centre, scale = np.asarray(frame[0], dtype=np.float64), float(frame[1])
    ring = render_ring(options)
    views, size = options.render_views, options.render_size
    if mesh is not None:
        vertices = (np.asarray(mesh[0], dtype=np.float64) - centre) / scale
        images = render_mesh_views(vertices, mesh[1], views=views, size=size, ring=ring, normalize=False)
        source = "mesh_render"
    else:
        images = splat_points(pts, views=views, size=size, normals=normal, ring=ring, normalize=False)
        source = "point_splat"
    return [encode_png(image) for image in images], source
