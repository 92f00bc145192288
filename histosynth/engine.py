"""The one training engine: every model histosynth trains runs through :func:`train`.

A model is a :class:`~histosynth.roles.Task` (the maths of one step, its data and its own state);
the engine owns everything else, the same way for a GAN family, CycleGAN, the classifier or a
test's toy task:

* device, bf16 autocast and channels_last (the :class:`~histosynth.runtime.Runtime` it is given),
  deterministic algorithms on the CPU for the run only (restored afterwards);
* torchrun data parallelism: the same initial weights on every rank, gradients averaged over the
  ranks in one all-reduce before every optimizer step (stylegan3's way: it works for WGAN-GP's
  double backward and several discriminator passes per backward, which DistributedDataParallel
  does not), rank 0 logging, evaluating and writing;
* EMA copies of ``task.ema_names`` (decay ramped as min(decay, (1+n)/(10+n))), learning-rate
  schedules (:class:`~histosynth.roles.LRSchedule`);
* ``metrics.jsonl`` (+ TensorBoard when installed), a progress bar with rate and ETA, sample grids
  (``task.visualise``), ``loss.png``;
* ``task.evaluate`` every ``plan.evaluate_every`` steps: ``best.pt`` by ``plan.criterion``, early
  stopping after ``plan.patience`` evaluations without a better value;
* checkpoints in one versioned format, written atomically, read with ``weights_only=True``:
  ``last.pt`` (everything needed to resume exactly: modules, EMA, optimizers, schedulers, every
  rank's torch/CUDA RNG and task state), ``best.pt`` and ``step_XXXXXX.pt`` snapshots (weights);
* the NaN/Inf guard: a non-finite loss or weight stops the run and keeps the last good checkpoint.

Run directory::

    RUN/config.yaml                  the resolved config (every key, defaults filled in)
    RUN/checkpoints/last.pt          resumable state (histosynth/2 format, below)
    RUN/checkpoints/best.pt          weights at the best evaluation (when the task evaluates)
    RUN/checkpoints/step_XXXXXX.pt   weights snapshots (plan.snapshot_every)
    RUN/samples/step_XXXXXX.png      the task's picture (sample grid)
    RUN/metrics.jsonl                one line per log interval and per evaluation
    RUN/runtime.json                 the path it trains on (fp32 / bf16, layout), how it was chosen
    RUN/loss.png                     curves of the logged losses

Checkpoint format ``histosynth/2``: ``format``, ``task`` (the family or task name), ``step``,
``config``, ``info`` (task.info()), ``modules``, ``ema``, ``engine`` (best value and step,
evaluations without improvement, done, the evaluation history), ``metrics`` (best.pt: the
evaluation it won); ``last.pt`` adds ``optimizers``, ``schedulers``, ``rng``, ``task_state`` and
``ranks`` (each rank's rng and task state under torchrun). ``histosynth/1`` (GAN runs before the
engine) is read by :func:`load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from histosynth import autotune
from histosynth.checkpoint import CheckpointError, atomic_save, atomic_write_text, remove_stale_temps, safe_load
from histosynth.config import ConfigError, dump_yaml, to_dict
from histosynth.distributed import Dist, setup as setup_distributed
from histosynth.errors import UserError
from histosynth.paths import MARKER, check_apart, check_claimable, claim_output_dir, hold
from histosynth.roles import Task
from histosynth.runtime import NonFiniteLossError, Runtime
from histosynth.viz import plot_curves, save_grid

CHECKPOINT_FORMAT = "histosynth/2"
READABLE_FORMATS = ("histosynth/1", CHECKPOINT_FORMAT)


class RunDirError(UserError, RuntimeError):
    """The output folder cannot be used as asked (exists, or is not a run); says what to pass."""


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory."""

    root: Path

    @property
    def config(self) -> Path: return self.root / "config.yaml"
    @property
    def checkpoints(self) -> Path: return self.root / "checkpoints"
    @property
    def last(self) -> Path: return self.checkpoints / "last.pt"
    @property
    def best(self) -> Path: return self.checkpoints / "best.pt"
    @property
    def samples(self) -> Path: return self.root / "samples"
    @property
    def metrics(self) -> Path: return self.root / "metrics.jsonl"
    @property
    def runtime(self) -> Path: return self.root / "runtime.json"

    def snapshot(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}.pt"

    def checkpoint(self, which: str | int = "last") -> Path:
        """``last``, ``best`` or a step number (a snapshot); the error lists what the run has."""
        if isinstance(which, int) or str(which).isdigit():
            path = self.snapshot(int(which))
        elif which in ("last", "best"):
            path = self.last if which == "last" else self.best
        else:
            raise ConfigError("--checkpoint", f"{which!r} is not last, best or a step number")
        if not path.is_file():
            have = sorted(p.stem for p in self.checkpoints.glob("*.pt")) if self.checkpoints.is_dir() else []
            hint = (" (best.pt is written when the run evaluates: train.kid_every for GANs)"
                    if path == self.best else "")
            raise CheckpointError(f"{self.root} has no {path.name}{hint}; it has: {', '.join(have) or 'none'}")
        return path


