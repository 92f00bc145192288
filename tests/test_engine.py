"""The engine and the roles: a toy task in a few lines, contract tests over every registered
family and downstream task, and the engine's own pieces (schedules, best.pt, early stopping,
snapshots, the finished-run record, scoped global state)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from gans.registry import families, list_families
from gans.train_gan import load_config
from histosynth import config as configlib
from histosynth.checkpoint import safe_load
from histosynth.config import PROJECT_ROOT
from histosynth.engine import RunDir, deterministic, load_checkpoint, train
from histosynth.registry import downstream_tasks
from histosynth.roles import Criterion, LRSchedule, Plan, Task
from histosynth.runtime import Runtime

CPU = Runtime.from_choices("cpu", "off", "off")


# ----------------------------------------------------------------------------------------------
# a toy task: everything a task must say, in a few lines


class ToyTask:
    """Fit y = 3x - 1 with one linear layer: noisy batches from its own generator (saved state),
    an EMA copy, evaluation by the distance of the EMA weights to the truth (lower is better)."""

    def __init__(self, rt: Runtime, steps: int = 12, patience: int = 0):
        self.net = torch.nn.Linear(1, 1).to(rt.device)
        self.modules = {"net": self.net}
        self.optimizers = {"net": torch.optim.SGD(self.net.parameters(), lr=0.1)}
        self.ema_names = ("net",)
        self.plan = Plan(steps=steps, log_every=2, checkpoint_every=3, evaluate_every=3, snapshot_every=6,
                         criterion=Criterion("error", "min"), patience=patience, ema_decay=0.5,
                         lr=LRSchedule("cosine", warmup=2), images_per_step=8)
        self.gen = torch.Generator().manual_seed(1)

    def train_step(self):
        x = torch.randn(8, 1, generator=self.gen)
        y = 3 * x - 1 + 0.1 * torch.randn(8, 1)              # global RNG: the engine's to save
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.optimizers["net"].zero_grad()
        loss.backward()
        self.optimizers["net"].step()
        return {"loss": loss.detach()}

    def evaluate(self, models):
        m = models["net"]
        return {"error": float((m.weight - 3).abs() + (m.bias + 1).abs())}

    def visualise(self, models):
        return None

    def info(self):
        return {"truth": [3.0, -1.0]}

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def _dying(build, at: int):
    """``build`` whose task raises KeyboardInterrupt at its ``at``-th step (a kill, in-process)."""
    def b(rt):
        task, calls = build(rt), {"n": 0}
        real = task.train_step

        def step():
            calls["n"] += 1
            if calls["n"] == at:
                raise KeyboardInterrupt
            return real()
        task.train_step = step
        return task
    return b


def _same(a, b, where="") -> None:
    """Two checkpoint trees hold the same values (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


RESUMED = ("step", "modules", "ema", "optimizers", "schedulers", "task_state", "rng")


def test_a_toy_task_trains_and_resumes_through_the_engine(tmp_path):
    assert isinstance(ToyTask(CPU), Task)                              # it is a Task: nothing to inherit
    whole = train("toy", {"lr": 0.1}, ToyTask, tmp_path / "whole", CPU, seed=0, progress=False)
    assert whole["step"] == 12 and [r["step"] for r in whole["history"]] == [3, 6, 9, 12]
    errors = [r["error"] for r in whole["history"]]
    assert errors[-1] < errors[0] and whole["best"] == min(errors)
    run = RunDir(tmp_path / "whole")
    best = safe_load(run.best)
    assert best["step"] == whole["best_step"] and best["metrics"]["error"] == whole["best"]
    assert best["info"] == {"truth": [3.0, -1.0]} and "optimizers" not in best
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best.pt", "last.pt", "step_000006.pt",
                                                                 "step_000012.pt"]
    with pytest.raises(KeyboardInterrupt):
        train("toy", {"lr": 0.1}, _dying(ToyTask, 8), tmp_path / "cut", CPU, seed=0, progress=False)
    assert safe_load(RunDir(tmp_path / "cut").last)["step"] == 6
    resumed = train("toy", {"lr": 0.1}, ToyTask, tmp_path / "cut", CPU, seed=0, resume=True, progress=False)
    a, b = safe_load(run.last), safe_load(RunDir(tmp_path / "cut").last)
    for key in RESUMED:
        _same(a[key], b[key], key)
    assert resumed["history"] == whole["history"]
    steps = [int(line.split('"step": ')[1].split(",")[0].rstrip("}")) for line in
             (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(8) == 1             # no line of the killed run repeated


def test_early_stopping_and_the_finished_record(tmp_path):
    class Stalls(ToyTask):
        def evaluate(self, models):
            return {"error": 1.0}                                     # never improves after the first
    s = train("toy", {}, lambda rt: Stalls(rt, steps=30, patience=2), tmp_path / "r", CPU, seed=0,
              progress=False, keep_final_state=False)
    assert s["stopped_early"] and s["step"] == 9 and s["best_step"] == 3   # evaluations at 3, 6, 9
    record = safe_load(RunDir(tmp_path / "r").last)
    assert "modules" not in record and record["engine"]["done"]        # slim: best.pt has the weights
    again = train("toy", {}, lambda rt: Stalls(rt, steps=30, patience=2), tmp_path / "r", CPU, seed=0,
                  resume=True, progress=False)
    assert again["step"] == 9 and again["history"] == s["history"]     # nothing trained again


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    class Diverges(ToyTask):
        calls = 0

        def train_step(self):
            self.calls += 1                                           # the loss is Inf from step 5 on
            return {"loss": super().train_step()["loss"] * (math.inf if self.calls >= 5 else 1)}
    from histosynth.runtime import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match=r"loss became NaN/Inf at step 6.*\(step 3\) was kept"):
        train("toy", {}, Diverges, tmp_path / "r", CPU, seed=0, progress=False)
    assert safe_load(RunDir(tmp_path / "r").last)["step"] == 3


def test_learning_rate_schedules_by_hand():
    assert LRSchedule("constant").factor(7, 10) == 1.0
    lin = LRSchedule("linear", decay_start=4)
    assert [lin.factor(s, 10) for s in (0, 3, 4, 7, 10)] == pytest.approx([1, 1, 1, 0.5, 0])
    cos = LRSchedule("cosine", warmup=2)
    assert [cos.factor(s, 10) for s in (0, 1)] == pytest.approx([0.5, 1.0])      # (step + 1) / warmup
    assert cos.factor(6, 10) == pytest.approx(0.5) and cos.factor(10, 10) == pytest.approx(0.0)


@pytest.mark.parametrize("env", [{"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ONEDNN_MAX_CPU_ISA": "avx2_vnni"}])
def test_a_cpu_held_to_avx2_kernels_takes_the_fp32_path(env, monkeypatch):
    """bf16 on a CPU without native bf16 is emulated and slower than fp32: ``auto`` must not
    choose it there, also when a bigger CPU is held to AVX2 kernels (how the AVX2 path is measured)."""
    from histosynth.runtime import cpu_has_fast_bf16
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert not cpu_has_fast_bf16()
    rt = Runtime.from_choices("cpu", "auto", "auto", cpu_fast_path=True)
    assert rt.amp_dtype is None and not rt.channels_last
    code = ("from histosynth.runtime import Runtime; rt = Runtime.from_choices('cpu', 'auto', 'auto', True);"
            "print(rt.amp_dtype, rt.channels_last)")
    held = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"} | {"ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT,
                         env=held, check=True).stdout
    assert out.split() == ["None", "False"]


