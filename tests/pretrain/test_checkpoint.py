from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pretrain.artifact_files as ckpt_mod
import pretrain.provenance as provenance_mod
from datapipes.errors import UserError
from pretrain.checkpoint import (
    ARTIFACT_FORMAT,
    CKPT_META_KEY,
    ArtifactError,
    WeightsMismatchError,
    export_from_lightning_ckpt,
    lightning_ckpt_meta,
    load_artifact_tensors,
    load_encoder,
    read_artifact_meta,
    save_artifact,
    save_encoder,
)
from pretrain.encoders import DataContract, PointEncoder, PointViTSpec, build_encoder

SPEC = PointViTSpec.named("tiny", tokenizer_dim=16, cls_token=True, mask_token=True)


def _trained_like(spec: PointViTSpec = SPEC) -> PointEncoder:
    torch.manual_seed(1)
    enc = build_encoder(spec)
    enc.train()
    with torch.no_grad():  # non-default BatchNorm statistics must survive the round trip
        enc.tokenize(torch.rand(4, 64, 3))
    return enc.eval()


def _artifact(tmp_path: Path, enc: PointEncoder | None = None, name: str = "art") -> Path:
    return save_encoder(
        tmp_path / name,
        enc or _trained_like(),
        data=DataContract(num_points=64),
        provenance={"method": "Test", "step": 5},
    )


def test_round_trip_gives_identical_outputs(tmp_path: Path, gen: torch.Generator) -> None:
    enc = _trained_like()
    art = _artifact(tmp_path, enc)
    assert sorted(p.name for p in art.iterdir()) == ["README.md", "encoder.json", "encoder.safetensors"]
    loaded, meta = load_encoder(art)
    assert loaded.spec == SPEC
    for key, value in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    xyz = torch.rand(2, 64, 3, generator=gen)
    loaded.eval()
    torch.testing.assert_close(loaded.pool(loaded.encode(xyz)), enc.pool(enc.encode(xyz)))
    assert meta["num_params"] == sum(p.numel() for p in enc.parameters())


def test_metadata_layout(tmp_path: Path) -> None:
    meta = json.loads((_artifact(tmp_path) / "encoder.json").read_text())
    assert meta["format"] == ARTIFACT_FORMAT == "pcpt-encoder/1"
    assert meta["kind"] == "point_encoder"
    assert PointViTSpec.from_dict(meta["spec"]) == SPEC
    assert DataContract.from_dict(meta["data_contract"]) == DataContract(num_points=64)
    prov = meta["provenance"]
    assert prov["method"] == "Test"
    assert prov["step"] == 5
    for key in ("epoch", "git_sha", "config_sha256", "data_manifest_sha256"):
        assert key in prov
    assert set(prov["versions"]) == {"pcpt", "torch", "lightning"}
    assert prov["versions"]["torch"] == torch.__version__


