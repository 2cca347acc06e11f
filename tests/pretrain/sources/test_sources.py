"""Loaders of frozen source transformers: parity with independent implementations, keys, errors."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.nn import Block
from pretrain.sources import (
    LAYOUTS,
    SourceError,
    load_source,
    random_source_state,
    remap,
    source_info,
    write_random_source,
)
from tests.pretrain.sources.reference import reference_forward

SUFFIX = {"bert": ".safetensors", "clip_text": ".pt", "vit": ".pth"}
#: the official keys of each synthetic file that the layout reads nothing from (depth 2).
EXPECTED_IGNORED = {
    "bert": {
        "embeddings.word_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.position_ids",
        "pooler.dense.weight",
        "pooler.dense.bias",
    },
    "clip_text": {
        "token_embedding.weight",
        "text_projection",
        "logit_scale",
        "visual.class_embedding",
        "visual.conv1.weight",
        "visual.proj",
    },
    "vit": {"cls_token", "mask_token", "patch_embed.proj.bias"},
}


def _write(tmp_path: Path, layout: str, **kwargs) -> Path:
    return write_random_source(tmp_path / layout / f"source{SUFFIX[layout]}", layout, **kwargs)


def _raw(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _pos_tokens(layout: str, sd: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """(length, D) positional rows taken straight from the official tensor."""
    if layout == "bert":
        return sd["embeddings.position_embeddings.weight"][:length]
    if layout == "clip_text":
        return sd["positional_embedding"][:length]
    return sd["pos_embed"][0, 1 : 1 + length]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_pos", [True, False])
def test_blocks_match_independent_implementation(tmp_path, gen, layout, with_pos):
    path = _write(tmp_path, layout, depth=3)
    sd = _raw(path)
    source = load_source(path, layout, num_heads=4)
    x = torch.randn(2, 7, 32, generator=gen)
    pos = _pos_tokens(layout, sd, 7).expand(2, 7, 32) if with_pos else None
    expected = reference_forward(layout, sd, x, pos, heads=4, depth=3)
    with torch.no_grad():
        got = source(x, pos)
    assert got.shape == (2, 7, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the inputs matter: a different input gives a different output
    assert not torch.allclose(got, source(x.flip(1), pos))


def test_reference_is_sensitive_to_a_wrong_remap(tmp_path, gen):
    """Swapping BERT's query and key in the file breaks parity: the comparison can fail."""
    path = _write(tmp_path, "bert")
    sd = _raw(path)
    swapped = dict(sd)
    for i in range(2):
        for wb in ("weight", "bias"):
            q, k = (
                f"encoder.layer.{i}.attention.self.query.{wb}",
                f"encoder.layer.{i}.attention.self.key.{wb}",
            )
            swapped[q], swapped[k] = sd[k], sd[q]
    wrong = remap("bert", swapped, num_heads=4)
    source = load_source(path, "bert")
    source.load_state_dict(wrong.state)
    x = torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        assert not torch.allclose(
            source(x), reference_forward("bert", sd, x, None, heads=4, depth=2), atol=1e-3
        )


