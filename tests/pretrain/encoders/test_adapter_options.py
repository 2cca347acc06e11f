"""The adapter options are checked the same way in both adapter families, and built as they say."""

from __future__ import annotations

import pytest

from pretrain.encoders.adapter_options import AdapterOptions, build_adapters, shared_attention_aliases

BAD = [
    ("adapter_dim", -1),
    ("adapter_dim", 2.5),
    ("attn_dim", 0),
    ("attn_heads", True),
    ("reduce_1d", "max"),
    ("direction", (0.0, 0.0, 0.0)),
    ("voxel_size", 0.0),
    ("cell_1d", -1.0),
    ("adapter_dropout", 1.0),
]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_adapter_options_are_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        AdapterOptions(**{field: value}).check_adapter_options()  # type: ignore[arg-type]


def test_both_specs_check_the_adapter_options() -> None:
    from pretrain.encoders import Any2PointSpec, PointAdapterSpec

    for field, value in BAD:
        with pytest.raises(ValueError, match=field):
            Any2PointSpec(source_path="model.safetensors", **{field: value})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=field):
            PointAdapterSpec(base_path="art", **{field: value})  # type: ignore[arg-type]


def test_build_adapters_shares_one_attention_and_aliases_every_copy() -> None:
    adapters = build_adapters(AdapterOptions(adapter_dim=4, attn_dim=6, attn_heads=2), dim=12, num_blocks=3)
    assert len(adapters.mlp) == 3
    assert len(adapters.guided) == 3
    assert all(g.attn1 is adapters.attn1 and g.norm3 is adapters.norm3 for g in adapters.guided)
    aliases = shared_attention_aliases(adapters, (f"guided.{i}." for i in range(3)))
    shared = len(adapters.attn1.state_dict()) + len(adapters.norm3.state_dict())
    assert len(aliases) == 3 * shared
    assert aliases["guided.2.norm3.5.weight"] == "norm3.5.weight"
    none = build_adapters(AdapterOptions(adapter_dim=0, guided=False), dim=12, num_blocks=3)
    assert none.mlp == []
    assert none.guided == []
    assert len(none.attn1) == 0
    assert len(none.norm3) == 0
