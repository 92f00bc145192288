"""Selective synthetic augmentation: keep the synthetic tiles a tissue classifier believes.

After HistoGAN (Xue et al., Med Image Anal 2021) and HistoDiffusion (MICCAI 2023): generate more
candidates than needed, score each against the **real training split only** and keep the best:

* ``confidence``: the probability a classifier trained on the real training tiles gives to the
  tile's intended class (metrics.histology's EfficientNet: trained once per training split,
  cached; it never sees validation or test tiles);
* ``centroid``: the distance of the tile's features (that classifier's penultimate layer) to the
  centroid of its class's real training tiles, in units of the real tiles' median distance to it
  (1.0: as typical as a median real tile);
* ``both``: the mean of the two per-class percentile ranks.

Near-copies of real training tiles (memorised: closer, in feature or pixel space, than the 1 %
quantile of real-vs-real nearest-neighbour distances) are always dropped first. Per class, the
best ``keep`` share of the remaining candidates is kept, or every tile whose confidence is at
least ``min_confidence``. :func:`select_folder` writes the kept tiles (an ImageFolder tree whose
manifest.csv carries every score), ``selection.csv`` (every candidate, kept or not, with its
scores), ``source.json`` (the generator's provenance plus the selector's training files, which
the leakage guard checks against validation and test) and ``selection.png`` (best kept and
worst rejected tiles side by side per class, and the score histograms).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from histosynth.checkpoint import atomic_write_csv, atomic_write_text, sha256_file
from histosynth.config import ConfigError, require
from histosynth.data import TileCache, default_cache_dir
from histosynth.paths import claim_output_dir, inside

BY = ("confidence", "centroid", "both")


@dataclass
class FilterConfig:
    by: Literal["confidence", "centroid", "both", "agreement"] = "confidence"
    """Score. Classification: the classifier's confidence in the intended class, the distance to
    the class centroid in its feature space, or both (mean percentile rank). Segmentation:
    ``agreement``, the Dice of a real-trained U-Net's prediction with the drawn mask
    (segmentation/selection.py)."""
    keep: Optional[float] = 0.5
    """Share of each class's candidates kept (best first); candidates = needed / keep."""
    min_confidence: Optional[float] = None
    """Instead of ``keep``: keep every tile whose confidence is at least this (by confidence)."""
    drop_copies: bool = True
    """Drop memorised near-copies of real training tiles first."""

    def __post_init__(self):
        require((self.keep is None) != (self.min_confidence is None), "keep",
                "give exactly one of keep (a share) or min_confidence (a threshold)")
        require(self.keep is None or 0 < self.keep <= 1, "keep", f"must be in (0, 1], got {self.keep}")
        require(self.min_confidence is None or (0 <= self.min_confidence < 1 and self.by == "confidence"),
                "min_confidence", "must be in [0, 1) and goes with by: confidence")

    def describe(self) -> str:
        rule = f"best {self.keep:.0%} per class" if self.keep is not None else f"confidence >= {self.min_confidence}"
        return f"{self.by}, {rule}" + (", near-copies dropped" if self.drop_copies else "")

    def tag(self) -> str:
        """A folder name for this filter."""
        rule = f"keep{self.keep:g}" if self.keep is not None else f"conf{self.min_confidence:g}"
        return f"{self.by}-{rule}" + ("" if self.drop_copies else "-copies")

    def candidates(self, need: int) -> int:
        """Candidates to generate per class for ``need`` kept tiles (a threshold keeps an unknown
        share: twice as many, and the assembly says when too few pass)."""
        return math.ceil(need / self.keep) if self.keep is not None else 2 * need


