"""Headless CPU image views of objects: meshes by ray casting (open3d), point sets by z-buffered splats.

Both renderers are pure functions of their inputs (no randomness, no global state) and share one camera
rig, :class:`CameraRing`, so an image of a mesh and an image of points sampled from it line up pixel for
pixel, and :meth:`Camera.project` / :meth:`Camera.matrix` map any 3-D point to its pixel.

Camera conventions:
    - World frame: the object's own frame, expected inside the unit sphere (the renderers centre and scale
      their input into it with ``normalize=True``, see :func:`unit_sphere_frame`). ``up`` names the world
      axis that points up (``"y"``: ShapeNet; ``"z"``: ModelNet's OFF meshes). The two other axes, in
      cyclic order after ``up`` (``up=y``: z then x; ``up=z``: x then y; ``up=x``: y then z), span the
      horizontal plane.
    - Camera ``k`` of ``K`` sits at azimuth ``azimuth_offset_deg + 360° k / K`` (0° on the first horizontal
      axis, increasing towards the second), ``elevation_deg`` above the horizontal plane, at ``distance``
      from the origin, and looks at the origin; the image's up direction is the world up axis projected
      into the image plane (no roll).
    - Camera coordinates: ``x`` right, ``y`` up, ``z`` forward (depth along the viewing direction).
    - Pinhole projection onto a square ``size × size`` image with field of view ``fov_deg`` (horizontal and
      vertical) and the principal point at the image centre: ``u = size/2 + f x/z`` (column, to the right),
      ``v = size/2 - f y/z`` (row, downwards), ``f = (size/2) / tan(fov/2)``. Pixel ``(row i, column j)``
      covers ``[j, j+1) × [i, i+1)`` in ``(u, v)``; its ray goes through its centre ``(j + 0.5, i + 0.5)``.
      The defaults (``distance`` 2.5, ``fov_deg`` 50) keep the whole unit sphere in view.

Shading: a grey-blue matte object (:data:`OBJECT_COLOR`) on a white background; Lambertian light from a
directional lamp just above and to the right of each camera (:meth:`Camera.light_direction`) plus
:data:`AMBIENT` light; surfaces are two-sided (lit on the side facing the camera). Object pixels are never
pure white, so the silhouette is ``any(channel != 255)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "AMBIENT",
    "BACKGROUND",
    "OBJECT_COLOR",
    "Camera",
    "CameraRing",
    "UpAxis",
    "render_mesh_views",
    "splat_points",
    "unit_sphere_frame",
]

UpAxis = Literal["x", "y", "z"]

AMBIENT = 0.3
"""Share of the object colour every visible surface gets, lit or not."""
OBJECT_COLOR = (0.78, 0.80, 0.86)
"""RGB albedo of the object (below 1, so object pixels are never the white background)."""
BACKGROUND = 255
"""Grey level of the background (white)."""
_LIGHT_OFFSET = (0.3, 0.5)
"""Light direction in camera coordinates: ``(right, up)`` offsets from the direction back to the camera."""
_AXES = {"x": 0, "y": 1, "z": 2}


@dataclass(frozen=True, eq=False)
class Camera:
    """One pinhole camera (see the module docstring for the conventions).

    Attributes:
        eye: ``(3,)`` camera centre in world coordinates.
        rotation: ``(3, 3)`` world-to-camera rotation; its rows are the camera's right, up and forward axes
            in world coordinates.
        focal: focal length in pixels.
        size: image side in pixels.
    """

    eye: np.ndarray
    rotation: np.ndarray
    focal: float
    size: int

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """World ``(N, 3)`` points in camera coordinates (x right, y up, z forward), float64."""
        return (np.asarray(points, dtype=np.float64).reshape(-1, 3) - self.eye) @ self.rotation.T

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projects world points onto the image.

        Args:
            points: ``(N, 3)`` world coordinates.

        Returns:
            ``(uv, depth)``: ``(N, 2)`` continuous image coordinates ``(u column, v row)`` in pixels (pixel
            ``(i, j)`` spans ``[j, j+1) × [i, i+1)``) and ``(N,)`` depth along the viewing direction
            (``<= 0``: behind the camera, where ``uv`` is meaningless).
        """
        cam = self.to_camera(points)
        depth = cam[:, 2]
        safe = np.where(np.abs(depth) > 1e-12, depth, 1e-12)
        centre = self.size / 2.0
        uv = np.stack(
            [centre + self.focal * cam[:, 0] / safe, centre - self.focal * cam[:, 1] / safe], axis=1
        )
        return uv, depth

    def matrix(self) -> np.ndarray:
        """The ``(3, 4)`` projection matrix ``P``: ``P @ [X, Y, Z, 1] = w · [u, v, 1]``, ``w`` the depth."""
        c = self.size / 2.0
        intrinsics = np.array([[self.focal, 0.0, c], [0.0, -self.focal, c], [0.0, 0.0, 1.0]])
        extrinsics = np.concatenate([self.rotation, -(self.rotation @ self.eye)[:, None]], axis=1)
        return intrinsics @ extrinsics

    def light_direction(self) -> np.ndarray:
        """Unit ``(3,)`` world direction towards this camera's lamp (above and right of the camera)."""
        right, up, forward = self.rotation
        direction = _LIGHT_OFFSET[0] * right + _LIGHT_OFFSET[1] * up - forward
        return np.asarray(direction / np.linalg.norm(direction))

    def rays(self) -> np.ndarray:
        """``(size, size, 6)`` float32 rays ``(origin, unit direction)`` through every pixel centre."""
        centre = self.size / 2.0
        coords = (np.arange(self.size, dtype=np.float64) + 0.5 - centre) / self.focal
        x = coords[None, :].repeat(self.size, axis=0)  # column -> camera x
        y = -coords[:, None].repeat(self.size, axis=1)  # row -> camera y (up)
        cam = np.stack([x, y, np.ones_like(x)], axis=-1)
        direction = cam @ self.rotation  # camera -> world (rotation is orthonormal)
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
        origin = np.broadcast_to(self.eye, direction.shape)
        return np.concatenate([origin, direction], axis=-1).astype(np.float32)


