from __future__ import annotations

import math

import pytest
import torch

from pretrain.optim import _build_scheduler
from pretrain.schedules import (
    CosineWarmRestartsFactor,
    CosineWarmRestartsLR,
    WarmupCosineFactor,
    WarmupCosineLR,
    cosine_ramp,
    cosine_warm_restarts,
    cosine_with_warmup,
    gumbel_temperature,
    kl_weight,
)


def timm_cosine_reference(t, *, t_initial, lr_min, warmup_lr_init, warmup_t, base):
    """timm CosineLRScheduler._get_lr (cycle_mul=1, cycle_decay=1, cycle_limit=1, warmup_prefix=False)."""
    if t < warmup_t:
        return warmup_lr_init + t * (base - warmup_lr_init) / warmup_t
    i = t // t_initial
    t_curr = t - t_initial * i
    if i < 1:
        return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t_curr / t_initial))
    return lr_min


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_cosine_with_warmup_matches_timm_reference(warmup):
    for t in range(0, 320):
        got = cosine_with_warmup(t, total_steps=300, warmup_steps=warmup, base_lr=1e-3)
        want = timm_cosine_reference(
            t, t_initial=300, lr_min=1e-6, warmup_lr_init=1e-6, warmup_t=warmup, base=1e-3
        )
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), t


def test_cosine_with_warmup_closed_forms():
    kw: dict = {"total_steps": 100, "warmup_steps": 10, "base_lr": 0.5, "min_lr": 0.0, "warmup_init_lr": 0.0}
    assert cosine_with_warmup(0, **kw) == 0.0
    assert cosine_with_warmup(5, **kw) == pytest.approx(0.25)
    # no warmup prefix: the cosine is measured from step 0, so step 10 is cos(pi/10), not the peak
    assert cosine_with_warmup(10, **kw) == pytest.approx(0.25 * (1 + math.cos(math.pi / 10)))
    assert cosine_with_warmup(50, **kw) == pytest.approx(0.25)
    assert cosine_with_warmup(100, **kw) == 0.0
    assert cosine_with_warmup(10_000, **kw) == 0.0
    # default floors are the official 1e-6
    assert cosine_with_warmup(0, total_steps=10, warmup_steps=2, base_lr=1.0) == 1e-6
    assert cosine_with_warmup(10, total_steps=10, warmup_steps=2, base_lr=1.0) == 1e-6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 0, "warmup_steps": 0}, "total_steps"),
        ({"total_steps": 5, "warmup_steps": 6}, "warmup_steps"),
        ({"total_steps": 5, "warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_cosine_with_warmup_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_with_warmup(0, base_lr=1.0, **kwargs)


def test_cosine_with_warmup_rejects_negative_step():
    with pytest.raises(ValueError, match="step"):
        cosine_with_warmup(-1, total_steps=5, warmup_steps=0, base_lr=1.0)


def _optimizer():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 4e-3}], lr=1.0)


def _run(opt, sched, n):
    lrs = []
    for _ in range(n):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs


def test_scheduler_follows_function_per_group():
    opt = _optimizer()
    sched = WarmupCosineLR(opt, warmup_epochs=2, total_steps=20, steps_per_epoch=2)
    lrs = _run(opt, sched, 25)
    for step, (lr_a, lr_b) in enumerate(lrs):
        assert lr_a == pytest.approx(cosine_with_warmup(step, total_steps=20, warmup_steps=4, base_lr=1e-3))
        assert lr_b == pytest.approx(cosine_with_warmup(step, total_steps=20, warmup_steps=4, base_lr=4e-3))
    # absolute floors, independent of the group's base lr
    assert lrs[0] == pytest.approx([1e-6, 1e-6])
    assert lrs[-1] == pytest.approx([1e-6, 1e-6])


def test_scheduler_resumes_from_state_dict():
    opt = _optimizer()
    sched = WarmupCosineLR(opt, warmup_epochs=1, total_steps=30, steps_per_epoch=5)
    full = _run(opt, sched, 30)

    opt1 = _optimizer()
    sched1 = WarmupCosineLR(opt1, warmup_epochs=1, total_steps=30, steps_per_epoch=5)
    first = _run(opt1, sched1, 12)
    opt_state, sched_state = opt1.state_dict(), sched1.state_dict()

    opt2 = _optimizer()
    sched2 = WarmupCosineLR(opt2, warmup_epochs=1, total_steps=30, steps_per_epoch=5)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    second = _run(opt2, sched2, 18)
    flat = [lr for row in first + second for lr in row]
    assert flat == pytest.approx([lr for row in full for lr in row], rel=1e-12)