def test_strict_load_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    art = _artifact(tmp_path)
    weights = art / "encoder.safetensors"
    state = load_file(str(weights))
    del state["blocks.1.mlp.fc2.bias"]
    state["head.weight"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(RuntimeError, match=r"blocks\.1\.mlp\.fc2\.bias") as info:
        load_encoder(art)
    assert "head.weight" in str(info.value)
    assert str(weights) in str(info.value)
    assert isinstance(info.value, WeightsMismatchError)


def test_strict_load_reports_shape_mismatch(tmp_path: Path) -> None:
    art = _artifact(tmp_path)
    meta = json.loads((art / "encoder.json").read_text())
    meta["spec"]["embed_dim"] = 64
    (art / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match=r"other shapes for \S+ \(\d+,.*\(spec: \(\d+"):
        load_encoder(art)


def test_expected_missing_with_spec_overrides(tmp_path: Path, gen: torch.Generator) -> None:
    art = _artifact(tmp_path, _trained_like(PointViTSpec.named("tiny")))
    with pytest.raises(RuntimeError, match=r"missing keys \['cls_pos', 'cls_token'\]"):
        load_encoder(art, spec_overrides={"cls_token": True})
    enc, _ = load_encoder(art, spec_overrides={"cls_token": True}, expected_missing={"cls_token", "cls_pos"})
    assert enc.spec.cls_token
    # unchanged keys were loaded; an allowed-missing key that is present is simply loaded
    enc2, _ = load_encoder(art, expected_missing={"cls_token"})
    assert torch.equal(enc.state_dict()["norm.weight"], enc2.state_dict()["norm.weight"])


def test_spec_override_rejects_unknown_field(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="unknown PointViTSpec fields"):
        load_encoder(_artifact(tmp_path), spec_overrides={"width": 3})


def test_clear_errors_for_bad_artifacts(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        load_encoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"encoder\.json is missing"):
        load_encoder(tmp_path / "empty")
    art = _artifact(tmp_path)
    meta_path = art / "encoder.json"
    good = meta_path.read_text()
    meta_path.write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable artifact metadata"):
        read_artifact_meta(art)
    meta = json.loads(good)
    meta_path.write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(ArtifactError, match="unsupported format 'other/9'"):
        load_encoder(art)
    meta_path.write_text(json.dumps({**meta, "kind": "dvae_tokenizer"}))
    with pytest.raises(ArtifactError, match="kind is 'dvae_tokenizer', expected 'point_encoder'"):
        load_encoder(art)
    meta_path.write_text(good)
    (art / "encoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="unreadable weights"):
        load_encoder(art)
    (art / "encoder.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"encoder\.safetensors is missing"):
        load_encoder(art)
    # user errors for the CLIs, and ValueError for library callers
    assert issubclass(ArtifactError, UserError)
    assert issubclass(ArtifactError, ValueError)


def test_failed_write_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _artifact(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = _artifact(tmp_path)
    before = (art / "encoder.json").read_text()

    def boom(path: Path, text: str) -> None:
        raise OSError("interrupted")

    monkeypatch.setattr(ckpt_mod, "_write_synced", boom)
    with pytest.raises(OSError, match="interrupted"):
        _artifact(tmp_path, _trained_like(PointViTSpec.named("tiny")))
    assert (art / "encoder.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    load_encoder(art)


def test_rewrite_replaces_an_artifact_but_not_other_directories(tmp_path: Path) -> None:
    art = _artifact(tmp_path)
    _artifact(tmp_path, _trained_like(PointViTSpec.named("tiny")))
    assert read_artifact_meta(art)["spec"]["cls_token"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a pcpt artifact"):
        _artifact(tmp_path, name="notes")
    assert (other / "todo.txt").read_text() == "keep me"


def test_generic_artifact_and_extra_tensors(tmp_path: Path) -> None:
    out = save_artifact(
        tmp_path / "tok", {"codebook": torch.arange(6.0).view(2, 3)}, {"kind": "dvae_tokenizer"}
    )
    tensors, meta = load_artifact_tensors(out, kind="dvae_tokenizer")
    assert meta["format"] == ARTIFACT_FORMAT
    assert torch.equal(tensors["codebook"], torch.arange(6.0).view(2, 3))
    with pytest.raises(ValueError, match="kind"):
        save_artifact(tmp_path / "x", {}, {})

    enc = _trained_like()
    art = save_encoder(
        tmp_path / "enc",
        enc,
        data=DataContract(),
        provenance={},
        extra_tensors={"head.weight": torch.ones(3)},
    )
    _, meta = load_encoder(art)  # the extra tensor is not an unexpected key
    assert meta["extra_tensors"] == ["head.weight"]
    assert torch.equal(load_artifact_tensors(art)[0]["head.weight"], torch.ones(3))
    with pytest.raises(ValueError, match="clash"):
        save_encoder(
            tmp_path / "e2",
            enc,
            data=DataContract(),
            provenance={},
            extra_tensors={"norm.weight": torch.ones(1)},
        )


# ------------------------------------------------------------------------------------------ Lightning export


def _lightning_ckpt(tmp_path: Path, enc: PointEncoder, *, with_meta: bool = True) -> Path:
    """A checkpoint dict shaped like the one Lightning writes for a pcpt module holding `self.encoder`."""
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state["decoder.weight"] = torch.zeros(3)
    ckpt: dict[str, object] = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": state,
        "optimizer_states": [],
        "hyper_parameters": {"encoder": enc.spec, "mask_ratio": 0.6},  # a dataclass, as built outside the CLI
    }
    if with_meta:
        ckpt[CKPT_META_KEY] = lightning_ckpt_meta(
            method="PointMAE",
            module=enc,
            prefix="encoder.",
            data_contract=DataContract(num_points=64, fps_order=True),
            config_sha256="c" * 64,
            data_manifest_sha256="d" * 64,
        )
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    return path


def test_export_from_lightning_checkpoint(tmp_path: Path, gen: torch.Generator) -> None:
    enc = _trained_like()
    art = export_from_lightning_ckpt(_lightning_ckpt(tmp_path, enc), tmp_path / "art")
    loaded, meta = load_encoder(art)
    for key, value in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    prov = meta["provenance"]
    assert (prov["method"], prov["step"], prov["epoch"]) == ("PointMAE", 120, 3)
    assert prov["config_sha256"] == "c" * 64
    assert prov["data_manifest_sha256"] == "d" * 64
    assert isinstance(prov["git_sha"], str)
    assert prov["git_sha"]
    assert meta["data_contract"]["fps_order"] is True
    art2 = export_from_lightning_ckpt(_lightning_ckpt(tmp_path, enc), tmp_path / "art2", git_sha="abc")
    assert read_artifact_meta(art2)["provenance"]["git_sha"] == "abc"


def test_export_errors(tmp_path: Path) -> None:
    enc = _trained_like()
    with pytest.raises(ArtifactError, match="no such checkpoint"):
        export_from_lightning_ckpt(tmp_path / "nope.ckpt", tmp_path / "a")
    with pytest.raises(ArtifactError, match="not a pcpt Lightning checkpoint"):
        export_from_lightning_ckpt(_lightning_ckpt(tmp_path, enc, with_meta=False), tmp_path / "a")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="cannot read checkpoint"):
        export_from_lightning_ckpt(bad, tmp_path / "a")
    path = _lightning_ckpt(tmp_path, enc)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["encoder.norm.bias"]
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match=r"missing keys \['norm.bias'\]"):
        export_from_lightning_ckpt(path, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_git_sha_is_best_effort(tmp_path: Path) -> None:
    assert provenance_mod.git_sha(tmp_path) == "unknown"


def test_git_sha_names_the_pcpt_checkout_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Path(provenance_mod.__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=False
    )
    if head.returncode != 0:
        pytest.skip("pcpt is not running from a git checkout")
    monkeypatch.chdir(tmp_path)  # not a repository
    assert provenance_mod.git_sha() == head.stdout.strip()


def test_checkpoints_of_earlier_pcpt_versions_still_export(tmp_path: Path) -> None:
    enc = _trained_like()
    path = _lightning_ckpt(tmp_path, enc)
    ckpt = torch.load(path, weights_only=True)
    meta = ckpt[CKPT_META_KEY]
    ckpt[CKPT_META_KEY] = {  # the layout before artifact kinds had one export path
        "method": meta["method"],
        "kind": "point_encoder",
        "encoder_spec": meta["spec"],
        "encoder_prefix": "encoder.",
        "data_contract": meta["data_contract"],
    }
    torch.save(ckpt, path)
    loaded, _ = load_encoder(export_from_lightning_ckpt(path, tmp_path / "art"))
    for key, value in enc.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
