"""The Any2Point encoder: frozen source, trainable parts by module, batch-first, artifacts name the source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.artifacts import load_encoder, save_encoder
from pretrain.encoders import Any2PointEncoder, Any2PointSpec, DataContract, build_encoder
from pretrain.encoders.any2point import SOURCES_ENV, SourceFileError
from pretrain.ops.virtual_projection import project_to_views, raw_positions_1d, rescale_positions_1d
from pretrain.sources.synthetic import write_random_source


def _spec(source: Path, layout: str = "bert", **overrides: object) -> Any2PointSpec:
    fields: dict[str, object] = {
        "source_path": str(source),
        "source_layout": layout,
        "num_tokens": 16,
        "tokenizer_stages": 2,
        "tokenizer_k": 8,
        "adapter_dim": 4,
        "attn_heads": 2,
        "voxel_size": 0.5,
        **overrides,
    }
    return Any2PointSpec.from_dict(fields)


@pytest.fixture
def bert_source(tmp_path: Path) -> Path:
    return write_random_source(tmp_path / "bert" / "model.safetensors", "bert", embed_dim=32, depth=2)


@pytest.fixture
def vit_source(tmp_path: Path) -> Path:
    return write_random_source(
        tmp_path / "vit.pth", "vit", embed_dim=32, depth=2, num_heads=4, positions=6, patch_size=4
    )


def _save(encoder: nn.Module, out: Path) -> Path:
    return save_encoder(out, encoder, data=DataContract(), provenance={})


def _clouds(batch: int, seed: int = 0, points: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, points, 3, generator=gen) * 2 - 1


def test_encodes_clouds_into_cls_and_tokens(bert_source: Path) -> None:
    enc = build_encoder(_spec(bert_source)).eval()
    assert isinstance(enc, Any2PointEncoder)
    out = enc.encode(_clouds(3))
    assert out.tokens.shape == (3, 16, 32)
    assert out.cls is not None
    assert out.cls.shape == (3, 32)
    assert out.centers.shape == (3, 16, 3)
    assert enc.pool(out).shape == (3, enc.pooled_dim) == (3, 64)
    assert enc.spec.source_sha256 is not None
    assert len(enc.spec.source_sha256) == 64


def test_vit_source_reads_the_2d_patch_table(vit_source: Path) -> None:
    enc = build_encoder(_spec(vit_source, "vit", cell_2d=6, source_num_heads=4)).eval()
    assert isinstance(enc, Any2PointEncoder)
    pos, context = enc.positional_encoding(_clouds(2)[:, :16])
    assert pos.shape == (2, 16, 32)
    assert context.view_cells.shape == (2, 6, 16)
    assert context.num_cells == 16  # a 24-pixel canvas in 6-pixel cells
    assert torch.isfinite(enc.encode(_clouds(2)).tokens).all()


def test_1d_encoding_is_the_view_average_of_the_table_at_the_projections(bert_source: Path) -> None:
    enc = build_encoder(_spec(bert_source, positions=12)).eval()
    assert isinstance(enc, Any2PointEncoder)
    centers = _clouds(2, seed=3)[:, :16]
    pos, _ = enc.positional_encoding(centers)
    table = enc.source.pos_table[:12]
    raw = raw_positions_1d(project_to_views(centers, enc.spec.translation), enc.spec.direction, 12)
    positions = rescale_positions_1d(raw, 12, span=12.0)
    expected = torch.zeros_like(pos)
    for b in range(2):
        for v in range(6):
            for g in range(16):  # ordinary linear interpolation, one token at a time
                p = float(positions[b, v, g].clamp(0, 11))
                lo, hi = int(p), min(int(p) + 1, 11)
                expected[b, g] += ((1 - (p - lo)) * table[lo] + (p - lo) * table[hi]) / 6
    torch.testing.assert_close(pos, expected, atol=1e-5, rtol=1e-5)


def test_a_sample_does_not_depend_on_its_batch_mates(bert_source: Path) -> None:
    enc = build_encoder(_spec(bert_source)).eval()
    clouds = _clouds(4, seed=1)
    with torch.no_grad():
        alone = enc.pool(enc.encode(clouds[:1]))
        together = enc.pool(enc.encode(clouds))
        other = enc.pool(enc.encode(torch.cat([clouds[:1], _clouds(3, seed=9)])))
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other[:1], alone, atol=1e-5, rtol=1e-5)


def test_official_sequence_first_attention_mixes_the_batch(bert_source: Path) -> None:
    enc = build_encoder(_spec(bert_source, sequence_first=True)).eval()
    clouds = _clouds(4, seed=1)
    with torch.no_grad():
        alone = enc.pool(enc.encode(clouds[:1]))
        together = enc.pool(enc.encode(clouds))
    assert not torch.allclose(together[:1], alone, atol=1e-3)


def test_official_batch_std_of_point_pn_mixes_the_batch(bert_source: Path) -> None:
    enc = build_encoder(_spec(bert_source, tokenizer_batch_std=True)).eval()
    clouds = _clouds(4, seed=1)
    with torch.no_grad():
        alone = enc.pool(enc.encode(clouds[:1]))
        together = enc.pool(enc.encode(torch.cat([clouds[:1], 3.0 * _clouds(3, seed=9)])))
    assert not torch.allclose(together[:1], alone, atol=1e-3)
    with pytest.raises(ValueError, match="mn40' only"):
        _spec(bert_source, tokenizer_normalize="scan", tokenizer_batch_std=True)


def test_trainable_parts_are_chosen_by_module(bert_source: Path) -> None:
    enc = build_encoder(_spec(bert_source))
    assert isinstance(enc, Any2PointEncoder)
    trainable = {id(p) for p in enc.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in enc.trainable_parameters()}
    frozen = {id(t) for t in enc.source.parameters() if not t.requires_grad}
    assert len(frozen) == len(enc.source_state()) - 1  # every source tensor but the positional table buffer
    assert set(enc.trainable_modules()) >= {"tokenizer", "norm", "attn1", "norm3", "guided", "adapter.0"}


def test_training_leaves_every_source_tensor_bit_identical(bert_source: Path) -> None:
    enc = build_encoder(_spec(bert_source))
    assert isinstance(enc, Any2PointEncoder)
    before = {k: v.clone() for k, v in enc.source_state().items()}
    tokenizer_before = [p.clone() for p in enc.tokenizer.parameters()]
    optimizer = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        loss = enc.pool(enc.encode(_clouds(4, seed=step))).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = enc.source_state()
    assert before.keys() == after.keys()
    assert len(before) > 0
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert any(
        not torch.equal(a, b) for a, b in zip(tokenizer_before, enc.tokenizer.parameters(), strict=True)
    )


def test_state_dict_leaves_out_the_source_and_the_shared_attention_copies(bert_source: Path) -> None:
    enc = build_encoder(_spec(bert_source))
    state = enc.state_dict()
    assert not any(k.startswith("source.") and ".adapters." not in k for k in state)
    assert any(k.startswith("source.blocks.0.adapters.mlp.") for k in state)
    assert any(k.startswith("attn1.") for k in state)
    assert not any(".attn1." in k or ".norm3." in k for k in state if k.startswith("guided."))
    # a strict load of that state (Lightning's resume) fills the frozen and shared tensors back in
    fresh = build_encoder(_spec(bert_source))
    fresh.load_state_dict(state, strict=True)
    wrapped = nn.ModuleDict({"encoder": fresh})
    wrapped.load_state_dict({f"encoder.{k}": v for k, v in state.items()}, strict=True)
    with torch.no_grad():
        enc.eval(), fresh.eval()
        clouds = _clouds(2)
        torch.testing.assert_close(fresh.pool(fresh.encode(clouds)), enc.pool(enc.encode(clouds)))


def test_shared_view_attention_is_one_module_in_every_block(bert_source: Path) -> None:
    enc = build_encoder(_spec(bert_source))
    assert isinstance(enc, Any2PointEncoder)
    assert all(g.attn1 is enc.attn1 and g.norm3 is enc.norm3 for g in enc.guided)
    fresh = build_encoder(_spec(bert_source))
    assert isinstance(fresh, Any2PointEncoder)
    with torch.no_grad():
        enc.attn1[0].qkv.weight.add_(1.0)
    fresh.load_state_dict(enc.state_dict())
    assert all(torch.equal(g.attn1[0].qkv.weight, enc.attn1[0].qkv.weight) for g in fresh.guided)


def test_artifact_names_the_source_and_reloads_strictly(bert_source: Path, tmp_path: Path) -> None:
    enc = build_encoder(_spec(bert_source)).eval()
    art = save_encoder(tmp_path / "art", enc, data=DataContract(num_points=64), provenance={"method": "t"})
    size = (art / "encoder.safetensors").stat().st_size
    source_bytes = sum(t.numel() * t.element_size() for t in enc.source_state().values())
    trained_bytes = sum(t.numel() * t.element_size() for t in enc.state_dict().values())
    assert source_bytes > trained_bytes  # the source is most of this model
    assert size < trained_bytes + source_bytes / 2  # the trained parts once each, a header, no source
    loaded, meta = load_encoder(art)
    assert meta["spec"]["source_sha256"] == enc.spec.source_sha256  # type: ignore[attr-defined]
    clouds = _clouds(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().pool(loaded.encode(clouds)), enc.pool(enc.encode(clouds)))


def test_artifact_refuses_another_source_file(bert_source: Path, tmp_path: Path) -> None:
    art = save_encoder(
        tmp_path / "art", build_encoder(_spec(bert_source)), data=DataContract(), provenance={}
    )
    write_random_source(bert_source, "bert", embed_dim=32, depth=2, seed=1)  # same name, other weights
    with pytest.raises(SourceFileError, match="sha256"):
        load_encoder(art)


def test_a_moved_source_is_found_in_the_sources_folder(
    bert_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    art = save_encoder(
        tmp_path / "art", build_encoder(_spec(bert_source)), data=DataContract(), provenance={}
    )
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in bert_source.parent.iterdir():
        f.rename(moved / f.name)
    with pytest.raises(SourceFileError, match=SOURCES_ENV):
        load_encoder(art)
    monkeypatch.setenv(SOURCES_ENV, str(moved))
    encoder, _ = load_encoder(art)
    assert isinstance(encoder, Any2PointEncoder)


@pytest.mark.parametrize("mode", ["every_block", "input_and_every_block", "input"])
def test_positional_encoding_is_added_where_pos_mode_says(bert_source: Path, mode: str) -> None:
    enc = build_encoder(_spec(bert_source, adapter_dim=0, guided=False, pos_mode=mode)).eval()
    assert isinstance(enc, Any2PointEncoder)
    groups, tokens = enc.tokenize(_clouds(2))
    pos, _ = enc.positional_encoding(groups.centers)
    pos = torch.cat([enc.cls_pos.expand(2, -1, -1), pos], dim=1)
    with torch.no_grad():
        x = torch.cat([enc.cls_token.expand(2, -1, -1), tokens], dim=1)
        x = enc.source.input_norm(x + pos if mode != "every_block" else x)
        for block in enc.source.blocks:  # the source's blocks, by hand
            x = block(x + pos if mode != "input" else x)
        x = enc.norm(x)
        out = enc(tokens, groups.centers)
    torch.testing.assert_close(out.tokens, x[:, 1:])
    assert out.cls is not None
    torch.testing.assert_close(out.cls, x[:, 0])


def test_without_guided_adapters_nothing_of_them_is_built(bert_source: Path) -> None:
    enc = build_encoder(_spec(bert_source, guided=False))
    assert isinstance(enc, Any2PointEncoder)
    assert not list(enc.attn1.parameters())
    assert not any(k.startswith(("attn1.", "norm3.", "guided.")) for k in enc.state_dict())


def test_bad_specs_are_refused(bert_source: Path) -> None:
    with pytest.raises(ValueError, match="source_path"):
        Any2PointSpec()
    with pytest.raises(ValueError, match="positional table"):
        build_encoder(_spec(bert_source, positions=10_000))
    with pytest.raises(ValueError, match="pos_mode"):
        _spec(bert_source, pos_mode="sometimes")
    with pytest.raises(ValueError, match="rescale"):
        _spec(bert_source, rescale="sometimes")
    with pytest.raises(ValueError, match="direction"):
        _spec(bert_source, direction=[0, 0, 0])
    enc = build_encoder(_spec(bert_source))
    with pytest.raises(ValueError, match="needs at least 64"):
        enc.encode(_clouds(1, points=32))


def test_a_classifier_on_the_frozen_source_learns_to_separate_two_shapes(bert_source: Path) -> None:
    """The classifier with a frozen source fits 16 clouds of two shapes (training works end to end)."""
    from finetune.classification import PointClassifier

    torch.manual_seed(0)
    model = PointClassifier(2, encoder=_spec(bert_source), num_points=64, pool_points=64)
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(16, 64, 3, generator=gen) * 2 - 1
    labels = torch.arange(16) % 2
    stretch = torch.tensor([[1.0, 0.3, 0.3], [0.3, 1.0, 0.3]])[labels]  # rods along x or along y
    clouds = base * stretch[:, None, :]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(clouds), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        accuracy = (model(clouds).argmax(-1) == labels).float().mean()
    assert losses[-1] < 0.25 * losses[0]
    assert accuracy == 1.0
