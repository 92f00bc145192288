"""Resolving the relative paths written in configs."""

from __future__ import annotations

import shutil
from pathlib import Path

from histosynth.checkpoint import remove_stale_temps
from histosynth.config import PROJECT_ROOT
from histosynth.errors import UserError


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


def claim_output_dir(path: str | Path, overwrite: bool,
                     hint: str = "pass --overwrite to replace it, or another --out") -> Path:
    """Make ``path`` an empty folder to write into; a non-empty one is refused unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        remove_stale_temps(path)    # a write killed before its rename leaves only a temp file
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{path} already exists and is not empty; {hint}")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
