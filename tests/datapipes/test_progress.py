"""Progress reporting: a bar on a terminal, periodic plain lines in a log, nothing when disabled."""

from __future__ import annotations

import io

import numpy as np

from datapipes.progress import Progress
from finetune.probes import svm_probe


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_when_not_a_terminal() -> None:
    log = io.StringIO()
    with Progress(10, "features", "cloud", interval=0.0, stream=log) as bar:
        for _ in range(10):
            bar.update()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("pcpt: features: 1/10 clouds (10%)")
    assert "pcpt: features: 5/10 clouds (50%)" in "\n".join(lines)
    assert lines[-1].startswith("pcpt: features: 10/10 clouds (100%)")
    assert lines[-1].endswith("done in")
    assert "\r" not in log.getvalue()


def test_short_steps_stay_silent_in_a_log() -> None:
    log = io.StringIO()
    with Progress(None, "dedup", "cloud", interval=3600.0, stream=log) as bar:
        bar.update(7)
    assert log.getvalue() == ""
    assert bar.done == 7


def test_bar_on_a_terminal_and_silence_when_disabled() -> None:
    terminal = _Terminal()
    with Progress(4, "shards", "shard", stream=terminal) as bar:
        bar.update(4)
    assert "\r" in terminal.getvalue()
    assert "pcpt:" not in terminal.getvalue()
    quiet = io.StringIO()
    with Progress(4, "shards", "shard", stream=quiet, disable=True) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""
    assert bar.done == 4


def _every_update(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "interval": 0.0})

    return patched


def test_svm_probe_reports_each_fit(capsys, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = np.repeat(np.arange(2), 20)
    x[y == 1] += 3.0
    monkeypatch.setattr(Progress, "__init__", _every_update(Progress.__init__))
    svm_probe(x, y, x, y, c_grid=(0.1, 1.0), progress=True)
    err = capsys.readouterr().err
    assert "pcpt: linear SVM: 1/3 fits (33%)" in err
    assert "pcpt: linear SVM: 3/3 fits (100%)" in err
