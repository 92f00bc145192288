"""Where the real train / validation / test data come from, split by group when groups are known.

``folders``: root/train, root/val, root/test as given; when root has train/ and test/ but no val/,
the validation split is carved from train here (by group when groups are known, else stratified
by class), sample by sample: an image and its mask always go together, and no image is ever cut
into tiles that land in two splits. ``groups`` / ``stratified``: one folder split here
(scikit-learn's StratifiedGroupKFold / train_test_split, seeded). Splits made here are written
as trees of symbolic links under ``OUT/splits/`` plus ``split.csv``, so every later stage (the
generator stages included) reads plain folders and a second run sees the same split.

What a sample is comes from the downstream task's :class:`~histosynth.roles.Layout`: one image
in a class folder (classification), an image with its mask (segmentation).
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
from histosynth.images import DataError
from histosynth.paths import resolve_data_path
from histosynth.roles import Layout, Sample

SPLITS = ("train", "val", "test")


@dataclass
class Splits:
    roots: dict[str, Path]                 # split -> its folder
    method: str                            # folders | folders, val carved from train | groups | stratified
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


def resolve_splits(cfg: CompareDataConfig, out: Path, layout: Layout) -> Splits:
    root = resolve_data_path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root {cfg.root} is not a folder; point it to a folder with train/ val/ "
                        f"test/ (or train/ and test/), each of {layout.description}, or to one such folder")
    gfile = resolve_data_path(cfg.groups) if cfg.groups else (root / "groups.csv")
    if cfg.groups and not gfile.is_file():
        raise DataError(f"data.groups {cfg.groups} does not exist")
    groups = read_groups(gfile) if gfile.is_file() else None
    gpath = gfile if groups else None
    method = cfg.split
    if method == "auto":
        method = "folders" if (root / "train").is_dir() else ("groups" if groups else "stratified")
    base = out / "splits"
    if method == "folders":
        missing = [s for s in ("train", "test") if not (root / s).is_dir()]
        if missing:
            raise DataError(f"data.split is 'folders' but {root} has no {', '.join(missing)}/ folder; "
                            "use data.split: groups or stratified to split one folder")
        if (root / "val").is_dir():
            return Splits({s: root / s for s in SPLITS}, method, groups, gpath)
        samples = layout.samples(root / "train")
        assign = _split(samples, groups, cfg, with_test=False)
        _link(root / "train", samples, assign, base, groups)
        how = "by group" if groups else ("stratified by class" if len({x.stratum for x in samples}) > 1
                                         else "by sample")
        return Splits({"train": base / "train", "val": base / "val", "test": root / "test"},
                      f"folders, validation carved from train ({how}, seed {cfg.split_seed})", groups, gpath)
    if method == "groups" and groups is None:
        raise DataError(f"data.split is 'groups' but there is no groups file ({gfile}); "
                        "set data.groups or use data.split: stratified")
    samples = layout.samples(root)
    assign = _split(samples, groups if method == "groups" else None, cfg, with_test=True)
    _link(root, samples, assign, base, groups)
    return Splits({s: base / s for s in SPLITS}, method, groups, gpath)


def _link(root: Path, samples: list[Sample], assign: list[str], base: Path, groups: dict | None) -> None:
    """``base/<split>/<file>`` -> ``root/<file>`` for every file of every sample, ``base/split.csv``;
    every folder a sample's files sit in exists in every split (an empty class folder included)."""
    if base.exists():
        shutil.rmtree(base)
    rows = []
    parents = {Path(f).parent for smp in samples for f in smp.files}
    for s in sorted(set(assign)):
        for d in parents:
            (base / s / d).mkdir(parents=True, exist_ok=True)
    for smp, s in zip(samples, assign):
        for f in smp.files:
            dst = base / s / f
            try:
                os.symlink((root / f).resolve(), dst)
            except OSError:
                shutil.copy2(root / f, dst)
        rows.append({"file": smp.files[0], "split": s, "class": smp.stratum,
                     "group_id": (group_of(groups, smp.files[0]) or "") if groups else ""})
    atomic_write_csv(base / "split.csv", rows, ["file", "split", "class", "group_id"])


def _split(samples: list[Sample], groups: dict[str, str] | None, cfg: CompareDataConfig,
           with_test: bool) -> list[str]:
    """``train`` / ``val`` (/ ``test``) for each sample, seeded, stratified by ``stratum``."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    rel = [smp.files[0] for smp in samples]
    _, y = np.unique([smp.stratum for smp in samples], return_inverse=True)
    n, k = len(y), len(np.unique(y))
    idx = np.arange(n)
    test = np.array([], dtype=np.int64)
    if groups is not None:
        g = np.array([group_of(groups, r) or f"__ungrouped_{i}" for i, r in enumerate(rel)])

        def take(ids: np.ndarray, frac: float, seed: int) -> np.ndarray:
            smallest = int(np.bincount(y[ids]).min()) if len(ids) else 0
            if smallest < 2:
                raise DataError(f"a class has {smallest} sample(s) left to split; every class needs "
                                "at least 3 (one each for train, val and test)")
            folds = min(max(2, round(1 / frac)), smallest, len(np.unique(g[ids])))
            if folds < 2:
                raise DataError(f"{len(ids)} samples in one group cannot be split by group")
            cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            _, held = next(cv.split(ids, y[ids], g[ids]))
            return ids[held]

        if with_test:
            test = take(idx, cfg.test_fraction, cfg.split_seed)
        rest = np.setdiff1d(idx, test)
        frac = cfg.val_fraction / (1 - cfg.test_fraction) if with_test else cfg.val_fraction
        val = take(rest, frac, cfg.split_seed + 1)
    else:
        rest = idx
        if with_test:
            n_test = max(k, round(cfg.test_fraction * n))
            rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=cfg.split_seed)
        n_val = max(k, round(cfg.val_fraction * n))
        if len(rest) - n_val < k:
            raise DataError(f"{len(rest)} samples in {k} classes are too few to split off {n_val} for validation")
        _, val = train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=cfg.split_seed + 1)
    out = ["train"] * n
    for i in test:
        out[i] = "test"
    for i in val:
        out[i] = "val"
    return out