def score(candidates: TileCache, train: TileCache, checkpoint: Path) -> dict[str, np.ndarray]:
    """Per candidate: intended class index, confidence, centroid distance, nearest-training-tile
    distances (features and pixels) and whether it is a memorised near-copy."""
    from classifier.train import checkpoint_info, model_from_checkpoint
    from histosynth.engine import load_checkpoint
    from histosynth.runtime import resolve_device
    from metrics.features import ClassifierExtractor, PixelExtractor
    from metrics.memorisation import calibrate, nearest
    from metrics.report import features

    ck = load_checkpoint(checkpoint)
    info = checkpoint_info(ck)
    missing = [c for c in candidates.classes if c not in info["classes"]]
    if missing:
        raise ConfigError("filter", f"synthetic class(es) {', '.join(missing)} are not classes of the training "
                                    f"split ({', '.join(info['classes'])})")
    intended = np.array([info["classes"].index(candidates.classes[y]) for y in candidates.labels])
    ext = ClassifierExtractor(checkpoint, info["variant"], int(info["image_size"]))
    fc, ft = features(candidates, ext, False), features(train, ext, False)
    model, _ = model_from_checkpoint(ck)
    dev = resolve_device()
    with torch.no_grad():
        logits = model.to(dev).head(fc.to(dev)).float().cpu()                    # the classifier's head
    confidence = torch.softmax(logits, 1)[torch.arange(len(intended)), torch.from_numpy(intended)].numpy()
    train_y = np.array([info["classes"].index(train.classes[y]) for y in train.labels])
    distance = np.zeros(len(intended))
    for c in np.unique(intended):
        real = ft[torch.from_numpy(train_y == c)]
        centre = real.mean(0)
        scale = float(torch.median((real - centre).norm(dim=1))) or 1.0
        rows = np.flatnonzero(intended == c)
        distance[rows] = ((fc[torch.from_numpy(rows)] - centre).norm(dim=1) / scale).numpy()
    pix = PixelExtractor()
    pc, pt = features(candidates, pix, False), features(train, pix, False)
    nn_feat, _ = nearest(fc, ft)
    nn_pix, _ = nearest(pc, pt)
    copy = (nn_feat <= calibrate(ft)) | (nn_pix <= calibrate(pt))
    return {"intended": intended, "confidence": confidence, "centroid_distance": distance,
            "nn_feature": nn_feat.numpy(), "nn_pixel": nn_pix.numpy(), "copy": copy.numpy()}


def choose(scores: dict[str, np.ndarray], spec: FilterConfig) -> tuple[np.ndarray, np.ndarray]:
    """(kept mask, rank score: higher is better) of the candidates, class by class."""
    n = len(scores["intended"])
    usable = ~scores["copy"] if spec.drop_copies else np.ones(n, bool)
    rank = np.zeros(n)
    kept = np.zeros(n, bool)
    for c in np.unique(scores["intended"]):
        rows = np.flatnonzero(scores["intended"] == c)

        def pct(v: np.ndarray) -> np.ndarray:           # percentile rank within the class, 1 = best
            order = np.argsort(np.argsort(v[rows], kind="stable"), kind="stable")
            return (order + 1) / len(rows)
        conf, dist = pct(scores["confidence"]), pct(-scores["centroid_distance"])
        rank[rows] = conf if spec.by == "confidence" else dist if spec.by == "centroid" else (conf + dist) / 2
        ok = rows[usable[rows]]
        if spec.min_confidence is not None:
            kept[ok[scores["confidence"][ok] >= spec.min_confidence]] = True
        else:
            best = ok[np.argsort(-rank[ok], kind="stable")][:round(spec.keep * len(rows))]
            kept[best] = True
    return kept, rank


def selector_checkpoint(train_root: str | Path, progress: bool) -> tuple[Path, TileCache, str]:
    """The classifier the scores come from (trained on ``train_root`` only; cached) and the
    training tiles at its input size."""
    from classifier.train import checkpoint_info
    from histosynth.engine import load_checkpoint
    from metrics.histology import histology_weights
    best, note = histology_weights(train_root, progress)
    size = int(checkpoint_info(load_checkpoint(best))["image_size"])
    return best, TileCache.build(train_root, size, cache_dir=default_cache_dir(), progress=progress), note


