"""Model cards: written with every artifact, replaced on updates, never over a user's README."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from pretrain import artifact_files, cli
from pretrain.artifact_files import record_evaluation
from pretrain.artifacts import ArtifactError, artifact_kind, read_artifact_meta, save_module_artifact
from pretrain.checkpoint import CKPT_META_KEY, lightning_ckpt_meta
from pretrain.encoders import (
    DataContract,
    PointAdapterSpec,
    PointViTSpec,
    ViPFormerImageEncoder,
    ViPFormerImageSpec,
    build_encoder,
)
from pretrain.model_card import CARD_FILE, CARD_MARKER, render_model_card

CONTRACT = DataContract(num_points=64, normalization="unit_sphere", fps_order=True)
PROVENANCE = {
    "method": "PointMAE",
    "step": 1234,
    "epoch": 7,
    "config_sha256": "c" * 64,
    "data_manifest_sha256": "d" * 64,
    "init_from": {"artifact": "runs/stage1", "method": "PointBERT", "weights_sha256": "e" * 64},
}


def _point_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_encoder(PointViTSpec.named("tiny", num_groups=8, group_size=8))


def _card(art: Path) -> str:
    return (art / CARD_FILE).read_text(encoding="utf-8")


def _python_snippet(card: str) -> str:
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    return snippet


def test_the_card_names_method_provenance_spec_contract_and_params(tmp_path: Path) -> None:
    art = save_module_artifact(tmp_path / "mae", _point_vit(), data=CONTRACT, provenance=PROVENANCE)
    meta = read_artifact_meta(art)
    card = _card(art)
    assert card.startswith(CARD_MARKER)
    assert card.splitlines()[2] == "# point_encoder: point_vit"
    for needle in (
        "PointMAE",
        "| step | 1234 |",
        "| epochs trained | 7 |",
        f"| pcpt git sha | `{meta['provenance']['git_sha']}` |",
        f"| config sha256 | `{'c' * 64}` |",
        f"| data manifest sha256 | `{'d' * 64}` |",
        f"artifact `runs/stage1`, method `PointBERT`, weights_sha256 `{'e' * 64}`",
        f"torch {torch.__version__}",
        artifact_kind("point_encoder").summary(meta),  # the one-line summary export and import print
        f"Parameters: {meta['num_params']:,}.",
        '"num_groups": 8',  # the full spec
        "| points per cloud | 64 |",
        "| normalisation | `unit_sphere` |",
        "| farthest-point order | yes |",
        '| channels | `["x", "y", "z"]` |',
        "pcpt-finetune probe mae --data SHARDS",
        "pcpt-finetune fewshot mae --data SHARDS",
        "pcpt-finetune embed mae --input",
        "--model.pretrained mae",
        "## Evaluations recorded\n\nNone yet.",
    ):
        assert needle in card, needle
    assert card == render_model_card(meta, folder="mae")  # rendered from encoder.json alone
    assert render_model_card(meta, folder="mae") == render_model_card(dict(meta), folder="mae")


@pytest.mark.parametrize("kind", ["point_encoder", "image_encoder"])
def test_the_loading_snippet_of_the_card_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    torch.manual_seed(0)
    module = (
        _point_vit() if kind == "point_encoder" else ViPFormerImageEncoder(ViPFormerImageSpec.named("tiny"))
    )
    art = save_module_artifact(tmp_path / "shared" / "enc", module, data=CONTRACT, provenance={})
    monkeypatch.chdir(tmp_path / "shared")  # the snippet works from the folder that holds the artifact
    namespace: dict[str, object] = {}
    exec(_python_snippet(_card(art)), namespace)
    loaded = namespace["module"]
    assert isinstance(loaded, type(module))
    assert not loaded.training
    assert namespace["meta"] == read_artifact_meta(art)
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_export_of_a_lightning_checkpoint_writes_the_card(tmp_path: Path) -> None:
    enc = build_encoder(PointViTSpec.named("tiny"))
    ckpt = {
        "epoch": 1,
        "global_step": 10,
        "state_dict": {f"encoder.{k}": v for k, v in enc.state_dict().items()},
        CKPT_META_KEY: lightning_ckpt_meta(
            method="PointMAE", module=enc, prefix="encoder.", data_contract=DataContract(num_points=96)
        ),
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert cli.main(["export", str(tmp_path / "last.ckpt"), str(tmp_path / "art")]) == 0
    card = _card(tmp_path / "art")
    assert card == render_model_card(read_artifact_meta(tmp_path / "art"), folder="art")
    for needle in ("PointMAE", "| step | 10 |", f"| source | `{tmp_path / 'last.ckpt'}` |", "| 96 |"):
        assert needle in card, needle


def test_resaving_replaces_the_card(tmp_path: Path) -> None:
    art = save_module_artifact(tmp_path / "art", _point_vit(), data=CONTRACT, provenance=PROVENANCE)
    first = _card(art)
    save_module_artifact(art, _point_vit(1), data=DataContract(num_points=128), provenance={"method": "Next"})
    second = _card(art)
    assert second != first
    assert "Next" in second
    assert "PointMAE" not in second
    assert "| points per cloud | 128 |" in second
    assert sorted(p.name for p in art.iterdir()) == [CARD_FILE, "encoder.json", "encoder.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary folder left


def test_a_users_readme_is_never_overwritten(tmp_path: Path) -> None:
    # a folder that is not an artifact: refused, as before, the README untouched
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / CARD_FILE).write_text("my project")
    with pytest.raises(ArtifactError, match="not a pcpt artifact"):
        save_module_artifact(theirs, _point_vit(), data=CONTRACT, provenance={})
    assert [p.name for p in theirs.iterdir()] == [CARD_FILE]
    assert (theirs / CARD_FILE).read_text() == "my project"

    # an artifact whose README the user replaced by notes: updates and recordings keep the notes
    art = save_module_artifact(tmp_path / "art", _point_vit(), data=CONTRACT, provenance={})
    (art / CARD_FILE).write_text("my notes on this encoder")
    save_module_artifact(art, _point_vit(1), data=CONTRACT, provenance={"method": "Next"})
    record_evaluation(art, {"command": "probe", "accuracy": 0.5})
    assert (art / CARD_FILE).read_text() == "my notes on this encoder"
    assert read_artifact_meta(art)["provenance"]["method"] == "Next"


def test_record_evaluation_rewrites_meta_and_card_but_not_the_weights(tmp_path: Path) -> None:
    art = save_module_artifact(tmp_path / "art", _point_vit(), data=CONTRACT, provenance=PROVENANCE)
    weights = art / "encoder.safetensors"
    before = (hashlib.sha256(weights.read_bytes()).hexdigest(), weights.stat().st_mtime_ns)
    entry = {
        "command": "probe",
        "protocol": "knn",
        "accuracy": 0.8125,
        "train_split": "train",
        "test_split": "test",
        "num_points": 64,
        "manifest_sha256": "f" * 64,
        "date": "2030-01-02T03:04:05+00:00",
        "git_sha": "0" * 40,
    }
    record_evaluation(art, entry)
    meta = record_evaluation(art, {**entry, "accuracy": 0.5})
    assert read_artifact_meta(art) == meta
    assert [e["accuracy"] for e in meta["evaluations"]] == [0.8125, 0.5]
    assert (hashlib.sha256(weights.read_bytes()).hexdigest(), weights.stat().st_mtime_ns) == before
    card = _card(art)
    assert card == render_model_card(meta, folder="art")
    assert "test accuracy **81.25 %**" in card
    assert "test accuracy **50.00 %**" in card
    assert f"data manifest sha256 `{'f' * 64}`" in card
    assert "2030-01-02T03:04:05+00:00" in card
    assert sorted(p.name for p in art.iterdir()) == [CARD_FILE, "encoder.json", "encoder.safetensors"]


def test_a_failed_recording_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = save_module_artifact(tmp_path / "art", _point_vit(), data=CONTRACT, provenance={})
    before = {p.name: p.read_bytes() for p in art.iterdir()}

    def refused(path: Path, text: str) -> None:
        if path.name.startswith(".README.md"):
            raise PermissionError(13, "Permission denied", str(path))
        Path(path).write_text(text)

    monkeypatch.setattr(artifact_files, "_write_synced", refused)
    with pytest.raises(PermissionError):
        record_evaluation(art, {"command": "probe", "accuracy": 0.5})
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before  # no temporary files either
    with pytest.raises(ArtifactError, match="no such artifact"):
        record_evaluation(tmp_path / "missing", {"command": "probe"})


def test_frozen_source_and_base_are_named_as_required(tmp_path: Path) -> None:
    base = save_module_artifact(tmp_path / "base", _point_vit(), data=CONTRACT, provenance={})
    spec = PointAdapterSpec.from_dict({"base_path": str(base), "adapter_dim": 4, "attn_heads": 2})
    art = save_module_artifact(
        tmp_path / "adapted", build_encoder(spec), data=CONTRACT, provenance={"method": "point_adapter"}
    )
    card = _card(art)
    sha = hashlib.sha256((base / "encoder.safetensors").read_bytes()).hexdigest()
    assert "## Frozen base encoder (required)" in card
    assert f"`{base.resolve()}`" in card
    assert f"`{sha}`" in card
    assert "must be present" in card

    meta = {
        "kind": "point_encoder",
        "spec": {
            "arch": "any2point",
            "source_path": "pkg:minilm/model.safetensors",
            "source_sha256": "a" * 64,
        },
        "data_contract": CONTRACT.to_dict(),
        "provenance": {"method": "any2point"},
    }
    card = render_model_card(meta)
    assert "## Frozen source model (required)" in card
    assert "`pkg:minilm/model.safetensors`" in card
    assert f"sha256 `{'a' * 64}`" in card
    assert "$PCPT_SOURCES" in card
    assert "Frozen" not in render_model_card({**meta, "spec": {"arch": "point_vit"}})


def test_evaluations_are_listed_in_order_whatever_their_command() -> None:
    meta = {
        "kind": "dvae_tokenizer",
        "spec": {},
        "evaluations": [
            {
                "command": "fewshot",
                "protocol": "svm",
                "way": 5,
                "shot": 10,
                "folds": 10,
                "mean": 0.911,
                "std": 0.072,
                "episodes_sha256": "b" * 64,
                "date": "2030-01-01",
            },
            {"command": "eval-tokenizer", "cdl1": 0.01, "date": "2030-01-02"},
            "not an entry",
        ],
    }
    card = render_model_card(meta, folder="tok")
    section = card.split("## Evaluations recorded\n\n")[1]
    lines = section.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("- 2030-01-01: **fewshot** (svm): 5-way 10-shot, **91.10 ± 7.20 %** over 10")
    assert f"episodes sha256 `{'b' * 64}`" in lines[0]
    assert lines[1].startswith("- 2030-01-02: **eval-tokenizer**: cdl1 0.01")
    assert 'load_artifact("tok")' in card
    assert "pcpt-pretrain eval-tokenizer tok" in card