@dataclass(frozen=True)
class CameraRing:
    """Cameras evenly spaced on a ring around the up axis, slightly elevated, looking at the origin.

    Attributes:
        up: the world axis pointing up (``"y"``: ShapeNet; ``"z"``: ModelNet OFF meshes).
        elevation_deg: angle of the cameras above the horizontal plane.
        distance: distance of the cameras from the origin (``> 1``: outside the unit sphere).
        fov_deg: field of view (horizontal = vertical), in ``(0, 180)``.
        azimuth_offset_deg: azimuth of camera 0.
    """

    up: UpAxis = "y"
    elevation_deg: float = 20.0
    distance: float = 2.5
    fov_deg: float = 50.0
    azimuth_offset_deg: float = 30.0

    def __post_init__(self) -> None:
        if self.up not in _AXES:
            raise ValueError(f"up must be 'x', 'y' or 'z', got {self.up!r}")
        if not -90.0 < self.elevation_deg < 90.0:
            raise ValueError(f"elevation_deg must be in (-90, 90), got {self.elevation_deg}")
        if not self.distance > 1.0:
            raise ValueError(f"distance must be > 1 (outside the unit sphere), got {self.distance}")
        if not 0.0 < self.fov_deg < 180.0:
            raise ValueError(f"fov_deg must be in (0, 180), got {self.fov_deg}")

    def cameras(self, views: int, size: int) -> list[Camera]:
        """The ``views`` cameras of this ring for ``size × size`` images.

        Raises:
            ValueError: ``views < 1`` or ``size < 1``.
        """
        _check_views_size(views, size)
        up_index = _AXES[self.up]
        up = np.eye(3)[up_index]
        h1, h2 = np.eye(3)[(up_index + 1) % 3], np.eye(3)[(up_index + 2) % 3]
        elevation = math.radians(self.elevation_deg)
        focal = (size / 2.0) / math.tan(math.radians(self.fov_deg) / 2.0)
        out = []
        for k in range(views):
            azimuth = math.radians(self.azimuth_offset_deg + 360.0 * k / views)
            horizontal = math.cos(azimuth) * h1 + math.sin(azimuth) * h2
            eye = self.distance * (math.cos(elevation) * horizontal + math.sin(elevation) * up)
            forward = -eye / np.linalg.norm(eye)
            right = np.cross(forward, up)
            right /= np.linalg.norm(right)
            cam_up = np.cross(right, forward)
            out.append(Camera(eye=eye, rotation=np.stack([right, cam_up, forward]), focal=focal, size=size))
        return out


