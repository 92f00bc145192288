"""Segmentation as ``augment-compare``'s downstream task (``task: segmentation``).

Data are image-mask pairs (:mod:`segmentation.data`): training images are cut once into tiles of
``model.tile_size`` (synthetic pairs are tiles already) and every step trains on random
``model.image_size`` crops of them, augmented by the arm's policy (:mod:`segmentation.augment`);
validation and test images are predicted whole. Each arm x seed cell trains a U-Net
(:class:`segmentation.task.SegmentationTask`, on the engine) early-stopped on validation Dice, and
scores its best checkpoint on the real test images: Dice and IoU (mean over images, and pooled
over all pixels), pixel accuracy and, where the test folder has instance maps (``instances/``),
AJI and panoptic quality of the nuclei separated in the prediction. Per-image scores go to the
cell's ``metrics.json``; a preview of the first test images with truth and prediction to
``overlay.npz``, from which the report draws its overlay figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from histosynth.checkpoint import atomic_write, atomic_write_text
from histosynth.config import ConfigError
from histosynth.roles import PairGenerator, Metric, MetricSpec, TileSet
from histosynth.runtime import Runtime
from histosynth.stain import StainNormaliser
from metrics.selection import FilterConfig
from segmentation.augment import POLICIES
from segmentation.config import SegmenterConfig
from segmentation.data import PAIRS, PairSet, PairsLayout, load_pairs
from segmentation.metrics import segmentation_metrics
from segmentation.task import (PairDataset, SegmentationTask, model_from_checkpoint, predict_images,
                               segmenter_runtime)

SPEC = MetricSpec(
    metrics=(Metric("dice", "Dice (mean over images)"), Metric("iou", "IoU (mean over images)"),
             Metric("aji", "AJI"), Metric("pq", "panoptic quality"),
             Metric("dice_pooled", "Dice (pooled pixels)", plotted=False),
             Metric("pixel_accuracy", "pixel accuracy", plotted=False)),
    primary="dice", control=None)

PREVIEW_IMAGES = 3          # test images kept (downsampled) per cell for the overlay figure
PREVIEW_SIDE = 256


def _preview(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """A centred square of at most 1.5 x PREVIEW_SIDE px of a test image (nuclei stay visible),
    its truth and prediction, at PREVIEW_SIDE px."""
    from PIL import Image

    h, w = image.shape[1:]
    side = min(h, w, PREVIEW_SIDE * 3 // 2)
    y, x = (h - side) // 2, (w - side) // 2
    crop = (slice(y, y + side), slice(x, x + side))
    img = Image.fromarray(np.ascontiguousarray(image[:, crop[0], crop[1]].transpose(1, 2, 0)))
    small = np.asarray(img.resize((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR))
    shrink = [np.asarray(Image.fromarray((m[crop] > 0).astype(np.uint8) * 255).resize(
        (PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.NEAREST)) > 0 for m in (truth, pred)]
    return small, shrink[0], shrink[1]


class Segmentation:
    name = "segmentation"
    config = SegmenterConfig
    spec = SPEC
    layout = PairsLayout()
    augment_policies = POLICIES
    filters = ("agreement",)
    test_unit = "images"
    synthesis = PairGenerator
    class_balance = False
    smoke = ("model.tile_size=64", "model.image_size=64", "train.batch_size=4", "train.steps=4",
             "train.evaluate_every=2", "train.warmup_steps=0", "train.device=cpu", "eval.window=256")

    def chance(self, classes: Sequence[str]) -> dict[str, float]:
        return {}

    def load(self, cfg: SegmenterConfig, root: Path, role: str, cache_dir: Path | None, progress: bool,
             stain: StainNormaliser | None = None) -> PairSet:
        tile = cfg.model.tile_size if role in ("train", "synthetic") else None
        return load_pairs(root, tile, 1, stain, cache_dir, progress)

    def describe(self, cfg: SegmenterConfig) -> str:
        m, t = cfg.model, cfg.train
        return (f"{m.arch} with a {m.encoder} encoder (weights {m.encoder_weights or 'none, from scratch'}), "
                f"{m.image_size} px crops of {m.tile_size} px tiles, {t.steps} steps of {t.batch_size}, BCE + "
                f"{t.dice_weight:g} x Dice; best of every {t.evaluate_every} steps by validation Dice on whole "
                f"images; instances for AJI/PQ by {cfg.eval.instances}")

    def select(self, cfg: SegmenterConfig, spec: FilterConfig, source: Path, train_root: Path, out: Path,
               need: dict[str, int], cache_dir: Path | None, progress: bool) -> dict:
        from segmentation.selection import select_pairs
        return select_pairs(source, out, train_root, spec, cfg, out.parent / f"{out.name}-selector", cache_dir,
                            progress, need.get(PAIRS), overwrite=True)

    def runtime(self, cfg: SegmenterConfig) -> tuple[Runtime, ...]:
        return segmenter_runtime(cfg, candidates=True)

    def build_task(self, cfg: SegmenterConfig, arm, seed: int, train: TileSet, val: PairSet,
                   rt: Runtime) -> SegmentationTask:
        if train.targets is None:
            raise ConfigError("task", "the segmentation task trains on image-mask pairs; the training set has no masks")
        ds = PairDataset(train.images, train.targets, arm.augment, cfg.model.image_size, seed)
        return SegmentationTask(cfg, ds, val.images, val.masks, rt, seed)

    def score(self, cfg: SegmenterConfig, best: dict, train: TileSet, test: PairSet, cell: Path,
              groups: Sequence[str] | None = None) -> dict[str, float]:
        rt = segmenter_runtime(cfg, inference=True)
        model, info = model_from_checkpoint(best)
        probs = predict_images(rt.prepare(model), test.images, rt, cfg.eval.window)
        preds = [p >= cfg.eval.threshold for p in probs]
        m = segmentation_metrics(preds, test.masks, test.instances, cfg.eval.instances, cfg.eval.min_size,
                                 threads=torch.get_num_threads())
        for row, stem in zip(m["per_image"], test.stems):
            row["image"] = stem
        atomic_write_text(cell / "metrics.json", json.dumps(m, indent=1, default=float))
        n = min(PREVIEW_IMAGES, len(test))
        views = [_preview(test.images[i], test.masks[i], preds[i]) for i in range(n)]
        atomic_write(cell / "overlay.npz", lambda f: np.savez_compressed(
            f, images=np.stack([v[0] for v in views]), truth=np.stack([v[1] for v in views]),
            pred=np.stack([v[2] for v in views]), stems=np.array(test.stems[:n])))
        return {"best_step": int(best["step"]), "val_dice": float(best.get("metrics", {}).get("val_dice", math.nan)),
                **{k: m.get(k, math.nan) for k in ("dice", "iou", "aji", "pq", "dice_pooled", "iou_pooled",
                                                   "pixel_accuracy")}}

    def plots(self, summary: dict, rows: list[dict], out: Path) -> dict[str, str]:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import seaborn as sns

        names = list(summary["arms"])
        figs: dict[str, str] = {}

        def first_cell(n: str, file: str) -> Path | None:
            cells = sorted((r for r in rows if r["arm"] == n and (Path(r["cell_dir"]) / file).is_file()),
                           key=lambda r: int(r["seed"]))
            return Path(cells[0]["cell_dir"]) / file if cells else None

        views = {n: np.load(p) for n in names if (p := first_cell(n, "overlay.npz")) is not None}
        if views:
            ref = next(iter(views.values()))
            k = len(ref["images"])
            cols = 2 + len(views)
            fig, axes = plt.subplots(k, cols, figsize=(2.2 * cols, 2.3 * k), squeeze=False)
            for i in range(k):
                axes[i][0].imshow(ref["images"][i])
                axes[i][0].set_title(str(ref["stems"][i])[:18], fontsize=7)
                axes[i][1].imshow(_overlay(ref["images"][i], ref["truth"][i]))
                axes[i][1].set_title("truth", fontsize=8)
                for j, (n, v) in enumerate(views.items()):
                    axes[i][2 + j].imshow(_overlay(v["images"][i], v["pred"][i], v["truth"][i]))
                    axes[i][2 + j].set_title(n, fontsize=8)
            for ax in axes.flat:
                ax.axis("off")
            fig.suptitle("test images: truth and each arm's prediction (first seed; green: agrees with the truth, "
                         "yellow: false foreground, blue: missed)", fontsize=8)
            fig.tight_layout()
            fig.savefig(out / "overlays.png", dpi=110)
            plt.close(fig)
            figs["Overlays: image | truth | prediction per arm"] = "overlays.png"

        per_image: dict[str, dict[str, list[float]]] = {}
        for r in rows:
            p = Path(r["cell_dir"]) / "metrics.json"
            if p.is_file():
                for row in json.loads(p.read_text())["per_image"]:
                    per_image.setdefault(r["arm"], {}).setdefault(row.get("image", "?"), []).append(row["dice"])
        if per_image:
            images = sorted({im for d in per_image.values() for im in d})
            heat = np.array([[np.mean(per_image.get(n, {}).get(im, [math.nan])) for im in images] for n in names])
            fig, ax = plt.subplots(figsize=(0.5 * len(images) + 3, 0.45 * len(names) + 1.8))
            sns.heatmap(heat, annot=len(images) <= 16, fmt=".2f", vmin=0, vmax=1, cmap="viridis",
                        xticklabels=[im[:12] for im in images], yticklabels=names, ax=ax,
                        cbar_kws={"label": "Dice"}, annot_kws={"fontsize": 6})
            ax.set_title("Dice per test image (mean over seeds)")
            fig.tight_layout()
            fig.savefig(out / "per_image_dice.png", dpi=100)
            plt.close(fig)
            figs["Dice per test image"] = "per_image_dice.png"
        return figs


def _overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """``image`` tinted: green where prediction and truth agree, yellow false foreground, blue
    missed (no truth: the mask in green)."""
    out = image.astype(np.float32).copy()
    colour = np.zeros_like(out)
    if truth is None:
        colour[pred] = (0, 200, 0)
        hit = pred
    else:
        colour[pred & truth] = (0, 200, 0)
        colour[pred & ~truth] = (255, 210, 0)
        colour[~pred & truth] = (40, 90, 255)
        hit = pred | truth
    out[hit] = 0.55 * out[hit] + 0.45 * colour[hit]
    return out.clip(0, 255).astype(np.uint8)


DOWNSTREAM = Segmentation()
