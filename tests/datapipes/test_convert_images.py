"""Image views in converted shards: --render-views (meshes and point sets), shapenet-render, loading them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
import pytest
from PIL import Image

from datapipes.converters.shapenet_render import hash_fraction
from datapipes.inspect import format_report, inspect_shards
from datapipes.mesh import read_off
from datapipes.render import BACKGROUND, CameraRing, render_mesh_views
from datapipes.shards import read_manifest
from datapipes.shards.codecs import image_pixels
from tests.datapipes._convert_helpers import (
    convert_cli,
    read_split,
    rejected_by_source,
    shard_bytes,
    sorted_rows,
    unit_sphere,
    write_mesh_tree,
)

SIZE = 32


def _all_samples(out: Path) -> dict[str, dict[str, Any]]:
    manifest = read_manifest(out)
    return {k: v for split in manifest["splits"] for k, v in read_split(out, split).items()}


def _ring(manifest: dict[str, Any]) -> CameraRing:
    camera = {k: v for k, v in manifest["images"]["camera"].items() if k != "model"}
    return CameraRing(**camera)


def _check_views(out: Path, views: int, size: int, source: str) -> dict[str, dict[str, Any]]:
    """Every sample has views img.0.png ... decoding to (size, size, 3); the manifest names the source."""
    manifest = read_manifest(out)
    assert manifest["images"]["views"] == views
    assert manifest["images"]["size"] == size
    assert manifest["images"]["source"] == source
    assert manifest["fields"]["images"] == {"dtype": "png", "shape": [views]}
    samples = _all_samples(out)
    assert samples
    for sample in samples.values():
        assert len(sample["images"]) == views
        for data in sample["images"]:
            pixels = image_pixels(data)
            assert pixels.shape == (size, size, 3)
            assert (pixels != BACKGROUND).any()  # the object is in view
    return samples


def _on_object(xyz: np.ndarray, image: np.ndarray, camera: Any) -> float:
    """Share of points whose pixel (or a neighbour) is not background."""
    uv, depth = camera.project(xyz)
    assert (depth > 0).all()
    mask = np.any(image != BACKGROUND, axis=-1)
    padded = np.pad(mask, 1)
    grown = np.zeros_like(mask)
    for di in (0, 1, 2):
        for dj in (0, 1, 2):
            grown |= padded[di : di + mask.shape[0], dj : dj + mask.shape[1]]
    ij = np.clip(np.floor(uv).astype(int), 0, mask.shape[0] - 1)
    return float(grown[ij[:, 1], ij[:, 0]].mean())


def test_modelnet_off_render_views(tmp_path: Path) -> None:
    src = write_mesh_tree(tmp_path / "src", train=1, test=1)
    out = tmp_path / "out"
    args = ("--points", "256", "--render-views", "2", "--render-size", str(SIZE))
    assert convert_cli("modelnet-off", src, out, *args) == 0
    samples = _check_views(out, 2, SIZE, "mesh_render")
    manifest = read_manifest(out)
    assert manifest["images"]["camera"]["up"] == "z"  # ModelNet meshes stand on z
    assert manifest["source"]["render_views"] == 2
    assert "box_broken" not in samples  # rejections still work
    ring = _ring(manifest)
    cameras = ring.cameras(2, SIZE)
    for key, sample in samples.items():
        assert sample["meta"]["image_source"] == "mesh_render"
        views = [image_pixels(data) for data in sample["images"]]
        for camera, image in zip(cameras, views):
            assert _on_object(sample["xyz"], image, camera) > 0.99, key
    # the views are the mesh rendered in the stored cloud's unit-sphere frame
    key, sample = sorted(samples.items())[0]
    vertices, faces = read_off(src / sample["meta"]["source"])
    meta = sample["meta"]
    frame = (vertices - np.asarray(meta["center"])) / meta["scale"]
    expected = render_mesh_views(frame, faces, views=2, size=SIZE, ring=ring, normalize=False)
    for data, image in zip(sample["images"], expected):
        np.testing.assert_array_equal(image_pixels(data), image)
    text = format_report(inspect_shards(out))
    assert f"images: 2 view(s) per sample, {SIZE}x{SIZE} px, rendered from the meshes" in text
    # the per-item function renders: worker processes give the same bytes
    out2 = tmp_path / "out2"
    assert convert_cli("modelnet-off", src, out2, *args, "--workers", "2") == 0
    assert shard_bytes(out2) == shard_bytes(out)


def test_mesh_folder_render_views(tmp_path: Path) -> None:
    src = tmp_path / "src"
    meshes = {
        "box": o3d.geometry.TriangleMesh.create_box(1.0, 0.6, 0.3),
        "ball": o3d.geometry.TriangleMesh.create_sphere(resolution=6),
    }
    for name, mesh in meshes.items():
        (src / name).mkdir(parents=True)
        for i in range(2):
            assert o3d.io.write_triangle_mesh(str(src / name / f"{name}{i}.ply"), mesh)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.random.default_rng(0).normal(size=(80, 3))))
    assert o3d.io.write_point_cloud(str(src / "ball" / "points.ply"), cloud)
    out = tmp_path / "out"
    args = ("--points", "128", "--render-views", "2", "--render-size", str(SIZE), "--render-up", "z")
    assert convert_cli("mesh-folder", src, out, *args) == 0
    samples = _check_views(out, 2, SIZE, "mesh_render")
    assert len(samples) == 5
    sources = {k: s["meta"]["image_source"] for k, s in samples.items()}
    assert sources.pop("ball_points") == "point_splat"  # a faceless PLY is a point set: splatted
    assert set(sources.values()) == {"mesh_render"}
    assert read_manifest(out)["images"]["camera"]["up"] == "z"


def test_ray_engine_renders_the_same_views(tmp_path: Path) -> None:
    pytest.importorskip("ray.data")
    src = write_mesh_tree(tmp_path / "src", train=1, test=0)
    args = ("--points", "128", "--render-views", "2", "--render-size", "24", "--shard-size", "2")
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert convert_cli("modelnet-off", src, local, *args) == 0
    assert convert_cli("modelnet-off", src, ray_out, *args, "--engine", "ray", "--workers", "2") == 0
    assert shard_bytes(local) == shard_bytes(ray_out)
    assert (local / "manifest.json").read_bytes() == (ray_out / "manifest.json").read_bytes()


def _npy_tree(src: Path, *, classes: tuple[str, ...] = ("a", "b"), train: int = 4, test: int = 2) -> None:
    rng = np.random.default_rng(1)
    for c in classes:
        for split, count in (("train", train), ("test", test)):
            (src / c / split).mkdir(parents=True)
            for i in range(count):
                pts = rng.normal(size=(200, 3)) * [1.0, 0.5, 0.3] + 2.0
                np.save(src / c / split / f"{c}_{split}{i}.npy", pts.astype(np.float32))


def test_npy_tree_render_views_splats_points(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _npy_tree(src)
    assert convert_cli("npy-tree", src, out, "--render-views", "2", "--render-size", str(SIZE)) == 0
    samples = _check_views(out, 2, SIZE, "point_splat")
    cameras = _ring(read_manifest(out)).cameras(2, SIZE)
    for sample in samples.values():
        assert sample["meta"]["image_source"] == "point_splat"
        for camera, data in zip(cameras, sample["images"]):
            uv, _ = camera.project(sample["xyz"])  # every stored point lands on its own splat
            ij = np.floor(uv).astype(int)
            assert (image_pixels(data)[ij[:, 1], ij[:, 0]] != BACKGROUND).any(axis=-1).all()
    summary = inspect_shards(out, verify=False).summary
    assert summary["images"]["source"] == "point_splat"


def test_image_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    _npy_tree(src, train=1, test=0)
    cases = [
        ("kitti", ("--render-views", "2"), "--render-views does not apply to format 'kitti'"),
        ("shapenet-render", ("--render-views", "2"), "--render-views does not apply"),
        ("npy-tree", ("--render-size", "64"), "--render-size needs --render-views"),
        ("npy-tree", ("--render-views", "2", "--render-size", "4"), "--render-size must be in"),
        ("npy-tree", ("--render-views", "-1"), "--render-views must be in"),
        ("npy-tree", ("--max-views", "3"), "--max-views does not apply to format 'npy-tree'"),
    ]
    for fmt, args, message in cases:
        assert convert_cli(fmt, src, tmp_path / "out", *args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_datamodule_loads_image_views(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from datapipes.datamodule import PointCloudDataModule

    src, out = tmp_path / "src", tmp_path / "out"
    _npy_tree(src)
    assert convert_cli("npy-tree", src, out, "--render-views", "2", "--render-size", str(SIZE)) == 0
    dm = PointCloudDataModule(
        str(out), num_points=64, batch_size=4, num_workers=0, fields={"image_views": 2}, augment="none"
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.images is not None
    assert tuple(batch.images.shape) == (4, 2, 3, SIZE, SIZE)
    assert float(batch.images.min()) >= 0.0
    assert float(batch.images.max()) <= 1.0
    val = next(iter(dm.val_dataloader()))
    assert tuple(val.images.shape) == (4, 2, 3, SIZE, SIZE)
    one = PointCloudDataModule(str(out), num_points=64, batch_size=4, num_workers=0, images=True)
    one.setup("fit")
    assert tuple(next(iter(one.val_dataloader())).images.shape) == (4, 1, 3, SIZE, SIZE)


# ------------------------------------------------------------------------------------------ shapenet-render

SYNSETS = ("02691156", "03001627")


def _write_ply(path: Path, xyz: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert o3d.io.write_point_cloud(str(path), o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz)))


def _write_renderings(
    folder: Path, count: int, rng: np.random.Generator, channels: int = 4
) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(20, 20, channels), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        images.append(pixels)
    return images


def _shapenet_render(src: Path) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Two synsets of 3-view models (ply, npy and pts clouds) plus models that must be rejected."""
    rng = np.random.default_rng(7)
    clouds: dict[str, np.ndarray] = {}
    renders: dict[str, list[np.ndarray]] = {}
    for s, synset in enumerate(SYNSETS):
        for m in range(4):
            model = f"m{s}{m}"
            xyz = rng.normal(size=(60, 3)) * [1.0, 0.4, 0.7] + 5.0
            cloud_dir = src / "ShapeNet" / synset
            if m == 1:
                cloud_dir.mkdir(parents=True, exist_ok=True)
                np.save(cloud_dir / f"{model}.npy", xyz.astype(np.float32))
                xyz = xyz.astype(np.float32).astype(np.float64)
            elif m == 2:
                cloud_dir.mkdir(parents=True, exist_ok=True)
                np.savetxt(cloud_dir / f"{model}.pts", xyz, fmt="%.9f")
            else:
                _write_ply(cloud_dir / f"{model}.ply", xyz)
            clouds[f"{synset}_{model}"] = xyz
            folder = src / "ShapeNetRendering" / synset / model / "rendering"
            renders[f"{synset}_{model}"] = _write_renderings(folder, 3, rng, channels=4 - s)  # RGBA, RGB
            (folder / "renderings.txt").write_text("not an image\n")  # the R2N2 folders hold these too
    _write_ply(src / "ShapeNet" / SYNSETS[0] / "norender.ply", rng.normal(size=(60, 3)))
    _write_ply(src / "ShapeNet" / SYNSETS[0] / "few.ply", rng.normal(size=(60, 3)))
    _write_renderings(src / "ShapeNetRendering" / SYNSETS[0] / "few" / "rendering", 2, rng)
    _write_ply(src / "ShapeNet" / SYNSETS[1] / "badpng.ply", rng.normal(size=(60, 3)))
    bad = src / "ShapeNetRendering" / SYNSETS[1] / "badpng" / "rendering"
    _write_renderings(bad, 3, rng)
    (bad / "01.png").write_bytes(b"garbage, not a png")
    _write_renderings(src / "ShapeNetRendering" / SYNSETS[1] / "orphan" / "rendering", 3, rng)
    return clouds, renders