def test_vit_without_layer_scale_matches_reference(tmp_path, gen):
    path = _write(tmp_path, "vit", layer_scale=False)
    source = load_source(path, "vit", num_heads=4)
    assert source.spec.options.layer_scale is None
    assert not any(".ls" in name for name in source.state_dict())
    x = torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(
            source(x), reference_forward("vit", _raw(path), x, None, 4, 2), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positional_tables_and_structure(tmp_path, layout):
    path = _write(tmp_path, layout, positions=9 if layout == "vit" else 20, patch_size=7)
    sd = _raw(path)
    source = load_source(path, layout, num_heads=4)
    options = source.spec.options
    if layout == "vit":
        grid = sd["pos_embed"][0, 1:].reshape(9, 9, 32)
        torch.testing.assert_close(source.pos_table, grid, atol=0, rtol=0)
        assert source.cls_pos is not None
        torch.testing.assert_close(source.cls_pos, sd["pos_embed"][0, 0], atol=0, rtol=0)
        assert (source.patch_size, source.pos_kind) == (7, "2d")
        assert (options.norm_first, options.activation, options.norm_eps, options.layer_scale) == (
            True,
            "gelu",
            1e-6,
            1.0,
        )
        assert isinstance(source.input_norm, torch.nn.Identity)
    else:
        key = "embeddings.position_embeddings.weight" if layout == "bert" else "positional_embedding"
        torch.testing.assert_close(source.pos_table, sd[key], atol=0, rtol=0)
        assert (source.cls_pos, source.patch_size, source.pos_kind) == (None, None, "1d")
    if layout == "bert":
        assert (options.norm_first, options.activation, options.norm_eps) == (False, "gelu", 1e-12)
        assert isinstance(source.norm, torch.nn.Identity)
        assert isinstance(source.input_norm, torch.nn.LayerNorm)
    if layout == "clip_text":
        assert (options.norm_first, options.activation, options.norm_eps) == (True, "quick_gelu", 1e-5)
        assert isinstance(source.input_norm, torch.nn.Identity)
    assert options.qkv_bias
    assert "pos_table" in dict(source.named_buffers())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_key_is_used_or_explicitly_ignored(layout):
    sd = random_source_state(layout)
    result = remap(layout, sd, num_heads=4)
    assert set(result.used) | set(result.ignored) == set(sd)
    assert not set(result.used) & set(result.ignored)
    assert set(result.ignored) == EXPECTED_IGNORED[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loaded_source_is_frozen(tmp_path, layout):
    source = load_source(_write(tmp_path, layout), layout, num_heads=4)
    params = list(source.parameters())
    assert params
    assert not any(p.requires_grad for p in params)
    assert not source.training
    assert all(p.dtype == torch.float32 for p in params)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_source_info_is_plain_json(tmp_path, layout):
    path = _write(tmp_path, layout, depth=3)
    info = source_info(load_source(path, layout, num_heads=4))
    assert json.loads(json.dumps(info)) == info
    assert info["layout"] == layout
    assert info["name"] == path.name
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (info["embed_dim"], info["depth"], info["num_heads"]) == (32, 3, 4)
    assert info["pos_shape"] == ([4, 4, 32] if layout == "vit" else [16, 32])
    assert info["pos_kind"] == ("2d" if layout == "vit" else "1d")
    assert info["patch_size"] == (4 if layout == "vit" else None)


def test_synthetic_files_are_deterministic(tmp_path):
    a = _write(tmp_path / "a", "vit", seed=3)
    b = _write(tmp_path / "b", "vit", seed=3)
    c = _write(tmp_path / "c", "vit", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert load_source(a, "vit", num_heads=4).sha256 != load_source(c, "vit", num_heads=4).sha256


def test_contexts_reach_block_adapters(tmp_path, gen):
    source = load_source(_write(tmp_path, "clip_text"), "clip_text", num_heads=4)
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, context):
            seen.append(context)
            return torch.zeros_like(x)

    for block in source.blocks:
        assert isinstance(block, Block)
        block.attach_adapter("output", Recorder())
    x = torch.randn(1, 3, 32, generator=gen)
    source(x, contexts=["first", "second"])
    assert seen == ["first", "second"]
    with pytest.raises(ValueError, match="contexts"):
        source(x, contexts=["only one"])


# --------------------------------------------------------------------------------- file formats


def test_clip_torchscript_float16_archive(tmp_path, gen):
    """OpenAI ships CLIP as a float16 TorchScript archive that weights_only torch.load refuses."""
    plain = write_random_source(tmp_path / "plain.pt", "clip_text", dtype=torch.float16)
    archive = write_random_source(
        tmp_path / "ViT-L-14.pt", "clip_text", dtype=torch.float16, torchscript=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch says it dispatches to torch.jit.load, then refuses
        with pytest.raises(RuntimeError):
            torch.load(archive, weights_only=True)
    a, b = load_source(archive, "clip_text", num_heads=4), load_source(plain, "clip_text", num_heads=4)
    assert a.pos_table.dtype == torch.float32
    x = torch.randn(2, 4, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(a(x, a.pos_table[:4]), b(x, b.pos_table[:4]), atol=0, rtol=0)
        expected = reference_forward(
            "clip_text", _raw(plain), x, _raw(plain)["positional_embedding"][:4].float(), 4, 2
        )
        torch.testing.assert_close(a(x, a.pos_table[:4]), expected, atol=1e-4, rtol=1e-4)


def test_wrapped_and_prefixed_vit_checkpoint(tmp_path, gen):
    sd = random_source_state("vit")
    wrapped = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3, "best_val": 0.5}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    torch.save(sd, tmp_path / "plain.pth")
    a, b = (
        load_source(tmp_path / "wrapped.pth", "vit", num_heads=4),
        load_source(tmp_path / "plain.pth", "vit", num_heads=4),
    )
    x = torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_dinov2_chunked_block_names(tmp_path, gen):
    sd = random_source_state("vit", depth=4)
    chunked = {
        (f"blocks.{int(k.split('.')[1]) // 2}.{k[len('blocks.') :]}" if k.startswith("blocks.") else k): v
        for k, v in sd.items()
    }
    assert "blocks.1.3.norm1.weight" in chunked
    torch.save(chunked, tmp_path / "chunked.pth")
    torch.save(sd, tmp_path / "plain.pth")
    a, b = (
        load_source(tmp_path / "chunked.pth", "vit", num_heads=4),
        load_source(tmp_path / "plain.pth", "vit", num_heads=4),
    )
    x = torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_sentence_transformers_prefix_is_stripped(tmp_path, gen):
    path = _write(tmp_path, "bert")
    sd = _raw(path)
    torch.save({f"0.auto_model.{k}": v for k, v in sd.items()}, path.parent / "full.pt")
    a, b = load_source(path.parent / "full.pt", "bert"), load_source(path, "bert")
    x = torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ heads


def test_bert_heads_come_from_config_json(tmp_path):
    path = _write(tmp_path, "bert", num_heads=8)
    assert load_source(path, "bert").num_heads == 8
    with pytest.raises(SourceError, match=r"num_heads=4 disagrees with config\.json"):
        load_source(path, "bert", num_heads=4)


def test_bert_without_config_needs_num_heads(tmp_path):
    path = _write(tmp_path, "bert", config=False)
    with pytest.raises(SourceError, match="pass num_heads") as err:
        load_source(path, "bert")
    assert str(path) in str(err.value)
    assert load_source(path, "bert", num_heads=2).num_heads == 2


def test_bert_config_activation_and_eps_are_used(tmp_path):
    path = _write(tmp_path, "bert")
    config = json.loads((path.parent / "config.json").read_text())
    (path.parent / "config.json").write_text(
        json.dumps({**config, "hidden_act": "gelu_new", "layer_norm_eps": 1e-7})
    )
    options = load_source(path, "bert").spec.options
    assert (options.activation, options.norm_eps) == ("gelu_tanh", 1e-7)
    (path.parent / "config.json").write_text(
        json.dumps({**config, "position_embedding_type": "relative_key"})
    )
    with pytest.raises(SourceError, match="relative_key"):
        load_source(path, "bert")


@pytest.mark.parametrize("layout", ["clip_text", "vit"])
def test_default_heads_are_64_wide(tmp_path, layout):
    assert load_source(_write(tmp_path / "a", layout, embed_dim=128, num_heads=2), layout).num_heads == 2
    with pytest.raises(SourceError, match="pass num_heads"):
        load_source(_write(tmp_path / "b", layout), layout)
    with pytest.raises(SourceError, match="num_heads=5"):
        load_source(_write(tmp_path / "c", layout), layout, num_heads=5)


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unknown_key_is_named(tmp_path, layout):
    sd = random_source_state(layout)
    sd["blocks.0.surprise.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(SourceError) as err:
        load_source(tmp_path / "extra.pt", layout, num_heads=4)
    message = str(err.value)
    assert str(tmp_path / "extra.pt") in message
    assert repr(layout) in message
    assert "unknown keys: blocks.0.surprise.weight" in message


@pytest.mark.parametrize(
    ("layout", "key"),
    [
        ("bert", "encoder.layer.1.attention.self.value.bias"),
        ("bert", "embeddings.position_embeddings.weight"),
        ("clip_text", "transformer.resblocks.0.ln_2.weight"),
        ("clip_text", "ln_final.bias"),
        ("vit", "blocks.1.ls2.gamma"),
        ("vit", "pos_embed"),
    ],
)
def test_missing_key_is_named(tmp_path, layout, key):
    sd = random_source_state(layout)
    del sd[key]
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(
        SourceError, match=rf"short\.pt: not a '{layout}' source checkpoint: missing keys: {key}"
    ):
        load_source(tmp_path / "short.pt", layout, num_heads=4)


def test_wrong_layout_names_the_file(tmp_path):
    path = _write(tmp_path, "vit")
    with pytest.raises(
        SourceError, match=r"source\.pth: not a 'bert' source checkpoint: no transformer blocks"
    ):
        load_source(path, "bert", num_heads=4)
    with pytest.raises(SourceError, match=r"source\.pth: not a 'clip_text' source checkpoint"):
        load_source(path, "clip_text", num_heads=4)


def test_bad_shapes_name_the_file(tmp_path):
    sd = random_source_state("clip_text")
    sd["transformer.resblocks.1.attn.out_proj.weight"] = torch.zeros(32, 31)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(SourceError, match=r"bad\.pt: .*size mismatch for blocks\.1\.attn\.proj\.weight"):
        load_source(tmp_path / "bad.pt", "clip_text", num_heads=4)
    sd = random_source_state("vit")
    sd["pos_embed"] = sd["pos_embed"][:, :-2]
    torch.save(sd, tmp_path / "grid.pth")
    with pytest.raises(SourceError, match=r"grid\.pth: .*pos_embed has 15 entries"):
        load_source(tmp_path / "grid.pth", "vit", num_heads=4)


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.pt"])
def test_unreadable_file_names_the_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(SourceError, match=rf"{name}: cannot read as a source checkpoint"):
        load_source(tmp_path / name, "bert", num_heads=4)


def test_non_dict_and_missing_files(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(SourceError, match=r"list\.pt: holds a list"):
        load_source(tmp_path / "list.pt", "vit")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_source(tmp_path / "nope.pt", "vit")


def test_unknown_layout(tmp_path):
    path = _write(tmp_path, "vit")
    with pytest.raises(SourceError, match=r"source\.pth: unknown source layout 'audio'"):
        load_source(path, "audio", num_heads=4)  # type: ignore[arg-type]
