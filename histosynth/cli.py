"""What every histosynth command shares: one-line errors, readable warnings, no tracebacks."""

from __future__ import annotations

import errno
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Callable

from histosynth.errors import UserError
from histosynth.paths import ERROR_LOG

# Errors a user can fix; each message says what to change. Every project error of that kind
# derives from UserError (histosynth/errors.py); the two OS errors are a missing path. Anything
# else is a bug: traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError)


# the key to lower when a command runs out of memory
BATCH_KEYS = {"train-gan": "train.batch_size (--set train.batch_size=N)",
              "augment-compare": "downstream.train.batch_size (--set downstream.train.batch_size=N)",
              "gan-generate": "--batch-size", "gan-translate": "--tile", "piq-report": "--size",
              "gan-eval": "--max-images", "train-classifier": "train.batch_size (--set train.batch_size=N)",
              "classify": "--batch-size"}


def _is_cuda_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(e)


# what a stopped command keeps, and how to go on
CONTINUE = {"train-gan": "the last checkpoint is kept: continue with train-gan --resume RUN",
            "augment-compare": "finished cells are kept: re-run the same command to continue",
            "train-classifier": "the last epoch's checkpoint is kept: re-run the same command to continue"}


class Terminated(BaseException):
    """SIGTERM (a scheduler's stop, ``kill``) during a command."""


def run_cli(prog: str, fn: Callable[[], int | None], log_dir: str | Path | None = None) -> int:
    """Call ``fn`` and end every failure with one line on stderr and a non-zero exit: ``prog:
    error: ...`` (exit 2) for what the user can fix, an interrupt or SIGTERM with what was kept
    (130, 143), and for anything else (a bug) one line naming the exception and where it arose
    (exit 1) while the traceback goes to ``log_dir/histosynth-error.log`` (the run or output
    folder when it exists, else the cache folder) for a bug report.

    While ``fn`` runs, warnings print as ``prog: warning: ...`` and SIGTERM stops it like Ctrl-C;
    the caller's warning display and signal handler are restored afterwards (the CLI functions
    are also called from Python and from tests)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    def terminate(signum, frame):
        raise Terminated()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return _run(prog, fn, log_dir)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(prog: str, fn: Callable[[], int | None], log_dir: str | Path | None) -> int:
    kept = CONTINUE.get(prog, "nothing half-written is kept: run the command again")
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
    except OSError as e:            # read-only folder, disk full, name too long ...: the user's to fix
        where = f" ({e.filename})" if e.filename else ""
        what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.ENAMETOOLONG: "a file name is too long"}.get(e.errno, e.strerror or type(e).__name__)
        print(f"{prog}: error: {what}{where}; {kept}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {kept}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: stopped by SIGTERM; {kept}", file=sys.stderr)
        return 143
    except Exception as e:          # a bug: one line here, the traceback in a log file
        if _is_cuda_oom(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
            print(f"{prog}: error: out of GPU memory ({first}); lower {BATCH_KEYS.get(prog, 'the batch size')}; "
                  f"{kept}", file=sys.stderr)
            return 2
        frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
        log = _save_traceback(prog, e, log_dir)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"{prog}: error: internal error, {type(e).__name__}{at}: {first}; the traceback is in {log} "
              "(please include it in a bug report)", file=sys.stderr)
        return 1


def _save_traceback(prog: str, e: BaseException, log_dir: str | Path | None) -> str:
    """Write the traceback to ``log_dir`` (when it is a folder) or the cache folder; its path."""
    from histosynth.data import default_cache_dir
    text = f"{prog} {' '.join(sys.argv[1:])}\n" + "".join(traceback.format_exception(e))
    for folder in ([Path(log_dir)] if log_dir and Path(log_dir).is_dir() else []) + [default_cache_dir()]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ERROR_LOG).write_text(text)
            return str(folder / ERROR_LOG)
        except OSError:
            continue
    return "(nowhere writable: " + text.splitlines()[-1] + ")"
