from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.optim import is_no_decay, param_groups, split_decay_names


class Toy(nn.Module):
    """Parameter names of the official Point-MAE / Point-BERT classifier, in miniature."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 4))
        self.qkv = nn.Linear(4, 12, bias=False)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv1d(4, 4, 1)
        self.bn = nn.BatchNorm1d(4)
        self.norm_proj = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def reference_split(model, extra=()):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if len(p.shape) == 1 or name.endswith(".bias") or "token" in name or any(e in name for e in extra):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def test_official_rule():
    decay, no_decay = split_decay_names(Toy())
    assert set(decay) == {
        "cls_pos",
        "pos_embed.0.weight",
        "pos_embed.2.weight",
        "qkv.weight",
        "conv.weight",
        "norm_proj.weight",
    }
    assert set(no_decay) == {
        "cls_token",
        "mask_token",
        "pos_embed.0.bias",
        "pos_embed.2.bias",
        "norm.weight",
        "norm.bias",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "norm_proj.bias",
    }
    assert (decay, no_decay) == reference_split(Toy())


def test_extra_no_decay_names():
    decay, no_decay = split_decay_names(Toy(), no_decay_names=("norm",))
    assert "norm_proj.weight" in no_decay
    assert "norm_proj.weight" not in decay
    assert (decay, no_decay) == reference_split(Toy(), extra=("norm",))


def test_param_groups_for_adamw():
    model = Toy()
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [g["group"] for g in groups] == ["decay", "no_decay"]
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(id(p) for p in trainable)
    assert all(id(p) not in ids for p in model.frozen.parameters())
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert len(opt.param_groups) == 2
    # decay only acts on the first group: zero grads, one step
    for p in trainable:
        p.data.fill_(1.0)
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.cls_pos, torch.full_like(model.cls_pos, 1 - 1e-3 * 0.05))
    assert torch.equal(model.cls_token, torch.ones_like(model.cls_token))


def test_empty_group_is_left_out_and_errors():
    groups = param_groups(nn.LayerNorm(3), 0.1)
    assert [g["group"] for g in groups] == ["no_decay"]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(frozen, 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(nn.Linear(2, 2), -1.0)


def test_is_no_decay_scalars():
    assert is_no_decay("logit_scale", 0)
    assert not is_no_decay("blocks.0.mlp.fc1.weight", 2)


def test_a_module_named_tokenizer_is_decayed_like_the_official_encoder():
    """pcpt's ``tokenizer.*`` is the official ``encoder.*`` (mini-PointNet): its conv weights are decayed."""
    from pretrain.encoders.spec import PointViTSpec
    from pretrain.methods.point_mae import PointMAE

    model = PointMAE(PointViTSpec.named("tiny"), decoder_depth=1)
    decay, no_decay = split_decay_names(model)
    assert "encoder.tokenizer.first_conv.0.weight" in decay
    assert "encoder.tokenizer.second_conv.3.weight" in decay
    assert {"decoder.mask_token", "encoder.tokenizer.first_conv.1.weight"} <= set(no_decay)


def _train(optimizer_factory, steps: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
    optimizer = optimizer_factory(param_groups(model))
    data = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_adamw_is_fused_on_cpu_and_computes_torchs_op_by_op_update():
    from pretrain.optim import AdamW

    assert AdamW(nn.Linear(2, 2).parameters()).defaults["fused"] is True
    assert not AdamW(nn.Linear(2, 2).parameters(), fused=False).defaults["fused"]
    fused = _train(lambda groups: AdamW(groups, lr=1e-2))
    reference = _train(lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05, foreach=False))
    for a, b in zip(fused, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_adamw_takes_groups_whose_params_are_iterators():
    from pretrain.optim import AdamW

    model = nn.Linear(3, 2)
    groups = [{"params": iter([model.weight])}, {"params": model.bias, "weight_decay": 0.0}]
    optimizer = AdamW(groups)
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 1]
    assert optimizer.defaults["fused"] is True
