"""train-classifier: one classifier from a YAML, on an ImageFolder tree or train/ val/ test/ folders.

    train-classifier --cfg classifier.yaml --out runs/clf --set data.root=/data/tiles
    train-classifier --cfg classifier.yaml --out runs/clf --set model.variant=resnet18 --set model.weights=imagenet
    classify --run runs/clf --input /data/new_tiles --out predictions.csv

The same splits (by group when a groups file exists; validation carved from train when there is
no val/), leakage guard, data cache, stain normalisation, augmentation and training as one
augment-compare cell, then a report on the real test split::

    OUT/config.yaml             the resolved config
    OUT/run/                    the engine run (checkpoints/best.pt: what ``classify`` loads; last.pt
                                resumes an interrupted run: re-run the same command)
    OUT/metrics.json            test metrics: tile level, and group level (mean probability and
                                majority vote over a group's tiles) when a groups file exists
    OUT/test_predictions.csv    file, group, true class, predicted class, per-class probabilities
    OUT/report.md, report.html  the tables and figures: confusion matrices, ROC curves, training curves

Also runs as ``python -m classifier.train_classifier``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from classifier.augment import POLICIES
from classifier.config import ClassifierModelConfig, ClassifierTrainConfig
from experiments.config import CompareDataConfig
from histosynth import config as configlib
from histosynth.checkpoint import atomic_write_csv, atomic_write_text
from histosynth.cli import run_cli
from histosynth.config import require_choice
from histosynth.paths import check_apart, check_claimable, claim_output_dir, hold

CONFIG_NAME = "classifier.yaml"


@dataclass
class TrainClassifierConfig:
    data: CompareDataConfig = field(default_factory=CompareDataConfig)
    """Where the tiles come from, as augment-compare's data section (experiments/config.py)."""
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    augment: str = "flip_rot90"
    """Augmentation policy (classifier/augment.py): none | flip | flip_rot90 | stain | classic."""
    sampler: Literal["random", "balanced", "class_augment"] = "random"
    """``balanced``: classes drawn equally often; ``class_augment``: rare classes topped up with
    heavily augmented extra draws (see augment-compare's arms)."""
    stain_norm: Literal["none", "macenko", "reinhard"] = "none"
    """Stain normalisation of every image, fitted on training tiles only."""
    seed: int = 0

    def __post_init__(self):
        require_choice(self.augment, POLICIES, "augment", "an augmentation policy")

    def as_compare(self):
        """The one-arm, one-seed augment-compare config this run is."""
        from classifier.config import ClassifierConfig
        from experiments.config import ArmConfig, CompareConfig, CompareReportConfig
        arm = ArmConfig(name="classifier", augment=self.augment, sampler=self.sampler,
                        class_weights=self.train.class_weights, stain_norm=self.stain_norm)
        return CompareConfig(data=self.data, task="classification", downstream=ClassifierConfig(self.model, self.train),
                             arms=[arm], seeds=[self.seed], report=CompareReportConfig(baseline=arm.name))


def train_classifier(cfg: TrainClassifierConfig, out: str | Path, overwrite: bool = False,
                     progress: bool = True) -> dict:
    """Train (or continue) ``cfg`` into ``out``, score it on the test split, write the report;
    returns the test metrics."""
    from experiments.augment_compare import (Inputs, compare_inputs, leakage_checks, load_splits,
                                             sample_groups)
    from experiments.splits import SPLITS
    from histosynth import engine
    from histosynth.registry import get_downstream

    out = Path(out)
    ccfg = cfg.as_compare()
    check_apart(out, compare_inputs(ccfg))
    saved = out / "config.yaml"
    if not saved.is_file():
        check_claimable(out, overwrite)
    with hold(out):
        if saved.is_file() and not overwrite:
            old, now = configlib.read_yaml(saved), configlib.to_dict(cfg)
            if old != now:
                raise configlib.ConfigError("", f"{out} holds a classifier run with another config; pass "
                                                "--overwrite to start over, or another --out")
        else:
            claim_output_dir(out, overwrite, hint="pass --overwrite to replace it, or another --out")
            atomic_write_text(saved, configlib.dump_yaml(cfg))
        splits, caches = load_splits(ccfg, out, progress)
        leakage_checks(splits, caches, progress)
        groups = sample_groups(splits, caches["test"], "test")
        inputs = Inputs(ccfg, out, {s: str(splits.roots[s]) for s in SPLITS}, {}, groups, progress,
                        loaded=(caches, {}))
        task, arm = get_downstream("classification"), ccfg.arms[0]
        data, _ = inputs.get(arm.stain_norm)
        train = data["train"].tileset()
        run = out / "run"
        rt = task.runtime(ccfg.downstream)
        summary = engine.train("classifier", cfg, lambda rt: task.build_task(ccfg.downstream, arm, cfg.seed, train,
                                                                            data["val"], rt),
                               run, rt, seed=cfg.seed, resume=True, progress=progress, desc="classifier")
        best = engine.load_checkpoint(engine.RunDir(run).checkpoint("best"))
        task.score(ccfg.downstream, best, train, data["test"], run, groups)
        metrics = json.loads((run / "metrics.json").read_text())
        from classifier.train import checkpoint_info
        info = checkpoint_info(best)
        metrics.update(best_epoch=info["epoch"], val_balanced_accuracy=info["val_balanced_accuracy"],
                       epochs_run=summary["step"] // info["steps_per_epoch"],
                       stain_norm=arm.stain_norm, stain_reference=str(inputs.reference) if arm.stain_norm != "none" else None)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=float))
        _predictions_csv(run / "test_predictions.npz", data["test"].files, out / "test_predictions.csv")
        write_classifier_report(metrics, run, out, splits.method)
        return metrics


