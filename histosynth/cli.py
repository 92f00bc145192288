"""What every histosynth command shares: one-line errors, readable warnings, no tracebacks."""

from __future__ import annotations

import sys
import warnings
from typing import Callable

from histosynth.errors import UserError

# Errors a user can fix; each message says what to change. Every project error of that kind
# derives from UserError (histosynth/errors.py); the two OS errors are a missing path. Anything
# else is a bug: traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError)


# the key to lower when a command runs out of memory
BATCH_KEYS = {"train-gan": "train.batch_size (--set train.batch_size=N)",
              "augment-compare": "downstream.train.batch_size (--set downstream.train.batch_size=N)",
              "gan-generate": "--batch-size", "gan-translate": "--tile", "piq-report": "--size",
              "gan-eval": "--max-images"}


def _is_cuda_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(e)


def run_cli(prog: str, fn: Callable[[], int | None]) -> int:
    """Call ``fn``; a user error prints ``prog: error: ...`` on one line and returns 2.

    While ``fn`` runs, warnings print as ``prog: warning: ...``; the caller's warning display is
    restored afterwards (the CLI functions are also called from Python and from tests)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        return _run(prog, fn)


def _run(prog: str, fn: Callable[[], int | None]) -> int:
    try:
        return int(fn() or 0)
    except USER_ERRORS as e:
        msg = str(e).strip() or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except MemoryError as e:        # torch.cuda.OutOfMemoryError is a RuntimeError, see below
        print(f"{prog}: error: out of memory ({e or 'MemoryError'}); lower {BATCH_KEYS.get(prog, 'the batch size')}",
              file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not _is_cuda_oom(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
        resume = {"train-gan": "; the last checkpoint is kept: continue with --resume RUN --set ...",
                  "augment-compare": "; finished cells are kept: re-run the command"}.get(prog, "")
        print(f"{prog}: error: out of GPU memory ({first}); lower {BATCH_KEYS.get(prog, 'the batch size')}"
              f"{resume}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; a run can continue from its last checkpoint with --resume",
              file=sys.stderr)
        return 130
