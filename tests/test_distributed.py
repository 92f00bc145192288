"""Data-parallel classifier training: 2 processes on the gloo backend (CPU), as torchrun runs it."""

import json
import math
import os
import socket
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from histosynth.checkpoint import safe_load
from histosynth.engine import RunDir
from histosynth.runtime import Runtime
from conftest import assert_same_state, tiny_overrides
from fault_harness import kill_tree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tiles_root, run_dir, sampler, epochs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from test_classifier import _tiles, _tiny_cfg
    from classifier.train import fit
    t, ds = _tiles(tiles_root)
    fit(_tiny_cfg(epochs=epochs), ds, t.images, t.labels, t.classes, run_dir, 0, sampler, progress=False)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("sampler", ["random", "balanced"])
def test_two_process_gloo_training_preempted_then_resumed_on_one_process(sampler, crc_mini, tmp_path):
    """2 ranks train (DDP, gloo); both are SIGKILLed after epoch 2's checkpoint, as a pre-empted
    job would be; the run then continues on ONE process to its final epoch."""
    run, epochs = tmp_path / "run", 5
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, crc_mini, run, sampler, epochs)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and all(p.is_alive() for p in procs):
        if RunDir(run).last.is_file():
            try:
                killed_at = _epoch(run)
            except Exception:
                killed_at = None
            if killed_at and killed_at >= 2:
                break
        time.sleep(0.05)
    for p in procs:
        p.kill()
        p.join()
    killed_at = _epoch(run)
    assert 2 <= killed_at < epochs, "the 2-process run was not caught mid-way"
    assert RunDir(run).best.is_file()
    from test_classifier import _tiles, _tiny_cfg
    from classifier.train import fit
    t, ds = _tiles(crc_mini)
    res = fit(_tiny_cfg(epochs=epochs), ds, t.images, t.labels, t.classes, run, 0, sampler, progress=False)
    assert res["epochs_run"] == epochs
    assert [h["epoch"] for h in res["history"]] == list(range(1, epochs + 1))
    assert all(math.isfinite(h["train_loss"]) for h in res["history"])
    assert not list(run.rglob(".*.tmp"))


def _epoch(run) -> int:
    ck = safe_load(RunDir(run).last)
    return ck["step"] // ck["info"]["steps_per_epoch"]


# ---------------------------------------------------------------------------------------------
# the engine (every family, CycleGAN included) under torchrun

