"""Resolving the relative paths written in configs."""

from __future__ import annotations

from pathlib import Path

from histosynth.config import PROJECT_ROOT


def resolve_data_path(path: str | Path) -> Path:
    """``path`` as given when it exists (or is absolute); else relative to the histosynth
    checkout, so the bundled demo configs run from any working directory."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = PROJECT_ROOT / p
    return alt.resolve() if alt.exists() else p
