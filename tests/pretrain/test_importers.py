from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from datapipes.errors import UserError
from pretrain.checkpoint import WeightsMismatchError, load_encoder, read_artifact_meta
from pretrain.encoders import PointEncoder
from pretrain.importers import REMAPS, extract_state_dict, import_official, infer_spec
from tests.pretrain.encoders import official_reference as ref


def _inputs(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.group_reference(torch.rand(2, 64, 3, generator=gen) * 2 - 1, 16, 8)


def _import(tmp_path: Path, fmt: str, model: torch.nn.Module, **save_kwargs: object) -> PointEncoder:
    src = tmp_path / "official.pth"
    ref.save_official(src, model, **save_kwargs)  # type: ignore[arg-type]
    import_official(fmt, src, tmp_path / "art", num_heads=2, num_groups=16, group_size=8, num_points=64)
    enc, _ = load_encoder(tmp_path / "art")
    return enc.eval()


# ------------------------------------------------------------------------------------------ pure remaps


def test_point_mae_pretraining_remap() -> None:
    official = ref.PointMAE(32, 2, 2, group_size=8).state_dict()
    result = REMAPS["point-mae"](official)
    assert result.layout == "point-mae pre-training"
    expected_dropped = sorted(
        k
        for k in official
        if k == "mask_token" or k.startswith(("decoder_pos_embed.", "MAE_decoder.", "increase_dim."))
    )
    assert result.dropped == expected_dropped
    assert result.unexpected_dropped() == []
    assert len(result.state) + len(result.dropped) == len(official)
    assert torch.equal(
        result.state["tokenizer.second_conv.3.weight"], official["MAE_encoder.encoder.second_conv.3.weight"]
    )
    assert torch.equal(
        result.state["blocks.1.attn.qkv.weight"], official["MAE_encoder.blocks.blocks.1.attn.qkv.weight"]
    )
    assert "mask_token" not in result.state
    assert result.spec_hints == {"cls_token": False}


def test_point_mae_finetuned_remap() -> None:
    official = ref.PointTransformer(32, 2, 2).state_dict()
    result = REMAPS["point-mae"](official)
    assert result.layout == "point-mae finetuned classifier"
    assert result.dropped == sorted(k for k in official if k.startswith("cls_head_finetune."))
    assert {k.split(".")[0] for k in result.dropped} == {"cls_head_finetune"}
    assert {
        "cls_token",
        "cls_pos",
        "norm.weight",
        "blocks.0.norm1.weight",
        "tokenizer.first_conv.0.weight",
    } <= set(result.state)
    assert result.unexpected_dropped() == []


def test_point_bert_remap_keeps_only_transformer_q() -> None:
    official = ref.PointBERT(32, 2, 2, encoder_dims=16).state_dict()
    result = REMAPS["point-bert"](official)
    assert result.layout == "point-bert masked point modelling"
    assert set(result.dropped) == {
        k
        for k in official
        if k.startswith(("transformer_k.", "dvae.", "transformer_q.cls_head.", "transformer_q.lm_head."))
        or k in ("queue", "queue_ptr")
    }
    assert result.unexpected_dropped() == []
    assert {"cls_token", "cls_pos", "mask_token", "reduce_dim.weight"} <= set(result.state)
    assert not any(k.startswith(("lm_head", "cls_head", "transformer_")) for k in result.state)
    assert torch.equal(result.state["mask_token"], official["transformer_q.mask_token"])


def test_remaps_report_unknown_keys_and_wrong_layouts() -> None:
    official = dict(ref.PointMAE(32, 2, 2, group_size=8).state_dict())
    official["MAE_encoder.extra.weight"] = torch.zeros(1)
    assert REMAPS["point-mae"](official).unexpected_dropped() == ["MAE_encoder.extra.weight"]
    with pytest.raises(ValueError, match="not a Point-BERT checkpoint"):
        REMAPS["point-bert"](official)
    with pytest.raises(ValueError, match="not a Point-MAE checkpoint"):
        REMAPS["point-mae"](ref.PointBERT(32, 1, 2).state_dict())


def test_extract_state_dict_containers() -> None:
    state = {"module.a.weight": torch.zeros(1), "b": torch.ones(1)}
    for container in ({"base_model": state, "epoch": 1}, {"model": state}, state):
        assert sorted(extract_state_dict(container)) == ["a.weight", "b"]
    with pytest.raises(ValueError, match=r"top-level keys: \['epoch', 'optimizer'\]"):
        extract_state_dict({"optimizer": {"state": {}}, "epoch": 3})
    with pytest.raises(ValueError, match="dict checkpoint"):
        extract_state_dict([1, 2])


def test_infer_spec_from_shapes() -> None:
    result = REMAPS["point-bert"](ref.PointBERT(32, 3, 2, encoder_dims=16).state_dict())
    spec = infer_spec(result.state, num_heads=4, num_groups=16, group_size=8, **result.spec_hints)
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.tokenizer_dim, spec.mlp_ratio) == (
        32,
        3,
        4,
        16,
        4.0,
    )
    assert (spec.cls_token, spec.mask_token, spec.num_groups, spec.group_size) == (True, True, 16, 8)
    assert (spec.fps_start, spec.fps_skip_near_origin) == (0, True)
    with pytest.raises(ValueError, match="num_heads=5 must divide embed_dim=32"):
        infer_spec(result.state, num_heads=5)
    state = dict(result.state)
    del state["reduce_dim.weight"]
    with pytest.raises(ValueError, match="no reduce_dim"):
        infer_spec(state)
    with pytest.raises(ValueError, match="missing tensors"):
        infer_spec({})


