"""Point-MAE: the loss equals the official formula computed independently; shapes, masks, gradients."""

from __future__ import annotations

import pytest
import torch

from pretrain.encoders.spec import PointViTSpec
from pretrain.methods.point_mae import PointMAE
from pretrain.ops import random_group_mask


def _fps_reference(xyz: torch.Tensor, n: int) -> list[int]:
    chosen = [0]
    dist = torch.full((xyz.shape[0],), float("inf"), dtype=torch.float64)
    for _ in range(n - 1):
        last = xyz[chosen[-1]].double()
        dist = torch.minimum(dist, ((xyz.double() - last) ** 2).sum(-1))
        chosen.append(int(dist.argmax()))
    return chosen


def _groups_reference(xyz: torch.Tensor, g: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    centers, neigh = [], []
    for cloud in xyz:
        c = cloud[_fps_reference(cloud, g)]
        d = ((c[:, None, :] - cloud[None, :, :]) ** 2).sum(-1)
        idx = d.argsort(dim=1, stable=True)[:, :k]
        centers.append(c)
        neigh.append(cloud[idx] - c[:, None, :])
    return torch.stack(centers), torch.stack(neigh)


def _chamfer_l2_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official ChamferDistanceL2: mean squared NN distance pred→target + target→pred, over all points."""
    d1, d2 = [], []
    for a, b in zip(pred, target):
        for p in a:
            d1.append(min(float(((p - q) ** 2).sum()) for q in b))
        for q in b:
            d2.append(min(float(((q - p) ** 2).sum()) for p in a))
    return torch.tensor(sum(d1) / len(d1) + sum(d2) / len(d2), dtype=torch.float64)


@pytest.fixture
def model() -> PointMAE:
    torch.manual_seed(0)
    spec = PointViTSpec.named("tiny", fps_skip_near_origin=False, drop_path=0.0)
    return PointMAE(spec, mask_ratio=0.6, decoder_depth=2, decoder_drop_path=0.0).eval()


def test_loss_equals_official_formula(model: PointMAE, gen: torch.Generator) -> None:
    xyz = torch.rand(2, 96, 3, generator=gen) * 2 - 1
    spec = model.encoder_spec
    mask = random_group_mask(2, spec.num_groups, 0.6, generator=gen)
    assert mask.sum(1).tolist() == [int(0.6 * spec.num_groups)] * 2
    with torch.no_grad():
        loss = model.loss_for(xyz, mask)

        # Independent computation: reference grouping, explicit decoder loop, brute-force Chamfer-L2.
        centers, neigh = _groups_reference(xyz, spec.num_groups, spec.group_size)
        tokens = model.encoder.embed(neigh)
        visible = model.encoder(tokens, centers, keep=~mask).tokens
        dec = model.decoder
        vis_c, msk_c = centers[~mask].view(2, -1, 3), centers[mask].view(2, -1, 3)
        x = torch.cat([visible, dec.mask_token.expand(2, msk_c.shape[1], -1)], dim=1)
        pos = dec.pos_embed(torch.cat([vis_c, msk_c], dim=1))
        for block in dec.blocks:
            x = block(x + pos)
        pred = dec.head(dec.norm(x[:, -msk_c.shape[1] :])).reshape(-1, spec.group_size, 3)
        target = neigh[mask].reshape(-1, spec.group_size, 3)
        expected = _chamfer_l2_reference(pred, target)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)


def test_training_gradients_reach_encoder_and_decoder(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    model = PointMAE(PointViTSpec.named("tiny"), decoder_depth=1)
    loss = model.loss_for(torch.rand(3, 128, 3, generator=gen), generator=gen)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_prediction_shapes_and_mask_count(model: PointMAE, gen: torch.Generator) -> None:
    groups = model.encoder.group(torch.rand(3, 128, 3, generator=gen))
    mask = model.make_mask(groups, gen)
    assert mask.sum(1).tolist() == [int(0.6 * 16)] * 3
    pred, target = model.reconstruct(groups, mask)
    assert pred.shape == target.shape == (3, int(0.6 * 16), 8, 3)


def test_block_masking_option(gen: torch.Generator) -> None:
    model = PointMAE(PointViTSpec.named("tiny"), mask_type="block", decoder_depth=1).eval()
    groups, _ = model.encoder.tokenize(torch.rand(2, 128, 3, generator=gen))
    mask = model.make_mask(groups, gen)
    assert mask.sum(1).tolist() == [int(0.6 * 16)] * 2


@pytest.mark.parametrize("ratio", [0.0, 1.0, 0.01])
def test_bad_mask_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        PointMAE(PointViTSpec.named("tiny"), mask_ratio=ratio)


def test_random_fps_start_draws_from_the_step_generator_only() -> None:
    torch.manual_seed(0)
    model = PointMAE(PointViTSpec.named("tiny", fps_start="random", drop_path=0.0), decoder_depth=1).eval()
    xyz = torch.rand(2, 128, 3, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):
        torch.manual_seed(123)  # the default generator's state must not matter
        global_state = torch.random.get_rng_state()
        with torch.no_grad():
            losses.append(model.loss_for(xyz, generator=torch.Generator().manual_seed(7)))
        assert torch.equal(torch.random.get_rng_state(), global_state)
    assert torch.equal(losses[0], losses[1])
    with torch.no_grad():
        other = model.loss_for(xyz, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other, losses[0])  # the start (and the mask) follow the generator


def _embedded_shapes(model: PointMAE) -> list[tuple[int, ...]]:
    """Records the (B, G', K, 3) inputs of the encoder's mini-PointNet."""
    shapes: list[tuple[int, ...]] = []
    model.encoder.tokenizer.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("embed_masked", [False, True])
def test_only_visible_patches_are_embedded_unless_asked(embed_masked: bool, gen: torch.Generator) -> None:
    model = PointMAE(PointViTSpec.named("tiny"), decoder_depth=1, embed_masked_patches=embed_masked).train()
    shapes = _embedded_shapes(model)
    model.loss_for(torch.rand(3, 128, 3, generator=gen), generator=gen)
    visible = 16 - int(0.6 * 16)
    assert shapes == [(3, 16 if embed_masked else visible, 8, 3)]


def test_visible_only_embedding_is_the_official_loss_in_eval_mode(gen: torch.Generator) -> None:
    """With BatchNorm's running statistics the tokens do not depend on which other patches were embedded."""
    torch.manual_seed(0)
    model = PointMAE(PointViTSpec.named("tiny"), decoder_depth=1, decoder_drop_path=0.0)
    xyz = torch.rand(2, 128, 3, generator=gen) * 2 - 1
    model.train()
    for _ in range(3):  # running statistics away from their initial values
        model.loss_for(xyz, generator=torch.Generator().manual_seed(0))
    model.eval()
    mask = random_group_mask(2, 16, 0.6, generator=gen)
    with torch.no_grad():
        visible_only = model.loss_for(xyz, mask)
        model.embed_masked_patches = True
        official = model.loss_for(xyz, mask)
    torch.testing.assert_close(visible_only, official, atol=1e-6, rtol=1e-6)


def test_training_mode_batch_statistics_come_from_the_visible_patches(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    spec = PointViTSpec.named("tiny", drop_path=0.0)
    model = PointMAE(spec, decoder_depth=1, decoder_drop_path=0.0).train()
    xyz = torch.rand(2, 128, 3, generator=gen) * 2 - 1
    mask = random_group_mask(2, 16, 0.6, generator=gen)
    loss = model.loss_for(xyz, mask)
    with torch.no_grad():  # reference: the visible neighbourhoods alone through the train-mode tokenizer
        groups = model.encoder.group(xyz)
        visible_patches = groups.neighborhoods[~mask].reshape(2, -1, 8, 3)
        tokens = model.encoder.embed(visible_patches)
        visible = model.encoder(tokens, groups.centers[~mask].reshape(2, -1, 3)).tokens
        centers = groups.centers
        pred = model.decoder(visible, centers[~mask].reshape(2, -1, 3), centers[mask].reshape(2, -1, 3))
        target = groups.neighborhoods[mask].reshape_as(pred)
        expected = _chamfer_l2_reference(pred.flatten(0, 1), target.flatten(0, 1))
    torch.testing.assert_close(loss.detach().double(), expected, atol=1e-6, rtol=1e-6)
    model.embed_masked_patches = True  # the official statistics (all 16 patches) give another loss
    assert abs(float(model.loss_for(xyz, mask)) - float(loss)) > 1e-6


def test_unequal_keep_counts_are_rejected(gen: torch.Generator) -> None:
    model = PointMAE(PointViTSpec.named("tiny"), decoder_depth=1)
    groups = model.encoder.group(torch.rand(2, 128, 3, generator=gen))
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[0, :3], keep[1, :4] = True, True
    with pytest.raises(ValueError, match="same number of tokens per row"):
        model.encoder.encode_kept(groups, keep)
