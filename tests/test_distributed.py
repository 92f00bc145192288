"""Data-parallel classifier training: 2 processes on the gloo backend (CPU), as torchrun runs it."""

import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from histosynth.checkpoint import safe_load


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
        if (run / "last.pt").is_file():
            try:
                killed_at = safe_load(run / "last.pt")["state"]["epoch"]
            except Exception:
                killed_at = None
            if killed_at and killed_at >= 2:
                break
        time.sleep(0.05)
    for p in procs:
        p.kill()
        p.join()
    killed_at = safe_load(run / "last.pt")["state"]["epoch"]
    assert 2 <= killed_at < epochs, "the 2-process run was not caught mid-way"
    assert (run / "best.pt").is_file()
    from test_classifier import _tiles, _tiny_cfg
    from classifier.train import fit
    t, ds = _tiles(crc_mini)
    res = fit(_tiny_cfg(epochs=epochs), ds, t.images, t.labels, t.classes, run, 0, sampler, progress=False)
    assert res["epochs_run"] == epochs
    assert [h["epoch"] for h in res["history"]] == list(range(1, epochs + 1))
    assert all(math.isfinite(h["train_loss"]) for h in res["history"])
    assert not list(run.glob(".*.tmp"))
