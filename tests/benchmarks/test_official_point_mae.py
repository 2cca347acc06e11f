"""The benchmarks' restatement of the official Point-MAE computes pcpt's loss: timings compare like with like.

pcpt with ``embed_masked_patches=True`` embeds every patch as the official code does, so in training mode
(BatchNorm batch statistics, random mask given) both compute the same loss and gradients on the same weights.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from pretrain.encoders.spec import PointViTSpec
from pretrain.methods.point_mae import PointMAE
from pretrain.ops.grouping import group_points
from pretrain.optim import param_groups
from tests.cli_helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from official_point_mae import (
    OfficialPointMAE,
    fps_standin,
    knn_standin,
    official_optimizer,
    state_dict_from_pcpt,
)


def _pair() -> tuple[PointMAE, OfficialPointMAE]:
    torch.manual_seed(0)
    spec = PointViTSpec.named("tiny", num_groups=16, group_size=8, drop_path=0.0)
    pcpt = PointMAE(spec, decoder_depth=2, decoder_drop_path=0.0, embed_masked_patches=True).train()
    official = OfficialPointMAE(
        spec.embed_dim,
        spec.depth,
        spec.num_heads,
        decoder_depth=2,
        num_group=16,
        group_size=8,
        drop_path_rate=0.0,
    ).train()
    official.load_state_dict(state_dict_from_pcpt(pcpt.state_dict()))
    return pcpt, official


def _clouds(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 96, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_same_loss_and_gradients_as_pcpt_on_the_same_weights_and_mask() -> None:
    pcpt, official = _pair()
    points = _clouds(3)
    mask = pcpt.make_mask(pcpt.encoder.group(points), torch.Generator().manual_seed(1))
    ours, theirs = pcpt.loss_for(points, mask), official(points, mask=mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.backward()
    theirs.backward()
    grads = state_dict_from_pcpt({n: p.grad for n, p in pcpt.named_parameters() if p.grad is not None})
    for name, param in official.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_the_random_mask_masks_the_official_count_per_sample() -> None:
    _, official = _pair()
    mask = official.MAE_encoder.mask_center_rand(torch.zeros(5, 16, 3), np.random.default_rng(0))
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [int(0.6 * 16)] * 5


def test_fps_and_knn_standins_pick_what_pcpt_picks() -> None:
    points = _clouds(2, seed=3)
    points[:, 5] = 0.01  # near the origin: pointnet2's FPS never picks it
    groups = group_points(points, 16, 8, skip_near_origin=True)
    center_idx = fps_standin(points, 16)
    assert torch.equal(center_idx, groups.center_idx)
    assert not bool((center_idx == 5).any())
    centers = torch.gather(points, 1, center_idx[..., None].expand(-1, -1, 3))
    neighbours = knn_standin(points, centers, 8)
    assert torch.equal(neighbours.sort(dim=-1).values, groups.idx.sort(dim=-1).values)


def test_official_weight_decay_groups_match_pcpts() -> None:
    pcpt, official = _pair()
    names = {id(p): n for n, p in official.named_parameters()}
    theirs = {names[id(p)] for p in official_optimizer(official).param_groups[0]["params"]}
    pcpt_groups = param_groups(pcpt)
    no_decay = next(g for g in pcpt_groups if g["group"] == "no_decay")
    pcpt_names = {id(p): n for n, p in pcpt.named_parameters()}
    ours = set(state_dict_from_pcpt({pcpt_names[id(p)]: p for p in no_decay["params"]}))
    assert theirs == ours


def test_unmapped_parameter_is_named() -> None:
    with pytest.raises(KeyError, match=r"extra\.weight"):
        state_dict_from_pcpt({"extra.weight": torch.zeros(1)})