def _avg_worker(rank, world, port, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from histosynth.distributed import setup
    dist = setup("cpu")
    p = torch.nn.Parameter(torch.zeros(2, 3))
    q = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((2, 3), float(rank + 1))
    q.grad = torch.arange(4.0) * (rank + 1)
    dist.average_gradients([p, q])
    result[rank] = (p.grad.tolist(), q.grad.tolist())
    torch.distributed.destroy_process_group()


def test_average_gradients_over_two_gloo_processes():
    ctx = mp.get_context("spawn")
    port = _free_port()
    with ctx.Manager() as manager:
        result = manager.dict()
        procs = [ctx.Process(target=_avg_worker, args=(r, 2, port, result)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert all(p.exitcode == 0 for p in procs)
        for rank in range(2):
            pg, qg = result[rank]
            assert pg == [[1.5] * 3] * 2 and qg == [0.0, 1.5, 3.0, 4.5]


def test_ranks_share_out_the_global_batch_the_same_for_any_world_size():
    from histosynth.data import BatchSampler, flip_rot90
    one = BatchSampler(10, 4, seed=3)
    two = [BatchSampler(10, 4, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(7):                           # across epoch boundaries
        full = one.next()
        parts = [s.next() for s in two]
        assert torch.equal(parts[0], full[0::2]) and torch.equal(parts[1], full[1::2])
    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2)
    g1 = torch.Generator().manual_seed(0)
    whole = flip_rot90(x, g1, "flip_rot90")
    for r in range(2):
        g = torch.Generator().manual_seed(0)
        assert torch.equal(flip_rot90(x[r::2], g, "flip_rot90", (r, 2)), whole[r::2])
    with pytest.raises(ValueError, match="cannot be shared out over 3"):
        BatchSampler(10, 4, seed=0, rank=0, world=3)


def test_a_batch_that_does_not_split_over_the_processes_is_a_config_error(crc_mini):
    import dataclasses
    from conftest import tiny_config
    from gans.adversarial import GANTask, load_data
    from histosynth.config import ConfigError
    cfg = tiny_config(crc_mini, **{"train.batch_size": 7})
    rt = dataclasses.replace(Runtime.from_choices("cpu"), rank=0, world=2)
    with pytest.raises(ConfigError, match="train.batch_size.*multiple of 2"):
        GANTask(cfg, load_data(cfg, progress=False), rt)


def _torchrun(args, env, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gans.train_gan", "--no-progress", *args]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _kill_after_checkpoint(proc, ck_path, min_step, final_step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ck_path.is_file():
            try:
                step = safe_load(ck_path)["step"]
            except Exception:
                step = 0
            if min_step <= step < final_step:
                break
        time.sleep(0.05)
    tree = kill_tree(proc.pid)                # a pre-empted job: every process dies at once
    proc.wait()
    assert len(tree) >= 3, "torchrun's workers were not found"
    for pid in tree[1:]:
        while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
            time.sleep(0.01)
    return safe_load(ck_path)["step"]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _env(tmp_path):
    return {**os.environ, "HISTOSYNTH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def test_wgan_gp_on_two_processes_killed_and_resumed_equals_the_uninterrupted_run(crc_mini, tmp_path):
    """2 gloo ranks (gradient penalty: the case DistributedDataParallel cannot do); one run
    SIGKILLed after a checkpoint and resumed on 2 processes ends bit-identical to an uninterrupted
    one: every rank's noise, augmentation and data-order state is in the checkpoint."""
    sets = tiny_overrides(crc_mini, **{"train.steps": 8, "train.checkpoint_every": 2,
                                       "train.sample_every": 4})
    sets = sum((["--set", s] for s in sets), [])
    env = _env(tmp_path)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    p = _torchrun(["--cfg", "wgan_gp", "--out", str(whole), *sets], env)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "Traceback" not in out and out.count("finished step 8") == 1     # rank 0 reports
    ref = safe_load(RunDir(whole).last)
    assert ref["step"] == 8 and len(ref["ranks"]) == 2
    assert not torch.equal(ref["ranks"][0]["rng"]["torch"], ref["ranks"][1]["rng"]["torch"])
    rows = [json.loads(line) for line in RunDir(whole).metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["gp"]) for r in rows)

    p = _torchrun(["--cfg", "wgan_gp", "--out", str(cut), *sets], env)
    killed_at = _kill_after_checkpoint(p, RunDir(cut).last, 2, 8)
    assert 2 <= killed_at < 8
    p = _torchrun(["--resume", str(cut)], env)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert_same_state(ref, safe_load(RunDir(cut).last))
    rows = [json.loads(line) for line in RunDir(cut).metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert not list(cut.rglob(".*.tmp"))


def test_cyclegan_on_two_processes_preempted_then_resumed_on_one(stain_domains, tmp_path):
    """CycleGAN (global batch 2 = 1 per rank) pre-empted on 2 processes, continued on ONE."""
    from test_cyclegan import tiny_cycle_sets
    from gans.train_gan import main as train_main
    a, b = stain_domains
    sets = tiny_cycle_sets(a, b, **{"train.steps": 6, "train.checkpoint_every": 2})
    out_dir = tmp_path / "cg"
    env = _env(tmp_path)
    p = _torchrun(["--cfg", "cyclegan_cpu", "--out", str(out_dir), *sum((["--set", s] for s in sets), [])], env)
    killed_at = _kill_after_checkpoint(p, RunDir(out_dir).last, 2, 6)
    assert 2 <= killed_at < 6
    ck = safe_load(RunDir(out_dir).last)
    assert len(ck["ranks"]) == 2 and set(ck["ranks"][1]["task_state"]) == set(ck["task_state"])
    assert train_main(["--resume", str(out_dir), "--no-progress"]) == 0
    final = safe_load(RunDir(out_dir).last)
    assert final["step"] == 6 and final["ranks"] == []
    assert (out_dir / "eval.json").is_file()
    rows = [json.loads(line) for line in RunDir(out_dir).metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
