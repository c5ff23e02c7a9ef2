"""How a run ends without a traceback: exceptions that carry their exit code and their message.

Exit codes (README, docs/CHECKPOINTS.md): 0 done; 1 the run failed (a non-finite loss, or a crash
with a traceback); 2 bad input (config, data, paths: one ``error:`` line each, nothing existing
touched); 3 stopped on purpose after saving a full state (resume with ``--resume auto``).
"""

from __future__ import annotations

import sys
from typing import Callable

from train.redaction import redact_text

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3


class CleanExit(Exception):
    """Ends the run with ``lines`` on stderr (each after ``prefix``) and ``exit_code``, no traceback.

    ``printed``: the lines were already shown (the main process tells a deliberate stop once, before
    any process exits), so the entry point must not print them again.
    """

    exit_code = EXIT_FAILED
    prefix = "error: "

    def __init__(self, lines: list[str] | str, printed: bool = False):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        self.printed = printed
        super().__init__("; ".join(self.lines))


class UserError(CleanExit):
    """A problem the user can fix (config, data, paths): exit code 2, nothing existing is touched."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(UserError):
    """A config file or override that does not validate; one line per problem."""


class Stopped(CleanExit):
    """The run stopped early on purpose after saving a full state."""

    exit_code = EXIT_STOPPED
    prefix = ""


class NonFiniteLoss(CleanExit):
    """``training.on_nonfinite: stop`` found NaN/inf; nothing non-finite was saved."""

    exit_code = EXIT_FAILED


def run_cli(body: Callable[[], int | None]) -> int:
    """Run an entry point's body; a ``CleanExit`` becomes its lines on stderr and its exit code.

    The one place that prints errors for ``train/main.py``, ``train.predict`` and ``train.sweep``.
    An ``OSError`` that escaped (a path the user gave that cannot be read or written) is bad input
    too: one line, exit 2, rather than a traceback.
    """
    try:
        return body() or 0
    except CleanExit as e:
        # Errors may differ between processes, so each prints its own.
        if not e.printed:
            for line in e.lines:
                print(f"{e.prefix}{redact_text(line)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        where = f" '{e.filename}'" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_BAD_INPUT
