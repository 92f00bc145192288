"""A feature space that knows tissue: an EfficientNet trained on the real training split.

``histology_weights(train_root)`` trains classifier/'s EfficientNet-B0 (from scratch, 64 px,
stain + flip augmentation, class-weighted, early-stopped on a stratified 15 % of the training
tiles held out for validation) and caches its best checkpoint, keyed by the decoded training
tiles and these settings, so later reports on the same training set reuse it. The distribution
metrics then use its penultimate layer (``metrics.features.ClassifierExtractor``). A histosynth
classifier checkpoint (e.g. ``augment-compare``'s ``cells/real_only/seed0/best.pt``) can be given
instead with ``--weights``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from histosynth import config as configlib
from histosynth.checkpoint import safe_load
from histosynth.engine import RunDir, load_checkpoint
from histosynth.data import TileCache, default_cache_dir
from histosynth.errors import UserError

SETTINGS = ["model.image_size=64", "model.bn_momentum=0.5", "train.epochs=15", "train.lr=2e-3",
            "train.patience=5", "train.min_epochs=8", "train.class_weights=balanced",
            "train.channels_last=on"]


class ExtractorDataError(UserError, ValueError):
    """The training split cannot train the histology extractor (one class, or a class too small to
    give its held-out validation a tile)."""


def histology_weights(train_root: str | Path, progress: bool = True, epochs: int | None = None) -> tuple[Path, str]:
    """(best.pt of a classifier trained on ``train_root``, a one-line description)."""
    from sklearn.model_selection import train_test_split

    from classifier.augment import build_augment
    from classifier.config import ClassifierConfig
    from classifier.data import TileDataset
    from classifier.train import checkpoint_info, fit

    sets = SETTINGS + ([f"train.epochs={epochs}", f"train.min_epochs={min(8, epochs)}"] if epochs else [])
    cfg = configlib.load(ClassifierConfig, None, sets)[0]
    tiles = TileCache.build(train_root, cfg.model.image_size, cache_dir=default_cache_dir(), progress=progress)
    if len(tiles.classes) < 2:
        raise ExtractorDataError(f"{train_root} has one class; the histology extractor learns from class "
                                 "folders (give --train a class-folder tree, or use --extractor pixels)")
    counts = np.bincount(tiles.labels, minlength=len(tiles.classes))
    thin = [f"{c} ({n})" for c, n in zip(tiles.classes, counts) if n < 2]
    if thin:
        raise ExtractorDataError(
            f"{train_root}: the histology extractor (selection scores, tissue-space metrics) holds out "
            f"a stratified share of every class for validation, and class(es) {', '.join(thin)} have "
            "fewer than 2 training tiles; add tiles, or score with --extractor pixels or --weights")
    tag = hashlib.sha256(json.dumps([tiles.key, sets]).encode()).hexdigest()[:16]
    run = RunDir(default_cache_dir() / f"histology-{tag}")
    if not run.best.is_file() or not _finished(run):
        idx = np.arange(len(tiles))
        n_val = max(len(tiles.classes), round(0.15 * len(idx)))
        tr, va = train_test_split(idx, test_size=n_val, stratify=tiles.labels, random_state=0)
        ds = TileDataset(np.asarray(tiles.images)[tr], tiles.labels[tr], build_augment("stain", 0))
        fit(cfg, ds, np.asarray(tiles.images)[va], tiles.labels[va], tiles.classes, run.root, seed=0,
            progress=progress, desc="histology extractor", keep_final_state=False)
    ck = checkpoint_info(load_checkpoint(run.best))
    note = (f"trained here on {train_root} ({len(tiles)} tiles, {len(tiles.classes)} classes; "
            f"held-out balanced accuracy {ck['val_balanced_accuracy']:.3f} at epoch {ck['epoch']})")
    return run.best, note


def _finished(run: RunDir) -> bool:
    """Did the extractor's training end (its last.pt kept as the finished run's record)?"""
    return run.last.is_file() and "optimizers" not in safe_load(run.last)


def learned(ck: dict) -> bool:
    """Did the extractor's classifier beat chance clearly on its held-out tiles? (a quarter of
    the way from chance to perfect; below that its feature space is not about tissue). ``ck``: a
    classifier checkpoint's info (:func:`classifier.train.checkpoint_info`)."""
    chance = 1.0 / len(ck["classes"])
    return float(ck["val_balanced_accuracy"]) >= chance + 0.25 * (1.0 - chance)