def test_scheduler_needs_the_run_length_and_caps_the_warmup():
    with pytest.raises(ValueError, match="total_steps and steps_per_epoch"):
        WarmupCosineLR(_optimizer())
    sched = WarmupCosineLR(_optimizer(), warmup_epochs=50, total_steps=8, steps_per_epoch=4)
    assert sched.lr_lambdas[0].warmup_steps == 7  # at most the run less one step


def test_zero_base_lr_group_stays_zero():
    factor = WarmupCosineFactor(base_lr=0.0, total_steps=10, warmup_steps=2)
    assert [factor(s) for s in range(12)] == [0.0] * 12


def test_cosine_ramp_closed_form():
    kw: dict = {"start_it": 10, "ramp_iters": 100, "start_value": 2.0, "end_value": 0.0}
    assert cosine_ramp(0, **kw) == 2.0
    assert cosine_ramp(10, **kw) == 2.0
    assert cosine_ramp(60, **kw) == pytest.approx(1.0)
    assert cosine_ramp(35, **kw) == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert cosine_ramp(110, **kw) == 0.0
    assert cosine_ramp(10**7, **kw) == 0.0
    with pytest.raises(ValueError, match="ramp_iters"):
        cosine_ramp(0, start_it=0, ramp_iters=0, start_value=1.0, end_value=0.0)


def point_bert_temp(niter):
    start, target, ntime = 1.0, 0.0625, 100000
    if niter > ntime:
        return target
    return target + (start - target) * (1.0 + math.cos(math.pi * float(niter) / ntime)) / 2.0


def point_bert_kl(niter):
    start, target, ntime = 0.0, 0.1, 100000
    n = niter - 10000
    if n > ntime:
        return target
    if n < 0:
        return 0.0
    return target + (start - target) * (1.0 + math.cos(math.pi * float(n) / ntime)) / 2.0


@pytest.mark.parametrize(
    "it", [0, 1, 5_000, 9_999, 10_000, 10_001, 50_000, 60_000, 99_999, 100_000, 110_000, 200_000]
)
def test_dvae_schedules_match_point_bert(it):
    assert gumbel_temperature(it) == pytest.approx(point_bert_temp(it), rel=1e-12, abs=1e-15)
    assert kl_weight(it) == pytest.approx(point_bert_kl(it), rel=1e-12, abs=1e-15)


def test_dvae_schedule_landmarks():
    assert gumbel_temperature(0) == 1.0
    assert gumbel_temperature(50_000) == pytest.approx((1 + 1 / 16) / 2)
    assert gumbel_temperature(100_000) == pytest.approx(1 / 16)
    assert gumbel_temperature(500_000) == 1 / 16
    assert kl_weight(9_999) == 0.0
    assert kl_weight(60_000) == pytest.approx(0.05)
    assert kl_weight(110_000) == pytest.approx(0.1)
    assert kl_weight(10**6) == 0.1


class WarmRestartsReplay:
    """``CosineAnnealingWarmupRestarts`` stepped by ``step()`` (no epoch argument), replayed step by step."""

    def __init__(self, *, first_cycle_steps, cycle_mult, max_lr, min_lr, warmup_steps, gamma):
        self.cycle_steps, self.cycle_mult, self.warmup = first_cycle_steps, cycle_mult, warmup_steps
        self.base_max, self.min_lr, self.gamma = max_lr, min_lr, gamma
        self.step_in_cycle, self.cycle = -1, 0
        self.step()  # the base class steps once on construction

    def step(self):
        self.step_in_cycle += 1
        if self.step_in_cycle >= self.cycle_steps:
            self.cycle += 1
            self.step_in_cycle -= self.cycle_steps
            self.cycle_steps = int((self.cycle_steps - self.warmup) * self.cycle_mult) + self.warmup
        peak = self.base_max * self.gamma**self.cycle
        t = self.step_in_cycle
        if t < self.warmup:
            self.lr = (peak - self.min_lr) * t / self.warmup + self.min_lr
        else:
            span = self.cycle_steps - self.warmup
            cosine = 1 + math.cos(math.pi * (t - self.warmup) / span)
            self.lr = self.min_lr + (peak - self.min_lr) * cosine / 2