def _predictions_csv(npz: Path, files: list[str], path: Path) -> None:
    p = np.load(npz)
    classes, groups = [str(c) for c in p["classes"]], [str(g) for g in p["groups"]]
    rows = [{"file": f, "group": groups[i] if groups else "", "true": classes[int(p["labels"][i])],
             "predicted": classes[int(p["probs"][i].argmax())],
             **{f"p_{c}": round(float(v), 6) for c, v in zip(classes, p["probs"][i])}} for i, f in enumerate(files)]
    atomic_write_csv(path, rows, list(rows[0]))


def write_classifier_report(m: dict, run: Path, out: Path, split: str) -> None:
    """report.md / report.html of one classifier: tile- and group-level tables and the figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from sklearn.metrics import roc_curve

    from histosynth.viz import markdown_to_html, plot_curves

    p = np.load(run / "test_predictions.npz")
    classes = [str(c) for c in p["classes"]]
    levels = [("tiles", m)] + [(f"groups ({'mean tile probability' if how == 'mean' else 'majority vote'})", g)
                               for how, g in m.get("groups", {}).items()]
    L = ["# histosynth classifier report", "",
         f"Test split: {m['n']} tiles ({split}). Best weights: epoch {m['best_epoch']} of {m['epochs_run']} run "
         f"(validation balanced accuracy {m['val_balanced_accuracy']:.3f})."
         + (f" Stain normalisation: {m['stain_norm']} (reference {m['stain_reference']})." if m.get("stain_reference")
            else ""), "",
         "| level | n | accuracy | balanced accuracy | macro-F1 | AUC (one-vs-rest) |", "|---|---|---|---|---|---|"]
    for name, r in levels:
        L.append(f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | {r['macro_f1']:.3f} | "
                 f"{r['auc']:.3f} |")
    L += ["", "## Per class (tiles)", "", "| class | support | sensitivity | specificity | AUC |", "|---|---|---|---|---|"]
    for c, r in m["per_class"].items():
        L.append(f"| {c} | {r['support']} | {r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['auc']:.3f} |")
    figs = {}
    fig, axes = plt.subplots(1, len(levels), figsize=(3.8 * len(levels), 3.4), squeeze=False)
    for ax, (name, r) in zip(axes[0], levels):
        cm = np.asarray(r["confusion"], dtype=float)
        sns.heatmap(cm / np.maximum(cm.sum(1, keepdims=True), 1), annot=cm.astype(int), fmt="d", vmin=0, vmax=1,
                    cmap="Blues", cbar=False, ax=ax, xticklabels=classes, yticklabels=classes)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)
    figs["Confusion matrices (numbers: counts; colour: row share)"] = "confusion.png"
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    for ci, c in enumerate(classes):
        y = p["labels"] == ci
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, p["probs"][:, ci])
            ax.plot(fpr, tpr, lw=1.3, label=f"{c} (AUC {m['per_class'][c]['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("ROC, one class vs the rest (tiles)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)
    figs["ROC curves"] = "roc.png"
    if (run / "metrics.jsonl").is_file():
        plot_curves(run / "metrics.jsonl", out / "curves.png", ["train_loss", "val_balanced_accuracy"])
        figs["Training loss and validation balanced accuracy"] = "curves.png"
    for title, f in figs.items():
        L += ["", f"## {title}", "", f"![{Path(f).stem}]({f})"]
    md = "\n".join(L) + "\n"
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", markdown_to_html(md, out, "histosynth classifier report"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train-classifier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default=CONFIG_NAME, help=f"YAML config (bare names resolve in configs/; default {CONFIG_NAME})")
    p.add_argument("--out", required=True, help="output folder; re-run the same command to continue")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.root=/data/tiles (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _main(args: argparse.Namespace) -> int:
    cfg, _, _ = configlib.load(TrainClassifierConfig, args.cfg, args.set)
    if args.dry_run:
        print(configlib.dump_yaml(cfg), end="")
        return 0
    m = train_classifier(cfg, args.out, args.overwrite, not args.no_progress)
    line = f"balanced accuracy {m['balanced_accuracy']:.3f} on {m['n']} test tiles"
    for how, g in m.get("groups", {}).items():
        line += f"; {g['balanced_accuracy']:.3f} on {g['n']} groups ({how})"
    print(f"train-classifier: {line}; report in {Path(args.out) / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("train-classifier", lambda: _main(args), log_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