def test_a_process_held_to_avx2_compiles_into_a_kernel_cache_of_its_own(monkeypatch):
    """Inductor's disk cache does not key on the kernel level: kernels compiled with the CPU's own
    ISA and loaded by a process held to AVX2 trained a DCGAN to NaN (and the reverse aborted)."""
    from histosynth.runtime import compiled
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    for held in ({"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, {}):
        for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "TORCHINDUCTOR_CACHE_DIR"):
            monkeypatch.delenv(k, raising=False)
        for k, v in held.items():
            monkeypatch.setenv(k, v)
        compiled(torch.nn.Linear(2, 2), True)
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if held:
            assert cache.startswith(default_cache_dir() + "-") and "avx2" in cache
        else:
            assert cache in (None, default_cache_dir())          # torch's own default, untouched
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/chosen")
    compiled(torch.nn.Linear(2, 2), True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/chosen"       # the user's choice stands


def test_global_state_is_restored_after_a_run_and_a_cli_call(tmp_path):
    torch.use_deterministic_algorithms(False)
    with deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    train("toy", {}, ToyTask, tmp_path / "r", CPU, seed=0, progress=False)
    assert not torch.are_deterministic_algorithms_enabled()          # the CPU run asked; not kept
    from histosynth.cli import run_cli
    before = warnings.showwarning
    assert run_cli("x", lambda: warnings.warn("w") or 0) == 0
    assert warnings.showwarning is before


def test_user_errors_print_one_line_whatever_was_imported(tmp_path):
    """A user error of any module prints one line: the set is declared by inheritance, not
    collected by importing the CLIs (gan-eval once printed one line only thanks to an import)."""
    code = ("import sys\nfrom histosynth.cli import run_cli\nfrom experiments.leakage import LeakageError\n"
            "def boom():\n    raise LeakageError('test image in train')\n"
            "sys.exit(run_cli('augment-compare', boom))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert r.returncode == 2 and r.stderr.strip() == "augment-compare: error: test image in train"
    r = subprocess.run([sys.executable, "-m", "gans.cyclegan_eval", "--run", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# contracts, over everything registered


def _family_case(name: str):
    fam = families()[name]
    cfg, _ = load_config(fam.config_file, list(fam.smoke))
    data = fam.load_data(cfg, False)
    t = cfg.train
    rt = Runtime.from_choices(t.device, t.amp, t.channels_last, cpu_fast_path=True)
    return name, cfg, lambda rt: fam.build_task(cfg, data, rt), rt, t.seed


def _downstream_case(name: str, folders):
    """The task on the first test folder in its layout (class folders, image-mask pairs), trained
    on it and validated on it (a contract test, not a measurement)."""
    from experiments.config import ArmConfig
    task = downstream_tasks()[name]
    cfg = configlib.load(task.config, None, list(task.smoke))[0]
    folder = next(f for f in folders if _fits(task.layout, f))
    data, val = (task.load(cfg, folder, role, None, False) for role in ("train", "val"))
    train_set = data.tileset()
    return name, cfg, lambda rt: task.build_task(cfg, ArmConfig(), 0, train_set, val, rt), task.runtime(cfg)[0], 0


def _fits(layout, folder) -> bool:
    try:
        return bool(layout.samples(folder))
    except Exception:
        return False


CASES = [("family", n) for n in list_families()] + [("downstream", n) for n in downstream_tasks()]


@pytest.fixture
def case(request, crc_mini):
    kind, name = request.param
    return _family_case(name) if kind == "family" else _downstream_case(name, [crc_mini, PROJECT_ROOT / "data" / "monuseg_demo" / "train"])


@pytest.mark.parametrize("case", CASES, indirect=True, ids=[f"{k}:{n}" for k, n in CASES])
def test_every_task_steps_saves_and_resumes_exactly(case, tmp_path):
    name, cfg, build, rt, seed = case
    torch.manual_seed(seed)
    task = build(rt)
    assert isinstance(task, Task) and task.plan.steps >= task.plan.checkpoint_every + 2
    out = task.train_step()                                           # one step: finite scalars
    assert out and all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert all(torch.isfinite(p).all() for m in task.modules.values() for p in m.parameters())
    torch.save({"state": task.state_dict(), "info": task.info()}, tmp_path / "s.pt")
    saved = safe_load(tmp_path / "s.pt")                              # state survives weights_only
    other = build(rt)
    other.load_state_dict(saved["state"])
    _same(task.state_dict(), other.state_dict(), "state")

    whole = train(name, cfg, build, tmp_path / "whole", rt, seed=seed, progress=False)
    kill = task.plan.checkpoint_every + 2
    with pytest.raises(KeyboardInterrupt):
        train(name, cfg, _dying(build, kill), tmp_path / "cut", rt, seed=seed, progress=False)
    resumed = train(name, cfg, build, tmp_path / "cut", rt, seed=seed, resume=True, progress=False)
    a, b = load_checkpoint(RunDir(tmp_path / "whole").last), load_checkpoint(RunDir(tmp_path / "cut").last)
    for key in RESUMED:
        _same(a[key], b[key], key)
    assert resumed["step"] == whole["step"] and resumed["history"] == whole["history"]


@pytest.mark.parametrize("name", list_families())
def test_every_family_steps_through_torch_compile_on_a_compiled_path(name, crc_mini, monkeypatch):
    """A compiled path (train.compile: on, or auto where it measured faster) runs the step's
    networks through torch.compile, for every family; an eager path never does. (torch.compile is
    replaced by a recorder here: what is checked is the wiring, not inductor.)"""
    import dataclasses
    calls: list[str] = []

    def recorder(module):
        def run(*args, **kwargs):
            calls.append(type(module).__name__)
            return module(*args, **kwargs)
        return run
    monkeypatch.setattr(torch, "compile", recorder)
    _, cfg, build, rt, seed = _family_case(name)
    torch.manual_seed(seed)
    build(dataclasses.replace(rt, compiled=False)).train_step()
    assert calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # spectral-norm networks stay eager, and say so
        build(dataclasses.replace(rt, compiled=True)).train_step()
    assert calls, f"{name}: no network of the training step went through torch.compile"


# ----------------------------------------------------------------------------------------------
# old checkpoints


def test_a_histosynth_1_checkpoint_still_generates(trained_run, tmp_path):
    """GAN runs written before the engine (format histosynth/1: 'family', 'extra') still load."""
    import shutil
    from gans.generate import generate
    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    ck = safe_load(RunDir(old).last)
    v1 = {k: v for k, v in ck.items() if k not in ("task", "task_state", "info", "engine")}
    v1.update(format="histosynth/1", family=ck["task"], extra=ck["task_state"])
    torch.save(v1, RunDir(old).last)
    generate(old, tmp_path / "a", 2, progress=False, device="cpu")
    generate(trained_run, tmp_path / "b", 2, progress=False, device="cpu")
    pngs = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert pngs and all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in pngs)


# ----------------------------------------------------------------------------------------------
# what it takes to add a generator family or a downstream task: one module / package + a YAML

TOY_FAMILY = '''
import torch.nn as nn
from gans.adversarial import adversarial_family


class Generator(nn.Module):
    def __init__(self, image_size, num_classes, z_dim):
        super().__init__()
        self.z_dim, self.num_classes, self.size = z_dim, num_classes, image_size
        self.embed = nn.Embedding(max(num_classes, 1), z_dim)
        self.net = nn.Sequential(nn.Linear(z_dim, 3 * image_size ** 2), nn.Tanh())

    def forward(self, z, y=None):
        return self.net(z + self.embed(y) if self.num_classes else z).view(-1, 3, self.size, self.size)


class Discriminator(nn.Module):
    def __init__(self, image_size):
        super().__init__()
        self.net = nn.Linear(3 * image_size ** 2, 1)

    def forward(self, x, y=None):
        return self.net(x.flatten(1)).flatten()


FAMILY = adversarial_family("toygan", lambda image_size, num_classes, z_dim, ch: (
    Generator(image_size, num_classes, z_dim), Discriminator(image_size)), default_loss="hinge", paper="a test")
'''

TOY_TASK = '''
import numpy as np
import torch
from classifier.data import ClassFolders
from histosynth.data import TileCache
from histosynth.roles import Criterion, Generator, Metric, MetricSpec, Plan
from histosynth.runtime import Runtime


class MeanColourTask:
    def __init__(self, epochs, train, val, rt, seed):
        self.x = torch.from_numpy(np.asarray(train.images, np.float32).mean((2, 3)) / 255)
        self.y, self.val, self.classes = torch.from_numpy(train.labels), val, train.classes
        self.net = torch.nn.Linear(3, len(train.classes))
        self.modules, self.optimizers, self.ema_names = {"net": self.net}, {"net": torch.optim.Adam(self.net.parameters(), 0.1)}, ()
        self.plan = Plan(steps=epochs, log_every=1, checkpoint_every=1, evaluate_every=1, criterion=Criterion("val_acc"))

    def train_step(self):
        loss = torch.nn.functional.cross_entropy(self.net(self.x), self.y)
        self.optimizers["net"].zero_grad()
        loss.backward()
        self.optimizers["net"].step()
        return {"loss": loss.detach()}

    def evaluate(self, models):
        return {"val_acc": accuracy(models["net"], self.val)}

    def visualise(self, models):
        return None

    def info(self):
        return {"classes": self.classes}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def accuracy(net, data):
    x = torch.from_numpy(np.asarray(data.images, np.float32).mean((2, 3)) / 255)
    return float((net(x).argmax(1).numpy() == data.labels).mean())


class MeanColour:
    name, augment_policies, smoke, filters, class_balance, test_unit = "mean_colour", ("none",), (), (), True, "tiles"
    spec = MetricSpec((Metric("accuracy", "accuracy"),), primary="accuracy", control="accuracy")
    layout, synthesis = ClassFolders(), Generator          # class folders; class-conditional generators

    from dataclasses import dataclass as _dc

    @_dc
    class config:
        epochs: int = 5

    def chance(self, classes):
        return {"accuracy": 1 / len(classes)}

    def load(self, cfg, root, role, cache_dir, progress, stain=None):
        return TileCache.build(root, 32, stain, cache_dir, progress)

    def select(self, cfg, spec, source, train_root, out, need, cache_dir, progress):
        raise AssertionError("filters = (): a config with a filter is refused before this")

    def describe(self, cfg):
        return f"a linear layer on the mean colour, {cfg.epochs} epochs"

    def runtime(self, cfg):
        return Runtime.from_choices("cpu", "off", "off")

    def build_task(self, cfg, arm, seed, train, val, rt):
        return MeanColourTask(cfg.epochs, train, val, rt, seed)

    def score(self, cfg, best, train, test, cell, groups=None):
        net = torch.nn.Linear(3, len(train.classes))
        net.load_state_dict(best["modules"]["net"])
        return {"accuracy": accuracy(net, test)}

    def plots(self, summary, rows, out):
        return {}


DOWNSTREAM = MeanColour()
'''


@pytest.fixture
def fresh_registries():
    from histosynth.registry import downstream_tasks as tasks
    families.cache_clear()
    tasks.cache_clear()
    yield
    families.cache_clear()
    tasks.cache_clear()


def test_a_new_generator_family_is_one_module_and_its_yaml(tmp_path, monkeypatch, fresh_registries):
    import gans.families
    from gans.generate import main as generate_main
    from gans.train_gan import main as train_main
    (tmp_path / "fam").mkdir()
    (tmp_path / "fam" / "toygan.py").write_text(TOY_FAMILY)            # file 1: the family
    (tmp_path / "toygan.yaml").write_text("model: {family: toygan}\n")  # file 2: its config
    monkeypatch.setattr(gans.families, "__path__", [*gans.families.__path__, str(tmp_path / "fam")])
    monkeypatch.delitem(sys.modules, "gans.families.toygan", raising=False)
    sets = sum((["--set", s] for s in families()["toygan"].smoke), [])
    assert train_main(["--cfg", str(tmp_path / "toygan.yaml"), "--out", str(tmp_path / "run"), "--no-progress",
                       *sets]) == 0
    assert generate_main(["--run", str(tmp_path / "run"), "--per-class", "2", "--out", str(tmp_path / "synth"),
                          "--no-progress"]) == 0
    assert len(list((tmp_path / "synth").rglob("*.png"))) == 2 * 3 and (tmp_path / "synth" / "source.json").is_file()


def test_a_new_downstream_task_is_one_package_and_its_yaml(tmp_path, monkeypatch, fresh_registries, crc_mini):
    import csv
    import json
    from experiments.augment_compare import main as compare_main
    from histosynth import registry
    (tmp_path / "roots" / "meancolour").mkdir(parents=True)
    (tmp_path / "roots" / "meancolour" / "__init__.py").write_text("")
    (tmp_path / "roots" / "meancolour" / "downstream.py").write_text(TOY_TASK)    # the package
    (tmp_path / "cmp.yaml").write_text(                                            # its compare YAML
        f"data: {{root: '{crc_mini}', split: stratified}}\ntask: mean_colour\ndownstream: {{epochs: 4}}\n"
        "arms: [{name: real_only, augment: none}, {name: shuffled, augment: none, labels: shuffled}]\n"
        "seeds: [0, 1]\n")
    monkeypatch.syspath_prepend(str(tmp_path / "roots"))
    monkeypatch.setattr(registry, "SEARCH_ROOTS", [*registry.SEARCH_ROOTS, tmp_path / "roots"])
    assert compare_main(["--cfg", str(tmp_path / "cmp.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(rows) == 4 and all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(s["metrics"]) == ["accuracy"] and s["chance"]["accuracy"] == pytest.approx(1 / len(s["classes"]))
    assert "accuracy" in s["verdict"] and (tmp_path / "out" / "report.html").is_file()