@pytest.mark.parametrize(
    ("cycle", "warmup", "gamma", "mult", "min_lr"),
    [(100, 5, 0.6, 1.0, 0.0), (10, 3, 0.5, 2.0, 1e-5), (7, 0, 1.0, 1.5, 0.0), (1, 0, 0.9, 1.0, 0.0)],
)
def test_cosine_warm_restarts_matches_the_package_stepping(cycle, warmup, gamma, mult, min_lr):
    replay = WarmRestartsReplay(
        first_cycle_steps=cycle, cycle_mult=mult, max_lr=1e-3, min_lr=min_lr, warmup_steps=warmup, gamma=gamma
    )
    kw = {"cycle_steps": cycle, "warmup_steps": warmup, "max_lr": 1e-3, "min_lr": min_lr, "gamma": gamma}
    for step in range(320):
        got = cosine_warm_restarts(step, cycle_mult=mult, **kw)
        assert got == pytest.approx(replay.lr, rel=1e-12, abs=1e-18), step
        replay.step()


def test_cosine_warm_restarts_closed_forms_at_the_cycle_boundaries():
    kw: dict = {"cycle_steps": 100, "warmup_steps": 5, "max_lr": 1e-3, "gamma": 0.6}  # ViPFormer, per epoch

    def lr(step):
        return cosine_warm_restarts(step, **kw)

    assert lr(0) == 0.0
    assert lr(1) == pytest.approx(2e-4)
    assert lr(5) == pytest.approx(1e-3)  # end of warmup: the peak
    assert lr(99) == pytest.approx(1e-3 * (1 + math.cos(math.pi * 94 / 95)) / 2)  # last step, not quite 0
    assert lr(100) == 0.0  # restart: warmup from min_lr
    assert lr(102) == pytest.approx(0.6e-3 * 2 / 5)
    assert lr(105) == pytest.approx(0.6e-3)
    assert lr(205) == pytest.approx(0.36e-3)
    assert lr(299) == pytest.approx(0.36e-3 * (1 + math.cos(math.pi * 94 / 95)) / 2)
    middle = cosine_warm_restarts(55, cycle_steps=105, warmup_steps=5, max_lr=1.0, min_lr=0.2)
    assert middle == pytest.approx(0.6)
    # cycle_mult 2: cycles of 10, 5 + 2·5 = 15, 5 + 2·10 = 25 steps
    grow: dict = {"cycle_steps": 10, "warmup_steps": 5, "max_lr": 1.0, "gamma": 0.5, "cycle_mult": 2.0}
    assert cosine_warm_restarts(10, **grow) == 0.0
    assert cosine_warm_restarts(15, **grow) == pytest.approx(0.5)
    assert cosine_warm_restarts(25, **grow) == 0.0
    assert cosine_warm_restarts(30, **grow) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cycle_steps": 0, "warmup_steps": 0}, "cycle_steps"),
        ({"cycle_steps": 5, "warmup_steps": 5}, "warmup_steps"),
        ({"cycle_steps": 5, "warmup_steps": 1, "gamma": -1.0}, "gamma"),
        ({"cycle_steps": 5, "warmup_steps": 1, "cycle_mult": 0.5}, "cycle_mult"),
    ],
)
def test_cosine_warm_restarts_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_warm_restarts(0, max_lr=1.0, **kwargs)
    with pytest.raises(ValueError, match="step"):
        cosine_warm_restarts(-1, cycle_steps=5, warmup_steps=1, max_lr=1.0)


def test_warm_restarts_scheduler_follows_the_function_per_step_and_group():
    opt = _optimizer()
    sched = CosineWarmRestartsLR(opt, cycle_epochs=3, warmup_epochs=1, total_steps=40, steps_per_epoch=4)
    lrs = _run(opt, sched, 40)
    for step, (lr_a, lr_b) in enumerate(lrs):
        for lr, base in ((lr_a, 1e-3), (lr_b, 4e-3)):
            want = cosine_warm_restarts(step, cycle_steps=12, warmup_steps=4, max_lr=base, gamma=0.6)
            assert lr == pytest.approx(want, rel=1e-12, abs=1e-18), step
    assert lrs[0] == [0.0, 0.0]
    assert lrs[4] == pytest.approx([1e-3, 4e-3])
    assert lrs[12] == [0.0, 0.0]
    assert lrs[16] == pytest.approx([0.6e-3, 2.4e-3])
    assert lrs[28] == pytest.approx([0.36e-3, 1.44e-3])


