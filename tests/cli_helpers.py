"""Helpers for tests that run the pcpt commands: one-line error checks and subprocess runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

#: the repository root (the folder holding ``datapipes``, ``pretrain`` and ``finetune``).
REPO = Path(__file__).resolve().parents[1]


def assert_one_error_line(prog: str, err: str, *needles: str) -> None:
    """Checks that ``err`` is one ``PROG: error: ...`` line containing every needle."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def assert_error_line_last(prog: str, err: str, *needles: str) -> None:
    """Checks that ``err`` ends with one ``PROG: error: ...`` line containing every needle, with no traceback.

    Lines before it may be the notices Lightning prints while it sets up (seed, devices).
    """
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, err
    assert "Traceback" not in err, err
    assert sum(line.startswith(f"{prog}: error: ") for line in lines) == 1, err
    assert_one_error_line(prog, lines[-1], *needles)


def console_script(name: str) -> str:
    """The installed console script ``name``; skips the test when pcpt is not installed."""
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed (pip install -e .)")
    return exe


def repo_env(**extra: str) -> dict[str, str]:
    """The current environment with the repository first on ``PYTHONPATH`` (plus ``extra`` variables)."""
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        **extra,
    }


def run_command(
    cmd: Sequence[str], *, timeout: float = 120, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``cmd`` to completion and captures its text output (a failing status is returned, not raised)."""
    return subprocess.run(
        list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
