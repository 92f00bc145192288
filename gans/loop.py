"""The one training loop every family shares (DCGAN, SNGAN, WGAN-GP; CycleGAN plugs in the same way).

The loop owns what is common: device and precision, EMA copies of the generator(s), learning-rate
schedules, the progress bar, ``metrics.jsonl`` (and TensorBoard when installed), sample grids,
atomic checkpoints, resume and the NaN guard. Model-specific maths lives in a *task* object with
``d_step()`` / ``g_step()`` (see :class:`gans.losses.GANTask`), which exposes:

``modules`` (name -> nn.Module), ``optimizers`` (name -> Optimizer), ``ema_names``, ``n_dis``,
``phases`` (the order of d/g updates in one step), ``sample_grid(gens)``, ``extra_state()`` /
``load_extra_state()``. :class:`gans.cyclegan.CycleGANTask` is the second such task.

Data-parallel (``torchrun --nproc_per_node N -m gans.train_gan ...``): every process builds the
same initial weights, draws its share of each global batch of ``train.batch_size`` (the batch of
all processes together, as stylegan2-ada's ``--batch``), and gradients are averaged over processes
before every optimizer step; rank 0 logs, draws samples and writes checkpoints, which hold every
rank's RNG and task state, so a run resumes exactly on the same number of processes and continues
(same data order, fresh per-rank noise) on another.

Run directory::

    RUN/config.yaml            resolved config (every key, defaults filled in)
    RUN/checkpoints/last.pt    G, D, EMA, optimizers, schedulers, step, RNG and data-order state
    RUN/samples/step_XXXXXX.png  one row per class, fixed noise, EMA generator
    RUN/metrics.jsonl          one JSON line per log interval
    RUN/loss.png               loss curves
    RUN/data.json              classes, counts and skipped files of the training data
    RUN/eval.json, eval.md     CycleGAN only: evaluation at the end of training
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from histosynth.checkpoint import (CheckpointError, atomic_save, atomic_write_text, remove_stale_temps,
                                   safe_load)
from histosynth.config import ConfigError, dump_yaml, to_dict
from histosynth.distributed import Dist, setup as setup_distributed
from histosynth.paths import claim_output_dir
from histosynth.runtime import NonFiniteLossError, Runtime
from histosynth.viz import plot_curves, save_grid

CHECKPOINT_FORMAT = "histosynth/1"


class RunDirError(RuntimeError):
    """The output folder cannot be used as asked (exists, or is not a run); says what to pass."""


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path: return self.root / "config.yaml"
    @property
    def checkpoint(self) -> Path: return self.root / "checkpoints" / "last.pt"
    @property
    def samples(self) -> Path: return self.root / "samples"
    @property
    def metrics(self) -> Path: return self.root / "metrics.jsonl"


def prepare_run_dir(out: str | Path, resume: bool, overwrite: bool) -> RunPaths:
    """Check that ``out`` may be written: new/empty, or ``--resume``, or ``--overwrite``."""
    paths = RunPaths(Path(out))
    if resume:
        if not paths.config.is_file():
            raise RunDirError(f"cannot resume: {out} has no config.yaml (is it a histosynth run "
                              "directory?)")
        remove_stale_temps(paths.root)          # a kill inside a write leaves its temp file
        return paths
    claim_output_dir(paths.root, overwrite, hint=f"pass --resume {out} to continue that run, "
                                                 "--overwrite to replace it, or another --out")
    return paths


def _lr_lambda(schedule: str, decay_start: int, total: int):
    if schedule == "constant":
        return lambda step: 1.0
    span = max(total - decay_start, 1)
    return lambda step: 1.0 if step < decay_start else max(0.0, 1.0 - (step - decay_start) / span)


def ema_with_warmup(decay: float):
    """EMA update for AveragedModel whose decay ramps up as min(decay, (1 + n) / (10 + n)).

    With a fixed 0.999 the average of a 300-step run would still be ~75 % initial weights; the
    ramp (as in TensorFlow's and timm's EMA) makes short runs' samples meaningful and long runs
    unaffected.
    """
    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        else:                                   # integer buffers (BN batch counters): copy
            torch._foreach_copy_(ema_params, params)
    return update


def _rank_seed(seed: int, step: int, rank: int) -> int:
    """Seed of a rank's own noise stream (ranks > 0; rank 0 continues the run's stream)."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2 ** 63)


def distributed_runtime(rt: Runtime, dist: Dist, batch_size: int) -> Runtime:
    """``rt`` for this process of a data-parallel run, whose global batch must split over the ranks."""
    if dist.active and batch_size % dist.world:
        raise ConfigError("train.batch_size", f"{batch_size} cannot be shared out over {dist.world} "
                          f"processes: it is the batch of all processes together, use a multiple of {dist.world}")
    return dist.place(rt)


