"""The segmenter as an engine task: a U-Net (segmentation-models-pytorch) trained on random crops
of image-mask tiles, validated on whole images.

One ``train_step`` is one batch of ``image_size`` crops: binary cross-entropy + ``dice_weight`` x
soft Dice (smp.losses), AdamW; the engine adds warm-up + cosine decay, the validation Dice that
decides best.pt and early stopping, checkpoints, the NaN guard, torchrun gradient averaging and
exact resume. As for the classifier, a batch is a pure function of (seed, step) (tiles from a
seeded permutation per epoch; each crop and its augmentation seeded by (seed, step, position)),
so nothing but the step needs saving to resume exactly.

Whole images are predicted in one pass (reflect-padded to a multiple of 32) up to
``eval.window`` px a side, larger ones in overlapping windows whose probabilities are averaged.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from histosynth.data import StepBatches, normalise
from histosynth.engine import require_divisible
from histosynth.roles import Criterion, LRSchedule, Plan
from histosynth.runtime import Runtime, eval_mode, fold_batchnorm
from segmentation.augment import build_pair_augment
from segmentation.config import SegmenterConfig
from segmentation.data import tile_starts
from segmentation.metrics import dice_iou
from segmentation.model import create_segmenter, unet_inference_runtime

CRITERION = Criterion("val_dice", "max")


def segmenter_runtime(cfg: SegmenterConfig, candidates: bool = False, inference: bool = False):
    """Device and precision of a segmenter: ``amp: auto`` is bf16 + channels_last on CUDA and on
    CPUs with native bf16 (measured on 2 AMX cores, resnet18 U-Net: 2.1x per training step at
    128 px crops, 3.3x at 256 px, 4x for whole-image prediction), fp32 elsewhere: the rule's
    path, or (``candidates``) every path the config admits, the rule's first, for training runs
    to measure (:mod:`histosynth.autotune`); ``inference``: the path a trained segmenter predicts
    test images on (:func:`~segmentation.model.unet_inference_runtime`)."""
    t = cfg.train
    if inference:
        return unet_inference_runtime(t.device, t.amp, t.channels_last)
    pick = Runtime.candidates if candidates else Runtime.from_choices
    return pick(t.device, t.amp, t.channels_last, cpu_fast_path=True)


class PairDataset(Dataset):
    """Tiles ``images`` (N x 3 x T x T uint8) with ``masks`` (N x T x T class ids); an item is a
    random crop, augmented by ``policy``: (normalised 3 x S x S float, S x S float mask)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, policy: str, crop: int, seed: int = 0):
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        self.images, self.masks = images, masks
        self.transform = build_pair_augment(policy, crop, seed)

    def __len__(self) -> int:
        return len(self.images)

    def get_labels(self) -> list[int]:
        return [0] * len(self)

    def item(self, i: int, seed: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if seed is not None:
            s = int(np.random.SeedSequence(seed).generate_state(1)[0])
            self.transform.set_random_state(np.random.default_rng(s), random.Random(s))
        out = self.transform(image=np.ascontiguousarray(np.asarray(self.images[i]).transpose(1, 2, 0)),
                             mask=np.asarray(self.masks[i]))
        x = normalise(torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))))
        return x, torch.from_numpy(np.ascontiguousarray(out["mask"])).float()

    def __getitem__(self, i: int):
        return self.item(i)


BATCH_PIXELS = 8 * 256 * 256     # images smaller than the window are predicted this many pixels at a time


