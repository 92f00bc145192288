"""Training and prediction of an EfficientNet classifier, on the shared engine.

``fit`` trains a :class:`classifier.task.ClassifierTask` with :func:`histosynth.engine.train`
(AdamW, linear warm-up + cosine decay per step, cross-entropy with optional class weights and
label smoothing, bf16 / channels_last where the device has them, validation every epoch, early
stopping on validation balanced accuracy, torchrun data parallelism). Its run directory is an
engine run directory::

    RUN/checkpoints/last.pt   resumable state; a killed run continues from its last epoch (with
                              ``keep_final_state=False`` a finished run keeps only its record)
    RUN/checkpoints/best.pt   weights of the best validation epoch (+ classes, variant, image size):
                              what is evaluated, and what ``piq-report --extractor histology`` loads
    RUN/metrics.jsonl         one line per epoch (training loss, learning rate) and per validation
    RUN/config.yaml           the classifier config
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from classifier.config import ClassifierConfig
from classifier.data import TileDataset
from classifier.model import create_classifier, upgrade_state
from classifier.task import ClassifierTask, class_weights, predict, steps_per_epoch  # noqa: F401  (public API)
from histosynth import engine
from histosynth.runtime import Runtime

TASK_NAME = "classifier"


def checkpoint_info(ck: dict) -> dict:
    """What a classifier checkpoint says about itself: classes, variant, image size, the
    validation balanced accuracy and epoch of its weights (best.pt)."""
    info, metrics = dict(ck["info"]), ck.get("metrics", {})
    return {**info, "val_balanced_accuracy": metrics.get("val_balanced_accuracy", float("nan")),
            "epoch": int(ck["step"]) // info["steps_per_epoch"]}


def model_from_checkpoint(ck: dict) -> tuple[torch.nn.Module, dict]:
    """The classifier a checkpoint holds (eval mode, on the CPU) and its info."""
    info = checkpoint_info(ck)
    model = create_classifier(info["variant"], len(info["classes"]))
    model.load_state_dict(upgrade_state(ck["modules"]["model"]))
    return model.eval(), info


def load_best(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The best-validation model of a classifier run (eval mode) and its checkpoint info."""
    ck = engine.load_checkpoint(engine.RunDir(Path(run_dir)).checkpoint("best"), {TASK_NAME: None},
                                "it is not a classifier checkpoint")
    model, info = model_from_checkpoint(ck)
    return model.to(device), info


def fit(cfg: ClassifierConfig, train: TileDataset, val_images: np.ndarray, val_labels: np.ndarray,
        classes: list[str], run_dir: str | Path, seed: int, sampler: str = "random",
        progress: bool = True, desc: str = "classifier", keep_final_state: bool = True) -> dict:
    """Train into ``run_dir`` (continuing from its last.pt when present); return the engine's
    summary plus the epoch view: epochs_run, best_epoch, best_val_balanced_accuracy, and a
    history with one row per epoch (epoch, train_loss, lr, validation metrics)."""
    t = cfg.train
    rt = Runtime.candidates(t.device, t.amp, t.channels_last)
    summary = engine.train(TASK_NAME, cfg, lambda rt: ClassifierTask(cfg, train, val_images, val_labels, classes,
                                                                    rt, seed, sampler),
                           run_dir, rt, seed=seed, resume=True, progress=progress, desc=desc,
                           keep_final_state=keep_final_state)
    spe = steps_per_epoch(len(train), t.batch_size)
    history = [{"epoch": row["step"] // spe, **{k: v for k, v in row.items() if k != "step"}}
               for row in summary["history"]]
    return {**summary, "history": history, "epochs_run": summary["step"] // spe,
            "best_epoch": (summary["best_step"] or 0) // spe,
            "best_val_balanced_accuracy": summary["best"] if summary["best"] is not None else -1.0}
