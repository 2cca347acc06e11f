"""Any2Point's adapters on a frozen pcpt encoder artifact: what trains, what is saved, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.artifacts import load_encoder, save_encoder
from pretrain.encoders import (
    DataContract,
    PointAdapterEncoder,
    PointAdapterSpec,
    PointViTSpec,
    ViPFormerPointSpec,
    build_encoder,
)
from pretrain.encoders.point_adapter import BaseEncoderError


def _base(out: Path, seed: int = 0, **fields: object) -> Path:
    torch.manual_seed(seed)
    spec = PointViTSpec.named("tiny", num_groups=8, group_size=8, **fields)
    return save_encoder(
        out, build_encoder(spec), data=DataContract(num_points=64), provenance={"method": "t"}
    )


def _adapted(base: Path, **fields: object) -> PointAdapterEncoder:
    spec = PointAdapterSpec.from_dict({"base_path": str(base), "adapter_dim": 4, "attn_heads": 2, **fields})
    encoder = build_encoder(spec)
    assert isinstance(encoder, PointAdapterEncoder)
    return encoder


def _clouds(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 64, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_only_adapters_and_the_final_norm_train(tmp_path: Path) -> None:
    enc = _adapted(_base(tmp_path / "base"))
    trainable = {id(p) for p in enc.parameters() if p.requires_grad}
    by_module = {id(p) for m in enc.trainable_modules().values() for p in m.parameters()}
    assert trainable == by_module
    assert {id(p) for p in enc.base.tokenizer.parameters()}.isdisjoint(trainable)
    assert {id(p) for p in enc.base.norm.parameters()} <= trainable
    frozen_norm = _adapted(_base(tmp_path / "b2"), train_norm=False)
    assert not any(p.requires_grad for p in frozen_norm.base.norm.parameters())


def test_training_leaves_the_base_bit_identical(tmp_path: Path) -> None:
    enc = _adapted(_base(tmp_path / "base"))
    before = {k: v.clone() for k, v in enc.frozen_state().items()}
    params = [p for p in enc.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    assert not enc.base.training  # as built: frozen BatchNorm statistics and drop-path in eval mode
    assert enc.trainable_modules()["mlp.0"].training
    enc.train()
    assert not enc.base.training  # and after train()
    for step in range(3):
        loss = enc.pool(enc.encode(_clouds(4, step))).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = enc.frozen_state()
    assert before.keys() == after.keys()
    assert any(k.startswith("tokenizer.") and "running_mean" in k for k in after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_the_adapters_change_the_features(tmp_path: Path) -> None:
    base_path = _base(tmp_path / "base")
    base, _ = load_encoder(base_path)
    enc = _adapted(base_path).eval()
    clouds = _clouds(2)
    with torch.no_grad():
        plain = base.eval().pool(base.encode(clouds))
        adapted = enc.pool(enc.encode(clouds))
        without = _adapted(base_path, adapter_dim=0, guided=False).eval()
        torch.testing.assert_close(without.pool(without.encode(clouds)), plain)
    assert adapted.shape == plain.shape
    assert not torch.allclose(adapted, plain)


def test_a_sample_does_not_depend_on_its_batch_mates(tmp_path: Path) -> None:
    enc = _adapted(_base(tmp_path / "base", cls_token=True)).eval()
    clouds = _clouds(4, 1)
    with torch.no_grad():
        alone = enc.pool(enc.encode(clouds[:1]))
        together = enc.pool(enc.encode(clouds))
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


def test_artifact_holds_the_adapters_only_and_checks_the_base(tmp_path: Path) -> None:
    base_path = _base(tmp_path / "base")
    enc = _adapted(base_path).eval()
    state = enc.state_dict()
    assert not any(k.startswith("base.tokenizer.") or k.endswith("attn.qkv.weight") for k in state)
    assert not any(".adapters.output.attn1." in k for k in state)
    assert any(k.startswith("attn1.") for k in state)
    art = save_encoder(tmp_path / "art", enc, data=DataContract(num_points=64), provenance={})
    loaded, meta = load_encoder(art)
    assert meta["spec"]["base_sha256"] == enc.spec.base_sha256
    clouds = _clouds(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().pool(loaded.encode(clouds)), enc.pool(enc.encode(clouds)))
    _base(base_path, seed=1)  # the base artifact is overwritten with other weights
    with pytest.raises(BaseEncoderError, match="sha256"):
        load_encoder(art)


def test_bases_without_adapter_contexts_and_missing_bases_are_refused(tmp_path: Path) -> None:
    spec = ViPFormerPointSpec(embed_dim=32, num_latents=8, group_size=8, num_sa_layers=1, num_heads=2)
    vip = save_encoder(tmp_path / "vip", build_encoder(spec), data=DataContract(), provenance={})
    with pytest.raises(BaseEncoderError, match="point_vit family"):
        _adapted(vip)
    with pytest.raises(BaseEncoderError, match="missing"):
        _adapted(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="base_path"):
        PointAdapterSpec()