def _check_views_size(views: int, size: int) -> None:
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be an int >= 1, got {views!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")


def _points(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3 or len(arr) == 0:
        raise ValueError(f"{name} must have shape (N, 3) with N >= 1, got {np.shape(value)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def unit_sphere_frame(points: np.ndarray) -> tuple[np.ndarray, float]:
    """``(centre, scale)`` that put ``points`` into the unit sphere: ``(points - centre) / scale``.

    The centre is the middle of the bounding box, the scale the largest distance from it (1 for a single
    point), so the farthest point lands on the sphere.

    Raises:
        ValueError: not a finite non-empty ``(N, 3)`` array.
    """
    pts = _points("points", points)
    centre = (pts.min(axis=0) + pts.max(axis=0)) / 2.0
    scale = float(np.sqrt(((pts - centre) ** 2).sum(axis=1).max()))
    return centre, scale if scale > 0.0 else 1.0


def _normalized(pts: np.ndarray, normalize: bool) -> np.ndarray:
    if not normalize:
        return pts
    centre, scale = unit_sphere_frame(pts)
    return (pts - centre) / scale


def _shade(lambert: np.ndarray) -> np.ndarray:
    """``(M,)`` Lambert factors in ``[0, 1]`` -> ``(M, 3)`` uint8 colours."""
    level = AMBIENT + (1.0 - AMBIENT) * np.clip(lambert, 0.0, 1.0)
    return np.rint(255.0 * level[:, None] * np.asarray(OBJECT_COLOR)[None, :]).astype(np.uint8)


def _blank(size: int) -> np.ndarray:
    return np.full((size, size, 3), BACKGROUND, dtype=np.uint8)


def render_mesh_views(
    vertices: np.ndarray,
    triangles: np.ndarray,
    *,
    views: int,
    size: int = 144,
    ring: CameraRing | None = None,
    normalize: bool = True,
) -> list[np.ndarray]:
    """Renders a triangle mesh from the cameras of a ring by casting one ray per pixel (open3d, CPU).

    Each pixel's ray through its centre hits the nearest triangle or nothing (background); a hit is shaded
    by the triangle's normal (flipped towards the camera) and the camera's lamp (see the module docstring).

    Args:
        vertices: ``(V, 3)`` finite coordinates.
        triangles: ``(T, 3)`` vertex indices, ``T >= 1``.
        views: number of cameras ``K`` on the ring.
        size: image side in pixels.
        ring: the camera ring (default :class:`CameraRing` ``()``).
        normalize: first centre and scale the vertices into the unit sphere (:func:`unit_sphere_frame`);
            ``False``: render the coordinates as given.

    Returns:
        ``K`` images, ``(size, size, 3)`` uint8 RGB, camera ``k``'s at index ``k``.

    Raises:
        ValueError: malformed vertices or triangles (shape, NaN, indices out of range), ``views < 1`` or
            ``size < 1``.
    """
    _check_views_size(views, size)
    verts = _normalized(_points("vertices", vertices), normalize)
    tris = np.asarray(triangles)
    if tris.ndim != 2 or tris.shape[1] != 3 or len(tris) == 0 or tris.dtype.kind not in "iu":
        raise ValueError(f"triangles must be a non-empty integer (T, 3) array, got {tris.dtype} {tris.shape}")
    if tris.min() < 0 or tris.max() >= len(verts):
        raise ValueError(f"triangle vertex index out of range [0, {len(verts)})")
    o3d = _open3d()
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(np.ascontiguousarray(verts, dtype=np.float32)),
        o3d.core.Tensor(np.ascontiguousarray(tris, dtype=np.uint32)),
    )
    images = []
    for camera in (ring or CameraRing()).cameras(views, size):
        rays = camera.rays()
        hits = scene.cast_rays(o3d.core.Tensor(rays))
        hit = np.isfinite(hits["t_hit"].numpy())
        normal = hits["primitive_normals"].numpy()[hit].astype(np.float64)
        direction = rays[..., 3:][hit].astype(np.float64)
        facing = np.einsum("ij,ij->i", normal, direction) > 0.0
        normal[facing] = -normal[facing]  # two-sided: the side the ray sees
        image = _blank(size)
        image[hit] = _shade(normal @ camera.light_direction())
        images.append(image)
    return images


def splat_points(
    xyz: np.ndarray,
    *,
    views: int,
    size: int = 144,
    normals: np.ndarray | None = None,
    radius: float | None = None,
    ring: CameraRing | None = None,
    normalize: bool = True,
) -> list[np.ndarray]:
    """Renders a point set from the cameras of a ring as z-buffered round splats.

    A point covers every pixel whose centre lies within ``radius`` pixels of the point's projection (a
    constant size, whatever the depth); where splats overlap the nearest point wins (ties: the lower point
    index). With ``normals``, a point is shaded like a mesh surface (two-sided Lambert, see the module
    docstring); without, by depth: the nearest possible point of the unit sphere gets full light, the
    farthest only the ambient share. Points behind a camera are not drawn.

    Args:
        xyz: ``(N, 3)`` finite points.
        views: number of cameras ``K`` on the ring.
        size: image side in pixels.
        normals: ``(N, 3)`` normals (any length, not all needed unit) or ``None``.
        radius: splat radius in pixels (default ``max(1, size / 72)``: 2 px at 144).
        ring: the camera ring (default :class:`CameraRing` ``()``).
        normalize: first centre and scale the points into the unit sphere (:func:`unit_sphere_frame`).

    Returns:
        ``K`` images, ``(size, size, 3)`` uint8 RGB.

    Raises:
        ValueError: malformed points or normals, a non-positive radius, ``views < 1`` or ``size < 1``.
    """
    _check_views_size(views, size)
    pts = _normalized(_points("xyz", xyz), normalize)
    nrm = None
    if normals is not None:
        nrm = np.asarray(normals, dtype=np.float64)
        if nrm.shape != pts.shape or not np.isfinite(nrm).all():
            raise ValueError(f"normals must be finite and of shape {pts.shape} like xyz, got {nrm.shape}")
        length = np.linalg.norm(nrm, axis=1, keepdims=True)
        nrm = np.divide(nrm, length, out=np.zeros_like(nrm), where=length > 0.0)
    r = max(1.0, size / 72.0) if radius is None else float(radius)
    if not r > 0.0:
        raise ValueError(f"radius must be > 0 pixels, got {radius}")
    ring = ring or CameraRing()
    return [_splat_view(camera, pts, nrm, r, ring.distance) for camera in ring.cameras(views, size)]


def _splat_view(
    camera: Camera, pts: np.ndarray, nrm: np.ndarray | None, radius: float, distance: float
) -> np.ndarray:
    size = camera.size
    uv, depth = camera.project(pts)
    if nrm is not None:
        to_eye = camera.eye - pts
        flip = np.einsum("ij,ij->i", nrm, to_eye) < 0.0
        oriented = np.where(flip[:, None], -nrm, nrm)
        colours = _shade(oriented @ camera.light_direction())
    else:
        colours = _shade((distance + 1.0 - depth) / 2.0)
    front = np.flatnonzero(depth > 1e-6)
    uv, depth = uv[front], depth[front]
    reach = math.ceil(radius) + 1
    offsets = np.arange(-reach, reach + 1)
    dj, di = (a.ravel() for a in np.meshgrid(offsets, offsets))
    base = np.floor(uv)
    # guard against huge coordinates (points near the camera plane) before integer conversion
    base = np.clip(base, -2 * reach - 1, size + 2 * reach)
    col = base[:, 0:1].astype(np.int64) + dj[None, :]
    row = base[:, 1:2].astype(np.int64) + di[None, :]
    near = (col + 0.5 - uv[:, 0:1]) ** 2 + (row + 0.5 - uv[:, 1:2]) ** 2 <= radius * radius
    inside = near & (col >= 0) & (col < size) & (row >= 0) & (row < size)
    point, slot = np.nonzero(inside)
    pixel = row[point, slot] * size + col[point, slot]
    order = np.lexsort((point, depth[point], pixel))  # by pixel, then depth, then point index
    pixel, point = pixel[order], point[order]
    first = np.unique(pixel, return_index=True)[1]
    image = _blank(size).reshape(-1, 3)
    image[pixel[first]] = colours[front[point[first]]]
    return image.reshape(size, size, 3)


def _open3d() -> Any:
    import open3d as o3d

    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    return o3d
