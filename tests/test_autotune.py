"""The measured choice of the CPU path (histosynth/autotune.py): the fastest candidate wins, the
choice is cached per network and machine and recorded per run, a resumed run keeps it, and
measuring leaves the run exactly as if it had been given the chosen path."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from histosynth import autotune
from histosynth import runtime as runtime_mod
from histosynth.checkpoint import safe_load
from histosynth.engine import RunDir, train
from histosynth.roles import Plan
from histosynth.runtime import Runtime

NCHW = Runtime.from_choices("cpu", "off", "off")
CL = Runtime.from_choices("cpu", "off", "on")
NCHW_C, CL_C = (dataclasses.replace(r, compiled=True) for r in (NCHW, CL))


class PathTask:
    """A linear fit whose step takes longer on one memory layout (``slow``): a stand-in for a
    network that is faster in channels_last on one CPU and slower on another. Batches come from its
    own generator; the noise from the global one (the engine's to keep)."""

    builds = 0

    def __init__(self, rt: Runtime, slow: str = "NCHW", steps: int = 30):
        PathTask.builds += 1
        self.rt, self.slow = rt, slow
        self.net = torch.nn.Linear(4, 1)
        self.modules = {"net": self.net}
        self.optimizers = {"net": torch.optim.SGD(self.net.parameters(), lr=0.05)}
        self.ema_names = ()
        self.plan = Plan(steps=steps, log_every=5, checkpoint_every=10)
        self.gen = torch.Generator().manual_seed(3)

    def train_step(self):
        layout = "channels_last" if self.rt.channels_last else "NCHW"
        time.sleep(0.03 if layout == self.slow else 0.003)
        x = torch.randn(16, 4, generator=self.gen)
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(16, 1)
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.optimizers["net"].zero_grad()
        loss.backward()
        self.optimizers["net"].step()
        return {"loss": loss.detach()}

    def evaluate(self, models):
        return {}

    def visualise(self, models):
        return None

    def info(self):
        return {}

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def test_candidates_are_the_paths_the_auto_keys_admit_the_rule_first(monkeypatch):
    monkeypatch.setattr(runtime_mod, "cpu_has_fast_bf16", lambda: False)      # an AVX2-only CPU
    c = Runtime.candidates("cpu", "auto", "auto", cpu_fast_path=True)
    assert [x.describe() for x in c] == ["cpu | fp32 | NCHW", "cpu | fp32 | channels_last"]  # no emulated bf16
    monkeypatch.setattr(runtime_mod, "cpu_has_fast_bf16", lambda: True)       # AMX / AVX-512 BF16
    c = Runtime.candidates("cpu", "auto", "auto", cpu_fast_path=True)
    assert c[0].describe() == "cpu | bf16 autocast | channels_last" and len(c) == 4
    assert len({x.describe() for x in c}) == 4
    assert [x.describe() for x in Runtime.candidates("cpu", "auto", "on")] == [
        "cpu | fp32 | channels_last", "cpu | bf16 autocast | channels_last"]
    assert len(Runtime.candidates("cpu", "off", "off")) == 1                   # every key set: one path


def test_the_fastest_path_wins_is_cached_and_short_runs_are_not_measured(tmp_path):
    cache = tmp_path / "choices.json"
    cands = (NCHW, CL)
    PathTask.builds = 0
    short = autotune.choose("toy", PathTask, cands, steps=5, cache=cache)      # too short: no build at all
    assert short.runtime is NCHW and PathTask.builds == 0 and not cache.exists()
    quick = autotune.choose("toy", PathTask, cands, steps=100, cache=cache)    # ~3 s at the rule's pace
    assert quick.runtime is NCHW and "projected" in quick.how and not cache.exists()
    long = autotune.choose("toy", PathTask, cands, steps=100_000, cache=cache)
    assert long.runtime is CL and long.how.startswith("measured")
    s = long.seconds
    assert s["cpu | fp32 | NCHW"] > 5 * s["cpu | fp32 | channels_last"]
    builds = PathTask.builds
    again = autotune.choose("toy", PathTask, cands, steps=100_000, cache=cache)
    assert again.runtime is CL and "earlier" in again.how and PathTask.builds == builds + 1   # signature only
    # another network (other parameter shapes) is another entry: measured anew
    other = autotune.choose("toy", lambda rt: _wider(rt), cands, steps=100_000, cache=cache)
    assert other.runtime is CL and other.how.startswith("measured") and len(json.loads(cache.read_text())) == 2



@pytest.mark.parametrize("cl_seconds, wins", [(0.98, "NCHW"), (0.90, "channels_last")])
def test_the_rule_s_path_stays_unless_another_is_clearly_faster(monkeypatch, cl_seconds, wins):
    """Within TIE (3 %) of the fastest, the rule's path stays: no flapping between near-equal paths."""
    monkeypatch.setattr(autotune, "_time", lambda task, steps: cl_seconds if task.rt.channels_last else 1.0)
    choice = autotune.choose("toy", PathTask, (NCHW, CL), steps=100_000, force=True)
    assert choice.runtime.describe() == f"cpu | fp32 | {wins}"


def test_compile_auto_adds_compiled_paths_only_where_a_compiler_exists(monkeypatch):
    from histosynth.config import ConfigError
    monkeypatch.setattr(runtime_mod, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(runtime_mod, "cpp_compiler", lambda: "/usr/bin/c++")
    c = Runtime.candidates("cpu", "auto", "auto", cpu_fast_path=True, compile="auto")
    assert [x.describe() for x in c] == ["cpu | fp32 | NCHW", "cpu | fp32 | channels_last",
                                         "cpu | fp32 | NCHW | compiled", "cpu | fp32 | channels_last | compiled"]
    assert [x.describe() for x in Runtime.candidates("cpu", "off", "off", compile="on")] == ["cpu | fp32 | NCHW | compiled"]
    monkeypatch.setattr(runtime_mod, "cpp_compiler", lambda: None)      # no C++ compiler: eager paths only
    assert not any(x.compiled for x in Runtime.candidates("cpu", "auto", "auto", compile="auto"))
    with pytest.raises(ConfigError, match=r"train.compile: 'on' needs a C\+\+ compiler.*'auto'"):
        Runtime.candidates("cpu", "auto", "auto", compile="on")


def _compile_timed(compiled_seconds: float):
    """Step times by path: NCHW 1.0 s, channels_last 0.5 s, compiled channels_last ``compiled_seconds``."""
    def timed(task, steps):
        if task.rt.compiled:
            assert task.rt.channels_last, "only the fastest eager path's compiled twin is tried"
            return compiled_seconds
        return 0.5 if task.rt.channels_last else 1.0
    return timed


@pytest.mark.parametrize("compiled_seconds, wins", [(0.3, "cpu | fp32 | channels_last | compiled"),
                                                     (0.49, "cpu | fp32 | channels_last"),     # within TIE
                                                     (0.6, "cpu | fp32 | channels_last")])
def test_the_compiled_twin_of_the_fastest_eager_path_is_measured_and_kept_where_faster(
        monkeypatch, compiled_seconds, wins):
    monkeypatch.setattr(autotune, "_time", _compile_timed(compiled_seconds))
    cands = (NCHW, CL, NCHW_C, CL_C)
    PathTask.builds = 0
    choice = autotune.choose("toy", PathTask, cands, steps=100_000)
    assert choice.runtime.describe() == wins and PathTask.builds == 3     # rule, channels_last, its twin
    assert set(choice.seconds) == {NCHW.describe(), CL.describe(), CL_C.describe()}
    assert autotune.Choice(choice.runtime, choice.how).record()["compile"] == ("on" if "compiled" in wins else "off")


def test_compiling_is_not_tried_for_a_short_run_and_a_failed_compile_leaves_the_eager_path(monkeypatch):
    monkeypatch.setattr(autotune, "_time", _compile_timed(0.1))
    short = autotune.choose("toy", PathTask, (NCHW, CL, NCHW_C, CL_C), steps=1000)       # 500 s at 0.5 s a step
    assert short.runtime is CL and CL_C.describe() not in short.seconds and "not tried" in short.how

    def failing(rt):
        if rt.compiled:
            raise RuntimeError("C++ compile error: cannot find Python.h")
        return PathTask(rt)
    failed = autotune.choose("toy", failing, (NCHW, CL, NCHW_C, CL_C), steps=100_000)
    assert failed.runtime is CL and "compiled path failed (RuntimeError: C++ compile error" in failed.how


def test_a_resumed_run_keeps_its_recorded_compile_choice(tmp_path):
    record = tmp_path / "runtime.json"
    autotune.write_record(record, autotune.Choice(CL_C, "measured"))
    assert autotune.recorded(record, (NCHW, CL, NCHW_C, CL_C)) is CL_C
    autotune.write_record(record, autotune.Choice(CL, "measured"))
    assert autotune.recorded(record, (NCHW, CL, NCHW_C, CL_C)) is CL


def _wider(rt):
    task = PathTask(rt)
    task.net = task.modules["net"] = torch.nn.Linear(4, 1, bias=False)
    task.optimizers = {"net": torch.optim.SGD(task.net.parameters(), lr=0.05)}
    return task


def test_a_measured_run_equals_a_run_given_that_path_and_resume_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "MIN_SECONDS", 0.0)            # measure even this short run
    measured = train("toy", {}, PathTask, tmp_path / "m", (NCHW, CL), seed=0, progress=False)
    rec = json.loads(RunDir(tmp_path / "m").runtime.read_text())
    assert rec["runtime"] == "cpu | fp32 | channels_last" and rec["how"].startswith("measured")
    assert set(rec["seconds_per_step"]) == {"cpu | fp32 | NCHW", "cpu | fp32 | channels_last"}
    direct = train("toy", {}, PathTask, tmp_path / "d", CL, seed=0, progress=False)
    assert measured["step"] == direct["step"] == 30
    a, b = safe_load(RunDir(tmp_path / "m").last), safe_load(RunDir(tmp_path / "d").last)
    for k, v in a["modules"]["net"].items():                      # measuring disturbed nothing
        assert torch.equal(v, b["modules"]["net"][k])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # killed at step 10, then the other layout became the fast one (another machine state, a
    # cleared cache): the resumed run still computes on the path it started with
    def dying(rt):
        task = PathTask(rt)
        real, n = task.train_step, {"k": 0}

        def step():
            n["k"] += 1
            if n["k"] == 12:
                raise KeyboardInterrupt
            return real()
        task.train_step = step
        return task
    monkeypatch.setattr(autotune, "cache_file", lambda: tmp_path / "empty-cache.json")
    with pytest.raises(KeyboardInterrupt):
        train("toy", {}, dying, tmp_path / "k", (NCHW, CL), seed=0, progress=False)
    assert json.loads(RunDir(tmp_path / "k").runtime.read_text())["runtime"] == "cpu | fp32 | channels_last"
    resumed = train("toy", {}, lambda rt: PathTask(rt, slow="channels_last"), tmp_path / "k", (NCHW, CL),
                    seed=0, resume=True, progress=False)
    assert resumed["device"] == "cpu | fp32 | channels_last"
    c = safe_load(RunDir(tmp_path / "k").last)
    for k, v in c["modules"]["net"].items():
        assert torch.equal(v, b["modules"]["net"][k])


def test_runs_that_must_compute_alike_share_one_recorded_path(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "cache_file", lambda: tmp_path / "cache.json")
    record = tmp_path / "runtime.json"
    first = autotune.shared(record, "toy", PathTask, (NCHW, CL), repeats=10_000)
    assert first is CL and json.loads(record.read_text())["runtime"] == CL.describe()
    # the next cell would measure the other way; it takes the comparison's recorded path
    later = autotune.shared(record, "toy", lambda rt: PathTask(rt, slow="channels_last"), (NCHW, CL), repeats=10_000)
    assert later is CL
