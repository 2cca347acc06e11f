"""Fixed-length epochs over a loader, with the epoch set before every pass and exact mid-epoch resume."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from datapipes.types import PointBatch

__all__ = ["Capped", "EpochLoader"]


class EpochLoader:
    """An iterable of batches with a fixed length that sets the data epoch before every pass.

    The epoch is read when the first batch of a pass is requested: from ``epoch_source`` when given (e.g. the
    trainer's current epoch, so a resumed run gets the data of the epoch it resumes at), otherwise from
    :meth:`set_epoch`, advancing by one after each pass.
    It is deliberately not a ``torch.utils.data.DataLoader``, so Lightning does not try to re-shard it.

    Resuming inside an epoch: Lightning stores :meth:`state_dict` in its checkpoints (the epoch and how many
    of its batches were trained, from ``progress_source``) and hands it back through :meth:`load_state_dict`
    on resume; the first pass of the resumed run then skips the batches already trained, so it continues with
    exactly the batches the interrupted run would have drawn next (the streams are seeded per epoch). The
    position saved counts the skipped batches plus what ``progress_source`` advanced since the pass began, so
    it stays right when the source restarts its count on resume (Lightning does after a resume at an epoch
    end) and a run is resumed twice in one epoch.

    Args:
        loader: the underlying iterable (a WebLoader with ``with_epoch`` or a DataLoader).
        length: batches per pass.
        on_epoch: called with the epoch number before each pass.
        epoch_source: returns the epoch to use, or ``None`` to use the internal counter.
        progress_source: returns ``(epoch, batches of it trained)`` at checkpoint time (e.g. from the
            trainer), or ``None`` when unknown.
    """

    def __init__(
        self,
        loader: Iterable[PointBatch],
        *,
        length: int,
        on_epoch: Callable[[int], None],
        epoch_source: Callable[[], int | None] | None = None,
        progress_source: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:
        self.loader, self.length, self.on_epoch = loader, int(length), on_epoch
        self.epoch_source, self.progress_source = epoch_source, progress_source
        self._next_epoch = 0
        self._resume: tuple[int, int] | None = None
        self._skipped = self._source_start = 0
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass use ``epoch``."""
        self._next_epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_done"}``: where training stands in the data (saved in checkpoints)."""
        if self._resume is not None:  # restored but not started: the position is still the restored one
            return {"epoch": self._resume[0], "batches_done": self._resume[1]}
        position = self.progress_source() if self.progress_source is not None else None
        epoch, done = position if position is not None else (self.epoch, 0)
        if epoch == self.epoch:  # a resumed pass: the source may count from where it resumed
            done = self._skipped + done - self._source_start
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Makes the next pass skip the batches a checkpoint says were trained, if it is the same epoch."""
        self._resume = (int(state.get("epoch", -1)), int(state.get("batches_done", 0)))

    def __iter__(self) -> Iterator[PointBatch]:
        return self._run()

    def _run(self) -> Iterator[PointBatch]:
        # A generator: the epoch is resolved at the first batch, not when the iterator is created. Lightning
        # creates the first iterator before it restores the epoch counters of a resumed run.
        source = self.epoch_source() if self.epoch_source is not None else None
        self.epoch = self._next_epoch if source is None else int(source)
        self._next_epoch = self.epoch + 1
        skip = 0
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            if epoch == self.epoch and done > 0:
                skip = min(done, self.length)
        self._skipped = skip
        position = self.progress_source() if self.progress_source is not None else None
        self._source_start = int(position[1]) if position is not None and position[0] == self.epoch else 0
        if skip == self.length:
            # Every batch of this epoch was trained (a checkpoint of its last batch that the trainer did not
            # recognise as the epoch's end): an empty pass, so the trainer moves on to the next epoch.
            return
        self.on_epoch(self.epoch)
        batches = iter(self.loader)
        for _ in itertools.islice(batches, skip):  # drawn and dropped: the streams stay in step
            pass
        yield from batches

    def __len__(self) -> int:
        return self.length


class Capped:
    """Iterates at most ``length`` items of a loader (a map-style training pass cut to its epoch length)."""

    def __init__(self, loader: Iterable[Any], length: int) -> None:
        self.loader, self.length = loader, length

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if i >= self.length:
                break
            yield batch