def _mean_over_ranks(sums: dict[str, torch.Tensor], dist: Dist) -> dict[str, float]:
    """The accumulated losses as floats, averaged over ranks (one all-reduce, one host sync), so
    every rank logs and takes the NaN decision on the same numbers."""
    return dict(zip(sums, dist.mean(torch.stack(list(sums.values())).float()).tolist()))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_finite(modules: dict[str, torch.nn.Module]) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules.values() for p in m.parameters())


def run_training(cfg: Any, task_factory, paths: RunPaths, family: str, resume: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Train ``task_factory(cfg, rt)``'s task for ``cfg.train.steps`` steps into ``paths``.

    Returns a summary: final step, seconds, last logged losses. Raises NonFiniteLossError (after
    keeping the last good checkpoint) when a loss turns NaN/Inf.
    """
    t = cfg.train
    rt = Runtime.from_choices(t.device, t.amp, t.channels_last, cpu_fast_path=True)
    dist = setup_distributed(rt.device.type)
    rt = distributed_runtime(rt, dist, t.batch_size)
    torch.manual_seed(t.seed)               # the same initial weights on every rank
    if rt.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    task = task_factory(cfg, rt)
    if dist.active:
        for m in task.modules.values():
            dist.broadcast_module(m)
        for o in task.optimizers.values():  # gradients averaged over ranks before every update
            o.register_step_pre_hook(lambda opt, args, kwargs: dist.average_gradients(
                [p for g in opt.param_groups for p in g["params"]]))
        if dist.rank > 0:
            torch.manual_seed(_rank_seed(t.seed, 0, dist.rank))

    emas = {n: AveragedModel(task.modules[n], multi_avg_fn=ema_with_warmup(t.ema_decay),
                             use_buffers=True) for n in task.ema_names} if t.ema_decay > 0 else {}
    lr_fn = _lr_lambda(t.lr_schedule, t.lr_decay_start, t.steps)
    scheds = {n: torch.optim.lr_scheduler.LambdaLR(o, lr_fn) for n, o in task.optimizers.items()}

    start = 0
    if resume and paths.checkpoint.is_file():
        ck = safe_load(paths.checkpoint, map_location=rt.device)
        if ck.get("format") != CHECKPOINT_FORMAT or ck.get("family") != family:
            raise CheckpointError(f"{paths.checkpoint} holds a {ck.get('family')!r} model, not "
                                  f"{family!r}; point --resume at a run of the same family")
        for n, m in task.modules.items():
            m.load_state_dict(ck["modules"][n])
        for n, e in emas.items():
            e.load_state_dict(ck["ema"][n])
        for n, o in task.optimizers.items():
            o.load_state_dict(ck["optimizers"][n])
        for n, s in scheds.items():
            s.load_state_dict(ck["schedulers"][n])
        start = int(ck["step"])
        ranks = ck.get("ranks") or []
        same_world = len(ranks) == dist.world and dist.active
        mine = ranks[dist.rank] if same_world else {"rng": ck["rng"], "extra": ck["extra"]}
        task.load_extra_state(mine["extra"])
        _set_rng_state(mine["rng"])
        if dist.rank > 0 and not same_world:    # another world size: a fresh stream per new rank
            torch.manual_seed(_rank_seed(t.seed, start, dist.rank))
    if resume and dist.main:        # drop what a killed run logged after its last checkpoint
        _truncate_metrics(paths.metrics, start)
    if dist.main:
        atomic_write_text(paths.config, dump_yaml(cfg))

    def save_checkpoint(step: int) -> None:
        per_rank = dist.gather({"rng": _rng_state(), "extra": task.extra_state()})
        if not dist.main:
            return
        atomic_save({
            "format": CHECKPOINT_FORMAT, "family": family, "step": step, "config": to_dict(cfg),
            "modules": {n: m.state_dict() for n, m in task.modules.items()},
            "ema": {n: e.state_dict() for n, e in emas.items()},
            "optimizers": {n: o.state_dict() for n, o in task.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in scheds.items()},
            "rng": per_rank[0]["rng"], "extra": per_rank[0]["extra"],
            "ranks": per_rank if dist.active else [],
        }, paths.checkpoint)

    def generators() -> dict[str, torch.nn.Module]:
        return {n: (emas[n].module if n in emas else task.modules[n]) for n in task.ema_names}

    def save_samples(step: int) -> None:
        imgs, nrow, labels = task.sample_grid(generators())
        save_grid(imgs, nrow, labels, paths.samples / f"step_{step:06d}.png")

    def log_kid(step: int, log) -> None:
        from metrics.distribution import kid
        from metrics.features import PixelExtractor

        real, fake = task.kid_pair(generators(), t.kid_samples)
        ext = PixelExtractor()
        value = kid(ext(real).double(), ext(fake).double())
        log.write(json.dumps({"step": step, "kid": value}) + "\n")
        log.flush()
        if tb is not None:
            tb.add_scalar("kid", value, step)

    tb = _tensorboard(paths.root) if dist.main else None
    sums: dict[str, torch.Tensor] = {}
    n_acc, last_logged = 0, {}
    t_log = t0 = time.perf_counter()
    last_good = start if paths.checkpoint.is_file() else None
    bar = tqdm(total=t.steps, initial=start, unit="step", desc=f"{family}",
               disable=not progress or not dist.main, dynamic_ncols=True, mininterval=1.0)
    step = start
    try:
        with (paths.metrics.open("a") if dist.main else open(os.devnull, "w")) as log:
            while step < t.steps:
                out: dict[str, torch.Tensor] = {}
                for phase in task.phases:        # e.g. ("d",) * n_dis + ("g",), or ("g", "d")
                    out.update(task.d_step() if phase == "d" else task.g_step())
                for n, e in emas.items():
                    if step < t.ema_start:
                        e.n_averaged.zero_()      # copy G until the EMA starts
                    e.update_parameters(task.modules[n])
                for s in scheds.values():
                    s.step()
                step += 1
                for k, v in out.items():        # accumulate on device: no sync per step
                    sums[k] = sums[k] + v if k in sums else v.clone()
                n_acc += 1

                if step % t.log_every == 0 or step == t.steps:
                    row = {k: v / n_acc for k, v in _mean_over_ranks(sums, dist).items()}
                    _check_finite(row, step, last_good, paths)
                    now = time.perf_counter()
                    row = {"step": step, **row,
                           **{f"lr_{n.lower()}": o.param_groups[0]["lr"] for n, o in task.optimizers.items()},
                           "sec_per_step": (now - t_log) / n_acc,
                           "real_img_per_s": n_acc * task.n_dis * t.batch_size / (now - t_log)}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    if tb is not None:
                        for k, v in row.items():
                            if k != "step":
                                tb.add_scalar(k, v, step)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in row.items()
                                     if k.startswith(("loss", "gp"))}, refresh=False)
                    sums, n_acc, t_log, last_logged = {}, 0, now, row
                if dist.main and (step % t.sample_every == 0 or step == t.steps):
                    save_samples(step)
                if dist.main and t.kid_every and (step % t.kid_every == 0 or step == t.steps):
                    log_kid(step, log)
                if step % t.checkpoint_every == 0 or step == t.steps:
                    if sums:                     # losses since the last log: check before saving
                        _check_finite(_mean_over_ranks(sums, dist), step, last_good, paths)
                    if not _all_finite(task.modules):
                        raise NonFiniteLossError(_nan_message("a weight", step, last_good, paths))
                    save_checkpoint(step)
                    last_good = step
                bar.update(1)
    finally:
        bar.close()
        if tb is not None:
            tb.close()
        if dist.main and paths.metrics.is_file():
            try:
                plot_curves(paths.metrics, paths.root / "loss.png")
            except Exception:  # a plot must never hide the real outcome of a run
                pass
    dist.barrier()                  # every rank returns once the final checkpoint exists
    return {"step": step, "seconds": time.perf_counter() - t0, "last": last_logged,
            "device": rt.describe() + (f" x {dist.world} processes" if dist.active else "")}


def load_run_checkpoint(run: str | Path, families: list[str], tool: str) -> tuple[dict[str, Any], Path]:
    """The last checkpoint of run directory ``run``, refused unless its family is in ``families``."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise RunDirError(f"{run} is not a histosynth run directory (no config.yaml)")
    ck_path = RunPaths(run).checkpoint
    ck = safe_load(ck_path)
    if ck.get("format") != CHECKPOINT_FORMAT or ck.get("family") not in families:
        raise CheckpointError(f"{ck_path} holds a {ck.get('family')!r} model; {tool}")
    return ck, ck_path


def generator_state(ck: dict[str, Any], name: str, weights: str = "ema") -> dict[str, torch.Tensor]:
    """State dict of generator ``name`` from a checkpoint: its EMA copy when kept and asked for."""
    ema = ck.get("ema", {}).get(name)
    if weights == "ema" and ema:
        return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}
    return ck["modules"][name]


def _nan_message(what: str, step: int, last_good: int | None, paths: RunPaths) -> str:
    kept = (f"the last good checkpoint {paths.checkpoint} (step {last_good}) was kept"
            if last_good is not None else "no checkpoint had been written yet")
    return (f"{what} became NaN/Inf at step {step}; training stopped and {kept}. Lower the "
            "learning rates, turn amp off, or resume from the checkpoint with --resume.")


def _check_finite(row: dict[str, float], step: int, last_good: int | None, paths: RunPaths) -> None:
    bad = [k for k, v in row.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLossError(_nan_message(", ".join(bad), step, last_good, paths))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines a killed run wrote after its last checkpoint, so steps are not repeated."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _tensorboard(root: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(root / "tb"))
