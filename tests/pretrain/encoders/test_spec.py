from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from pretrain.encoders import DataContract, PointViTSpec


def test_defaults_are_the_official_encoder() -> None:
    spec = PointViTSpec()
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.num_groups, spec.group_size) == (
        384,
        12,
        6,
        64,
        32,
    )
    assert (spec.tokenizer_dim, spec.mlp_ratio, spec.drop_path) == (384, 4.0, 0.1)
    assert (spec.fps_start, spec.fps_skip_near_origin) == (0, True)
    assert not spec.cls_token
    assert not spec.mask_token
    assert PointViTSpec.named("small") == spec


def test_named_tiny_and_overrides() -> None:
    tiny = PointViTSpec.named("tiny", cls_token=True)
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.num_groups, tiny.group_size) == (32, 2, 2, 16, 8)
    assert tiny.tokenizer_dim == 32
    assert tiny.cls_token
    with pytest.raises(ValueError, match="unknown encoder size 'huge'"):
        PointViTSpec.named("huge")
    with pytest.raises(ValueError, match="width"):
        PointViTSpec.named("tiny", width=3)


def test_dict_and_json_round_trip() -> None:
    spec = PointViTSpec.named("tiny", fps_start="random", tokenizer_dim=16, mask_token=True)
    assert PointViTSpec.from_dict(spec.to_dict()) == spec
    assert PointViTSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    contract = DataContract(num_points=2048, fps_order=True, channels=("x", "y", "z", "i"))
    assert DataContract.from_dict(json.loads(json.dumps(contract.to_dict()))) == contract


def test_from_dict_names_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown PointViTSpec fields: \['bogus', 'depthh'\]"):
        PointViTSpec.from_dict({"depthh": 3, "bogus": 1})
    with pytest.raises(ValueError, match=r"unknown DataContract fields: \['points'\]"):
        DataContract.from_dict({"points": 3})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("num_heads", 5, "num_heads=5 must divide embed_dim=32"),
        ("depth", 0, "depth must be a positive int"),
        ("drop_path", 1.0, "drop_path"),
        ("fps_start", -1, "fps_start"),
        ("fps_start", "first", "fps_start"),
        ("mlp_ratio", 0.0, "mlp_ratio"),
    ],
)
def test_invalid_values_raise(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PointViTSpec.named("tiny", **{field: value})


def test_data_contract_validation() -> None:
    with pytest.raises(ValueError, match="normalization"):
        DataContract(normalization="cube")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_points"):
        DataContract(num_points=0)


def test_specs_survive_weights_only_load() -> None:
    buffer = io.BytesIO()
    torch.save({"spec": PointViTSpec.named("tiny"), "data": DataContract()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["spec"] == PointViTSpec.named("tiny")
    assert loaded["data"] == DataContract()


class _Module:
    def __init__(self, encoder: PointViTSpec, data: DataContract | None = None) -> None:
        self.encoder = encoder
        self.data = data


def test_jsonargparse_parses_spec_from_yaml(tmp_path: Path) -> None:
    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(_Module, "model")
    config = tmp_path / "c.yaml"
    config.write_text(
        "model:\n  encoder:\n    embed_dim: 32\n    depth: 2\n    num_heads: 2\n    fps_start: random\n"
        "    cls_token: true\n  data:\n    num_points: 512\n    channels: [x, y, z]\n"
    )
    cfg = parser.parse_args(["--config", str(config)])
    model = parser.instantiate_classes(cfg).model
    assert model.encoder == PointViTSpec(
        embed_dim=32, depth=2, num_heads=2, fps_start="random", cls_token=True
    )
    assert model.data == DataContract(num_points=512)
    cfg = parser.parse_args(["--config", str(config), "--model.encoder.fps_start=3"])
    assert parser.instantiate_classes(cfg).model.encoder.fps_start == 3
