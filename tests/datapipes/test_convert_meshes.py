from __future__ import annotations

from pathlib import Path

import numpy as np
import open3d as o3d
import pytest

from datapipes.mesh import MeshError, estimate_normals_curvature, read_mesh, read_off, sample_surface
from tests.datapipes._convert_helpers import convert_cli, naive_fps, read_split, rejected_by_source

BOX = (2.0, 1.0, 0.5)  # extents: face areas 0.5 (x faces), 1.0 (y faces), 2.0 (z faces)


def _box() -> o3d.geometry.TriangleMesh:
    mesh = o3d.geometry.TriangleMesh.create_box(*BOX)
    mesh.translate([-BOX[0] / 2, -BOX[1] / 2, -BOX[2] / 2])
    mesh.compute_triangle_normals()
    return mesh


def _write_off(path: Path, vertices: np.ndarray, faces: np.ndarray, *, quirk: bool = False) -> None:
    header = f"OFF{len(vertices)} {len(faces)} 0\n" if quirk else f"OFF\n{len(vertices)} {len(faces)} 0\n"
    body = "".join(f"{x} {y} {z}\n" for x, y, z in vertices) + "".join(
        f"3 {a} {b} {c}\n" for a, b, c in faces
    )
    path.write_text(header + body)


def _box_arrays() -> tuple[np.ndarray, np.ndarray]:
    mesh = _box()
    return np.asarray(mesh.vertices), np.asarray(mesh.triangles)


def _on_box_surface(xyz: np.ndarray, tol: float = 1e-5) -> np.ndarray:
    half = np.asarray(BOX) / 2
    inside = np.all(np.abs(xyz) <= half + tol, axis=1)
    on_face = np.any(np.abs(np.abs(xyz) - half) <= tol, axis=1)
    return inside & on_face


# ----------------------------------------------------------------------------------- mesh.py unit tests


def test_read_off_quirk_comments_and_polygons(tmp_path: Path) -> None:
    v, f = _box_arrays()
    plain, quirk = tmp_path / "plain.off", tmp_path / "quirk.off"
    _write_off(plain, v, f)
    _write_off(quirk, v, f, quirk=True)
    for path in (plain, quirk):
        vertices, faces = read_off(path)
        np.testing.assert_allclose(vertices, v)
        np.testing.assert_array_equal(faces, f)
    square = tmp_path / "square.off"
    square.write_text("OFF\n# a unit square as one quad\n4 1 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n\n4 0 1 2 3\n")
    vertices, faces = read_off(square)
    np.testing.assert_array_equal(faces, [[0, 1, 2], [0, 2, 3]])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty file"),
        ("PLY\n3 1 0\n", "missing 'OFF' header"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n", "truncated OFF file"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "face index out of range"),
        ("OFF\n3 1 0\n0 0 x\n1 0 0\n0 1 0\n3 0 1 2\n", "not numbers"),
    ],
)
def test_read_off_errors(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "bad.off"
    path.write_text(text)
    with pytest.raises(MeshError, match=reason):
        read_off(path)


def test_sample_surface_uniform_and_seeded() -> None:
    v, f = _box_arrays()
    xyz, normal = sample_surface(v, f, 20000, np.random.default_rng(0))
    assert xyz.shape == normal.shape == (20000, 3)
    assert xyz.dtype == np.float32
    assert _on_box_surface(xyz).all()
    # each point lies on the face its normal says, and faces get points in proportion to their area
    axis = np.abs(normal).argmax(axis=1)
    np.testing.assert_allclose(np.abs(normal).max(axis=1), 1.0, atol=1e-6)
    half = np.asarray(BOX) / 2
    np.testing.assert_allclose(
        xyz[np.arange(len(xyz)), axis], normal[np.arange(len(xyz)), axis] * half[axis], atol=1e-5
    )
    areas = np.array([BOX[1] * BOX[2], BOX[0] * BOX[2], BOX[0] * BOX[1]])
    np.testing.assert_allclose(np.bincount(axis, minlength=3) / len(xyz), areas / areas.sum(), atol=0.015)
    again, _ = sample_surface(v, f, 20000, np.random.default_rng(0))
    np.testing.assert_array_equal(xyz, again)


def test_sample_surface_degenerate() -> None:
    v = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]], float)
    with pytest.raises(ValueError, match="zero surface area"):
        sample_surface(v, np.array([[0, 1, 2]]), 10, np.random.default_rng(0))


def test_estimate_normals_curvature_plane_and_sphere() -> None:
    rng = np.random.default_rng(0)
    plane = np.c_[rng.uniform(-1, 1, (500, 2)), np.zeros(500)]
    normal, curv = estimate_normals_curvature(plane, k=12, orient="viewpoint", viewpoint=(0, 0, 5))
    np.testing.assert_allclose(normal, np.tile([0, 0, 1], (500, 1)), atol=1e-6)
    np.testing.assert_allclose(curv, 0.0, atol=1e-9)
    sphere = rng.normal(size=(2000, 3))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    for orient in ("consistent", "outward"):
        normal, curv = estimate_normals_curvature(sphere, k=12, orient=orient)  # type: ignore[arg-type]
        assert np.mean(np.sum(normal * sphere, axis=1) > 0.95) > 0.99
        assert 0 < curv.mean() < 0.05


# ----------------------------------------------------------------------------------- converters