def test_shapenet_render_roundtrip(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    clouds, renders = _shapenet_render(src)
    assert convert_cli("shapenet-render", src, out, "--test-fraction", "0.5", "--shard-size", "3") == 0
    manifest = read_manifest(out)
    assert manifest["classes"] == list(SYNSETS)
    assert manifest["images"] == {
        "views": 3,
        "size": 20,
        "source": "rendering",
        "format": "png",
        "channels": 3,
        "files": "ShapeNetRendering/*/*/rendering/*.png",
    }
    assert manifest["converter"]["split"] == "hash"
    assert manifest["converter"]["renderings_without_cloud"] == 1
    for split in ("train", "test"):
        samples = read_split(out, split)
        for key, sample in samples.items():
            synset, model = key.split("_")
            assert (hash_fraction(f"{synset}/{model}") < 0.5) == (split == "test")
            assert sample["label"] == SYNSETS.index(synset)
            np.testing.assert_allclose(
                sorted_rows(sample["xyz"]), sorted_rows(unit_sphere(clouds[key])), atol=2e-5
            )
            assert len(sample["images"]) == 3
            folder = src / "ShapeNetRendering" / synset / model / "rendering"
            for i, data in enumerate(sample["images"]):
                written = folder / f"{i:02d}.png"
                if synset == SYNSETS[1]:  # RGB renderings: stored byte for byte
                    assert data == written.read_bytes()
                    np.testing.assert_array_equal(image_pixels(data), renders[key][i])
                else:  # RGBA: as the official loader's convert("RGB") sees them (alpha dropped)
                    assert sample["meta"]["renderings_converted"] == "RGB"
                    with Image.open(written) as img:
                        np.testing.assert_array_equal(image_pixels(data), np.asarray(img.convert("RGB")))
                    np.testing.assert_array_equal(image_pixels(data), renders[key][i][:, :, :3])
            assert sample["meta"]["rendering_files"] == ["00.png", "01.png", "02.png"]
    kept = set(read_split(out, "train")) | set(read_split(out, "test"))
    assert kept == set(clouds)
    rejected = rejected_by_source(out)
    assert "no renderings" in rejected["ShapeNet/02691156/norender.ply"]
    assert "only 2 renderings" in rejected["ShapeNet/02691156/few.ply"]
    assert "rendering 01.png: not a PNG" in rejected["ShapeNet/03001627/badpng.ply"]
    assert "3 view(s) per sample, 20x20 px, the source's own renderings" in format_report(inspect_shards(out))


def test_shapenet_render_max_views_and_split_lists(tmp_path: Path) -> None:
    src = tmp_path / "src"
    clouds, renders = _shapenet_render(src)
    out = tmp_path / "out"
    assert convert_cli("shapenet-render", src, out, "--max-views", "2", "--test-fraction", "0") == 0
    samples = read_split(out, "train")
    assert "02691156_few" in samples  # two renderings are enough now
    assert all(len(s["images"]) == 2 for s in samples.values())
    np.testing.assert_array_equal(
        image_pixels(samples["03001627_m10"]["images"][1]), renders["03001627_m10"][1]
    )
    assert read_manifest(out)["images"]["views"] == 2
    assert json.loads((out / "manifest.json").read_text())["source"]["max_views"] == 2
    if importlib.util.find_spec("lightning") is not None:  # RGBA renderings load as 3-channel views
        from datapipes.datamodule import PointCloudDataModule

        dm = PointCloudDataModule(
            str(out), val_split=None, num_points=32, batch_size=4, num_workers=0, fields={"image_views": 2}
        )
        dm.setup("fit")
        assert tuple(next(iter(dm.train_dataloader())).images.shape) == (4, 2, 3, 20, 20)

    (src / "test.txt").write_text("02691156/m00\n")
    (src / "train.txt").write_text("03001627-m11\nm12.pts\n03001627/ghost\n")
    listed = tmp_path / "listed"
    assert convert_cli("shapenet-render", src, listed) == 0
    assert set(read_split(listed, "test")) == {"02691156_m00"}
    assert set(read_split(listed, "train")) == {"03001627_m11", "03001627_m12"}
    converter = read_manifest(listed)["converter"]
    assert converter["split"] == "lists"
    assert converter["unlisted"] == len(clouds) + 3 - 3  # 11 clouds (3 to be rejected) minus the 3 listed
    assert "listed in train.txt but no cloud" in rejected_by_source(listed)["train.txt:03001627/ghost"]
