"""Arm x seed cells spread over worker processes: one per GPU (or N on a many-core CPU).

The parent process does everything that must happen once (splits, leakage guard, GAN stage,
synthetic set verification) and is the only writer of ``results.csv``. Each worker is a fresh
(spawned) process bound to one device: it reopens the decoded tile caches the parent left on
disk (memory-mapped, nothing is decoded twice), takes the next cell from a shared queue, trains
and evaluates it and sends the row back. Cells are independent and seeded, so the numbers do not
depend on which worker ran a cell. A worker dies with its parent (Linux: PR_SET_PDEATHSIG), so a
killed comparison leaves no orphan writing into a cell; re-running the command continues as usual.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.multiprocessing as mp


def default_workers() -> int:
    """One worker per visible GPU; one (in-process) on a CPU."""
    return max(1, torch.cuda.device_count())


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker(index: int, n_workers: int, job: dict, tasks, results) -> None:
    _die_with_parent()
    if torch.cuda.is_available():
        torch.cuda.set_device(index % torch.cuda.device_count())
    else:   # share the cores out; inside a cell the downstream model uses this many threads
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))
    from experiments.augment_compare import Inputs, run_cell

    cfg, out = job["cfg"], Path(job["out"])
    inputs = Inputs(cfg, out, job["split_roots"], job["source_roots"], job["test_groups"])
    while True:
        item = tasks.get()
        if item is None:
            return
        seed, arm_index = item
        try:
            row = run_cell(cfg, cfg.arms[arm_index], arm_index, seed, inputs, out, False)
        except BaseException as e:  # handed to the parent, which stops and reports it
            try:
                import pickle
                pickle.dumps(e)
            except Exception:
                e = RuntimeError(f"{type(e).__name__}: {e}")
            results.put(("error", (seed, arm_index, e)))
            return
        results.put(("row", row))


def run_cells_parallel(job: dict, todo: Iterable[tuple[int, int]], n_workers: int,
                       on_row: Callable[[dict], None]) -> None:
    """Run the (seed, arm index) cells of ``todo`` on ``n_workers`` processes; ``on_row`` gets
    each finished cell's row in the parent, as it arrives. A worker's error stops the others
    and is raised here (finished cells are already recorded)."""
    todo = list(todo)
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in todo:
        tasks.put(item)
    n_workers = min(n_workers, len(todo))
    for _ in range(n_workers):
        tasks.put(None)
    procs = [ctx.Process(target=_worker, args=(i, n_workers, job, tasks, results), daemon=True)
             for i in range(n_workers)]
    for p in procs:
        p.start()
    try:
        remaining = len(todo)
        while remaining:
            try:
                kind, payload = results.get(timeout=5)
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"cell worker {dead[0][0]} died (exit code {dead[0][1]}); "
                                       "finished cells are saved, re-run the same command to continue")
                continue
            if kind == "error":
                seed, arm_index, err = payload
                print(f"augment-compare: cell {job['cfg'].arms[arm_index].name} seed {seed} failed",
                      file=sys.stderr)
                raise err
            on_row(payload)
            remaining -= 1
    finally:
        for p in procs:
            if p.is_alive() and remaining:
                p.kill()
            p.join(timeout=30)
