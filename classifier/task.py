"""The classifier as an engine task: any backbone of classifier/model.py trained on tiles,
validated every epoch.

One ``train_step`` is one batch: cross-entropy (optional class weights and label smoothing),
AdamW with two learning rates (backbone: ``train.backbone_lr`` x lr; head: lr) and, for
fine-tuning, the backbone frozen for the first ``train.freeze_epochs`` epochs; the engine adds
the warm-up + cosine schedule, validation every epoch (balanced accuracy decides best.pt and
early stopping), checkpoints, torchrun gradient averaging and exact resume.

Batches are a pure function of (seed, step): epoch ``e`` is a permutation of the training tiles
(``random``), a class-balanced draw with replacement by torchsampler's weights (``balanced``) or
every tile plus heavily augmented extra draws of the rarer classes (``class_augment``), from a
generator seeded by (seed, e); each tile's augmentation is seeded by (seed, step, position).
So the data order and the augmentation need no saved state, do not depend on the number of
torchrun processes (each takes its share of the same global batch) or of DataLoader workers,
and a run resumes exactly at any step.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from classifier.config import ClassifierConfig
from classifier.data import TileDataset, normalise
from classifier.metrics import classification_metrics
from classifier.model import backbone_parameters, create_classifier
from histosynth.data import StepBatches, steps_per_epoch  # noqa: F401  (public API)
from histosynth.engine import require_divisible
from histosynth.roles import Criterion, LRSchedule, Plan
from histosynth.runtime import Runtime, eval_mode

CRITERION = Criterion("val_balanced_accuracy", "max")


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (k * n_c)`` per class (scikit-learn's 'balanced'); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, rt: Runtime, batch_size: int = 128,
            progress: bool = False, desc: str = "predicting") -> np.ndarray:
    """Softmax probabilities (N x k, float64) for uint8 tiles ``N x 3 x S x S``."""
    out = []
    with eval_mode(model):
        for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
            x = rt.batch(normalise(torch.from_numpy(np.array(images[i:i + batch_size]))))
            with rt.autocast():
                logits = model(x)
            out.append(torch.softmax(logits.float(), 1).cpu().double())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


class ClassifierTask:
    """Train ``cfg``'s EfficientNet on ``train``; validate on ``val_images`` / ``val_labels``."""

    def __init__(self, cfg: ClassifierConfig, train: TileDataset, val_images: np.ndarray,
                 val_labels: np.ndarray, classes: list[str], rt: Runtime, seed: int,
                 sampler: str = "random"):
        m, t = cfg.model, cfg.train
        self.cfg, self.rt, self.classes = cfg, rt, list(classes)
        self.val_images, self.val_labels = val_images, val_labels
        require_divisible(t.batch_size, rt.world, "train.batch_size")
        self.model = rt.prepare(create_classifier(m.variant, len(classes), m.weights, m.dropout, m.bn_momentum))
        self.modules = {"model": self.model}
        body, head = backbone_parameters(self.model)          # fine-tuning: two learning rates
        self.optimizers = {"model": torch.optim.AdamW([{"params": body, "lr": t.lr * t.backbone_lr},
                                                       {"params": head, "lr": t.lr}],
                                                      lr=t.lr, weight_decay=t.weight_decay,
                                                      **rt.optimizer_options())}
        self.ema_names: tuple[str, ...] = ()
        self.batches = StepBatches(train, t.batch_size, seed, sampler, rt.rank, rt.world)
        spe = self.batches.steps_per_epoch
        self.plan = Plan(steps=t.epochs * spe, log_every=spe, checkpoint_every=spe, evaluate_every=spe,
                         criterion=CRITERION, patience=t.patience, min_steps=t.min_epochs * spe,
                         lr=LRSchedule("cosine", warmup=round(t.warmup_epochs * spe)),
                         images_per_step=self.batches.batch_size)
        self.weight = (class_weights(train.labels, len(classes)).to(rt.device)
                       if t.class_weights == "balanced" else None)
        self.freeze_steps = t.freeze_epochs * spe
        self.step = 0
        self._loader = None

    def _freeze(self, frozen: bool) -> None:
        """The backbone's weights and BatchNorm statistics held (only the head learns), or not."""
        for p in self.model.body.parameters():
            p.requires_grad_(not frozen)
        self.model.body.train(not frozen)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._loader is None:                 # starts at the (resumed) step
            # its own generator: creating the iterator would otherwise draw from the global RNG
            # (which dropout uses) at a step that differs between a resumed and a whole run
            self._loader = iter(DataLoader(self.batches, batch_size=None, sampler=range(self.step, self.plan.steps),
                                           num_workers=self.cfg.train.num_workers, generator=torch.Generator(),
                                           pin_memory=self.rt.device.type == "cuda"))
        return next(self._loader)

    def train_step(self) -> dict[str, torch.Tensor]:
        if self.freeze_steps:
            self._freeze(self.step < self.freeze_steps)
        x, y = self._next_batch()
        x, y = self.rt.batch(x), y.to(self.rt.device, non_blocking=True)
        with self.rt.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, weight=self.weight, label_smoothing=self.cfg.train.label_smoothing)
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.step += 1
        return {"train_loss": loss.detach()}

    def evaluate(self, models: Mapping[str, torch.nn.Module]) -> dict[str, float]:
        m = classification_metrics(self.val_labels, predict(models["model"], self.val_images, self.rt), self.classes)
        return {"val_balanced_accuracy": m["balanced_accuracy"], "val_macro_f1": m["macro_f1"], "val_auc": m["auc"]}

    def visualise(self, models) -> None:
        return None

    def info(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"classes": self.classes, "variant": m.variant, "image_size": m.image_size,
                "steps_per_epoch": self.batches.steps_per_epoch}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self._loader = int(state["step"]), None
