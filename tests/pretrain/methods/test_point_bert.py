from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.artifacts import save_module_artifact
from pretrain.dvae import DiscreteVAE, DVAESpec
from pretrain.encoders.spec import DataContract, PointViTSpec
from pretrain.methods.point_bert import PointBERT, enqueue_keys, mix_patches
from tests.pretrain import dvae_reference as dref

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

SPEC = PointViTSpec.named(
    "tiny", num_groups=16, group_size=8, tokenizer_dim=16, cls_token=True, mask_token=True
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dvae = dref.randomize_dvae(DiscreteVAE(DVAESpec(**dref.TINY_SPEC)), seed=1)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return save_module_artifact(out, dvae, data=DataContract(num_points=64), provenance={"method": "test"})


def _model(tokenizer: Path, **kwargs: object) -> PointBERT:
    torch.manual_seed(0)
    return PointBERT(SPEC, str(tokenizer), queue_size=10, proj_dim=8, **kwargs)  # type: ignore[arg-type]


def test_init_freezes_tokenizer_and_initialises_from_it(tokenizer: Path) -> None:
    model = _model(tokenizer).train()
    assert not model.dvae.training
    assert not any(p.requires_grad for p in model.dvae.parameters())
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    for key, value in model.dvae.encoder.state_dict().items():
        assert torch.equal(model.encoder.tokenizer.state_dict()[key], value), key  # type: ignore[union-attr]
    for (name, a), (_, b) in zip(model.encoder.named_parameters(), model.momentum_encoder.named_parameters()):
        assert torch.equal(a, b), name
    assert model.queue.shape == (8, 10)
    assert int(model.queue_ptr) == 0
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(10))
    assert model.lm_head.out_features == 12


def test_rejects_incompatible_encoder(tokenizer: Path) -> None:
    with pytest.raises(ValueError, match="num_groups: encoder 8 vs tokenizer 16"):
        PointBERT(PointViTSpec.named("tiny", num_groups=8, group_size=8, tokenizer_dim=16, cls_token=True,
                                    mask_token=True), str(tokenizer))  # fmt: skip
    with pytest.raises(ValueError, match="cls_token=True and mask_token=True"):
        PointBERT(PointViTSpec.named("tiny", num_groups=16, group_size=8, tokenizer_dim=16), str(tokenizer))
    with pytest.raises(ValueError, match="mask_ratio"):
        _model(tokenizer, mask_ratio=(0.5, 0.2))


def test_block_mask_counts_follow_per_sample_ratio(tokenizer: Path, gen: torch.Generator) -> None:
    model = _model(tokenizer)
    centers = torch.rand(64, 16, 3, generator=gen)
    counts = model.make_mask(centers, gen).sum(1)
    assert counts.min() >= int(0.25 * 16)
    assert counts.max() <= int(0.45 * 16)
    assert len(counts.unique()) > 1  # a ratio per sample
    rand = _model(tokenizer, mask_type="rand").make_mask(centers, gen)
    assert rand.dtype == torch.bool
    assert rand.shape == (64, 16)
    assert 0.2 < rand.float().mean() < 0.5


def test_mix_patches_against_loop(gen: torch.Generator) -> None:
    batch, groups = 5, 6
    neigh = torch.randn(batch, groups, 4, 3, generator=gen)
    centers = torch.randn(batch, groups, 3, generator=gen)
    targets = torch.randint(100, (batch, groups), generator=gen)
    state = gen.get_state()
    ratio, mixed_neigh, mixed_centers, mixed_targets = mix_patches(neigh, centers, targets, generator=gen)
    gen.set_state(state)
    expected_ratio = torch.rand(batch, generator=gen)
    uniforms = torch.rand(batch, groups, generator=gen)
    torch.testing.assert_close(ratio, expected_ratio)
    for b in range(batch):
        for g in range(groups):
            source = b if uniforms[b, g] < expected_ratio[b] else batch - 1 - b
            assert torch.equal(mixed_neigh[b, g], neigh[source, g])
            assert torch.equal(mixed_centers[b, g], centers[source, g])
            assert int(mixed_targets[b, g]) == int(targets[source, g])


def test_enqueue_wraps_around() -> None:
    queue, ptr = torch.zeros(2, 5), torch.tensor([3])
    keys = torch.arange(8.0).view(4, 2)
    enqueue_keys(queue, ptr, keys)
    assert int(ptr) == 2
    assert queue.T.tolist() == [[4, 5], [6, 7], [0, 0], [0, 1], [2, 3]]
    enqueue_keys(queue, ptr, keys[:1])
    assert int(ptr) == 3
    assert queue[:, 2].tolist() == [0, 1]
    with pytest.raises(ValueError, match="keys must be"):
        enqueue_keys(queue, ptr, torch.zeros(6, 2))


def test_momentum_update_is_ema(tokenizer: Path) -> None:
    model = _model(tokenizer, momentum=0.9)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    model.momentum_update()
    for p_q, p_k, old in zip(model.encoder.parameters(), model.momentum_encoder.parameters(), before):
        torch.testing.assert_close(p_k, 0.9 * old + 0.1 * p_q)


@pytest.mark.parametrize("moco", [False, True])
def test_training_step_gradients_and_queue(tokenizer: Path, moco: bool) -> None:
    model = _model(tokenizer, moco=moco).train()
    points = torch.rand(4, 64, 3) * 2 - 1
    groups = model.encoder.group(points)
    targets = model.token_targets(groups)
    assert torch.equal(targets, model.dvae.logits(groups.neighborhoods, groups.centers).argmax(-1))
    queue_before = model.queue.clone()
    loss = model.training_step(points, batch_idx=0)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("encoder.", "lm_head.", "cls_head.")) for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert int(model.queue_ptr) == 4
    assert not torch.equal(model.queue[:, :4], queue_before[:, :4])
    assert torch.equal(model.queue[:, 4:], queue_before[:, 4:])
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(10))


def test_keys_are_normalised_momentum_projections(tokenizer: Path, gen: torch.Generator) -> None:
    model = _model(tokenizer).eval()  # no drop-path draws
    groups = model.encoder.group(torch.rand(3, 64, 3, generator=gen))
    state = gen.get_state()
    keys = model.momentum_keys(groups, gen)
    gen.set_state(state)
    mask = model.make_mask(groups.centers, gen)
    with torch.no_grad():
        out = model.momentum_encoder(
            model.momentum_encoder.embed(groups.neighborhoods), groups.centers, replace=mask
        )
        expected = F.normalize(model.momentum_cls_head(out.cls), dim=1)
    torch.testing.assert_close(keys, expected)
