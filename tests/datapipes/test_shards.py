from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from datapipes.errors import UserError
from datapipes.shards import (
    FORMAT,
    PROGRESS_DIR,
    ShardFormatError,
    ShardSetWriter,
    decode_image,
    decode_npy,
    decode_png,
    encode_npy,
    encode_png,
    encode_sample,
    image_pixels,
    iter_shard_samples,
    iter_tar_members,
    read_manifest,
    sha256_file,
    shard_name,
    validate_key,
    verify_shards,
)
from tests.datapipes._shard_helpers import make_samples, npy_bytes, write_raw_tar, write_tiny

OPTIONS = {"format": "tiny", "points": 48}


# ------------------------------------------------------------------------------------------ naming / codecs


def test_shard_name_and_bad_splits():
    assert shard_name("train", 3) == "train-000003.tar"
    for split in ("", "a-b", "a.b", "x/y"):
        with pytest.raises(ValueError, match="split"):
            shard_name(split, 0)
    with pytest.raises(ValueError, match="index"):
        shard_name("train", -1)


@pytest.mark.parametrize("key", ["", "a.b", "a b", "/abs", "__meta", "tab\there", "back\\slash"])
def test_bad_keys_rejected(key):
    with pytest.raises(ValueError, match="key"):
        validate_key(key)


def test_good_keys_accepted():
    for key in ("chair_0001", "02691156-1a04e3eab45ca15dd86060f189eb133", "class/model_7"):
        assert validate_key(key) == key


def test_npy_roundtrip_matches_numpy_load():
    rng = np.random.default_rng(0)
    for arr in (rng.normal(size=(10, 3)), rng.normal(size=(7,)), rng.normal(size=(5, 1))):
        data = encode_npy(arr)
        ref = np.load(io.BytesIO(data), allow_pickle=False)
        out = decode_npy(data)
        assert out.dtype == np.float32
        assert out.flags.writeable
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(out, arr.astype(np.float32))


def test_npy_decoder_handles_fortran_and_big_endian():
    arr = np.asfortranarray(np.arange(12, dtype=">f8").reshape(3, 4))
    np.testing.assert_array_equal(decode_npy(npy_bytes(arr)), arr)


def test_npy_object_array_refused_without_unpickling():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ShardFormatError, match="pickle"):
        decode_npy(buf.getvalue(), where="x.tar: member k.xyz.npy")


def test_npy_truncated_refused():
    data = encode_npy(np.zeros((4, 3)))
    with pytest.raises(ShardFormatError, match="undecodable"):
        decode_npy(data[:-4], where="x.tar")


def test_npy_payload_checked_on_every_member_also_after_its_header_was_seen():
    seen = encode_npy(np.arange(30).reshape(10, 3))
    np.testing.assert_array_equal(decode_npy(seen), np.arange(30).reshape(10, 3))  # header now known
    other = encode_npy(np.ones((10, 3)))
    assert other[:128] == seen[:128]  # same header bytes: the remembered layout is used
    np.testing.assert_array_equal(decode_npy(other), np.ones((10, 3), np.float32))
    with pytest.raises(ShardFormatError, match=r"x\.tar: member k\.xyz\.npy: undecodable .npy \(payload has"):
        decode_npy(other[:-4], where="x.tar: member k.xyz.npy")
    with pytest.raises(ShardFormatError, match="undecodable"):
        decode_npy(other + b"\0" * 4, where="x.tar")  # bytes after the array are refused too
    fresh = npy_bytes(np.ones((7, 3), np.float64))
    with pytest.raises(ShardFormatError, match="bytes follow the array data"):
        decode_npy(fresh + b"\0" * 8, where="x.tar")


def test_npy_object_array_refused_even_with_a_known_header_length():
    buf = io.BytesIO()
    np.save(buf, np.array([1, "a", None], dtype=object), allow_pickle=True)
    with pytest.raises(ShardFormatError, match="object array needs pickle, which pcpt refuses"):
        decode_npy(buf.getvalue(), where="x.tar")


