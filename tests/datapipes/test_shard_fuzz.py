"""Fuzzing the shard readers: a damaged shard is either read in full or refused, never read short.

A small valid shard folder is damaged at random (truncation, flipped bits, extra tar members including a
pickle, random bytes in place of a shard), then read three ways: one shard with its manifest count
(:func:`iter_shard_samples`), the whole split in memory (:func:`load_split_arrays`) and the streaming loader
(:func:`make_eval_loader`). Each read must return exactly the manifest's sample count with finite point
arrays, or stop with a ``ShardFormatError`` / ``UserError`` whose one-line message names the damaged shard.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from datapipes.errors import UserError
from datapipes.memory import load_split_arrays
from datapipes.pipeline import make_eval_loader
from datapipes.shards import iter_shard_samples, manifest_shard_samples, read_manifest, shard_paths
from datapipes.synthetic import write_synthetic
from tests.datapipes._shard_helpers import member_offsets, npy_bytes

POINTS = 16
SHARDS = ("train-000000.tar", "train-000001.tar")
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "ds"
    write_synthetic(root, classes=2, per_class=3, test_per_class=0, points=POINTS, shard_size=3)
    return root


def content_end(path: Path) -> int:
    """Offset of the end-of-archive blocks (everything before it is headers and member data)."""
    return member_offsets(path)[-1]


@contextmanager
def damaged_copy(pristine: Path, damage: Callable[[Path], None], shard: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        shutil.copytree(pristine, root)
        damage(root / shard)
        yield root


def read_all_ways(root: Path, shard: str) -> None:
    """The contract: every reader gives the full, finite data or a one-line error naming ``shard``."""
    manifest = read_manifest(root)
    expected = manifest_shard_samples(manifest)

    def refused(err: Exception) -> None:
        message = str(err)
        assert "\n" not in message, message
        assert shard in message, message

    try:
        samples = list(iter_shard_samples(root / shard, expected=expected[shard]))
    except UserError as err:  # ShardFormatError is a UserError
        refused(err)
    else:
        assert len(samples) == expected[shard]
        for sample in samples:
            for name in ("xyz", "normal"):
                assert np.isfinite(sample[name]).all()

    try:
        xyz, labels, keys = load_split_arrays(root, "train", POINTS)
    except UserError as err:
        refused(err)
    else:
        assert xyz.shape == (manifest["splits"]["train"]["samples"], POINTS, 3)
        assert len(keys) == len(labels) == xyz.shape[0]
        assert np.isfinite(xyz).all()

    try:
        loader = make_eval_loader(shard_paths(root, "train"), batch_size=4, rank=0, world_size=1)
        batches = list(loader)
    except UserError as err:
        refused(err)
    else:
        assert sum(len(b.key) for b in batches) == manifest["splits"]["train"]["samples"]
        for batch in batches:
            assert bool(batch.points.isfinite().all())


@FUZZ
@given(shard=st.sampled_from(SHARDS), where=st.floats(0.0, 1.0, exclude_max=True))
def test_truncation(pristine: Path, shard: str, where: float) -> None:
    def cut(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(where * (content_end(path) + 1024))])

    with damaged_copy(pristine, cut, shard) as root:
        read_all_ways(root, shard)


@FUZZ
@given(
    shard=st.sampled_from(SHARDS),
    flips=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=4
    ),
)
def test_bit_flips(pristine: Path, shard: str, flips: list[tuple[float, int]]) -> None:
    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        span = content_end(path) + 1024  # mostly headers and payloads, a little of the end blocks
        for where, bit in flips:
            data[int(where * span)] ^= 1 << bit
        path.write_bytes(bytes(data))

    with damaged_copy(pristine, flip, shard) as root:
        read_all_ways(root, shard)


EXTRA_NAMES = st.one_of(
    st.sampled_from(
        [
            "intruder.xyz.npy",  # a new sample
            "sphere_00000.xyz.npy",  # a repeated member (or a second run of a key)
            "sphere_00000.notes.txt",  # an unknown member of an existing key
            "sphere_00000.feat.npy",
            "weights.pth",  # pickles: refused, never decoded
            "sphere_00000.state.pth",
            "ellipsoid_00001.cls.txt",
            "noext",
        ]
    ),
    st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1, max_size=20),
)
EXTRA_DATA = st.one_of(
    st.binary(max_size=200),
    st.just(npy_bytes(np.zeros((POINTS, 3), np.float32))),
    st.just(npy_bytes(np.full((POINTS, 3), np.nan, np.float32))),
    st.just(b"\x80\x04K\x01."),  # a pickle payload
)


@FUZZ
@given(shard=st.sampled_from(SHARDS), name=EXTRA_NAMES, data=EXTRA_DATA, position=st.integers(0, 12))
@example(
    shard=SHARDS[1], name="intruder.xyz.npy", data=npy_bytes(np.zeros((POINTS, 3), np.float32)), position=0
)
@example(
    shard=SHARDS[0], name="intruder.xyz.npy", data=npy_bytes(np.zeros((POINTS, 3), np.float32)), position=12
)
@example(shard=SHARDS[0], name="weights.pth", data=b"\x80\x04K\x01.", position=12)
def test_extra_members(pristine: Path, shard: str, name: str, data: bytes, position: int) -> None:
    def insert(path: Path) -> None:
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
        members.insert(min(position, len(members)), (name, data))
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for member, payload in members:
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    with damaged_copy(pristine, insert, shard) as root:
        read_all_ways(root, shard)


@FUZZ
@given(shard=st.sampled_from(SHARDS), data=st.binary(max_size=4096))
def test_random_bytes_as_a_shard(pristine: Path, shard: str, data: bytes) -> None:
    def replace(path: Path) -> None:
        path.write_bytes(data)

    with damaged_copy(pristine, replace, shard) as root:
        read_all_ways(root, shard)