def select_folder(source: str | Path, out: str | Path, train_root: str | Path, spec: FilterConfig,
                  overwrite: bool = False, progress: bool = True, need: dict[str, int] | None = None) -> dict:
    """Select from the synthetic folder ``source`` (gan-generate's layout: class folders,
    manifest.csv, source.json) into ``out``; returns a summary (kept / candidates per class).
    ``need``: tiles per class the caller must have; fewer passing is an error that says so."""
    source, train_root = Path(source), Path(train_root)
    ck, train, note = selector_checkpoint(train_root, progress)
    cands = TileCache.build(source, train.images.shape[-1], cache_dir=default_cache_dir(), progress=progress)
    s = score(cands, train, ck)
    kept, rank = choose(s, spec)
    out = claim_output_dir(out, overwrite, inputs={"synthetic source": source, "training split": train_root})
    manifest = {}
    if (source / "manifest.csv").is_file():
        with open(source / "manifest.csv", newline="") as f:
            manifest = {r["file"]: r for r in csv.DictReader(f)}
    rows, table = [], []
    for i, rel in enumerate(cands.files):
        cls = cands.classes[cands.labels[i]]
        entry = {"file": Path(rel).as_posix(), "class": cls, "kept": bool(kept[i]),
                 "confidence": float(s["confidence"][i]), "centroid_distance": float(s["centroid_distance"][i]),
                 "nn_feature": float(s["nn_feature"][i]), "nn_pixel": float(s["nn_pixel"][i]),
                 "near_copy": bool(s["copy"][i]), "rank": float(rank[i])}
        table.append(entry)
        if kept[i]:
            dst = inside(out, rel, "synthetic tile")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, dst)
            base = manifest.get(entry["file"], {"file": entry["file"], "class": cls, "sha256": sha256_file(dst)})
            rows.append({**base, **{k: entry[k] for k in ("confidence", "centroid_distance", "nn_feature", "rank")}})
    counts = {c: {"candidates": int((cands.labels == i).sum()), "kept": int(kept[cands.labels == i].sum()),
                  "near_copies": int(s["copy"][cands.labels == i].sum())} for i, c in enumerate(cands.classes)}
    short = {c: (need[c], counts[c]["kept"]) for c in (need or {}) if c in counts and counts[c]["kept"] < need[c]}
    if short:
        c, (want, got) = next(iter(short.items()))
        raise ConfigError("filter", f"only {got} {c} tiles of {source} pass the filter ({spec.describe()}), "
                                    f"{want} are needed; generate more candidates or loosen the filter")
    write_selection(out, source, rows, table, spec, counts, note, train_root, train.files)
    plot_selection(cands, kept, rank, s, spec, out / "selection.png")
    return {"folder": str(out), "filter": spec.describe(), "counts": counts}


def write_selection(out: Path, source: Path, rows: list[dict], table: list[dict], spec: FilterConfig, counts: dict,
                    note: str, train_root: Path, train_files: list[str]) -> None:
    """A selection's records: manifest.csv (the kept files, with their scores), selection.csv
    (every candidate) and source.json (the generator's provenance, plus the files the selector
    was trained on, which the leakage guard checks against validation and test)."""
    if rows:
        atomic_write_csv(out / "manifest.csv", rows, list(rows[0]))
    atomic_write_csv(out / "selection.csv", table, list(table[0]))
    info = json.loads((source / "source.json").read_text()) if (source / "source.json").is_file() else {}
    info["selected"] = {"from": str(source.resolve()), "filter": spec.describe(), "counts": counts,
                        "selector": note, "selector_train_root": str(train_root.resolve()),
                        "selector_train_files_sha256": sorted({sha256_file(train_root / f) for f in train_files})}
    atomic_write_text(out / "source.json", json.dumps(info, indent=1))


def plot_selection(cands: TileCache, kept: np.ndarray, rank: np.ndarray, s: dict, spec: FilterConfig,
                   path: Path, n: int = 6) -> None:
    """Per class: the best kept and the worst rejected tiles side by side; then the histograms of
    confidence and centroid distance, kept against rejected."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    k = len(cands.classes)
    fig = plt.figure(figsize=(2 * n * 0.9 + 1, 1.0 * k + 3.2))
    grid = fig.add_gridspec(k + 2, 2 * n, height_ratios=[1] * k + [0.25, 2.2])
    for ci, c in enumerate(cands.classes):
        rows = np.flatnonzero(cands.labels == ci)
        best = rows[kept[rows]][np.argsort(-rank[rows[kept[rows]]])][:n]
        worst = rows[~kept[rows]][np.argsort(rank[rows[~kept[rows]]])][:n]
        for j, (group, title) in enumerate(((best, "kept"), (worst, "rejected"))):
            for m in range(n):
                ax = fig.add_subplot(grid[ci, j * n + m])
                ax.axis("off")
                if m < len(group):
                    ax.imshow(np.asarray(cands.images[group[m]]).transpose(1, 2, 0))
                    ax.set_title(f"{s['confidence'][group[m]]:.2f}", fontsize=6)
                if m == 0:
                    ax.text(-0.1, 0.5, f"{c}\n{title}", transform=ax.transAxes, ha="right", va="center", fontsize=7)
    for j, (key, label) in enumerate((("confidence", "confidence in the intended class"),
                                      ("centroid_distance", "distance to the class centroid"))):
        ax = fig.add_subplot(grid[k + 1, j * n:(j + 1) * n])
        ax.hist(s[key][kept], bins=25, alpha=0.7, label="kept")
        ax.hist(s[key][~kept], bins=25, alpha=0.7, label="rejected")
        ax.set_xlabel(label, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"selection: {spec.describe()} (numbers: confidence)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
