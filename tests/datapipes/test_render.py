"""Headless rendering (datapipes.render): silhouettes against a reference rasteriser, shading, z-buffer."""

from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest

from datapipes.render import (
    AMBIENT,
    BACKGROUND,
    OBJECT_COLOR,
    Camera,
    CameraRing,
    render_mesh_views,
    splat_points,
    unit_sphere_frame,
)


def _silhouette(image: np.ndarray) -> np.ndarray:
    return np.any(image != BACKGROUND, axis=-1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.arange(size) + 0.5
    u, v = np.meshgrid(centres, centres)  # [row, column] grids of the pixel-centre coordinates
    return u, v


def _rasterise(camera: Camera, vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Reference silhouette: pixels whose centre lies inside a projected triangle (point-in-triangle test)."""
    uv, depth = camera.project(vertices)
    assert (depth > 0).all()
    u, v = _pixel_centres(camera.size)
    mask = np.zeros((camera.size, camera.size), dtype=bool)

    def edge(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return (q[0] - p[0]) * (v - p[1]) - (q[1] - p[1]) * (u - p[0])

    for a, b, c in triangles:
        d1, d2, d3 = edge(uv[a], uv[b]), edge(uv[b], uv[c]), edge(uv[c], uv[a])
        mask |= ((d1 >= 0) & (d2 >= 0) & (d3 >= 0)) | ((d1 <= 0) & (d2 <= 0) & (d3 <= 0))
    return mask


def _meshes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    box = o3d.geometry.TriangleMesh.create_box(1.0, 2.0, 0.5).translate((-0.5, -1.0, -0.25))
    shapes = {
        "box": box,
        "sphere": o3d.geometry.TriangleMesh.create_sphere(radius=1.0, resolution=8),
        "cone": o3d.geometry.TriangleMesh.create_cone(radius=0.6, height=1.5),
    }
    return {k: (np.asarray(m.vertices), np.asarray(m.triangles)) for k, m in shapes.items()}


@pytest.mark.parametrize("up", ["y", "z"])
def test_mesh_silhouettes_match_projected_triangles(up: str) -> None:
    ring = CameraRing(up=up)  # type: ignore[arg-type]
    for name, (vertices, triangles) in _meshes().items():
        images = render_mesh_views(vertices, triangles, views=3, size=32, ring=ring)
        assert len(images) == 3
        centre, scale = unit_sphere_frame(vertices)
        normalised = (vertices - centre) / scale
        for camera, image in zip(ring.cameras(3, 32), images):
            assert image.shape == (32, 32, 3)
            assert image.dtype == np.uint8
            expected = _rasterise(camera, normalised, triangles)
            assert expected.sum() > 20, name
            assert _iou(_silhouette(image), expected) > 0.95, name


def test_mesh_rendering_is_deterministic_and_two_sided() -> None:
    vertices, triangles = _meshes()["cone"]
    first = render_mesh_views(vertices, triangles, views=2, size=48)
    again = render_mesh_views(vertices.copy(), triangles.copy(), views=2, size=48)
    flipped = render_mesh_views(vertices, triangles[:, ::-1], views=2, size=48)
    for a, b, c in zip(first, again, flipped):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)  # winding does not matter: surfaces are lit on the seen side
        assert (a[0, 0] == BACKGROUND).all()  # corners stay background (white)
    assert not np.array_equal(first[0], first[1])  # two different cameras


def _square(normal: np.ndarray, half: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    n = normal / np.linalg.norm(normal)
    t1 = np.cross(n, [0.0, 0.0, 1.0] if abs(n[2]) < 0.9 else [1.0, 0.0, 0.0])
    t1 /= np.linalg.norm(t1)
    t2 = np.cross(n, t1)
    corners = [half * (s1 * t1 + s2 * t2) for s1, s2 in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    return np.asarray(corners), np.array([[0, 1, 2], [0, 2, 3]])


def test_plane_facing_the_light_is_brighter_than_at_grazing_angle() -> None:
    camera = CameraRing().cameras(1, 32)[0]
    light = camera.light_direction()
    to_camera = camera.eye / np.linalg.norm(camera.eye)
    grazing = to_camera - (to_camera @ light) * light  # perpendicular to the light, still facing the camera
    means = {}
    for name, normal in (("facing", light), ("grazing", grazing)):
        vertices, triangles = _square(normal)
        image = render_mesh_views(vertices, triangles, views=1, size=32, normalize=False)[0]
        mask = _silhouette(image)
        assert mask.sum() > 30, name
        means[name] = image[mask].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(means["facing"], 255 * np.asarray(OBJECT_COLOR), atol=2.0)  # full light
    np.testing.assert_allclose(means["grazing"], 255 * AMBIENT * np.asarray(OBJECT_COLOR), atol=2.0)
    assert (means["facing"] > means["grazing"] + 50).all()


def _cloud(n: int = 300) -> np.ndarray:
    rng = np.random.default_rng(3)
    pts = rng.standard_normal((n, 3)) * np.array([0.9, 0.5, 0.3])
    return pts / np.linalg.norm(pts, axis=1).max()


def test_splat_silhouettes_match_projected_points() -> None:
    xyz, radius = _cloud(), 1.5
    images = splat_points(xyz, views=4, size=32, radius=radius, normalize=False)
    u, v = _pixel_centres(32)
    for camera, image in zip(CameraRing().cameras(4, 32), images):
        uv, depth = camera.project(xyz)
        assert (depth > 0).all()
        expected = np.zeros((32, 32), dtype=bool)
        for pu, pv in uv:
            expected |= (u - pu) ** 2 + (v - pv) ** 2 <= radius**2
        assert _iou(_silhouette(image), expected) > 0.99
    again = splat_points(xyz.copy(), views=4, size=32, radius=radius, normalize=False)
    for a, b in zip(images, again):
        np.testing.assert_array_equal(a, b)


def test_splat_z_buffer_keeps_the_nearest_point_and_normals_shade() -> None:
    camera = CameraRing().cameras(1, 33)[0]
    towards = camera.eye / np.linalg.norm(camera.eye)
    near, far = 0.5 * towards, -0.5 * towards  # both project onto the image centre
    both = splat_points(np.stack([far, near]), views=1, size=33, normalize=False)[0]
    only_far = splat_points(far[None], views=1, size=33, normalize=False)[0]
    only_near = splat_points(near[None], views=1, size=33, normalize=False)[0]
    np.testing.assert_array_equal(both[16, 16], only_near[16, 16])
    assert (only_near[16, 16] > only_far[16, 16]).all()  # depth shading: nearer is brighter
    light = camera.light_direction()
    lit = splat_points(near[None], views=1, size=33, normals=light[None], normalize=False)[0]
    side = np.cross(light, camera.rotation[0])
    unlit = splat_points(near[None], views=1, size=33, normals=side[None], normalize=False)[0]
    assert (lit[16, 16] > unlit[16, 16]).all()


def test_camera_conventions() -> None:
    camera = CameraRing(up="y", elevation_deg=0.0, azimuth_offset_deg=0.0, distance=2.5).cameras(4, 64)[0]
    np.testing.assert_allclose(camera.eye, [0.0, 0.0, 2.5], atol=1e-12)  # azimuth 0 on +z for up=y
    points = np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.5, 0.0, 0.0]])
    uv, depth = camera.project(points)
    np.testing.assert_allclose(uv[0], [32.0, 32.0])  # the origin is at the image centre
    assert uv[1, 1] < 32.0  # up is up in the image (rows grow downwards)
    assert uv[2, 0] > 32.0  # +x is to the right, seen from +z
    homogeneous = np.c_[points, np.ones(3)] @ camera.matrix().T
    np.testing.assert_allclose(homogeneous[:, :2] / homogeneous[:, 2:], uv)
    np.testing.assert_allclose(homogeneous[:, 2], depth)
    # the whole unit sphere is in view of the default ring
    sphere = np.random.default_rng(0).standard_normal((500, 3))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    for cam in CameraRing(up="z").cameras(6, 32):
        uv, _ = cam.project(sphere)
        assert (uv >= 0).all()
        assert (uv <= 32).all()


def test_bad_input_is_refused() -> None:
    vertices, triangles = _meshes()["box"]
    with pytest.raises(ValueError, match="out of range"):
        render_mesh_views(vertices, triangles + 100, views=1, size=16)
    with pytest.raises(ValueError, match="views"):
        render_mesh_views(vertices, triangles, views=0, size=16)
    with pytest.raises(ValueError, match="NaN"):
        splat_points(np.full((4, 3), np.nan), views=1, size=16)
    with pytest.raises(ValueError, match="up"):
        CameraRing(up="w")  # type: ignore[arg-type]