def test_warm_restarts_scheduler_per_epoch_staircase():
    opt = _optimizer()
    sched = CosineWarmRestartsLR(
        opt, cycle_epochs=4, warmup_epochs=1, per_epoch=True, total_steps=30, steps_per_epoch=3
    )
    lrs = _run(opt, sched, 30)
    for step, (lr_a, _) in enumerate(lrs):
        want = cosine_warm_restarts(step // 3, cycle_steps=4, warmup_steps=1, max_lr=1e-3, gamma=0.6)
        assert lr_a == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert lrs[3][0] == pytest.approx(1e-3)  # epoch 1, every step of it
    assert lrs[5][0] == pytest.approx(1e-3)


def test_warm_restarts_scheduler_one_cycle_over_the_run_and_caps_the_warmup():
    opt = _optimizer()
    sched = CosineWarmRestartsLR(opt, cycle_epochs=None, warmup_epochs=2, total_steps=20, steps_per_epoch=2)
    lrs = _run(opt, sched, 20)
    for step, (lr_a, _) in enumerate(lrs):
        want = cosine_warm_restarts(step, cycle_steps=20, warmup_steps=4, max_lr=1e-3, gamma=0.6)
        assert lr_a == pytest.approx(want, rel=1e-12, abs=1e-18)
    capped = CosineWarmRestartsLR(
        _optimizer(), cycle_epochs=1, warmup_epochs=5, total_steps=8, steps_per_epoch=4
    )
    assert capped.lr_lambdas[0].cycle_steps == 4
    assert capped.lr_lambdas[0].warmup_steps == 3  # at most the cycle less one step


def test_warm_restarts_scheduler_resumes_from_state_dict():
    def build(opt):
        return CosineWarmRestartsLR(opt, cycle_epochs=2, warmup_epochs=0.5, total_steps=30, steps_per_epoch=5)

    opt = _optimizer()
    full = _run(opt, build(opt), 30)
    opt1 = _optimizer()
    sched1 = build(opt1)
    first = _run(opt1, sched1, 13)
    opt_state, sched_state = opt1.state_dict(), sched1.state_dict()
    opt2 = _optimizer()
    sched2 = build(opt2)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    second = _run(opt2, sched2, 17)
    flat = [lr for row in first + second for lr in row]
    assert flat == pytest.approx([lr for row in full for lr in row], rel=1e-12, abs=1e-18)


def test_warm_restarts_scheduler_takes_the_run_length_from_the_training_module():
    opt = _optimizer()

    def factory(optimizer, **kw):
        return CosineWarmRestartsLR(optimizer, cycle_epochs=2, warmup_epochs=1, **kw)

    sched = _build_scheduler(factory, opt, 12, 3)
    assert isinstance(sched, CosineWarmRestartsLR)
    assert (sched.lr_lambdas[0].cycle_steps, sched.lr_lambdas[0].warmup_steps) == (6, 3)
    with pytest.raises(ValueError, match="total_steps and steps_per_epoch"):
        CosineWarmRestartsLR(_optimizer())


def test_warm_restarts_factor_zero_base_lr_and_bad_arguments():
    factor = CosineWarmRestartsFactor(base_lr=0.0, cycle_steps=4, warmup_steps=1)
    assert [factor(s) for s in range(10)] == [0.0] * 10
    with pytest.raises(ValueError, match="stride"):
        CosineWarmRestartsFactor(base_lr=1.0, cycle_steps=4, warmup_steps=1, stride=0)
    with pytest.raises(ValueError, match="cycle_epochs"):
        CosineWarmRestartsLR(_optimizer(), cycle_epochs=0, total_steps=10, steps_per_epoch=2)
    with pytest.raises(ValueError, match="warmup_epochs"):
        CosineWarmRestartsLR(_optimizer(), warmup_epochs=-1, total_steps=10, steps_per_epoch=2)
