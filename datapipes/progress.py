"""Progress reporting for every long step of the pcpt commands.

On a terminal it is a tqdm bar on stderr. When stderr is not a terminal (a log file, a batch job, CI) a bar
would either vanish (tqdm's default there) or fill the log with carriage returns, so a plain line is written
every ``interval`` seconds while the step runs, and one when a step that ran that long ends (short steps
stay silent)::

    pcpt: features: 1200/9843 clouds (12%), 0:00:31 elapsed
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Progress:
    """Counts work done and reports it (see the module docstring); use as a context manager.

    Args:
        total: units of work in all, or ``None`` when unknown.
        desc: what is being done, e.g. ``"features"``.
        unit: name of one unit, e.g. ``"cloud"``.
        disable: report nothing.
        interval: seconds between two log lines when stderr is not a terminal.
        stream: where to write (default: ``sys.stderr``).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        disable: bool = False,
        interval: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.disable, self.interval = disable, float(interval)
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._bar: Any = None
        self._start = self._last = 0.0

    def __enter__(self) -> Progress:
        if self.disable:
            return self
        self._start = self._last = time.monotonic()
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=self.stream, leave=False)
        return self

    def set_total(self, total: int | None) -> None:
        """Sets the total once it is known (e.g. after planning)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        """Records ``n`` more units of work done."""
        self.done += int(n)
        if self.disable:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._line()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.disable:
            return
        if self._bar is not None:
            self._bar.close()
        elif kind is None and time.monotonic() - self._start >= self.interval:
            self._line(final=True)

    def _line(self, final: bool = False) -> None:
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        state = "done in" if final else "elapsed"
        elapsed = _clock(time.monotonic() - self._start)
        print(
            f"pcpt: {self.desc}: {count} {self.unit}s{share}, {elapsed} {state}", file=self.stream, flush=True
        )