# ------------------------------------------------------------------------------------------ full imports


@pytest.mark.parametrize(
    "save_kwargs",
    [{}, {"data_parallel": False}, {"container": "model"}, {"container": "bare"}],
    ids=["dataparallel", "distributed", "model-key", "bare"],
)
def test_import_point_mae_pretraining_matches_official(
    tmp_path: Path, gen: torch.Generator, save_kwargs: dict[str, object]
) -> None:
    official = ref.randomize(ref.PointMAE(32, 2, 2, group_size=8)).eval()
    enc = _import(tmp_path, "point-mae", official, **save_kwargs)
    assert not enc.spec.cls_token
    assert not enc.spec.mask_token
    assert not enc.spec.has_reduce_dim
    neighborhood, center = _inputs(gen)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::3] = True
    expected = official.MAE_encoder(neighborhood, center, mask)
    torch.testing.assert_close(
        enc(enc.embed(neighborhood), center, keep=~mask).tokens, expected, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("encoder_dims", [32, 16], ids=["point-mae", "point-bert"])
def test_import_finetuned_classifier_matches_official(
    tmp_path: Path, gen: torch.Generator, encoder_dims: int
) -> None:
    official = ref.randomize(ref.PointTransformer(32, 2, 2, encoder_dims=encoder_dims)).eval()
    fmt = "point-mae" if encoder_dims == 32 else "point-bert"
    enc = _import(tmp_path, fmt, official)
    assert enc.spec.cls_token
    assert enc.spec.tokenizer_dim == encoder_dims
    neighborhood, center = _inputs(gen)
    _, concat = official.features(neighborhood, center)
    torch.testing.assert_close(enc.pool(enc(enc.embed(neighborhood), center)), concat, atol=1e-5, rtol=1e-5)


def test_import_point_bert_matches_official(tmp_path: Path, gen: torch.Generator) -> None:
    official = ref.randomize(ref.PointBERT(32, 2, 2, encoder_dims=16)).eval()
    enc = _import(tmp_path, "point-bert", official)
    assert (enc.spec.cls_token, enc.spec.mask_token, enc.spec.tokenizer_dim) == (True, True, 16)
    neighborhood, center = _inputs(gen)
    masked = torch.rand(2, 16, generator=gen) < 0.4
    expected = official.transformer_q(neighborhood, center, masked)
    out = enc(enc.embed(neighborhood), center, replace=masked)
    assert out.cls is not None
    torch.testing.assert_close(out.cls, expected[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, expected[:, 1:], atol=1e-5, rtol=1e-5)


def test_import_records_provenance(tmp_path: Path) -> None:
    src = tmp_path / "official.pth"
    ref.save_official(src, ref.PointMAE(32, 1, 2, group_size=8))
    summary = import_official("point-mae", src, tmp_path / "art", num_heads=2, num_groups=16, group_size=8)
    meta = read_artifact_meta(tmp_path / "art")
    assert summary["layout"] == "point-mae pre-training"
    assert summary["num_params"] == meta["num_params"]
    assert meta["provenance"]["source_sha256"] == summary["source_sha256"]
    assert len(summary["source_sha256"]) == 64
    assert meta["provenance"]["epoch"] == 300
    assert meta["data_contract"] == {
        "num_points": 1024,
        "normalization": "unit_sphere",
        "fps_order": False,
        "channels": ["x", "y", "z"],
    }
    assert meta["spec"]["num_groups"] == 16


def test_import_errors_are_user_errors(tmp_path: Path) -> None:
    out = tmp_path / "art"
    with pytest.raises(UserError, match="no such checkpoint file"):
        import_official("point-mae", tmp_path / "missing.pth", out)
    with pytest.raises(UserError, match="unknown checkpoint format 'point-xyz'"):
        import_official("point-xyz", tmp_path / "missing.pth", out)

    src = tmp_path / "official.pth"
    ref.save_official(src, ref.PointMAE(32, 1, 2, group_size=8))
    with pytest.raises(UserError, match="not a Point-BERT checkpoint"):
        import_official("point-bert", src, out)

    state = torch.load(src, weights_only=True)
    state["base_model"]["module.MAE_encoder.extra.weight"] = torch.zeros(1)
    state["base_model"]["module.probe.bias"] = torch.zeros(1)
    torch.save(state, src)
    with pytest.raises(UserError, match=r"\['MAE_encoder.extra.weight', 'probe.bias'\]"):
        import_official("point-mae", src, out)

    pickled = tmp_path / "pickled.pth"
    torch.save({"base_model": {}, "args": argparse.Namespace(lr=1)}, pickled)
    with pytest.raises(UserError, match=r"weights_only=True"):
        import_official("point-mae", pickled, out)
    assert not out.exists()


def test_import_weight_mismatch_names_keys(tmp_path: Path) -> None:
    src = tmp_path / "official.pth"
    ref.save_official(src, ref.PointMAE(32, 1, 2, group_size=8))
    state = torch.load(src, weights_only=True)
    del state["base_model"]["module.MAE_encoder.norm.bias"]
    torch.save(state, src)
    with pytest.raises(WeightsMismatchError, match=r"missing keys \['norm.bias'\]"):
        import_official("point-mae", src, tmp_path / "art", num_heads=2)
    assert not (tmp_path / "art").exists()