@contextlib.contextmanager
def open_run_dir(out: str | Path, resume: bool, overwrite: bool,
                 inputs: Mapping[str, Any] | None = None) -> Iterator[RunDir]:
    """``out`` as a run directory that this process alone writes for the block (its lock held):
    apart from ``inputs``; new or empty, ``--resume`` (a run's folder: its killed writes' temporary
    files are removed), ``--overwrite`` (a histosynth folder), or a start that failed before it
    computed anything (taken over). Everything is checked before anything is written."""
    run = RunDir(Path(out))
    hint = f"pass --resume {out} to continue that run, --overwrite to replace it, or another --out"
    check_apart(run.root, inputs or {})
    if resume:
        if not run.config.is_file():
            raise RunDirError(f"cannot resume: {out} has no config.yaml (is it a histosynth run directory?)")
    elif _computed_nothing(run):
        overwrite = True
    else:
        check_claimable(run.root, overwrite, hint, inputs)
    with hold(run.root):
        if resume:
            remove_stale_temps(run.root)          # a kill inside a write leaves its temp file
        else:
            claim_output_dir(run.root, overwrite, hint, inputs)
        yield run


def _computed_nothing(run: RunDir) -> bool:
    """A histosynth run folder whose start failed (bad data, say) before any step was logged."""
    return ((run.root / MARKER).is_file() and run.config.is_file() and not run.checkpoints.exists()
            and not run.metrics.exists() and not run.samples.exists())


def run_inputs(run: str | Path) -> dict[str, Any]:
    """What a command that reads trained run ``run`` must keep its output apart from: the run
    directory and the data it was trained on (its data.json)."""
    out: dict[str, Any] = {"run": Path(run)}
    data_json = Path(run) / "data.json"
    if data_json.is_file():
        info = json.loads(data_json.read_text())
        out.update({f"run's training data ({k})": info[k] for k in ("root", "root_a", "root_b") if info.get(k)})
    return out


def load_checkpoint(path: str | Path, tasks: Mapping[str, Any] | None = None, tool: str = "") -> dict[str, Any]:
    """A checkpoint of either readable format, as ``histosynth/2``; refused (naming what it holds)
    unless its task is in ``tasks`` (when given)."""
    ck = safe_load(path)
    fmt = ck.get("format")
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not a histosynth checkpoint (format {fmt!r}; this version "
                              f"reads {', '.join(READABLE_FORMATS)})")
    if fmt == "histosynth/1":                # GAN runs written before the engine: same tensors
        ck = {**ck, "format": CHECKPOINT_FORMAT, "task": ck.get("family"), "task_state": ck.get("extra", {}),
              "info": {k: ck.get("extra", {}).get(k) for k in ("classes", "num_classes")},
              "engine": _fresh_engine_state()}
    if tasks is not None and ck.get("task") not in tasks:
        raise CheckpointError(f"{path} holds a {ck.get('task')!r} model; {tool}")
    return ck


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