def _png_filter_reference(rows: np.ndarray, bpp: int, kind: int) -> bytes:
    """PNG filter encoder written straight from the spec (slow, obviously correct)."""
    out = bytearray()
    prev = [0] * rows.shape[1]
    for row in rows.tolist():
        out.append(kind)
        for x, raw in enumerate(row):
            a = row[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = a
            elif kind == 2:
                pred = b
            elif kind == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out.append((raw - pred) % 256)
        prev = row
    return bytes(out)


def _png_with_filter(image: np.ndarray, kind: int) -> bytes:
    h, w, c = image.shape
    colour = {1: 0, 3: 2, 4: 6}[c]

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    raw = _png_filter_reference(image.reshape(h, w * c), c, kind)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_roundtrip(channels):
    image = np.random.default_rng(channels).integers(0, 256, size=(9, 13, channels), dtype=np.uint8)
    data = encode_png(image)
    assert data == encode_png(image)  # deterministic
    np.testing.assert_array_equal(decode_png(data), image)


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_png_decoder_reverses_every_filter(kind):
    image = np.random.default_rng(kind).integers(0, 256, size=(7, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(_png_with_filter(image, kind)), image)


def test_png_rejects_garbage():
    with pytest.raises(ValueError, match="PNG"):
        decode_png(b"not a png at all")


def test_png_encoding_is_deterministic_without_metadata_chunks():
    image = np.random.default_rng(5).integers(0, 256, size=(16, 12, 3), dtype=np.uint8)
    first, second = encode_png(image), encode_png(image.copy())
    assert first == second
    chunks, pos = [], 8
    while pos < len(first):
        length = struct.unpack(">I", first[pos : pos + 4])[0]
        chunks.append(first[pos + 4 : pos + 8])
        pos += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}  # no time, text or colour-profile chunks
    assert encode_png(image[:, :, :1]) == encode_png(image[:, :, 0])  # (H, W, 1) is grey


def test_image_decoding_handles_jpeg_16_bit_and_refuses_damage():
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    assert image_pixels(buf.getvalue()).shape == (8, 8, 3)
    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    np.testing.assert_array_equal(image_pixels(buf.getvalue())[:, :, 0], deep >> 8)  # the high byte
    png = encode_png(rgb)
    with pytest.raises(ValueError, match="undecodable image"):
        image_pixels(png[: len(png) // 2])
    with pytest.raises(ShardFormatError, match=r"x\.tar: sample k: image bytes are neither PNG nor JPEG"):
        decode_image(b"GIF89a....", where="x.tar: sample k")


def test_encode_sample_validates_fields():
    good = make_samples(0, 1)[0]
    with pytest.raises(ValueError, match="unknown fields"):
        encode_sample({**good, "normals": good["normal"]})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(ValueError, match="xyz must have shape"):
        encode_sample({**good, "xyz": np.zeros((4, 2))})
    with pytest.raises(ValueError, match="normal"):
        encode_sample({**good, "normal": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="NaN"):
        encode_sample({**good, "xyz": np.full((48, 3), np.nan)})
    with pytest.raises(ValueError, match="label"):
        encode_sample({**good, "label": -1})
    with pytest.raises(ValueError, match="PNG nor JPEG"):
        encode_sample({**good, "images": [b"GIF89a..."]})
    with pytest.raises(ValueError, match="JSON"):
        encode_sample({**good, "meta": {"x": object()}})


def test_encode_sample_member_order_and_image_names():
    sample = make_samples(0, 1)[0]
    png = encode_png(np.zeros((4, 4), np.uint8))
    _, members = encode_sample({**sample, "images": [png]})
    assert [m for m, _ in members] == ["xyz.npy", "normal.npy", "cls.txt", "img.png", "meta.json"]
    _, members = encode_sample({**sample, "images": [png, png]})
    assert [m for m, _ in members if m.startswith("img")] == ["img.0.png", "img.1.png"]


# ------------------------------------------------------------------------------------------ writer / reader


def test_roundtrip_samples_manifest_and_rejections(tmp_path):
    root = tmp_path / "ds"
    writer = ShardSetWriter(root, options=OPTIONS)
    train = make_samples(0, 10)
    png = encode_png(np.arange(16, dtype=np.uint8).reshape(4, 4))
    for s in train:
        s["images"] = [png]
    writer.write_shard("train", 0, train[:6], [{"source": "a.off", "reason": "empty mesh", "split": "train"}])
    writer.write_shard("train", 1, train[6:], [])
    test = make_samples(10, 3)
    for s in test:
        s["images"] = [png]
    writer.write_shard("test", 0, test, [{"source": "b.off", "reason": "bad header", "split": "test"}])
    manifest = writer.finalize(
        num_shards={"train": 2, "test": 1}, classes=["c0", "c1", "c2"], fps_ordered=False, extra={"note": "x"}
    )
    assert manifest == read_manifest(root)
    assert manifest["format"] == FORMAT
    assert manifest["splits"]["train"] == {"shards": ["train-000000.tar", "train-000001.tar"], "samples": 10}
    assert manifest["splits"]["test"]["samples"] == 3
    assert manifest["counts"]["train"] == {"c0": 4, "c1": 3, "c2": 3}
    assert manifest["fields"]["xyz"] == {"dtype": "float32", "shape": ["N", 3]}
    assert manifest["fields"]["images"] == {"dtype": "png", "shape": [1]}
    assert manifest["points"] == {"min": 48, "max": 48}
    assert manifest["rejected"] == 2
    assert manifest["note"] == "x"
    assert manifest["source"] == OPTIONS
    assert manifest["sha256"]["train-000001.tar"] == sha256_file(root / "train-000001.tar")
    lines = (root / "rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["source"] for line in lines] == ["a.off", "b.off"]

    got = list(iter_shard_samples(root / "train-000000.tar")) + list(
        iter_shard_samples(root / "train-000001.tar")
    )
    assert [g["key"] for g in got] == [s["key"] for s in train]
    for g, s in zip(got, train):
        np.testing.assert_array_equal(g["xyz"], s["xyz"])
        np.testing.assert_array_equal(g["normal"], s["normal"])
        assert g["label"] == s["label"]
        assert g["meta"] == s["meta"]
        assert g["images"] == [png]
    assert verify_shards(root) == []


def test_only_requested_fields_are_decoded(tmp_path):
    write_tiny(tmp_path / "ds")
    sample = next(iter_shard_samples(tmp_path / "ds" / "train-000000.tar", fields=("xyz", "label")))
    assert set(sample) == {"key", "xyz", "label"}


def test_same_samples_give_identical_bytes(tmp_path):
    write_tiny(tmp_path / "a")
    write_tiny(tmp_path / "b")
    for name in (
        "train-000000.tar",
        "train-000003.tar",
        "test-000000.tar",
        "manifest.json",
        "rejected.jsonl",
    ):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_writer_rejects_duplicate_keys_and_mixed_fields(tmp_path):
    writer = ShardSetWriter(tmp_path / "ds", options=OPTIONS)
    samples = make_samples(0, 2)
    with pytest.raises(ValueError, match="duplicate sample key"):
        writer.write_shard("train", 0, [samples[0], samples[0]], [])
    mixed = [samples[0], {k: v for k, v in samples[1].items() if k != "normal"}]
    with pytest.raises(ValueError, match="fields"):
        writer.write_shard("train", 0, mixed, [])  # type: ignore[list-item,arg-type]
    with pytest.raises(ValueError, match="rejection"):
        writer.write_shard("train", 0, samples, [{"source": "x"}])  # type: ignore[list-item,typeddict-item]


def test_empty_shard_records_progress_and_is_left_out(tmp_path):
    root = tmp_path / "ds"
    writer = ShardSetWriter(root, options=OPTIONS)
    writer.write_shard("train", 0, make_samples(0, 4), [])
    writer.write_shard("train", 1, [], [{"source": "x.off", "reason": "broken", "split": "train"}])
    assert writer.is_complete("train", 1)
    assert not (root / "train-000001.tar").exists()
    manifest = writer.finalize(num_shards={"train": 2}, classes=["c0", "c1", "c2"], fps_ordered=True)
    assert manifest["splits"]["train"] == {"shards": ["train-000000.tar"], "samples": 4}
    assert manifest["rejected"] == 1
    assert manifest["fps_ordered"] is True
    assert verify_shards(root) == []


def test_finalize_refuses_incomplete_sets(tmp_path):
    writer = ShardSetWriter(tmp_path / "ds", options=OPTIONS)
    writer.write_shard("train", 0, make_samples(0, 4), [])
    with pytest.raises(UserError, match=r"1 shard\(s\) not complete \(train-000001.tar\)"):
        writer.finalize(num_shards={"train": 2}, classes=[], fps_ordered=False)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_finalize_rejects_labels_without_class_and_reserved_extra(tmp_path):
    writer = ShardSetWriter(tmp_path / "ds", options=OPTIONS)
    writer.write_shard("train", 0, make_samples(0, 4, classes=3), [])
    with pytest.raises(UserError, match="label 2"):
        writer.finalize(num_shards={"train": 1}, classes=["a", "b"], fps_ordered=False)
    with pytest.raises(ValueError, match="override"):
        writer.finalize(
            num_shards={"train": 1}, classes=["a", "b", "c"], fps_ordered=False, extra={"splits": 1}
        )


def test_options_mismatch_is_a_clear_error(tmp_path):
    root = tmp_path / "ds"
    write_tiny(root, options={"format": "tiny", "points": 48, "seed": 1})
    with pytest.raises(UserError, match=r"different options \(points, seed\).*another output folder"):
        ShardSetWriter(root, options={"format": "tiny", "points": 64, "seed": 2})
    ShardSetWriter(root, options={"format": "tiny", "points": 48, "seed": 1})  # same options: resume is fine


def test_options_mismatch_detected_from_an_unfinished_run(tmp_path):
    root = tmp_path / "ds"
    ShardSetWriter(root, options=OPTIONS).write_shard("train", 0, make_samples(0, 2), [])
    with pytest.raises(UserError, match="points"):
        ShardSetWriter(root, options={**OPTIONS, "points": 1})


def test_foreign_tar_files_are_not_adopted(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "data-000000.tar").write_bytes(b"x")
    with pytest.raises(UserError, match="not written by a pcpt conversion"):
        ShardSetWriter(root, options=OPTIONS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        ShardSetWriter(tmp_path / "file", options=OPTIONS)


def _convert(root: Path, *, total: int = 4, stop_after: int | None = None) -> list[int]:
    """A converter loop: writes every shard that is not complete; returns the indices it (re)wrote."""
    writer = ShardSetWriter(root, options=OPTIONS)
    written: list[int] = []
    for i in range(total):
        if stop_after is not None and len(written) == stop_after:
            return written
        if not writer.is_complete("train", i):
            writer.write_shard("train", i, make_samples(8 * i, 8), [])
            written.append(i)
    writer.finalize(num_shards={"train": total}, classes=["c0", "c1", "c2"], fps_ordered=False)
    return written


def test_interrupted_run_resumes_to_identical_output(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert _convert(full) == [0, 1, 2, 3]

    assert _convert(broken, stop_after=3) == [0, 1, 2]
    # Damage it the ways a crash can: a stray temp file, a shard without progress record, a torn shard.
    (broken / ".train-000003.tar.tmp-4242").write_bytes(b"half a shard")
    (broken / PROGRESS_DIR / "train-000001.tar.json").unlink()
    data = bytearray((broken / "train-000002.tar").read_bytes())
    data[700] ^= 0xFF
    (broken / "train-000002.tar").write_bytes(bytes(data))
    assert not (broken / "manifest.json").exists()
    kept = (broken / "train-000000.tar").stat().st_mtime_ns

    assert _convert(broken) == [1, 2, 3]  # shard 0 is verified and kept, the rest is redone
    assert (broken / "train-000000.tar").stat().st_mtime_ns == kept
    assert not list(broken.glob(".*tmp*"))
    names = sorted(p.name for p in full.iterdir() if p.is_file())
    assert names == sorted(p.name for p in broken.iterdir() if p.is_file())
    for name in names:
        assert (full / name).read_bytes() == (broken / name).read_bytes(), name
    keys = [s["key"] for i in range(4) for s in iter_shard_samples(broken / f"train-{i:06d}.tar")]
    assert keys == [f"s{k:05d}" for k in range(32)]  # nothing lost, nothing duplicated
    assert _convert(broken) == []  # a finished run is left alone
    assert verify_shards(broken) == []


def test_rewriting_a_shard_drops_the_manifest_first(tmp_path):
    root = tmp_path / "ds"
    _convert(root)
    (root / "train-000002.tar").unlink()
    writer = ShardSetWriter(root, options=OPTIONS)
    assert (root / "manifest.json").exists()  # nothing rewritten yet
    writer.write_shard("train", 2, make_samples(16, 8), [])
    assert not (root / "manifest.json").exists()  # no longer a finished dataset until finalize


# ------------------------------------------------------------------------------------------ manifest / verify


def test_read_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="no such shard folder"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(UserError, match=r"manifest\.json: not found"):
        read_manifest(tmp_path)
    ShardSetWriter(tmp_path / "partial", options=OPTIONS)
    with pytest.raises(UserError, match="unfinished conversion"):
        read_manifest(tmp_path / "partial")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(UserError, match="other/9"):
        read_manifest(tmp_path)


def test_verify_detects_a_flipped_byte(tmp_path):
    root = tmp_path / "ds"
    write_tiny(root)
    path = root / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify_shards(root)
    assert any(p.startswith("train-000001.tar: sha256 mismatch") for p in problems)


def test_verify_detects_missing_shard_and_unlisted_file(tmp_path):
    root = tmp_path / "ds"
    write_tiny(root)
    (root / "train-000002.tar").rename(root / "train-000009.tar")
    problems = verify_shards(root)
    assert "train-000002.tar: missing shard" in problems
    assert any("train-000009.tar: shard file not listed" in p for p in problems)
    assert any("split 'train': 48 samples in shards, manifest says 64" in p for p in problems)


def _rewrite_with(root: Path, name: str, extra: list[tuple[str, bytes]]) -> None:
    """Re-packs a shard with extra members and updates its sha256 so only the content check can fail."""
    import tarfile

    with tarfile.open(root / name) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    write_raw_tar(root / name, members + extra)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["sha256"][name] = sha256_file(root / name)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_verify_detects_an_extra_member(tmp_path):
    root = tmp_path / "ds"
    write_tiny(root)
    _rewrite_with(root, "test-000000.tar", [("s00079.notes.txt", b"hello")])
    problems = verify_shards(root)
    assert problems == ["test-000000.tar: sample s00079 has unexpected member(s) s00079.notes.txt"]


def test_verify_detects_count_mismatch(tmp_path):
    root = tmp_path / "ds"
    write_tiny(root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shard_samples"]["test-000000.tar"] = 15
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert "test-000000.tar: 16 samples, manifest says 15" in verify_shards(root)


def test_verify_detects_undecodable_member(tmp_path):
    root = tmp_path / "ds"
    write_tiny(root)
    _rewrite_with(root, "test-000000.tar", [("zz.xyz.npy", b"\x93NUMPY garbage")])
    problems = verify_shards(root)
    assert any("undecodable" in p and "zz.xyz.npy" in p for p in problems)


def test_pickle_member_is_refused_by_reader_and_verify(tmp_path):
    root = tmp_path / "ds"
    write_tiny(root)
    payload = pickle.dumps({"boom": 1})
    _rewrite_with(root, "test-000000.tar", [("x.pyd", payload)])
    with pytest.raises(ShardFormatError, match=r"test-000000.tar: member x.pyd is a pickle"):
        list(iter_shard_samples(root / "test-000000.tar"))
    assert any("x.pyd is a pickle" in p for p in verify_shards(root))


@pytest.mark.parametrize("suffix", ["pickle", "pkl", "pth", "pt", "state.pyd"])
def test_every_pickle_suffix_is_refused(tmp_path, suffix):
    path = tmp_path / "bad.tar"
    write_raw_tar(
        path, [("k.xyz.npy", npy_bytes(np.zeros((2, 3), np.float32))), (f"k.{suffix}", b"\x80\x04.")]
    )
    with pytest.raises(ShardFormatError, match=f"bad.tar: member k.{suffix} is a pickle"):
        list(iter_shard_samples(path))


def test_not_a_tar_is_a_format_error(tmp_path):
    path = tmp_path / "train-000000.tar"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ShardFormatError, match=r"train-000000\.tar"):
        list(iter_shard_samples(path))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_tar_reader_matches_tarfile(tmp_path, fmt):
    path = tmp_path / "a.tar"
    long_dir = "d" * 120
    names = [
        "k1.xyz.npy",
        f"{long_dir}/k2.cls.txt",
        "ünïcode_key.meta.json",
        "k3.empty.txt",
        "sub/k4.xyz.npy",
    ]
    if fmt == tarfile.USTAR_FORMAT:
        names = [n for n in names if n.isascii()]
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("adir/"), None)  # a directory entry is skipped
        for i, name in enumerate(names):
            data = rng.bytes(0 if "empty" in name else 100 * i + 7)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1234.5
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        regular = [m for m in tar.getmembers() if m.isreg()]
        expected = [(m.name, tar.extractfile(m).read()) for m in regular]  # type: ignore[union-attr]
    assert list(iter_tar_members(path)) == expected
    skipped = list(iter_tar_members(path, select=lambda n: n.endswith(".npy")))
    assert [(n, d is None) for n, d in skipped] == [(n, not n.endswith(".npy")) for n, _ in expected]


def test_fast_tar_reader_detects_damage(tmp_path):
    write_tiny(tmp_path / "ds")
    path = tmp_path / "ds" / "train-000000.tar"
    original = path.read_bytes()
    data = bytearray(original)
    data[10] ^= 0x41  # inside the first member name: the header checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match=r"train-000000\.tar: damaged tar header at byte 0"):
        list(iter_tar_members(path))
    path.write_bytes(original[:1000])
    with pytest.raises(ShardFormatError, match="truncated"):
        list(iter_tar_members(path))
