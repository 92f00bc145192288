"""Selective synthetic augmentation for segmentation: keep the synthetic pairs whose image a
segmenter trained on the REAL training split segments like their drawn mask.

A painted image can ignore its mask (nuclei painted where the mask has none, or not painted where
it has). A U-Net trained on the real training tiles only (the compare config's downstream model,
flips and rotations, no validation: it never sees validation or test images) predicts each
synthetic image; the pair's ``agreement`` is the Dice of that prediction with the drawn mask. The
best ``keep`` share of the candidates is kept (after dropping near-copies of real training tiles
in pixel space, as for classification). :func:`select_pairs` writes the kept pairs (a pairs folder
whose manifest carries the scores), ``selection.csv`` (every candidate), ``source.json`` (the
generator's provenance plus the selector's training files, which the leakage guard checks) and
``selection.png`` (best kept and worst rejected pairs, and the score histogram).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import torch

from histosynth import engine
from histosynth.checkpoint import sha256_file
from histosynth.config import ConfigError
from histosynth.paths import claim_output_dir, inside
from metrics.selection import FilterConfig, write_selection
from segmentation.config import SegmenterConfig
from segmentation.data import PAIRS, PairSet, load_pairs
from segmentation.metrics import dice_iou

SELECTOR = "segmenter-selector"


def train_selector(cfg: SegmenterConfig, train: PairSet, run: Path, progress: bool) -> tuple[torch.nn.Module, str]:
    """The selector U-Net (trained into ``run``, or continued / reused from it) and a note."""
    from segmentation.task import PairDataset, SegmentationTask, model_from_checkpoint, segmenter_runtime

    t = cfg.train
    ds = PairDataset(train.images, train.masks, "flip_rot90", cfg.model.image_size, 0)
    engine.train(SELECTOR, cfg, lambda rt: SegmentationTask(cfg, ds, None, None, rt, 0), run,
                 segmenter_runtime(cfg, candidates=True), seed=0,
                 resume=True, progress=progress, desc="selector U-Net")
    model, _ = model_from_checkpoint(engine.load_checkpoint(engine.RunDir(run).checkpoint("last")))
    note = (f"{cfg.model.arch}/{cfg.model.encoder} trained {t.steps} steps on the {len(set(train.stems))} real "
            f"training images (flips/rotations, seed 0), {run}")
    return model, note


def score_pairs(model: torch.nn.Module, cands: PairSet, train: PairSet, cfg: SegmenterConfig) -> dict[str, np.ndarray]:
    """Per candidate pair (by stem): agreement (Dice of the selector's prediction with the drawn
    mask, mean over the pair's tiles) and whether it is a pixel-space near-copy of a training tile."""
    from metrics.features import PixelExtractor
    from metrics.memorisation import calibrate, nearest
    from segmentation.task import predict_images, segmenter_runtime

    rt = segmenter_runtime(cfg, inference=True)
    probs = predict_images(rt.prepare(model), list(cands.images), rt, cfg.eval.window)
    dice = np.array([dice_iou(p >= cfg.eval.threshold, m)[0] for p, m in zip(probs, cands.masks)])
    pix = PixelExtractor()
    fc = torch.cat([pix(torch.from_numpy(np.asarray(cands.images[i:i + 256]))) for i in range(0, len(cands), 256)])
    ft = torch.cat([pix(torch.from_numpy(np.asarray(train.images[i:i + 256]))) for i in range(0, len(train), 256)])
    d, _ = nearest(fc, ft)
    copy = (d <= calibrate(ft)).numpy()
    stems = sorted(set(cands.stems))
    of = np.array([stems.index(s) for s in cands.stems])
    return {"stem": np.array(stems), "agreement": np.array([dice[of == k].mean() for k in range(len(stems))]),
            "copy": np.array([copy[of == k].any() for k in range(len(stems))]),
            "nn_pixel": np.array([d.numpy()[of == k].min() for k in range(len(stems))])}


def select_pairs(source: str | Path, out: str | Path, train_root: str | Path, spec: FilterConfig,
                 cfg: SegmenterConfig, selector_run: Path, cache_dir: Path | None = None, progress: bool = True,
                 need: int | None = None, overwrite: bool = False) -> dict:
    """Select from the pairs folder ``source`` (gan-generate's layout) into ``out``; the selector
    is trained into ``selector_run`` (reused when already trained). ``need``: pairs the caller
    must have; fewer passing is an error that says so."""
    source, train_root = Path(source), Path(train_root)
    train = load_pairs(train_root, cfg.model.tile_size, 1, None, cache_dir, progress)
    cands = load_pairs(source, cfg.model.tile_size, 1, None, cache_dir, progress)
    model, note = train_selector(cfg, train, selector_run, progress)
    s = score_pairs(model, cands, train, cfg)
    usable = ~s["copy"] if spec.drop_copies else np.ones(len(s["stem"]), bool)
    order = np.flatnonzero(usable)[np.argsort(-s["agreement"][usable], kind="stable")]
    kept = np.zeros(len(s["stem"]), bool)
    kept[order[:round(spec.keep * len(s["stem"]))]] = True
    counts = {PAIRS: {"candidates": len(kept), "kept": int(kept.sum()), "near_copies": int(s["copy"].sum())}}
    if need is not None and kept.sum() < need:
        raise ConfigError("filter", f"only {int(kept.sum())} pairs of {source} pass the filter ({spec.describe()}), "
                                    f"{need} are needed; generate more candidates or loosen the filter")
    out = claim_output_dir(out, overwrite, inputs={"synthetic source": source, "training split": train_root})
    with open(source / "manifest.csv", newline="") as f:
        manifest = {r["file"]: r for r in csv.DictReader(f)}
    files_of: dict[str, list[str]] = {}
    for rel in cands.files:
        files_of.setdefault(Path(rel).stem, []).append(rel)
    rows, table = [], []
    for i, stem in enumerate(s["stem"]):
        entry = {"pair": stem, "kept": bool(kept[i]), "agreement": float(s["agreement"][i]),
                 "nn_pixel": float(s["nn_pixel"][i]), "near_copy": bool(s["copy"][i])}
        table.append(entry)
        if kept[i]:
            for rel in files_of[stem]:
                dst = inside(out, rel, "synthetic pair file")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / rel, dst)
                base = manifest.get(rel, {"file": rel, "class": PAIRS, "sha256": sha256_file(dst)})
                rows.append({**base, "agreement": entry["agreement"]})
    write_selection(out, source, rows, table, spec, counts, note, train_root, train.files)
    plot_pair_selection(cands, s, kept, spec, out / "selection.png")
    return {"folder": str(out), "filter": spec.describe(), "counts": counts}


