"""Leakage guard: nothing the classifier is evaluated on may reach its training data.

Refuses to run (``LeakageError``, naming the files) when

* a validation or test image is in the training set by content (sha256 of the file bytes);
* a near-duplicate group (``groups.csv``) spans the training split and validation/test;
* a synthetic tile differs from the sha256 its manifest recorded (tampered or re-encoded), is
  not in the manifest, or equals a validation/test image;
* the generator behind a synthetic set was trained on a validation/test image (its
  ``source.json``, written by gan-generate from the run's data.json, lists the sha256 of every
  training file), or on a folder that contains the validation/test folders;
* a selected set (metrics/selection.py) was scored by a classifier that saw a validation/test
  image (its source.json lists the sha256 of the classifier's training files).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from experiments.splits import group_of
from histosynth.checkpoint import sha256_file
from histosynth.errors import UserError


class LeakageError(UserError, ValueError):
    """Evaluation data could reach training; the message names the files and what to do."""


def file_hashes(root: Path, files: list[str], progress: bool = False, desc: str = "hashing") -> dict[str, str]:
    """sha256 of each file's bytes -> its path relative to ``root`` (first one for duplicates)."""
    out: dict[str, str] = {}
    for f in tqdm(files, desc=desc, unit="file", disable=not progress, leave=False):
        out.setdefault(sha256_file(root / f), f)
    return out


def _examples(pairs: list[str], n: int = 3) -> str:
    more = f" (and {len(pairs) - n} more)" if len(pairs) > n else ""
    return "; ".join(pairs[:n]) + more


def check_real(train: dict[str, str], evals: dict[str, dict[str, str]]) -> None:
    """``train`` / ``evals[split]``: hash -> file. Refuse any evaluation file whose bytes are in train."""
    for split, hashes in evals.items():
        dup = [f"{split}/{f} = train/{train[h]}" for h, f in hashes.items() if h in train]
        if dup:
            raise LeakageError(f"{len(dup)} {split} image(s) are also in the training set (identical "
                               f"content): {_examples(dup)}; remove them from one of the splits")


def check_groups(groups: dict[str, str], files: dict[str, list[str]]) -> int:
    """Refuse a near-duplicate group present in train and in val/test; returns groups seen."""
    def gs(split):
        return {g for f in files[split] if (g := group_of(groups, f"{split}/{f}") or group_of(groups, f))}
    train = gs("train")
    for split in ("val", "test"):
        shared = sorted(train & gs(split))
        if shared:
            raise LeakageError(f"{len(shared)} near-duplicate group(s) span train and {split} "
                               f"({', '.join(shared[:5])}); re-split by group (data.split: groups)")
    return len(train)


def verify_synthetic(root: Path, files: list[str], eval_hashes: dict[str, str], eval_roots: list[Path],
                     allow_unverified: bool) -> dict:
    """Check a synthetic folder before use; returns its provenance for the report."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise LeakageError(f"synthetic set {root} has no manifest.csv; write synthetic sets with "
                           "gan-generate (it records each tile's sha256 and the generator's source)")
    with open(manifest, newline="") as f:
        recorded = {row["file"]: row.get("sha256", "") for row in csv.DictReader(f)}
    bad, unlisted, copies = [], [], []
    for rel in files:
        rel_posix = Path(rel).as_posix()
        if rel_posix not in recorded:
            unlisted.append(rel_posix)
            continue
        h = sha256_file(root / rel)
        if h != recorded[rel_posix]:
            bad.append(rel_posix)
        if h in eval_hashes:
            copies.append(f"{rel_posix} = {eval_hashes[h]}")
    if unlisted:
        raise LeakageError(f"{len(unlisted)} synthetic tile(s) of {root} are not in its manifest.csv: "
                           f"{_examples(unlisted)}; regenerate the set or remove them")
    if bad:
        raise LeakageError(f"{len(bad)} synthetic tile(s) of {root} do not match the sha256 in "
                           f"manifest.csv (changed after generation): {_examples(bad)}; regenerate the set")
    if copies:
        raise LeakageError(f"{len(copies)} synthetic tile(s) are byte-identical to validation/test "
                           f"images: {_examples(copies)}")
    source = root / "source.json"
    if not source.is_file():
        msg = (f"synthetic set {root} has no source.json, so the data its generator was trained on "
               "cannot be checked against validation/test")
        if not allow_unverified:
            raise LeakageError(msg + "; regenerate it with gan-generate, or set "
                                     "leakage.allow_unverified_synthetic: true to accept the risk")
        warnings.warn(msg + "; accepted because leakage.allow_unverified_synthetic is true", stacklevel=2)
        return {"verified": False, "tiles_checked": len(files)}
    info = json.loads(source.read_text())
    train_root = Path(info.get("train_root", ""))
    for r in eval_roots:
        if train_root and (r.resolve() == train_root.resolve() or train_root.resolve() in r.resolve().parents):
            raise LeakageError(f"the generator of {root} was trained on {train_root}, which contains "
                               f"the evaluation folder {r}; train it on the training split only")
    trained = info.get("train_files_sha256")
    if trained is None:
        if not allow_unverified:
            raise LeakageError(f"{source} does not list the generator's training files (a run from an "
                               "older histosynth); retrain it, or set leakage.allow_unverified_synthetic: true")
        return {"verified": False, "tiles_checked": len(files), **_brief(info)}
    leaked = [f"{eval_hashes[h]}" for h in trained if h in eval_hashes]
    if leaked:
        raise LeakageError(f"the generator of {root} was trained on {len(leaked)} validation/test "
                           f"image(s): {_examples(leaked)}; train it on the training split only")
    out = {"verified": True, "tiles_checked": len(files), "generator_train_files": len(trained), **_brief(info)}
    if "selected" in info:          # a selection: its classifier must not have seen validation/test either
        sel = info["selected"]
        seen = sel.get("selector_train_files_sha256")
        if seen is None:
            raise LeakageError(f"{source} records a selection but not the files its classifier was trained on")
        leaked = [f"{eval_hashes[h]}" for h in seen if h in eval_hashes]
        if leaked:
            raise LeakageError(f"the tiles of {root} were selected by a classifier trained on {len(leaked)} "
                               f"validation/test image(s): {_examples(leaked)}; select with the training split only")
        out["selected"] = {k: sel[k] for k in ("filter", "counts", "selector") if k in sel}
    return out


def _brief(info: dict) -> dict:
    return {k: info[k] for k in ("run", "family", "step", "checkpoint_sha256", "train_root") if k in info}
