"""Training and prediction of an EfficientNet classifier: one epoch loop, resumable per epoch.

``fit`` trains on a :class:`classifier.data.TileDataset` with AdamW, linear warm-up + cosine
decay (per step), cross-entropy (optional class weights and label smoothing), bf16 autocast and
channels_last on CUDA, and early stopping on validation balanced accuracy. Under ``torchrun`` it
runs data-parallel (DistributedDataParallel, a DistributedSampler or a distributed class-balanced
sampler, rank 0 validating, logging and writing checkpoints). Its run directory::

    RUN/last.pt      model, optimizer, epoch, history, RNG and augmentation state (the LR schedule
                     is replayed from the epoch, so a run may resume on another number of processes):
                     a killed run continues from the last finished epoch (once the run is
                     finished only the epoch record is kept: it is what best.pt is for)
    RUN/best.pt      weights of the best validation epoch (+ variant, classes, image size):
                     what is evaluated, and what ``piq-report --extractor histology`` loads
    RUN/history.json one row per epoch: train loss, validation metrics, learning rate

Checkpoints are written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchsampler import ImbalancedDatasetSampler
from tqdm.auto import tqdm

from classifier.config import ClassifierConfig
from classifier.data import TileDataset, normalise
from classifier.metrics import classification_metrics
from classifier.model import create_classifier
from histosynth.checkpoint import atomic_save, atomic_write_text, remove_stale_temps, safe_load
from histosynth.distributed import DistributedWeightedSampler, setup
from histosynth.runtime import NonFiniteLossError, Runtime, eval_mode

SAMPLERS = ("random", "balanced")


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (k * n_c)`` per class (scikit-learn's 'balanced'); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


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


def _share_aug_rng(tf, seed: int) -> None:
    """One numpy and one Python generator for the whole albumentations pipeline (each transform
    otherwise holds its own), seeded by ``seed``, so the augmentation state is one thing to save."""
    if tf is not None:
        tf.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _aug_state(tf) -> dict | None:
    if tf is None:
        return None
    return {"np": tf.random_generator.bit_generator.state, "py": tf.py_random.getstate()}


def _set_aug_state(tf, state: dict | None) -> None:
    if tf is None or state is None:
        return
    tf.random_generator.bit_generator.state = state["np"]
    py = state["py"]
    tf.py_random.setstate((py[0], tuple(py[1]), py[2]))


def load_best(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The best-validation model of a classifier run (eval mode) and its checkpoint metadata."""
    ck = safe_load(Path(run_dir) / "best.pt")
    model = create_classifier(ck["variant"], len(ck["classes"]))
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), ck


