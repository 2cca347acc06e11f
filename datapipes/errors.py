"""User-facing errors shared by every pcpt command.

A :class:`UserError` is a mistake the user can fix (a bad argument, a missing or unreadable file, damaged
data). The CLIs print its message on one line, prefixed by the command name, and exit with status 2 instead
of showing a traceback. Library code raises it with a message that names the file or argument and what is
wrong. The same holds for a :class:`UserError` raised in a DataLoader worker process (torch re-raises it in
the main process with the worker's traceback folded into the message: only the original line is printed)
and for an ``OSError`` on a path the user gave (``No such file or directory: 'x.ckpt'``).

Set ``PCPT_DEBUG=1`` to get the full traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence

__all__ = ["FieldError", "UserError", "one_line", "run_cli"]

#: torch's DataLoader folds a worker's exception into "Caught X in DataLoader worker process N.\n
#: Original Traceback (most recent call last):\n ... \nmodule.X: message"; the last line holds the message.
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"
_QUALIFIED_PREFIX = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception): ")


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class FieldError(UserError, ValueError):
    """A batch field the data cannot provide (e.g. a feature channel the manifest does not name).

    Also a ``ValueError``: it is an invalid argument to the loader that asked for it.
    """


def one_line(message: str) -> str:
    """The message of an error as one line.

    The original message of an exception re-raised from a DataLoader worker is recovered; any other
    multi-line message keeps its first non-empty line.
    """
    text = str(message)
    if _WORKER_TRACEBACK in text:
        lines = [line for line in text.splitlines() if line.strip()]
        return _QUALIFIED_PREFIX.sub("", lines[-1].strip()) if lines else text
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def _os_error_line(err: OSError) -> str:
    reason = err.strerror or str(err)
    if err.filename is not None and err.filename2 is not None:
        return f"{os.fsdecode(err.filename)} -> {os.fsdecode(err.filename2)}: {reason}"
    if err.filename is not None:
        return f"{os.fsdecode(err.filename)}: {reason}"
    return one_line(str(err))


def run_cli(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Runs ``main(argv)`` and turns user mistakes into ``prog: error: message`` and exit status 2.

    A :class:`UserError` (also one re-raised from a DataLoader worker) and an ``OSError`` naming a file
    become one line; ``KeyboardInterrupt`` exits with 130. ``PCPT_DEBUG=1`` re-raises instead.

    Args:
        prog: command name used as the message prefix, e.g. ``pcpt-data``.
        main: the command's entry function; returns an exit status.
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status to pass to ``sys.exit``.
    """
    debug = os.environ.get("PCPT_DEBUG", "") not in ("", "0")
    try:
        return main(argv)
    except UserError as err:
        if debug:
            raise
        print(f"{prog}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        if debug or err.filename is None:
            raise
        print(f"{prog}: error: {_os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed work is kept and a re-run resumes", file=sys.stderr)
        return 130