def ema_weights(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's own state dict inside an AveragedModel's state dict."""
    return {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}


def module_state(ck: dict[str, Any], name: str, weights: str = "ema") -> dict[str, torch.Tensor]:
    """State dict of module ``name`` from a checkpoint: its EMA copy when kept and asked for."""
    ema = ck.get("ema", {}).get(name)
    if weights == "ema" and ema:
        return ema_weights(ema)
    return ck["modules"][name]


def require_divisible(batch_size: int, world: int, key: str) -> None:
    """A global batch must share out over the torchrun processes."""
    if batch_size % world:
        raise ConfigError(key, f"{batch_size} cannot be shared out over {world} processes: it is the "
                               f"batch of all processes together, use a multiple of {world}")


@contextlib.contextmanager
def deterministic(on: bool):
    """``torch.use_deterministic_algorithms`` for the block only (warn-only), restored after."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    if on:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _rank_seed(seed: int, step: int, rank: int) -> int:
    """Seed of a rank's own noise stream (ranks > 0; rank 0 continues the run's stream)."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2 ** 63)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _mean_over_ranks(sums: dict[str, torch.Tensor], dist: Dist) -> dict[str, float]:
    """The accumulated values as floats, averaged over ranks (one all-reduce, one host sync), so
    every rank logs and takes the NaN decision on the same numbers."""
    return dict(zip(sums, dist.mean(torch.stack(list(sums.values())).float()).tolist()))


def _fresh_engine_state() -> dict[str, Any]:
    return {"best": None, "best_step": None, "bad_evals": 0, "done": False, "stopped_early": False,
            "history": []}


def train(task_name: str, config: Any, build: Callable[[Runtime], Task], run: RunDir | str | Path,
          rt: Runtime | Sequence[Runtime], *, seed: int, resume: bool = False, progress: bool = True,
          desc: str | None = None, keep_final_state: bool = True) -> dict[str, Any]:
    """Train ``build(rt)``'s task into ``run`` to ``task.plan.steps`` (or its early stop).

    ``rt``: the path to train on, or the candidates a config's ``auto`` keys admit
    (:meth:`Runtime.candidates`, the rule's choice first), between which a new run of one process
    measures (:func:`histosynth.autotune.choose`); the choice is kept in ``RUN/runtime.json`` and
    a resumed run keeps it. ``resume``: continue from ``run``'s last.pt when there is one (a
    finished run returns its summary at once). ``keep_final_state=False``: once finished, last.pt
    keeps only the run's record (step, evaluation history, best), not its weights and optimizer
    state (best.pt has the weights). Under torchrun every process calls this. Returns a summary:
    step, seconds, last logged row, device, the evaluation history, the best value and step,
    whether it stopped early. Raises NonFiniteLossError (after keeping the last good checkpoint)
    on NaN/Inf.
    """
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    candidates = autotune.as_candidates(rt)
    dist = setup_distributed(candidates[0].device.type)
    candidates = tuple(dist.place(c) for c in candidates)
    with deterministic(candidates[0].device.type == "cpu"):
        torch.manual_seed(seed)               # the same initial weights on every rank
        task = build(candidates[0])
        choice = _choose_path(task_name, build, candidates, task.plan.steps, run, resume, dist, progress)
        if choice.runtime is not candidates[0]:
            torch.manual_seed(seed)           # as if built on the chosen path in the first place
            task = build(choice.runtime)
        return _Engine(task_name, config, task, run, choice, dist, seed, progress, desc,
                       keep_final_state).run(resume)


def _choose_path(name: str, build: Callable[[Runtime], Task], candidates: Sequence[Runtime], steps: int,
                 run: RunDir, resume: bool, dist: Dist, progress: bool) -> autotune.Choice:
    if len(candidates) > 1 and dist.active:
        return autotune.Choice(candidates[0], "rule: data-parallel runs keep the rule's path")
    if len(candidates) > 1 and resume and run.last.is_file():   # it trained on the recorded path
        rt = autotune.recorded(run.runtime, candidates)
        if rt is None:                                          # runs from before the record: the rule's
            return autotune.Choice(candidates[0], "rule: a resumed run without runtime.json")
        return autotune.Choice(rt, f"kept from {run.runtime.name}: a resumed run computes as it started")
    return autotune.choose(name, build, candidates, steps, cache=autotune.cache_file(), progress=progress)


class _Engine:
    """One run of :func:`train` (its state in one place rather than in closures)."""

    def __init__(self, name: str, config: Any, task: Task, run: RunDir, choice: autotune.Choice, dist: Dist,
                 seed: int, progress: bool, desc: str | None, keep_final_state: bool):
        self.name, self.config, self.task, self.run_dir, self.dist = name, config, task, run, dist
        self.choice, self.rt = choice, choice.runtime
        self.seed, self.plan, self.keep_final_state = seed, task.plan, keep_final_state
        self.progress, self.desc = progress, desc or name
        if dist.active:
            for m in task.modules.values():
                dist.broadcast_module(m)
            for o in task.optimizers.values():   # gradients averaged over ranks before every update
                o.register_step_pre_hook(lambda opt, args, kwargs: dist.average_gradients(
                    [p for g in opt.param_groups for p in g["params"]]))
            if dist.rank > 0:
                torch.manual_seed(_rank_seed(seed, 0, dist.rank))
        p = self.plan
        self.emas = {n: AveragedModel(task.modules[n], multi_avg_fn=ema_with_warmup(p.ema_decay),
                                      use_buffers=True) for n in task.ema_names} if p.ema_decay > 0 else {}
        self.scheds = {n: torch.optim.lr_scheduler.LambdaLR(o, lambda s: p.lr.factor(s, p.steps))
                       for n, o in task.optimizers.items()}
        self.state = _fresh_engine_state()
        self.step = 0
        self.last_good: int | None = None

    # -- checkpoints -----------------------------------------------------------------------------
    def _weights(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "task": self.name, "step": self.step,
                "config": to_dict(self.config), "info": self.task.info(),
                "modules": {n: m.state_dict() for n, m in self.task.modules.items()},
                "ema": {n: e.state_dict() for n, e in self.emas.items()},
                "engine": dict(self.state)}

    def _save_last(self, final: bool) -> None:
        per_rank = self.dist.gather({"rng": _rng_state(), "task_state": self.task.state_dict()})
        if not self.dist.main:
            return
        if final and not self.keep_final_state:     # nothing left to resume: keep the record
            ck = {"format": CHECKPOINT_FORMAT, "task": self.name, "step": self.step,
                  "config": to_dict(self.config), "info": self.task.info(), "engine": dict(self.state)}
        else:
            ck = {**self._weights(),
                  "optimizers": {n: o.state_dict() for n, o in self.task.optimizers.items()},
                  "schedulers": {n: s.state_dict() for n, s in self.scheds.items()},
                  "rng": per_rank[0]["rng"], "task_state": per_rank[0]["task_state"],
                  "ranks": per_rank if self.dist.active else []}
        atomic_save(ck, self.run_dir.last)

    def _resume(self) -> bool:
        """Load last.pt; True when the run is already finished (nothing to train)."""
        ck = load_checkpoint(self.run_dir.last)
        if ck.get("task") != self.name:
            raise CheckpointError(f"{self.run_dir.last} holds a {ck.get('task')!r} model, not "
                                  f"{self.name!r}; point --resume at a run of the same family")
        self.step = int(ck["step"])
        self.state = {**_fresh_engine_state(), **ck.get("engine", {})}
        self.last_good = self.step
        if "optimizers" not in ck:
            return True                         # a finished run kept as its record only
        try:
            for n, m in self.task.modules.items():
                m.load_state_dict(ck["modules"][n])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{self.run_dir.last} does not fit this config's model ({first}); "
                                  "resume with the config the run was started with") from None
        for n, e in self.emas.items():
            e.load_state_dict(ck["ema"][n])
        for n, o in self.task.optimizers.items():
            o.load_state_dict(ck["optimizers"][n])
        for n, s in self.scheds.items():
            s.load_state_dict(ck["schedulers"][n])
        ranks = ck.get("ranks") or []
        same_world = self.dist.active and len(ranks) == self.dist.world
        mine = ranks[self.dist.rank] if same_world else {"rng": ck["rng"], "task_state": ck["task_state"]}
        self.task.load_state_dict(mine["task_state"])
        _set_rng_state(mine["rng"])
        if self.dist.rank > 0 and not same_world:   # another world size: a fresh stream per new rank
            torch.manual_seed(_rank_seed(self.seed, self.step, self.dist.rank))
        return bool(self.state["done"])

    # -- the pieces of a step ----------------------------------------------------------------------
    def _models(self) -> dict[str, torch.nn.Module]:
        """The modules as evaluation and pictures see them: EMA copies where kept."""
        return {n: (self.emas[n].module if n in self.emas else m) for n, m in self.task.modules.items()}

    def _nan(self, what: str) -> NonFiniteLossError:
        kept = (f"the last good checkpoint {self.run_dir.last} (step {self.last_good}) was kept"
                if self.last_good is not None else "no checkpoint had been written yet")
        return NonFiniteLossError(f"{what} became NaN/Inf at step {self.step}; training stopped and "
                                  f"{kept}. Lower the learning rates, turn amp off, or resume from the "
                                  "checkpoint with --resume.")

    def _check_finite(self, row: Mapping[str, float]) -> None:
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            raise self._nan(", ".join(bad))

    def _evaluate(self, log, tb, last_row: dict) -> None:
        with torch.no_grad():
            metrics = self.task.evaluate(self._models()) if self.dist.main else None
        metrics = self.dist.broadcast(metrics)
        row = {"step": self.step, **metrics}
        log.write(json.dumps(row) + "\n")
        log.flush()
        if tb is not None:
            for k, v in metrics.items():
                tb.add_scalar(k, v, self.step)
        kept = {k: v for k, v in last_row.items() if k not in ("sec_per_step", "images_per_s")}
        self.state["history"].append({**(kept if last_row.get("step") == self.step else {"step": self.step}),
                                      **metrics})
        crit = self.plan.criterion
        if crit is None:
            return
        value = metrics[crit.metric]
        if crit.better(value, self.state["best"]):
            self.state.update(best=value, best_step=self.step, bad_evals=0)
            if self.dist.main:
                atomic_save({**self._weights(), "metrics": metrics}, self.run_dir.best)
        else:
            self.state["bad_evals"] += 1
        if (self.plan.patience and self.state["bad_evals"] >= self.plan.patience
                and self.step >= self.plan.min_steps):
            self.state.update(done=True, stopped_early=True)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        finished = resume and self.run_dir.last.is_file() and self._resume()
        if resume and self.dist.main:          # drop what a killed run logged after its last checkpoint
            _truncate_metrics(self.run_dir.metrics, self.step)
        if finished:
            return self._summary(t0, {})
        if self.dist.main:
            self.run_dir.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir.config, dump_yaml(self.config))
            if not (resume and self.run_dir.last.is_file() and self.run_dir.runtime.is_file()):
                autotune.write_record(self.run_dir.runtime, self.choice)
        p, dist, task = self.plan, self.dist, self.task
        tb = _tensorboard(self.run_dir.root) if dist.main else None
        sums: dict[str, torch.Tensor] = {}
        n_acc, last_row = 0, {}
        t_log = time.perf_counter()
        bar = tqdm(total=p.steps, initial=self.step, unit="step", desc=self.desc, leave=False,
                   disable=not self.progress or not dist.main, dynamic_ncols=True, mininterval=1.0)

        def due(every: int) -> bool:
            return bool(every) and (self.step % every == 0 or self.step == p.steps)
        try:
            with (self.run_dir.metrics.open("a") if dist.main else open(os.devnull, "w")) as log:
                while self.step < p.steps and not self.state["done"]:
                    out = task.train_step()
                    for n, e in self.emas.items():
                        if self.step < p.ema_start:
                            e.n_averaged.zero_()        # copy the module until the EMA starts
                        e.update_parameters(task.modules[n])
                    for s in self.scheds.values():
                        s.step()
                    self.step += 1
                    for k, v in out.items():            # accumulate on device: no sync per step
                        sums[k] = sums[k] + v if k in sums else v.detach().clone()
                    n_acc += 1
                    if due(p.log_every):
                        row = {k: v / n_acc for k, v in _mean_over_ranks(sums, dist).items()}
                        self._check_finite(row)
                        now = time.perf_counter()
                        row = {"step": self.step, **row,
                               **{f"lr_{n.lower()}": o.param_groups[0]["lr"] for n, o in task.optimizers.items()},
                               "sec_per_step": (now - t_log) / n_acc,
                               "images_per_s": n_acc * p.images_per_step / (now - t_log)}
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        if tb is not None:
                            for k, v in row.items():
                                if k != "step":
                                    tb.add_scalar(k, v, self.step)
                        bar.set_postfix({k: f"{v:.3g}" for k, v in row.items()
                                         if k.startswith(("loss", "gp", "train_loss"))}, refresh=False)
                        sums, n_acc, t_log, last_row = {}, 0, now, row
                    if dist.main and due(p.visualise_every):
                        grid = task.visualise(self._models())
                        if grid is not None:
                            save_grid(*grid, self.run_dir.samples / f"step_{self.step:06d}.png")
                    if due(p.evaluate_every):
                        self._evaluate(log, tb, last_row)
                    final = self.step >= p.steps or self.state["done"]      # done: stopped early
                    if self.step % p.checkpoint_every == 0 or final:
                        if sums:                 # losses since the last log: check before saving
                            self._check_finite(_mean_over_ranks(sums, dist))
                        if not all(bool(torch.isfinite(q).all()) for m in task.modules.values()
                                   for q in m.parameters()):
                            raise self._nan("a weight")
                        self._save_last(final)
                        self.last_good = self.step
                    if dist.main and p.snapshot_every and self.step % p.snapshot_every == 0:
                        atomic_save(self._weights(), self.run_dir.snapshot(self.step))
                    bar.update(1)
        finally:
            bar.close()
            if tb is not None:
                tb.close()
            if dist.main and self.run_dir.metrics.is_file():
                try:
                    plot_curves(self.run_dir.metrics, self.run_dir.root / "loss.png")
                except Exception:  # a plot must never hide the real outcome of a run
                    pass
        dist.barrier()                  # every rank returns once the final checkpoint exists
        return self._summary(t0, last_row)

    def _summary(self, t0: float, last_row: dict) -> dict[str, Any]:
        s = self.state
        return {"step": self.step, "seconds": time.perf_counter() - t0, "last": last_row,
                "device": self.rt.describe() + (f" x {self.dist.world} processes" if self.dist.active else ""),
                "history": list(s["history"]), "best": s["best"], "best_step": s["best_step"],
                "stopped_early": bool(s["stopped_early"]),
                "checkpoint": str(self.run_dir.best if self.run_dir.best.is_file() else self.run_dir.last)}


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
