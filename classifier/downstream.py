"""Classification as ``augment-compare``'s downstream task (``task: classification``).

Each arm x seed cell trains an EfficientNet (:class:`classifier.task.ClassifierTask`, on the engine)
on the arm's assembled training set with the arm's augmentation policy, sampler and class
weights, early-stopped on validation balanced accuracy, and scores its best checkpoint on the
real test split: accuracy, balanced accuracy,
macro-F1, one-vs-rest AUC and the sensitivity of the minority class (fewest real training tiles).
Per-class sensitivity / specificity / AUC and the confusion matrix go to the cell's
``metrics.json``, the test probabilities to ``test_predictions.npz``; the report's classification
figures (per-class sensitivity heatmap, confusion matrices, ROC curves) are drawn from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from classifier.augment import POLICIES, build_augment
from classifier.config import ClassifierConfig
from classifier.data import ClassFolders, TileDataset
from classifier.metrics import by_group, classification_metrics
from classifier.task import ClassifierTask, predict
from classifier.train import model_from_checkpoint
from histosynth.checkpoint import atomic_write, atomic_write_text
from histosynth.data import TileCache
from histosynth.images import DataError
from histosynth.roles import Generator, Metric, MetricSpec, TileSet
from histosynth.runtime import Runtime
from histosynth.stain import StainNormaliser
from metrics.selection import BY, FilterConfig, select_folder

HEAVY = "classic"   # the augmentation of the extra draws of rare classes (sampler: class_augment)

SPEC = MetricSpec(
    metrics=(Metric("balanced_accuracy", "balanced accuracy (tiles)"), Metric("macro_f1", "macro-F1 (tiles)"),
             Metric("auc", "AUC (tiles, one-vs-rest)"), Metric("minority_sensitivity", "minority sensitivity (tiles)"),
             Metric("group_balanced_accuracy", "balanced accuracy (groups: mean tile probability)", needs_groups=True),
             Metric("group_vote_balanced_accuracy", "balanced accuracy (groups: majority vote)", needs_groups=True,
                    plotted=False),
             Metric("accuracy", "accuracy (tiles)", plotted=False)),
    primary="balanced_accuracy", control="balanced_accuracy")


def minority_class(data: TileSet) -> str:
    """The class with the fewest real training tiles."""
    real = data.labels[~data.synthetic] if data.synthetic is not None else data.labels
    counts = np.bincount(real, minlength=len(data.classes))
    return data.classes[int(np.argmin(counts))]


class Classification:
    name = "classification"
    config = ClassifierConfig
    spec = SPEC
    layout = ClassFolders()
    augment_policies = POLICIES
    filters = BY
    test_unit = "tiles"
    synthesis = Generator
    class_balance = True
    smoke = ("model.image_size=32", "model.bn_momentum=0.5", "train.batch_size=8", "train.epochs=2",
             "train.patience=0", "train.min_epochs=0", "train.device=cpu")

    def chance(self, classes: Sequence[str]) -> dict[str, float]:
        return {"balanced_accuracy": 1.0 / len(classes), "auc": 0.5}

    def load(self, cfg: ClassifierConfig, root: Path, role: str, cache_dir: Path | None, progress: bool,
             stain: StainNormaliser | None = None) -> TileCache:
        tiles = TileCache.build(root, cfg.model.image_size, stain, cache_dir, progress)
        if role == "train" and len(tiles.classes) < 2:
            raise DataError(f"the training split {root} has one class ({tiles.classes[0]}); a comparison needs "
                            "at least two class folders (one class would score a perfect, meaningless 1.0)")
        return tiles

    def describe(self, cfg: ClassifierConfig) -> str:
        return (f"{cfg.model.variant} at {cfg.model.image_size} px, weights "
                f"{cfg.model.weights or 'none (from scratch)'}, up to {cfg.train.epochs} epochs, early "
                f"stopping patience {cfg.train.patience} on validation balanced accuracy")

    def select(self, cfg: ClassifierConfig, spec: FilterConfig, source: Path, train_root: Path, out: Path,
               need: dict[str, int], cache_dir: Path | None, progress: bool) -> dict:
        return select_folder(source, out, train_root, spec, overwrite=True, progress=progress, need=need)

    def runtime(self, cfg: ClassifierConfig) -> tuple[Runtime, ...]:
        t = cfg.train
        return Runtime.candidates(t.device, t.amp, t.channels_last)

    def build_task(self, cfg: ClassifierConfig, arm, seed: int, train: TileSet, val_split: TileCache,
                   rt: Runtime) -> ClassifierTask:
        val = val_split.tileset()
        heavy = build_augment(HEAVY, seed + 1) if arm.sampler == "class_augment" else None
        ds = TileDataset(train.images, train.labels, build_augment(arm.augment, seed), heavy)
        ccfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, class_weights=arm.class_weights))
        return ClassifierTask(ccfg, ds, val.images, val.labels, train.classes, rt, seed, arm.sampler)

    def score(self, cfg: ClassifierConfig, best: dict, train: TileSet, test_split: TileCache,
              cell: Path, groups: Sequence[str] | None = None) -> dict[str, float]:
        rt = self.runtime(cfg)[0]
        test = test_split.tileset()
        model, info = model_from_checkpoint(best)
        probs = predict(rt.prepare(model), test.images, rt)
        m = classification_metrics(test.labels, probs, train.classes)
        out = {"best_epoch": info["epoch"], "val_balanced_accuracy": info["val_balanced_accuracy"],
               **{k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc")},
               "minority_sensitivity": m["per_class"][minority_class(train)]["sensitivity"],
               "group_balanced_accuracy": math.nan, "group_vote_balanced_accuracy": math.nan}
        if groups is not None:
            m["groups"] = {}
            for how, key in (("mean", "group_balanced_accuracy"), ("vote", "group_vote_balanced_accuracy")):
                y, p, _ = by_group(test.labels, probs, groups, how)
                m["groups"][how] = classification_metrics(y, p, train.classes)
                out[key] = m["groups"][how]["balanced_accuracy"]
        atomic_write(cell / "test_predictions.npz",
                     lambda f: np.savez(f, probs=probs, labels=test.labels, classes=np.array(train.classes),
                                        groups=np.array(groups if groups is not None else [], dtype=str)))
        atomic_write_text(cell / "metrics.json", json.dumps(m, indent=1, default=float))
        return out

    def plots(self, summary: dict, rows: list[dict], out: Path) -> dict[str, str]:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import seaborn as sns
        from sklearn.metrics import roc_curve

        names, classes = list(summary["arms"]), summary["classes"]
        palette = dict(zip(names, sns.color_palette("deep", len(names))))
        figs: dict[str, str] = {}

        def save(fig, title, name):
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            figs[title] = name

        def cells(n: str, file: str) -> list[Path]:
            return [Path(r["cell_dir"]) / file for r in rows
                    if r["arm"] == n and (Path(r["cell_dir"]) / file).is_file()]

        per_class = {n: [json.loads(p.read_text())["per_class"] for p in cells(n, "metrics.json")] for n in names}
        heat = np.array([[np.mean([pc[c]["sensitivity"] for pc in per_class[n]]) if per_class[n] else math.nan
                          for c in classes] for n in names])
        fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 0.45 * len(names) + 1.5))
        sns.heatmap(heat, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", xticklabels=classes,
                    yticklabels=names, ax=ax, cbar_kws={"label": "sensitivity"})
        ax.set_title("per-class sensitivity (mean over seeds)")
        save(fig, "Per-class sensitivity", "per_class_sensitivity.png")

        preds = {n: [np.load(p) for p in cells(n, "test_predictions.npz")] for n in names}
        cols = min(3, len(names))
        rows_n = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.2 * rows_n), squeeze=False)
        for ax, n in zip(axes.flat, names):
            if not preds[n]:
                ax.set_visible(False)
                continue
            k = len(classes)
            cm = sum(np.bincount(p["labels"] * k + p["probs"].argmax(1), minlength=k * k).reshape(k, k)
                     for p in preds[n])
            norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
            sns.heatmap(norm, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="Blues", cbar=False, ax=ax,
                        xticklabels=classes, yticklabels=classes)
            ax.set_title(f"{n} ({len(preds[n])} seeds)", fontsize=9)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        save(fig, "Confusion matrices (summed over seeds, rows normalised)", "confusion_matrices.png")

        fig, axes = plt.subplots(1, len(classes), figsize=(3.3 * len(classes), 3.3), squeeze=False)
        for ci, (ax, c) in enumerate(zip(axes[0], classes)):
            for n in names:
                if not preds[n]:
                    continue
                y = np.concatenate([p["labels"] for p in preds[n]]) == ci
                score = np.concatenate([p["probs"][:, ci] for p in preds[n]])
                if 0 < y.sum() < len(y):
                    fpr, tpr, _ = roc_curve(y, score)
                    ax.plot(fpr, tpr, lw=1.2, color=palette[n], label=n)
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
            ax.set_title(f"{c} vs rest (pooled seeds)", fontsize=9)
            ax.set_xlabel("1 - specificity")
            ax.set_ylabel("sensitivity")
        axes[0][-1].legend(fontsize=7, loc="lower right")
        save(fig, "ROC curves", "roc_curves.png")
        return figs


DOWNSTREAM = Classification()
