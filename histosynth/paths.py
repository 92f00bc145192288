"""Paths: resolving the relative ones of configs, and keeping outputs apart from inputs.

Every command writes into one output folder it claims with :func:`claim_output_dir`:

* the folder must not be, contain or lie inside any of the command's inputs (data roots, the run
  it reads, its training data): ``--overwrite`` could otherwise delete the input, or later runs
  would read the outputs as data;
* a non-empty folder is refused unless ``--overwrite``, and ``--overwrite`` only replaces a
  folder that histosynth wrote (it carries the :data:`MARKER` file), never a folder of the user's;
* one folder, one writer: :func:`hold` takes an advisory lock (``fcntl.flock`` on ``.lock``) for
  the life of a run; a second writer is refused with the holder's process id.

Names that come from files (class names stored in a checkpoint, rows of a manifest) become paths
only through :func:`safe_name` / :func:`inside`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Mapping

from histosynth.checkpoint import is_temp_name
from histosynth.config import PROJECT_ROOT
from histosynth.errors import UserError

MARKER = ".histosynth"
"""A file in every output folder histosynth creates: what ``--overwrite`` may replace."""
LOCK = ".lock"
ERROR_LOG = "histosynth-error.log"
"""Where a command that failed with a bug leaves its traceback (histosynth.cli)."""


def resolve_data_path(path: str | Path) -> Path:
    """``path`` as given when it exists (or is absolute); else relative to the histosynth
    checkout, so the bundled demo configs run from any working directory."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = PROJECT_ROOT / p
    return alt.resolve() if alt.exists() else p


class OutputExistsError(UserError, RuntimeError):
    """An output folder already holds files and the user did not ask to replace them."""


class UnsafeNameError(UserError, ValueError):
    """A name read from a file would point outside the folder it is meant for."""


def check_apart(out: str | Path, inputs: Mapping[str, str | Path | None], flag: str = "--out") -> None:
    """Refuse (one line, nothing touched) when ``out`` is, contains or is inside one of ``inputs``."""
    o = Path(out).expanduser().resolve()
    for name, p in inputs.items():
        if p is None:
            continue
        q = Path(p).expanduser().resolve()
        how = "is" if o == q else "contains" if o in q.parents else "is inside" if q in o.parents else None
        if how:
            raise OutputExistsError(f"{flag} {out} {how} the {name} ({p}): a command's output and its "
                                    f"inputs must not overlap; choose another {flag}")


def _entries(path: Path) -> list[Path]:
    """What a folder holds besides histosynth's marker, lock, error log and temporary files of
    killed writes (a folder holding only those computed nothing)."""
    return [p for p in path.iterdir() if p.name not in (MARKER, LOCK, ERROR_LOG) and not is_temp_name(p.name)]


def check_claimable(path: str | Path, overwrite: bool,
                    hint: str = "pass --overwrite to replace it, or another --out",
                    inputs: Mapping[str, str | Path | None] | None = None) -> None:
    """What :func:`claim_output_dir` checks, writing nothing: apart from ``inputs``; absent or
    empty, or ``overwrite`` and written by histosynth."""
    path = Path(path)
    check_apart(path, inputs or {})
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder; choose another --out")
    if path.is_dir() and _entries(path):
        if not overwrite:
            raise OutputExistsError(f"{path} already exists and is not empty; {hint}")
        if not (path / MARKER).is_file():
            raise OutputExistsError(f"{path} was not written by histosynth (it has no {MARKER} file), so "
                                    "--overwrite will not delete it; empty it yourself or choose another --out")


def claim_output_dir(path: str | Path, overwrite: bool,
                     hint: str = "pass --overwrite to replace it, or another --out",
                     inputs: Mapping[str, str | Path | None] | None = None) -> Path:
    """Make ``path`` an empty folder to write into, with the :data:`MARKER` file (see
    :func:`check_claimable`). Replacing a folder waits for nobody: a folder another process
    holds (:func:`hold`) is refused."""
    path = Path(path)
    check_claimable(path, overwrite, hint, inputs)
    if path.is_dir():
        with hold(path):
            for p in path.iterdir():            # everything but the lock: another process may be waiting on it
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by histosynth; --overwrite may replace this folder\n")
    return path


class FolderInUseError(UserError, RuntimeError):
    """Another process is writing into the folder."""


_HELD: dict[Path, int] = {}     # folders this process holds, and how many holds are open on each


@contextlib.contextmanager
def hold(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s advisory lock (``fcntl.flock`` on ``folder/.lock``) for the block; refused
    with the holder's process id when another process holds it (this process may hold it more
    than once). The kernel releases it when the holder dies, so a killed run resumes at once."""
    import fcntl

    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise FolderInUseError(f"{folder} is in use by process {holder} (it holds {folder / LOCK}); wait "
                               "for it to finish or stop it, then run again") from None
    _HELD[key] = 1
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        del _HELD[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def safe_name(name: str, what: str) -> str:
    """``name`` as one path component (a class folder, a file stem), or UnsafeNameError: no
    separators, not empty, ``.`` or ``..``, no NUL, at most 200 characters."""
    bad = (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
           or "\0" in name or len(name) > 200)
    if bad:
        raise UnsafeNameError(f"{what} {name!r} cannot be used as a file name (a path separator, '..', "
                              "an empty or overlong name); refusing to write outside the output folder")
    return name


def inside(root: str | Path, relative: str, what: str) -> Path:
    """``root / relative`` when it stays inside ``root`` (no absolute path, no ``..`` escape)."""
    root = Path(root).resolve()
    p = (root / relative).resolve()
    if Path(relative).is_absolute() or (p != root and root not in p.parents):
        raise UnsafeNameError(f"{what} {relative!r} points outside {root}; refusing to use it")
    return p