def fit(cfg: ClassifierConfig, train: TileDataset, val_images: np.ndarray, val_labels: np.ndarray,
        classes: list[str], run_dir: str | Path, seed: int, sampler: str = "random",
        progress: bool = True, desc: str = "classifier") -> dict:
    """Train into ``run_dir`` (continuing from ``last.pt`` when present); return a summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    m, t = cfg.model, cfg.train
    k = len(classes)
    rt = Runtime.from_choices(t.device, t.amp, t.channels_last)
    dist = setup(rt.device.type)          # torchrun: one process per device, DDP; else one process
    rt = dist.place(rt)
    torch.manual_seed(seed)
    model = rt.prepare(create_classifier(m.variant, k, m.weights, m.dropout, m.bn_momentum))
    net = model
    if dist.active:                       # gradients averaged across processes; weights stay equal
        net = DistributedDataParallel(model, device_ids=[dist.local_rank] if rt.device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                            fused=rt.device.type == "cuda")
    drop_last = len(train) > t.batch_size            # no size-1 batch for BatchNorm
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if dist.active:                       # every rank its own share; reseeded per (seed, epoch)
        batch_sampler_kw = {"sampler": DistributedWeightedSampler(
            ImbalancedDatasetSampler(train).weights, dist.rank, dist.world, seed) if sampler == "balanced"
            else DistributedSampler(train, dist.world, dist.rank, shuffle=True, seed=seed, drop_last=True)}
    elif sampler == "balanced":
        batch_sampler_kw = {"sampler": ImbalancedDatasetSampler(train)}
    else:
        batch_sampler_kw = {"shuffle": True, "generator": torch.Generator().manual_seed(seed)}
    loader = DataLoader(train, batch_size=t.batch_size, drop_last=drop_last, num_workers=t.num_workers,
                        pin_memory=rt.device.type == "cuda", **batch_sampler_kw)
    steps_per_epoch = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(round(t.warmup_epochs * steps_per_epoch), t.epochs * steps_per_epoch))
    weight = class_weights(train.labels, k).to(rt.device) if t.class_weights == "balanced" else None
    _share_aug_rng(train.transform, seed)

    state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": [], "done": False}
    last = run_dir / "last.pt"
    remove_stale_temps(run_dir)
    ck = safe_load(last) if last.is_file() else None
    if ck is not None and ck["state"]["done"]:
        return _summary(ck["state"], run_dir, rt)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        # the schedule is a function of the step; steps per epoch depend on the number of
        # processes, so it is replayed rather than loaded (a run may resume on another world size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(state["epoch"] * steps_per_epoch):
                sched.step()
        if not dist.active:               # one process: its RNG streams continue exactly
            torch.set_rng_state(ck["rng"])
            if "loader_rng" in ck and "generator" in batch_sampler_kw:
                batch_sampler_kw["generator"].set_state(ck["loader_rng"])
            _set_aug_state(train.transform, ck.get("aug_rng"))
        if dist.active:                   # weights are rank 0's file on every rank already
            dist.barrier()

    bar = tqdm(total=t.epochs, initial=state["epoch"], desc=desc, unit="epoch",
               disable=not progress or not dist.main, leave=False)
    while state["epoch"] < t.epochs:
        epoch = state["epoch"] + 1
        if dist.active:                   # per-(rank, epoch) streams: resumable at any epoch
            loader.sampler.set_epoch(epoch)
            stream = seed * 100003 + epoch * 1009 + dist.rank
            torch.manual_seed(stream)
            _share_aug_rng(train.transform, stream)
        model.train()
        loss_sum = torch.zeros((), device=rt.device)
        seen = 0
        for x, y in loader:
            x, y = rt.batch(x), y.to(rt.device, non_blocking=True)
            with rt.autocast():
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=t.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
        train_loss = float(dist.mean(loss_sum / max(seen, 1)))      # one host sync per epoch
        if not math.isfinite(train_loss):
            kept = (f"the last good checkpoint {last} (epoch {state['epoch']}) was kept"
                    if last.is_file() else "no checkpoint had been written yet")
            raise NonFiniteLossError(f"the classifier loss became NaN/Inf in epoch {epoch}; training "
                                     f"stopped and {kept}. Lower classifier.train.lr or turn amp off.")
        # validation on rank 0 (its BatchNorm statistics), the outcome broadcast to every rank
        val = classification_metrics(val_labels, predict(model, val_images, rt), classes) if dist.main else None
        val = dist.broadcast(val)
        row = {"epoch": epoch, "train_loss": train_loss, "lr": sched.get_last_lr()[0],
               "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_f1": val["macro_f1"],
               "val_auc": val["auc"]}
        state["history"].append(row)
        state["epoch"] = epoch
        if val["balanced_accuracy"] > state["best"]:
            state.update(best=val["balanced_accuracy"], best_epoch=epoch, bad_epochs=0)
            if dist.main:
                atomic_save({"model": {k_: v.detach().cpu() for k_, v in model.state_dict().items()},
                             "variant": m.variant, "classes": list(classes), "image_size": m.image_size,
                             "epoch": epoch, "val_balanced_accuracy": val["balanced_accuracy"]},
                            run_dir / "best.pt")
        else:
            state["bad_epochs"] += 1
        if t.patience and state["bad_epochs"] >= t.patience and epoch >= t.min_epochs:
            state["stopped_early"] = True
            state["done"] = True
        if state["epoch"] >= t.epochs:
            state["done"] = True
        if state["done"]:           # nothing left to resume: keep the record, drop the 50+ MB of state
            ck = {"state": state}
        else:
            ck = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "rng": torch.get_rng_state(),
                  "aug_rng": _aug_state(train.transform), "state": state}
            if "generator" in batch_sampler_kw:
                ck["loader_rng"] = batch_sampler_kw["generator"].get_state()
        if dist.main:
            atomic_save(ck, last)
        dist.barrier()                    # nobody starts the next epoch before the checkpoint exists
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", val_bacc=f"{val['balanced_accuracy']:.3f}",
                        best=f"{state['best']:.3f}@{state['best_epoch']}")
        if state["done"]:
            break
    bar.close()
    if dist.main:
        atomic_write_text(run_dir / "history.json", json.dumps(state["history"], indent=1))
    dist.barrier()
    return _summary(state, run_dir, rt)


def _summary(state: dict, run_dir: Path, rt: Runtime) -> dict:
    return {"epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
            "best_val_balanced_accuracy": state["best"], "stopped_early": bool(state.get("stopped_early")),
            "history": state["history"], "checkpoint": str(run_dir / "best.pt"), "device": rt.describe()}
