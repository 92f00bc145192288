"""Checkpoints that are written atomically and read without unpickling code."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import IO, Any, Callable

import torch

from histosynth.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or of another model; the message says which."""


def atomic_write(path: str | Path, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash (or a full disk) at any point leaves either the old file or the new one, never a
    torn file; the temporary file is removed when the write fails.
    """
    def fill(tmp: Path) -> None:
        with open(tmp, mode) as f:
            write(f)
    atomic_fill(path, fill)


def atomic_fill(path: str | Path, fill: Callable[[Path], None]) -> None:
    """:func:`atomic_write` for writers that need a file name (e.g. a memory-mapped array):
    ``fill(tmp)`` creates and writes ``tmp``; it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name if len(path.name) <= 200 else hashlib.sha256(path.name.encode()).hexdigest()[:32]
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")      # within the 255-byte name limit
    try:
        fill(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


_TEMP = re.compile(r"\..+\.\d+\.tmp")


def is_temp_name(name: str) -> bool:
    """Is ``name`` a temporary file of :func:`atomic_fill` (``.NAME.PID.tmp``)?"""
    return bool(_TEMP.fullmatch(name))


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left under ``folder`` (``.NAME.PID.tmp``);
    the files they were meant to replace are intact. Returns what was removed. Only the
    folder's one writer may call it (:func:`histosynth.paths.hold`): another writer's temporary
    files look the same."""
    gone = []
    for p in Path(folder).rglob(".*.tmp"):
        if p.is_file() and is_temp_name(p.name):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_csv(path: str | Path, rows: list[dict], fields: list[str]) -> None:
    """A CSV manifest (header + one row per dict), written atomically."""
    import csv

    def write(f):
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)

    atomic_write(path, write, mode="w")


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe pickles, RuntimeError for torn files
        first = str(e).strip().split("\n")[0]
        raise CheckpointError(f"cannot load checkpoint {path} safely (weights_only=True): {first}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a histosynth checkpoint (got {type(obj).__name__})")
    return obj


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
