"""Samples encoded in conversion workers give the same shard bytes as samples the writer encodes itself."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from datapipes.engines import pack_result, unpack_result
from datapipes.files import printable
from datapipes.shards import ShardSetWriter, encode_sample
from datapipes.shards.samples import EncodedSample, encode_for_shard, is_encoded
from datapipes.shards.tar_write import tar_member_blocks, write_tar_atomic, write_tar_blocks_atomic
from datapipes.types import Sample
from tests.datapipes._convert_helpers import convert_cli
from tests.datapipes._shard_helpers import make_samples


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _varied_samples() -> list[Sample]:
    samples = make_samples(0, 3, points=7)
    rng = np.random.default_rng(1)
    samples.append(
        {  # a name over 100 bytes (GNU long-name header), curvature, features, two views, no label
            "key": "k" * 120,
            "xyz": rng.normal(size=(1, 3)).astype(np.float32),
            "curv": np.zeros(1, np.float32),
            "feat": np.ones((1, 2), np.float32),
            "images": [_png(), _png()],
            "meta": {"source": "d\udcffir/x.off"},  # a surrogate-escaped file name byte
        }
    )
    samples.append({"key": "é-ünïcode", "xyz": rng.normal(size=(512 // 12, 3)).astype(np.float32)})
    return samples


def _record(out: Path, index: int = 0) -> dict[str, Any]:
    path = out / ".pcpt-progress" / f"train-{index:06d}.tar.json"
    return cast(dict[str, Any], json.loads(path.read_text()))


def test_tar_blocks_are_the_bytes_tarfile_writes(tmp_path: Path) -> None:
    encoded = [encode_sample(cast(Sample, printable(dict(s)))) for s in _varied_samples()]
    encoded[-1] = (encoded[-1][0], [*encoded[-1][1], ("cls.txt", b""), ("meta.json", b"x" * 512)])
    for count in range(len(encoded) + 1):  # every end-of-archive padding case seen here
        ref_sha, ref_size = write_tar_atomic(tmp_path / "ref.tar", encoded[:count])
        sha, size = write_tar_blocks_atomic(
            tmp_path / "blocks.tar", [tar_member_blocks(k, m) for k, m in encoded[:count]]
        )
        assert (tmp_path / "blocks.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
        assert (sha, size) == (ref_sha, ref_size)
        assert sha == hashlib.sha256((tmp_path / "blocks.tar").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="not a multiple of 512"):
        write_tar_blocks_atomic(tmp_path / "bad.tar", [b"x"])
    assert not (tmp_path / "bad.tar").exists()


def test_pre_encoded_samples_write_the_same_shards_and_records(tmp_path: Path) -> None:
    varied = _varied_samples()
    shards = [varied[:3], varied[3:4], varied[4:]]  # the samples of one shard share their fields
    outs: dict[str, Path] = {}
    for name in ("plain", "encoded", "ray"):
        outs[name] = tmp_path / name
        writer = ShardSetWriter(outs[name], options={"format": "test"})
        for index, samples in enumerate(shards):
            batch: list[Any] = list(samples)
            if name != "plain":
                batch = [encode_for_shard(s) for s in samples]
                assert all(is_encoded(e) for e in batch)
                assert not any(is_encoded(s) for s in samples)
            if name == "ray":  # results of Ray workers travel as .npz
                travelled = [cast(EncodedSample, unpack_result(pack_result(e))) for e in batch]
                assert travelled == batch
                batch = travelled
            writer.write_shard("train", index, batch, [])
        writer.close()
    for index in range(len(shards)):
        shard = f"train-{index:06d}.tar"
        ref = (outs["plain"] / shard).read_bytes()
        for name in ("encoded", "ray"):
            assert (outs[name] / shard).read_bytes() == ref
            assert _record(outs[name], index) == _record(outs["plain"], index)


def test_pre_encoded_samples_are_checked_like_plain_ones(tmp_path: Path) -> None:
    writer = ShardSetWriter(tmp_path / "out", options={"format": "test"})
    first, second = (encode_for_shard(s) for s in make_samples(0, 2, points=5))
    assert second["key"] != first["key"]
    with pytest.raises(ValueError, match="duplicate sample key"):
        writer.write_shard("train", 0, [first, first], [])
    other = encode_for_shard({"key": "plain", "xyz": np.eye(2, 3, dtype=np.float32)})
    with pytest.raises(ValueError, match="has fields"):
        writer.write_shard("train", 0, [first, other], [])
    writer.write_shard("train", 0, [first, make_samples(1, 1, points=5)[0]], [])  # mixed is fine
    writer.close()
    assert _record(tmp_path / "out")["samples"] == 2


def _mesh_src(root: Path) -> Path:
    import open3d as o3d

    for c, mesh in (
        ("box", o3d.geometry.TriangleMesh.create_box()),
        ("cone", o3d.geometry.TriangleMesh.create_cone()),
    ):
        (root / c).mkdir(parents=True)
        for i in range(4):
            mesh.scale(1.2, center=(0, 0, 0))
            assert o3d.io.write_triangle_mesh(str(root / c / f"{c}{i}.off"), mesh)
    (root / "box" / "bad.off").write_text("OFF\n3 1 0\n0 0 0\n")
    return root


def _shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_every_shard_has_the_same_sha256_with_one_and_two_workers(tmp_path: Path) -> None:
    src = _mesh_src(tmp_path / "src")
    args = ("--points", "96", "--shard-size", "2", "--test-fraction", "0.25")
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert convert_cli("mesh-folder", src, one, *args) == 0
    assert convert_cli("mesh-folder", src, two, *args, "--workers", "2") == 0
    hashes = _shard_hashes(one)
    assert len(hashes) >= 4
    assert _shard_hashes(two) == hashes
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest == json.loads((two / "manifest.json").read_text())
    recorded = {
        p.name.removesuffix(".json"): json.loads(p.read_text()).get("sha256")
        for p in (one / ".pcpt-progress").glob("*.tar.json")
    }
    assert {k: v for k, v in recorded.items() if v} == hashes
