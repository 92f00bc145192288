"""The measured choice of a run's CPU path: time the paths the config admits, keep the fastest.

On a CPU, which of fp32 / bf16 autocast and NCHW / channels_last is fastest depends on the CPU and
on the network, and no rule gets it right everywhere. Measured on one 2-core AMD EPYC (Zen 4) held
to AVX2 kernels, fp32: channels_last makes an SNGAN-32 iteration 1.34x faster (24.5 -> 18.3 s)
and a CycleGAN iteration 1.32x *slower* (13.3 -> 17.6 s); bf16 there is emulated and 20x slower.
So every ``auto`` key of ``train.amp`` / ``train.channels_last`` is a set of candidates
(:meth:`histosynth.runtime.Runtime.candidates`, the rule's choice first) and :func:`choose`
decides between them by timing the task's own ``train_step``:

1. one candidate (CUDA, or every key set): nothing to decide;
2. a resumed run keeps the path its ``runtime.json`` records (resume is exact only on the same
   arithmetic);
3. a run shorter than ``MIN_STEPS`` keeps the rule's choice;
4. otherwise a throw-away copy of the task is built on the rule's path and stepped once (which
   also records the shapes its modules see: the network's *signature*); a decision for the same
   signature on this CPU, torch version and thread count is taken from the machine's cache
   (``$HISTOSYNTH_CACHE/runtime-choices.json``), so runs of the same network on the same machine
   always compute the same way;
5. when the run, at the rule's pace, would take less than ``min_seconds`` (300 s), a measurement
   cannot pay for itself and the rule's choice stays (not cached);
6. else every candidate compiled as the rule's is (eager, unless ``train.compile: on``) is built,
   stepped once to warm up and timed over ``TIMED_STEPS`` steps (the best of them; one whose
   warm-up step alone takes ``SKIP`` times the best so far is not timed further). Where
   ``train.compile: auto`` admits compiled paths (a CPU with a C++ compiler), only the compiled
   twin of the fastest eager path is tried, and only when the run at that pace would last
   ``COMPILE_MIN_SECONDS`` (its first steps compile for 16-60 s, in the run as in the
   measurement); it warms up over ``COMPILE_WARMUP`` steps, and a compile that fails leaves the
   eager paths, with the reason in the record. Held to AVX2 (fp32), compiling measured 11.1 vs
   13.3 s an SNGAN-32 iteration one day and 12.8 vs 13.0 s another, and 0.77x for CycleGAN at
   256 px, so it is measured, not assumed. The fastest wins unless the rule's choice is within
   ``TIE`` (3 %) of it, and the compiled twin must beat its eager path by more than that too.
   The decision is cached and every measured path's seconds per step go into the run's record.

The throw-away tasks run under :func:`torch.random.fork_rng` and draw their batches from their own
samplers, so the real run starts from exactly the random state it would have had without them:
a measured run equals a run given its chosen path directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from histosynth.checkpoint import atomic_write_text
from histosynth.roles import Task
from histosynth.runtime import Runtime, cpu_facts

MIN_STEPS = 20          # shorter runs keep the rule's choice without building anything
TIMED_STEPS = 2         # timed steps per candidate, after one warm-up step
TIE = 0.03              # the rule's choice stays unless another candidate is this much faster
SKIP = 2.0              # a candidate whose warm-up step takes this many times the best is not timed on
MIN_SECONDS = 300.0     # a run projected shorter than this (at the rule's pace) is not measured
COMPILE_MIN_SECONDS = 1200.0   # nor compiled, when shorter than this at the fastest eager pace
COMPILE_WARMUP = 2      # untimed steps of a compiled path: the first compiles (grad on and off)
CACHE_NAME = "runtime-choices.json"


@dataclass(frozen=True)
class Choice:
    """The path a run trains on, how it was chosen, and what was measured (seconds per step)."""

    runtime: Runtime
    how: str
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        return {"runtime": self.runtime.describe(), "amp": "bf16" if self.runtime.amp_dtype else "off",
                "channels_last": "on" if self.runtime.channels_last else "off",
                "compile": "on" if self.runtime.compiled else "off", "how": self.how,
                "seconds_per_step": self.seconds, **cpu_facts(), "torch": torch.__version__,
                "threads": torch.get_num_threads()}


def as_candidates(rt: Runtime | Sequence[Runtime]) -> tuple[Runtime, ...]:
    return (rt,) if isinstance(rt, Runtime) else tuple(rt)


def recorded(path: Path, candidates: Sequence[Runtime]) -> Runtime | None:
    """The candidate a run's ``runtime.json`` names, if it is one of ``candidates``."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    for rt in candidates:
        if (("bf16" if rt.amp_dtype else "off") == rec.get("amp")
                and ("on" if rt.channels_last else "off") == rec.get("channels_last")
                and ("on" if rt.compiled else "off") == rec.get("compile", "off")):
            return rt
    return None


