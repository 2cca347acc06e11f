"""User-facing errors shared by every pcpt command.

A :class:`UserError` is a mistake the user can fix (a bad argument, a missing or unreadable file). The CLIs
print its message on one line, prefixed by the command name, and exit with status 2 instead of showing a
traceback. Library code raises it with a message that names the file or argument and what is wrong.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def run_cli(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Runs ``main(argv)`` and turns a :class:`UserError` into ``prog: error: message`` and exit status 2.

    Args:
        prog: command name used as the message prefix, e.g. ``pcpt-data``.
        main: the command's entry function; returns an exit status.
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status to pass to ``sys.exit``.
    """
    try:
        return main(argv)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed work is kept and a re-run resumes", file=sys.stderr)
        return 130