def plot_pair_selection(cands: PairSet, s: dict, kept: np.ndarray, spec: FilterConfig, path: Path, n: int = 5) -> None:
    """The best kept and the worst rejected pairs (image over mask outline; number: agreement),
    and the agreement histogram, kept against rejected."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {stem: i for i, stem in reversed(list(enumerate(cands.stems)))}     # the pair's first tile
    best = np.flatnonzero(kept)[np.argsort(-s["agreement"][kept])][:n]
    worst = np.flatnonzero(~kept)[np.argsort(s["agreement"][~kept])][:n]
    fig = plt.figure(figsize=(2.0 * n + 1, 6.4))
    grid = fig.add_gridspec(3, n, height_ratios=[1, 1, 1.1])
    for r, (group, title) in enumerate(((best, "kept"), (worst, "rejected"))):
        for m in range(n):
            ax = fig.add_subplot(grid[r, m])
            ax.axis("off")
            if m < len(group):
                i = first[s["stem"][group[m]]]
                ax.imshow(np.asarray(cands.images[i]).transpose(1, 2, 0))
                ax.contour(np.asarray(cands.masks[i]), levels=[0.5], colors="lime", linewidths=0.6)
                ax.set_title(f"{title} {s['agreement'][group[m]]:.2f}", fontsize=7)
    ax = fig.add_subplot(grid[2, :])
    ax.hist(s["agreement"][kept], bins=25, alpha=0.7, label="kept")
    ax.hist(s["agreement"][~kept], bins=25, alpha=0.7, label="rejected")
    ax.set_xlabel("agreement: Dice of a real-trained U-Net's prediction with the drawn mask", fontsize=8)
    ax.legend(fontsize=7)
    fig.suptitle(f"selection: {spec.describe()} (green: the drawn mask's outline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