def _shapes(x) -> object:
    if isinstance(x, torch.Tensor):
        return [list(x.shape), str(x.dtype).removeprefix("torch.")]
    if isinstance(x, (list, tuple)):
        return [_shapes(v) for v in x]
    return None


def signature(task: Task, step: Callable[[], object]) -> dict:
    """Run ``step`` once and return what the arithmetic of ``task`` depends on: its modules'
    parameter shapes and the shapes of the first inputs each module is called with."""
    seen: dict[str, object] = {}

    def hook(name):
        def see(module, args, kwargs) -> None:
            seen.setdefault(name, _shapes(list(args) + list(kwargs.values())))
        return see
    hooks = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in task.modules.items()]
    try:
        step()
    finally:
        for h in hooks:
            h.remove()
    return {"params": {n: [list(p.shape) for p in m.parameters()] for n, m in task.modules.items()},
            "inputs": seen, "images_per_step": task.plan.images_per_step}


def _time(task: Task, steps: int) -> float:
    best = float("inf")
    for _ in range(steps):
        t = time.perf_counter()
        task.train_step()
        best = min(best, time.perf_counter() - t)
    return best


def _measure(build: Callable[[Runtime], Task], rt: Runtime, best: float) -> float:
    """Seconds per step of a fresh task on ``rt``, after warming it up: one step (kernel and buffer
    set-up; a path whose warm-up alone takes ``SKIP`` x ``best`` is not timed further), or for a
    compiled path ``COMPILE_WARMUP`` steps, which compile its graphs."""
    gc.collect()
    task = build(rt)
    try:
        warm = _time(task, COMPILE_WARMUP if rt.compiled else 1)
        return warm if not rt.compiled and warm > SKIP * best else _time(task, TIMED_STEPS)
    finally:
        del task


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cache_key(name: str, sig: dict, candidates: Sequence[Runtime]) -> str:
    facts = {**cpu_facts(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    return hashlib.sha256(json.dumps([name, sig, [c.describe() for c in candidates], facts],
                                     sort_keys=True).encode()).hexdigest()[:24]


def _cached(cache: Path | None, key: str) -> dict | None:
    if cache is None or not cache.is_file():
        return None
    try:
        return json.loads(cache.read_text()).get(key)
    except ValueError:              # a damaged cache file is ignored and rewritten
        return None


def _store(cache: Path | None, key: str, entry: dict) -> None:
    if cache is None:
        return
    with _locked(cache):
        try:
            table = json.loads(cache.read_text()) if cache.is_file() else {}
        except ValueError:
            table = {}
        table[key] = entry
        atomic_write_text(cache, json.dumps(table, indent=1))


def choose(name: str, build: Callable[[Runtime], Task], candidates: Sequence[Runtime],
           steps: int | None = None, *, repeats: int = 1, cache: Path | None = None,
           min_seconds: float | None = None, force: bool = False, progress: bool = False) -> Choice:
    """The path among ``candidates`` (the rule's choice first) that ``build``'s task should train
    on for ``steps`` steps (None: its plan's), ``repeats`` times over (the cells of a comparison);
    see the module docstring. ``force``: measure whatever the run's length and the cache say, and
    cache nothing (benchmarks)."""
    default = candidates[0]
    min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
    if len(candidates) == 1:
        return Choice(default, "one path given: nothing to choose")
    if steps is not None and steps < MIN_STEPS and not force:
        return Choice(default, f"rule: a {steps}-step run is too short to measure")
    seconds: dict[str, float] = {}
    notes: list[str] = []
    with torch.random.fork_rng(devices=[]):
        task = build(default)
        steps = task.plan.steps if steps is None else steps
        if steps < MIN_STEPS and not force:
            return Choice(default, f"rule: a {steps}-step run is too short to measure")
        sig = signature(task, task.train_step)
        key = _cache_key(name, sig, candidates)
        hit = None if force else _cached(cache, key)
        rt = next((c for c in candidates if hit and c.describe() == hit.get("runtime")), None)
        if rt is not None:
            return Choice(rt, f"measured earlier on this machine for this network ({cache})",
                          hit.get("seconds_per_step", {}))
        seconds[default.describe()] = _time(task, TIMED_STEPS)
        del task
        projected = seconds[default.describe()] * steps * repeats
        if projected < min_seconds and not force:
            return Choice(default, f"rule: projected at {projected:.0f} s, too short for a measurement "
                                   "to pay", seconds)
        for rt in candidates[1:]:
            if rt.compiled == default.compiled:
                seconds[rt.describe()] = _measure(build, rt, min(seconds.values()))
        best = min((c for c in candidates if c.describe() in seconds), key=lambda c: seconds[c.describe()])
        twin = next((c for c in candidates if c.compiled != default.compiled
                     and (c.amp_dtype, c.channels_last) == (best.amp_dtype, best.channels_last)), None)
        if twin is not None:
            projected = seconds[best.describe()] * steps * repeats
            if projected < COMPILE_MIN_SECONDS and not force:
                notes.append(f"compiled path not tried: projected at {projected:.0f} s, too short for its "
                             "first-step compile to pay")
            else:
                try:
                    seconds[twin.describe()] = _measure(build, twin, seconds[best.describe()])
                except Exception as e:      # inductor / the C++ compiler failed: stay eager, say why
                    notes.append(f"compiled path failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                finally:
                    from torch import _dynamo
                    _dynamo.reset()               # the throw-away task's graphs (the disk cache stays)
        gc.collect()
    fastest = min((c for c in candidates if c.describe() in seconds), key=lambda c: seconds[c.describe()])
    if fastest.compiled != default.compiled and seconds[best.describe()] <= (1 + TIE) * seconds[fastest.describe()]:
        fastest = best                  # compiling must pay clearly for its first-step compile
    if seconds[default.describe()] <= (1 + TIE) * seconds[fastest.describe()]:
        fastest = default
    how = "; ".join(["measured: the fastest path on this machine", *notes])
    if not force:
        _store(cache, key, {"runtime": fastest.describe(), "seconds_per_step": seconds, "task": name,
                            "how": how, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    if progress:
        timings = ", ".join(f"{k.split(' | ', 1)[1]} {v:.3g} s" for k, v in seconds.items())
        print(f"histosynth: CPU path for {name} measured ({timings} per step): "
              f"{fastest.describe()}", file=sys.stderr, flush=True)
    return Choice(fastest, how, seconds)


def shared(record: Path, name: str, build: Callable[[Runtime], Task], candidates: Sequence[Runtime],
           repeats: int, progress: bool = False) -> Runtime:
    """One path for runs that must compute alike (the cells of a comparison, paired by seed): the
    one ``record`` names, else chosen once for all ``repeats`` of them and written to ``record``."""
    rt = recorded(record, candidates)
    if rt is not None:
        return rt
    choice = choose(name, build, candidates, repeats=repeats, cache=cache_file(), progress=progress)
    write_record(record, choice)
    return choice.runtime


def write_record(path: Path, choice: Choice) -> None:
    atomic_write_text(path, json.dumps(choice.record(), indent=1))


def cache_file() -> Path:
    from histosynth.data import default_cache_dir
    return default_cache_dir() / CACHE_NAME