@torch.no_grad()
def _probabilities(model: torch.nn.Module, x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Foreground probabilities (B x H x W, on the CPU) of a normalised B x 3 x H x W batch,
    reflect-padded to a multiple of 32 for the network."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % 32, (-w) % 32
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    with rt.autocast():
        logits = model(rt.batch(x))                    # B x 1 x H' x W'
    return torch.sigmoid(logits.float())[:, 0, :h, :w].cpu()


@torch.no_grad()
def predict_image(model: torch.nn.Module, image: np.ndarray, rt: Runtime, window: int = 1024) -> np.ndarray:
    """Foreground probability (``H x W`` float32) of a whole ``3 x H x W`` uint8 image."""
    _, h, w = image.shape
    x = normalise(torch.from_numpy(np.ascontiguousarray(image)))[None]
    out = torch.zeros(h, w)
    hits = torch.zeros(h, w)
    win_h, win_w = min(window, h), min(window, w)
    for y in tile_starts(h, win_h):
        for xx in tile_starts(w, win_w):
            out[y:y + win_h, xx:xx + win_w] += _probabilities(model, x[..., y:y + win_h, xx:xx + win_w], rt)[0]
            hits[y:y + win_h, xx:xx + win_w] += 1
    return (out / hits).numpy()


def predict_images(model: torch.nn.Module, images: Sequence[np.ndarray], rt: Runtime,
                   window: int = 1024) -> list[np.ndarray]:
    """:func:`predict_image` of each image, by a copy of ``model`` with its BatchNorms folded into
    the convolutions (:func:`~histosynth.runtime.fold_batchnorm`: 6-11 % of a whole-image
    prediction); runs of same-sized images within one window (tiles, synthetic pairs) go through
    the network together, ``BATCH_PIXELS`` at a time (on 2 Zen 4 cores, bf16: 23 instead of 32 ms
    per 256 px tile; the same probabilities as one at a time)."""
    out: list[np.ndarray] = []
    with eval_mode(model):
        model = rt.prepare(fold_batchnorm(model))
        for shape, same in itertools.groupby(images, key=np.shape):      # runs of one size, in order
            same = list(same)
            if max(shape[1:]) > window:
                out.extend(predict_image(model, img, rt, window) for img in same)
                continue
            n = max(1, BATCH_PIXELS // (shape[1] * shape[2]))
            for i in range(0, len(same), n):
                x = normalise(torch.from_numpy(np.stack([np.asarray(img) for img in same[i:i + n]])))
                out.extend(p.numpy() for p in _probabilities(model, x, rt))
    return out


class SegmentationTask:
    """Train ``cfg``'s segmenter on ``train``; validate (Dice, IoU) on the whole ``val`` images
    (None: no validation; train.steps steps, the last weights are the result)."""

    def __init__(self, cfg: SegmenterConfig, train: PairDataset, val_images: Sequence[np.ndarray] | None,
                 val_masks: Sequence[np.ndarray] | None, rt: Runtime, seed: int):
        m, t = cfg.model, cfg.train
        self.cfg, self.rt = cfg, rt
        self.val_images, self.val_masks = val_images, val_masks
        require_divisible(t.batch_size, rt.world, "train.batch_size")
        self.model = rt.prepare(create_segmenter(m))
        self.modules = {"model": self.model}
        self.optimizers = {"model": torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                                      **rt.optimizer_options())}
        self.ema_names: tuple[str, ...] = ()
        self.batches = StepBatches(train, t.batch_size, seed, "random", rt.rank, rt.world)
        validate = val_images is not None
        self.plan = Plan(steps=t.steps, log_every=min(25, t.evaluate_every), checkpoint_every=t.evaluate_every,
                         evaluate_every=t.evaluate_every if validate else 0, criterion=CRITERION if validate else None,
                         patience=t.patience if validate else 0,
                         lr=LRSchedule("cosine", warmup=t.warmup_steps), images_per_step=self.batches.batch_size)
        from segmentation_models_pytorch.losses import DiceLoss, SoftBCEWithLogitsLoss
        self.bce, self.dice = SoftBCEWithLogitsLoss(), DiceLoss("binary", from_logits=True)
        self.step = 0
        self._loader = None

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._loader is None:                 # starts at the (resumed) step; its own generator
            self._loader = iter(DataLoader(self.batches, batch_size=None, sampler=range(self.step, self.plan.steps),
                                           num_workers=self.cfg.train.num_workers, generator=torch.Generator(),
                                           pin_memory=self.rt.device.type == "cuda"))
        return next(self._loader)

    def train_step(self) -> dict[str, torch.Tensor]:
        x, y = self._next_batch()                    # B x 3 x S x S normalised, B x S x S {0, 1}
        x, y = self.rt.batch(x), y.to(self.rt.device, non_blocking=True)[:, None]
        with self.rt.autocast():
            logits = self.model(x)                   # B x 1 x S x S
        logits = logits.float()
        bce, dice = self.bce(logits, y), self.dice(logits, y)
        loss = bce + self.cfg.train.dice_weight * dice
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.step += 1
        return {"train_loss": loss.detach(), "bce": bce.detach(), "dice_loss": dice.detach()}

    def evaluate(self, models: Mapping[str, torch.nn.Module]) -> dict[str, float]:
        probs = predict_images(models["model"], self.val_images, self.rt, self.cfg.eval.window)
        scores = [dice_iou(p >= self.cfg.eval.threshold, t) for p, t in zip(probs, self.val_masks)]
        return {"val_dice": float(np.mean([d for d, _ in scores])), "val_iou": float(np.mean([i for _, i in scores]))}

    def visualise(self, models) -> None:
        return None

    def info(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"arch": m.arch, "encoder": m.encoder, "image_size": m.image_size, "tile_size": m.tile_size,
                "decoder_channels": m.decoder_channels,
                "classes": ["background", "foreground"]}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self._loader = int(state["step"]), None


def model_from_checkpoint(ck: dict) -> tuple[torch.nn.Module, dict]:
    """The segmenter a checkpoint holds (eval mode, on the CPU; no encoder weights are loaded:
    the checkpoint has them) and its info."""
    from segmentation.config import SegmenterModelConfig

    info = dict(ck["info"])
    model = create_segmenter(SegmenterModelConfig(arch=info["arch"], encoder=info["encoder"],
                                                  image_size=info["image_size"], tile_size=info["tile_size"],
                                                  decoder_channels=info.get("decoder_channels")))
    model.load_state_dict(ck["modules"]["model"])
    return model.eval(), info