def test_modelnet_off(tmp_path: Path) -> None:
    src = tmp_path / "ModelNet10"
    v, f = _box_arrays()
    for c in ("chair", "desk"):
        for split in ("train", "test"):
            (src / c / split).mkdir(parents=True)
            first = 1 if split == "train" else 11
            _write_off(src / c / split / f"{c}_{first:04d}.off", v * (2 if c == "desk" else 1), f)
            _write_off(src / c / split / f"{c}_{first + 1:04d}.off", v, f, quirk=True)
    bad = src / "chair" / "train"
    (bad / "chair_0003.off").write_text("")
    (bad / "chair_0004.off").write_text("OFF\n8 12 0\n0 0 0\n")
    _write_off(bad / "chair_0005.off", np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2]]), np.array([[0, 1, 2]]))
    (bad / "chair_0006.off").write_bytes(b"\x00\xffgarbage\x10")
    nan_v = v.copy()
    nan_v[0, 0] = np.nan
    _write_off(bad / "chair_0007.off", nan_v, f)
    out = tmp_path / "out"
    assert convert_cli("modelnet-off", src, out, "--points", "512", "--no-normalize", "--no-fps") == 0
    train, test = read_split(out, "train"), read_split(out, "test")
    assert set(train) == {"chair_0001", "chair_0002", "desk_0001", "desk_0002"}
    assert set(test) == {"chair_0011", "chair_0012", "desk_0011", "desk_0012"}
    for key, sample in train.items():
        xyz = sample["xyz"] / (2 if key.startswith("desk_0001") else 1)
        assert sample["xyz"].shape == (512, 3)
        assert sample["normal"].shape == (512, 3)
        assert _on_box_surface(xyz).all()
        assert sample["label"] == (0 if key.startswith("chair") else 1)
    assert rejected_by_source(out) == {
        "chair/train/chair_0003.off": "empty file (0 bytes)",
        "chair/train/chair_0004.off": (
            "truncated OFF file: header promises 8 vertices and 12 faces, found 1 data lines"
        ),
        "chair/train/chair_0005.off": "degenerate mesh: zero surface area",
        "chair/train/chair_0006.off": "not an ASCII OFF file (binary or garbage bytes)",
        "chair/train/chair_0007.off": "non-finite vertex coordinate values (1 NaN/inf)",
    }
    # default: 8192 points, unit sphere, FPS order (checked against the textbook FPS on a smaller run)
    out = tmp_path / "fps"
    assert convert_cli("modelnet-off", src, out, "--points", "256") == 0
    sample = read_split(out, "test")["chair_0012"]
    assert np.isclose(np.linalg.norm(sample["xyz"], axis=1).max(), 1.0, atol=1e-6)
    np.testing.assert_array_equal(naive_fps(sample["xyz"], 256), np.arange(256))


def test_mesh_folder_formats_and_seeded_split(tmp_path: Path) -> None:
    src = tmp_path / "meshes"
    shapes = {
        "box": _box(),
        "ball": o3d.geometry.TriangleMesh.create_sphere(radius=1.0, resolution=8),
    }
    for c, mesh in shapes.items():
        (src / c).mkdir(parents=True)
        mesh.compute_triangle_normals()
        for i, suffix in enumerate((".ply", ".obj", ".stl", ".off", ".ply", ".obj")):
            assert o3d.io.write_triangle_mesh(str(src / c / f"{c}{i}{suffix}"), mesh)
    cloud = o3d.geometry.PointCloud(
        o3d.utility.Vector3dVector(np.random.default_rng(0).normal(size=(300, 3)))
    )
    o3d.io.write_point_cloud(str(src / "ball" / "points.ply"), cloud)  # a point-cloud .ply: used as points
    (src / "box" / "zero.stl").write_bytes(b"")
    (src / "box" / "garbage.ply").write_bytes(b"not a ply file")
    (src / "box" / "notes.txt").write_text("ignored: not a mesh suffix")
    out = tmp_path / "out"
    args = ("--points", "300", "--test-fraction", "0.34", "--no-fps", "--no-normalize")
    assert convert_cli("mesh-folder", src, out, *args) == 0
    train, test = read_split(out, "train"), read_split(out, "test")
    assert len(train) + len(test) == 13
    assert len(test) == 5
    for key, sample in {**train, **test}.items():
        if key.startswith("box"):
            assert _on_box_surface(sample["xyz"], tol=1e-4).all(), key
        assert sample["normal"].shape == (300, 3)
    assert rejected_by_source(out) == {
        "box/zero.stl": "empty file (0 bytes)",
        "box/garbage.ply": "not a PLY file (missing 'ply' magic)",
    }
    out2 = tmp_path / "out2"
    assert convert_cli("mesh-folder", src, out2, *args) == 0  # the seeded split is reproducible
    assert set(read_split(out2, "test")) == set(test)
    assert (out / "test-000000.tar").read_bytes() == (out2 / "test-000000.tar").read_bytes()


def test_mesh_folder_split_dirs(tmp_path: Path) -> None:
    src = tmp_path / "meshes"
    for split in ("train", "test"):
        (src / "box" / split).mkdir(parents=True)
        assert o3d.io.write_triangle_mesh(str(src / "box" / split / f"{split}.ply"), _box())
    out = tmp_path / "out"
    assert convert_cli("mesh-folder", src, out, "--points", "64", "--normals") == 0
    assert set(read_split(out, "train")) == {"box_train"}
    assert set(read_split(out, "test")) == {"box_test"}
    sample = read_split(out, "train")["box_train"]
    assert sample["curv"].shape == (64,)
    assert convert_cli("mesh-folder", src, tmp_path / "x", "--test-fraction", "0.5") == 2


def test_read_mesh_suffixes(tmp_path: Path) -> None:
    box = _box()
    for suffix in (".ply", ".obj", ".stl", ".off"):
        assert o3d.io.write_triangle_mesh(str(tmp_path / f"b{suffix}"), box)
        vertices, faces = read_mesh(tmp_path / f"b{suffix}")
        assert len(faces) == 12
        assert vertices.shape[1] == 3
    with pytest.raises(MeshError, match="unsupported mesh suffix"):
        read_mesh(tmp_path / "b.txt")
