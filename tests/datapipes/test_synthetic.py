from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from datapipes.geometry import fps_order
from datapipes.shards import decode_png, iter_shard_samples, read_manifest, verify_shards
from datapipes.synthetic import CLASS_NAMES, make_sample, render_depth, write_synthetic

SMALL: dict[str, Any] = {"classes": 4, "per_class": 6, "test_per_class": 2, "points": 64, "shard_size": 10}


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_same_arguments_give_byte_identical_shards(tmp_path):
    a = write_synthetic(tmp_path / "a", seed=3, images=True, **SMALL)
    b = write_synthetic(tmp_path / "b", seed=3, images=True, **SMALL)
    assert a == b
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b")
    assert {
        "manifest.json",
        "rejected.jsonl",
        "train-000000.tar",
        "train-000002.tar",
        "test-000000.tar",
    } <= set(files)
    c = write_synthetic(tmp_path / "c", seed=4, images=True, **SMALL)
    assert c["sha256"]["train-000000.tar"] != a["sha256"]["train-000000.tar"]


def test_class_balance_splits_and_manifest(tmp_path):
    manifest = write_synthetic(tmp_path / "d", **SMALL)
    assert manifest["classes"] == list(CLASS_NAMES[:4])
    assert manifest["counts"]["train"] == dict.fromkeys(CLASS_NAMES[:4], 6)
    assert manifest["counts"]["test"] == dict.fromkeys(CLASS_NAMES[:4], 2)
    assert manifest["splits"]["train"]["samples"] == 24
    assert len(manifest["splits"]["train"]["shards"]) == 3
    assert manifest["fps_ordered"] is True
    assert manifest["points"] == {"min": 64, "max": 64}
    assert manifest["source"]["normalization"] == "unit_sphere"
    assert set(manifest["fields"]) == {"xyz", "normal", "label", "meta"}
    assert verify_shards(tmp_path / "d") == []
    # shards mix classes (samples are shuffled before sharding)
    labels = [s["label"] for s in iter_shard_samples(tmp_path / "d" / "train-000000.tar")]
    assert len(set(labels)) > 1


def test_samples_are_unit_sphere_fps_ordered_with_unit_normals():
    for c in range(len(CLASS_NAMES)):
        sample = make_sample(c, 0, points=256, seed=1)
        xyz, normal = sample["xyz"], sample["normal"]
        assert xyz.shape == (256, 3)
        assert xyz.dtype == np.float32
        assert sample["label"] == c
        assert 0.9 < np.linalg.norm(xyz, axis=1).max() < 1.1  # unit sphere, then small noise
        np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1e-5)
        # stored in FPS order: re-running FPS on the stored cloud keeps the order (up to noise-free ties)
        assert fps_order(xyz, n=16).tolist() == list(range(16))
        assert sample["key"] == f"{CLASS_NAMES[c]}_00000"
        assert sample["meta"]["class"] == CLASS_NAMES[c]


def test_sample_does_not_depend_on_shard_size(tmp_path):
    write_synthetic(tmp_path / "a", **{**SMALL, "shard_size": 7})
    write_synthetic(tmp_path / "b", **{**SMALL, "shard_size": 100})
    by_key: dict[str, list[np.ndarray]] = {}
    for root in ("a", "b"):
        for path in sorted((tmp_path / root).glob("train-*.tar")):
            for s in iter_shard_samples(path):
                by_key.setdefault(s["key"], []).append(s["xyz"])
    assert len(by_key) == 24
    for arrays in by_key.values():
        np.testing.assert_array_equal(arrays[0], arrays[1])


def test_images_are_depth_pngs(tmp_path):
    write_synthetic(tmp_path / "i", images=True, image_size=16, **SMALL)
    assert read_manifest(tmp_path / "i")["fields"]["images"] == {"dtype": "png", "shape": [1]}
    sample = next(iter_shard_samples(tmp_path / "i" / "test-000000.tar"))
    image = decode_png(sample["images"][0])
    assert image.shape == (16, 16, 1)
    assert image.max() > 0
    assert (image == 0).any()
    np.testing.assert_array_equal(image[:, :, 0], render_depth(sample["xyz"], 16))


def test_resume_after_interruption(tmp_path):
    write_synthetic(tmp_path / "full", **SMALL)
    partial = tmp_path / "partial"
    write_synthetic(partial, **SMALL)
    (partial / "manifest.json").unlink()
    (partial / "train-000001.tar").unlink()
    write_synthetic(partial, **SMALL)
    assert _files(partial) == _files(tmp_path / "full")


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        write_synthetic(tmp_path / "x", classes=13)
    with pytest.raises(ValueError, match="per_class"):
        write_synthetic(tmp_path / "x", per_class=0)
    with pytest.raises(ValueError, match="class_index"):
        make_sample(12, 0)
