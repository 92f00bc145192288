"""Where the real train / validation / test tiles come from, split by group when groups are known.

``folders``: root/train, root/val, root/test as given. ``groups`` / ``stratified``: one ImageFolder
tree split here (scikit-learn's StratifiedGroupKFold / train_test_split, seeded) and written as
a tree of symbolic links under ``OUT/splits/`` plus ``split.csv``, so every later stage (the GAN
stage included) reads plain folders and a second run sees the same split.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.config import CompareDataConfig
from histosynth.checkpoint import atomic_write_csv
from histosynth.images import DataError, scan_image_folder
from histosynth.paths import resolve_data_path

SPLITS = ("train", "val", "test")


@dataclass
class Splits:
    roots: dict[str, Path]                 # split -> ImageFolder root
    method: str                            # folders | groups | stratified
    groups: dict[str, str] | None          # "<split>/<class>/<file>" or bare name -> group id
    groups_file: Path | None


def read_groups(path: Path) -> dict[str, str]:
    """``file`` -> ``group_id`` from a CSV; the bare file name is a second key."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"file", "group_id"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path} lacks column(s) {', '.join(sorted(missing))}; a groups file needs "
                            f"'file' and 'group_id' (it has {', '.join(reader.fieldnames or [])})")
        out = {}
        for row in reader:
            out[row["file"]] = row["group_id"]
            out.setdefault(Path(row["file"]).name, row["group_id"])
    return out


def group_of(groups: dict[str, str], rel: str) -> str | None:
    return groups.get(rel) or groups.get(Path(rel).name)


def resolve_splits(cfg: CompareDataConfig, out: Path) -> Splits:
    root = resolve_data_path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root {cfg.root} is not a folder; point it to a folder with "
                        "train/ val/ test/ class folders, or to one class-folder tree")
    gfile = resolve_data_path(cfg.groups) if cfg.groups else (root / "groups.csv")
    if cfg.groups and not gfile.is_file():
        raise DataError(f"data.groups {cfg.groups} does not exist")
    groups = read_groups(gfile) if gfile.is_file() else None
    method = cfg.split
    if method == "auto":
        method = "folders" if (root / "train").is_dir() else ("groups" if groups else "stratified")
    if method == "folders":
        missing = [s for s in SPLITS if not (root / s).is_dir()]
        if missing:
            raise DataError(f"data.split is 'folders' but {root} has no {', '.join(missing)}/ folder; "
                            "use data.split: groups or stratified to split one tree")
        return Splits({s: root / s for s in SPLITS}, method, groups, gfile if groups else None)
    if method == "groups" and groups is None:
        raise DataError(f"data.split is 'groups' but there is no groups file ({gfile}); "
                        "set data.groups or use data.split: stratified")
    classes, items = scan_image_folder(root)
    rel = [str(p.relative_to(root)) for p, _ in items]
    y = np.array([label for _, label in items])
    assign = _split(rel, y, groups if method == "groups" else None, cfg)
    base = out / "splits"
    rows = []
    if base.exists():
        shutil.rmtree(base)
    for (path, label), r, s in zip(items, rel, assign):
        dst = base / s / r
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(path.resolve(), dst)
        except OSError:
            shutil.copy2(path, dst)
        rows.append({"file": r, "split": s, "class": classes[label],
                     "group_id": group_of(groups, r) if groups else ""})
    atomic_write_csv(base / "split.csv", rows, ["file", "split", "class", "group_id"])
    for s in SPLITS:
        for c in classes:
            (base / s / c).mkdir(parents=True, exist_ok=True)
    return Splits({s: base / s for s in SPLITS}, method, groups, gfile if groups else None)


def _split(rel: list[str], y: np.ndarray, groups: dict[str, str] | None, cfg: CompareDataConfig) -> list[str]:
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    n, k = len(y), len(np.unique(y))
    idx = np.arange(n)
    if groups is not None:
        g = np.array([group_of(groups, r) or f"__ungrouped_{i}" for i, r in enumerate(rel)])

        def take(ids: np.ndarray, frac: float, seed: int) -> np.ndarray:
            smallest = int(np.bincount(y[ids]).min()) if len(ids) else 0
            if smallest < 2:
                raise DataError(f"a class has {smallest} tile(s) left to split; every class needs "
                                "at least 3 tiles (one each for train, val and test)")
            folds = min(max(2, round(1 / frac)), smallest)
            cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            _, held = next(cv.split(ids, y[ids], g[ids]))
            return ids[held]

        test = take(idx, cfg.test_fraction, cfg.split_seed)
        rest = np.setdiff1d(idx, test)
        val = take(rest, cfg.val_fraction / (1 - cfg.test_fraction), cfg.split_seed + 1)
    else:
        n_test = max(k, round(cfg.test_fraction * n))
        rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=cfg.split_seed)
        n_val = max(k, round(cfg.val_fraction * n))
        if len(rest) - n_val < k:
            raise DataError(f"{n} tiles in {k} classes are too few to split into train, val and test")
        _, val = train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=cfg.split_seed + 1)
    out = ["train"] * n
    for i in test:
        out[i] = "test"
    for i in val:
        out[i] = "val"
    return out
