"""MicroBatchIndex: batches of one optimiser step are numbered from 0, whatever Lightning's batch_idx says."""

from __future__ import annotations

from pretrain.training import MicroBatchIndex


def test_batches_are_numbered_within_their_optimiser_step() -> None:
    index = MicroBatchIndex()
    steps = [0, 0, 0, 1, 1, 1, 2, 2, 2]  # accumulation over three batches
    assert [index.advance(step) for step in steps] == [0, 1, 2] * 3
    assert index.index == 2


def test_a_resumed_run_starts_at_zero_like_the_uninterrupted_one() -> None:
    uninterrupted, resumed = MicroBatchIndex(), MicroBatchIndex()
    seen = [uninterrupted.advance(step) for step in (4, 5, 6)]
    assert [resumed.advance(step) for step in (5, 6)] == seen[1:] == [0, 0]
