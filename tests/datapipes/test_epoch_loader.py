"""EpochLoader: the position a checkpoint records and the batches a resumed pass skips."""

from __future__ import annotations

import pytest

from datapipes.epochs import EpochLoader


def _loader(progress: dict[str, tuple[int, int]]) -> EpochLoader:
    return EpochLoader(
        list(range(8)),  # type: ignore[arg-type]  # batch stand-ins: their index in the pass
        length=8,
        on_epoch=lambda epoch: None,
        epoch_source=lambda: 1,
        progress_source=lambda: progress["now"],
    )


def test_a_fresh_pass_records_the_source_count() -> None:
    progress = {"now": (1, 0)}
    loader = _loader(progress)
    batches = iter(loader)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    progress["now"] = (1, 3)
    assert loader.state_dict() == {"epoch": 1, "batches_done": 3}


@pytest.mark.parametrize("source_start", [0, 1, 3])  # restarted at zero, restored lagging by one, restored
def test_a_resumed_pass_skips_the_trained_batches_and_records_skipped_plus_trained(source_start: int) -> None:
    progress = {"now": (1, source_start)}
    loader = _loader(progress)
    loader.load_state_dict({"epoch": 1, "batches_done": 3})
    batches = iter(loader)
    assert next(batches) == 3
    assert next(batches) == 4
    progress["now"] = (1, source_start + 2)
    assert loader.state_dict() == {"epoch": 1, "batches_done": 5}
    resumed_again = _loader({"now": (1, 0)})
    resumed_again.load_state_dict(loader.state_dict())
    assert list(resumed_again) == [5, 6, 7]


def test_a_position_of_another_epoch_skips_nothing() -> None:
    loader = _loader({"now": (1, 0)})
    loader.load_state_dict({"epoch": 0, "batches_done": 3})
    assert list(loader) == list(range(8))


def test_a_position_at_the_end_of_the_epoch_gives_an_empty_pass_then_the_next_epoch() -> None:
    epochs: list[int] = []
    loader = EpochLoader(
        list(range(8)),  # type: ignore[arg-type]
        length=8,
        on_epoch=epochs.append,
        progress_source=lambda: None,
    )
    loader.set_epoch(1)
    loader.load_state_dict({"epoch": 1, "batches_done": 8})
    assert list(loader) == []  # nothing replayed
    assert list(loader) == list(range(8))
    assert epochs == [2]


def test_a_restored_position_is_saved_again_before_the_resumed_pass_starts() -> None:
    loader = _loader({"now": (1, 0)})
    loader.load_state_dict({"epoch": 1, "batches_done": 3})
    assert loader.state_dict() == {"epoch": 1, "batches_done": 3}
