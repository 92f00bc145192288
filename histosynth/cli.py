"""What every histosynth command shares: one-line errors, readable warnings, no tracebacks."""

from __future__ import annotations

import sys
import warnings
from typing import Callable

from histosynth.checkpoint import CheckpointError
from histosynth.config import ConfigError
from histosynth.images import DataError
from histosynth.paths import OutputExistsError
from histosynth.runtime import NonFiniteLossError

# Errors a user can fix; each message says what to change. Anything else is a bug: traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, CheckpointError,
                                                OutputExistsError, NonFiniteLossError, FileNotFoundError,
                                                NotADirectoryError)


def register_user_error(*types: type[BaseException]) -> None:
    global USER_ERRORS
    USER_ERRORS = USER_ERRORS + tuple(t for t in types if t not in USER_ERRORS)


def run_cli(prog: str, fn: Callable[[], int | None]) -> int:
    """Call ``fn``; a user error prints ``prog: error: ...`` on one line and returns 2."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        return int(fn() or 0)
    except USER_ERRORS as e:
        msg = str(e).strip() or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; a run can continue from its last checkpoint with --resume",
              file=sys.stderr)
        return 130
