"""Fault-injection harness: kill training runs at random points and check that resuming loses nothing.

    python tests/fault_harness.py --kills 20 --out /tmp/faults          # every job, 20 kills each
    python tests/fault_harness.py --jobs dcgan compare --kills 3        # a subset (what CI runs)

For each job (dcgan, sngan, wgan_gp, cyclegan, acgan (sngan with an auxiliary classifier),
diffusion (with KID evaluations and best.pt), pix2pix (mask -> image pairs): train-gan;
ddp_wgan_gp: train-gan on 2 gloo processes under torchrun, the whole process tree killed as a
pre-empted job is; classifier: an augment-compare cell killed mid-training; compare: a 2 x 2
augment-compare run; segmentation: augment-compare with task: segmentation, a U-Net cell and a
stain-normalised one) the harness runs it once uninterrupted,
then again under fire (as many runs as it takes to land the kills): each attempt is SIGKILLed either after a random delay or, every other
attempt, inside an atomic write (HISTOSYNTH_FAILPOINT: after the temporary file is written,
before it replaces the target; injected by tests/failpoint/sitecustomize.py, which the harness
puts on PYTHONPATH: histosynth has no fault hook of its own) and then restarted with the resume
command, until it finishes.
Checked at the end: the run reached its configured end, every checkpoint loads
(``weights_only=True``), no temporary file is left, no traceback was printed by a resume, and
the final weights (GANs: G, D, EMA, optimizers; classifier/compare: best weights, every
epoch's losses and the test metrics) equal the uninterrupted run's. Writes a JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import TINY_BACKBONE  # noqa: E402

SHARED = Path(os.environ.get("HISTOSYNTH_SHARED_DATA", ROOT.parent / "shared" / "data"))
TILES = SHARED / "crc_mini" if (SHARED / "crc_mini").is_dir() else ROOT / "data" / "lung_demo" / "train"
PAIRS = ROOT / "data" / "monuseg_demo"
STAIN = ((SHARED / "stain" / "trainA_he", SHARED / "stain" / "trainB_ihc") if (SHARED / "stain").is_dir()
         else (ROOT / "data/lung_demo/train/lung_aca", ROOT / "data/lung_demo/train/lung_n"))


def _sets(items) -> list[str]:
    return sum((["--set", s] for s in items), [])


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts each worker in a session of its own, so
    killing torchrun's process group would leave the workers running)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every descendant at once (a pre-empted job); returns the pids."""
    tree = process_tree(pid)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def _gan_job(family: str, procs: int = 1, root: Path = TILES, **extra):
    """train-gan of ``family`` from its own smoke settings, longer, on the harness's tiles (or pairs)."""
    from gans.registry import families
    fam = families()[family]
    sets = [*fam.smoke, f"data.root={root}", f"train.steps={200 if procs == 1 else 60}",
            "train.checkpoint_every=4", "train.sample_every=50", "train.log_every=2",
            *(f"{k}={v}" for k, v in extra.items())]
    launch = [sys.executable, "-m", "gans.train_gan"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
        "-m", "gans.train_gan"]

    def start(out):
        return [*launch, "--cfg", fam.config_file, "--out", str(out), "--no-progress", *_sets(sets)]

    def resume(out):
        return [*launch, "--resume", str(out), "--no-progress"]
    return start, resume, _gan_final, procs > 1


def _cyclegan_job():
    from test_cyclegan import tiny_cycle_sets
    sets = tiny_cycle_sets(*STAIN, **{"train.steps": 60, "train.checkpoint_every": 3, "train.sample_every": 30,
                                      "eval.max_images": 1})

    def start(out):
        return [sys.executable, "-m", "gans.train_gan", "--cfg", "cyclegan_cpu", "--out", str(out), "--no-progress",
                *_sets(sets)]

    def resume(out):
        return [sys.executable, "-m", "gans.train_gan", "--resume", str(out), "--no-progress"]
    return start, resume, _gan_final, False


def _compare_job(arms: str, seeds: str, epochs: int, variant: str = "efficientnet-b0"):
    return _compare_run("compare_demo", [
        f"data.root={TILES}", "data.split=stratified", "generators={}", f"arms={arms}", f"seeds={seeds}",
        f"downstream.model.variant={variant}", "downstream.model.image_size=32", "downstream.model.bn_momentum=0.5",
        "downstream.train.batch_size=8",
        f"downstream.train.epochs={epochs}", "downstream.train.patience=0", "downstream.train.min_epochs=0",
        "downstream.train.device=cpu"])


def _segmentation_job():
    """augment-compare with task: segmentation on the demo pairs: a U-Net cell and a
    stain-normalised one (its reference mosaic and normalised caches written on the way)."""
    return _compare_run("compare_monuseg", [
        f"data.root={PAIRS}", "generators={}", "seeds=[0]",
        "arms=[{name: real_only, augment: classic}, {name: stain_norm, stain_norm: macenko}]",
        "downstream.model.tile_size=128", "downstream.model.image_size=64", "downstream.train.steps=40",
        "downstream.train.batch_size=4", "downstream.train.evaluate_every=5", "downstream.train.warmup_steps=4",
        "downstream.train.device=cpu", "downstream.eval.window=256"])


def _compare_run(config: str, sets: list[str]):
    def start(out):
        return [sys.executable, "-m", "experiments.augment_compare", "--cfg", config, "--out", str(out),
                "--no-progress", *_sets(sets)]
    return start, start, _compare_final, False


JOBS = {
    "dcgan": lambda: _gan_job("dcgan"), "sngan": lambda: _gan_job("sngan"),
    "wgan_gp": lambda: _gan_job("wgan_gp"), "cyclegan": _cyclegan_job,
    "acgan": lambda: _gan_job("sngan", **{"model.conditioning": "ac"}),
    "ada_lecam": lambda: _gan_job("sngan", **{"train.ada": "on", "train.ada_kimg": 1, "loss.lecam_weight": 0.3,
                                              "train.diffaugment": "''"}),
    "diffusion": lambda: _gan_job("diffusion", **{"train.steps": 100, "train.kid_every": 20, "train.kid_samples": 8}),
    "ddp_wgan_gp": lambda: _gan_job("wgan_gp", procs=2),
    "pix2pix": lambda: _gan_job("pix2pix", root=PAIRS / "train", **{"train.steps": 60}),
    "segmentation": _segmentation_job,
    "classifier": lambda: _compare_job("[{name: real_only, augment: classic}]", "[0]", 12),
    "compare": lambda: _compare_job("[{name: real_only}, {name: balanced, sampler: balanced}]", "[0, 1]", 4,
                                    TINY_BACKBONE),                 # the runner's resume; any backbone
}


def _gan_final(out: Path) -> dict:
    from histosynth.checkpoint import safe_load
    ck = safe_load(out / "checkpoints" / "last.pt")
    return {"step": ck["step"], "tensors": {f"{part}.{name}.{k}": v for part in ("modules", "ema")
                                            for name, sd in ck[part].items() for k, v in sd.items()},
            "optim": ck["optimizers"], "history": ck["engine"]["history"]}


def _compare_final(out: Path) -> dict:
    from histosynth.checkpoint import safe_load
    from histosynth.engine import RunDir
    rows = sorted(csv.DictReader(open(out / "results.csv")), key=lambda r: (r["arm"], int(r["seed"])))
    tensors, history = {}, {}
    for r in rows:
        cell = RunDir(out / r["cell_dir"])
        tensors.update({f"{r['cell_dir']}.{k}": v for k, v in safe_load(cell.best)["modules"]["model"].items()})
        history[r["cell_dir"]] = safe_load(cell.last)["engine"]["history"]
    metrics = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    return {"step": len(rows), "tensors": tensors, "history": history, "metrics": metrics}


def _equal(a: dict, b: dict) -> list[str]:
    import torch
    bad = [k for k, v in a["tensors"].items() if k not in b["tensors"] or not torch.equal(v, b["tensors"][k])]
    for key in ("history", "metrics", "step"):
        if a.get(key) != b.get(key):
            bad.append(key)
    return bad


def _no_temps(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*.tmp")]


def _all_checkpoints_load(out: Path) -> list[str]:
    from histosynth.checkpoint import CheckpointError, safe_load
    bad = []
    for p in out.rglob("*.pt"):
        try:
            safe_load(p)
        except CheckpointError as e:
            bad.append(f"{p}: {e}")
    return bad


def _killed(proc, err: str, distributed: bool) -> bool:
    if proc.returncode == -signal.SIGKILL:
        return True
    # torchrun reports a worker that killed itself inside a write as a failed child
    return distributed and proc.returncode != 0 and "Signal 9 (SIGKILL)" in err


def _faulted_round(start, resume, out: Path, env: dict, kills: int, rng: random.Random,
                   distributed: bool = False) -> dict:
    """One run to completion under fire: up to ``kills`` SIGKILLs, alternating a random moment and
    a moment inside an atomic write, each followed by the resume command."""
    injected = in_write = 0
    tracebacks = []
    cmd = start(out)
    while True:
        e = dict(env)
        if injected < kills and injected % 2 == 1:          # kill inside an atomic write
            e["HISTOSYNTH_FAILPOINT"] = str(rng.randint(1, 12))
        proc = subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if injected < kills and "HISTOSYNTH_FAILPOINT" not in e:
            try:
                # past the interpreter's start-up (~2-3 s; torchrun's ~5 s), a little way into the work
                proc.wait(timeout=rng.uniform(5.0, 10.0) if distributed else rng.uniform(2.0, 5.0))
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
        _, err = proc.communicate()
        if _killed(proc, err, distributed):
            injected += 1
            in_write += "HISTOSYNTH_FAILPOINT" in e
            # killed before the run wrote its config (during interpreter start-up): start again
            cmd = resume(out) if (out / "config.yaml").is_file() else start(out)
            continue
        if "Traceback" in err:
            tracebacks.append(err[-1500:])
        if proc.returncode == 0:
            return {"kills": injected, "in_write": in_write, "tracebacks": tracebacks}
        raise RuntimeError(f"a resume exited {proc.returncode}: {err[-1500:]}")


def run_job(name: str, kills: int, work: Path, seed: int) -> dict:
    """The uninterrupted run, then faulted runs (as many rounds as it takes to inject ``kills``
    SIGKILLs: a short job can finish before all of them land), each compared with it."""
    start, resume, final, distributed = JOBS[name]()   # distributed: torchrun, several processes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "failpoint")]),
           "HISTOSYNTH_CACHE": str(work / "cache")}
    ref = work / f"{name}-ref"
    shutil.rmtree(ref, ignore_errors=True)
    t0 = time.time()
    subprocess.run(start(ref), env=env, check=True, capture_output=True, cwd=ROOT)
    t_ref = time.time() - t0
    want = final(ref)
    rng = random.Random(seed)
    total = {"kills": 0, "in_write": 0, "rounds": 0, "tracebacks": 0, "reached_end": True, "identical": True,
             "differences": [], "temps": [], "bad": []}
    while total["kills"] < kills or total["rounds"] == 0:
        out = work / f"{name}-faults-{total['rounds']}"
        shutil.rmtree(out, ignore_errors=True)
        r = _faulted_round(start, resume, out, env, kills - total["kills"], rng, distributed)
        got = final(out)
        diff = _equal(want, got)
        total["kills"] += r["kills"]
        total["in_write"] += r["in_write"]
        total["rounds"] += 1
        total["tracebacks"] += len(r["tracebacks"])
        total["reached_end"] &= got["step"] == want["step"]
        total["identical"] &= not diff
        total["differences"] += diff[:5]
        total["temps"] += _no_temps(out)
        total["bad"] += _all_checkpoints_load(out)
        if r["kills"] == 0:                 # the job is too short to be hit at all
            break
    return {"job": name, "kills": total["kills"], "kills_inside_a_write": total["in_write"],
            "rounds": total["rounds"], "reached_end": total["reached_end"],
            "identical_to_uninterrupted": total["identical"], "differences": total["differences"][:5],
            "tracebacks": total["tracebacks"], "temp_files_left": total["temps"],
            "unloadable_checkpoints": total["bad"], "uninterrupted_s": round(t_ref, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="results folder (default: a temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="histosynth-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(args.jobs):
        print(f"fault harness: {name} ({args.kills} kills) ...", file=sys.stderr, flush=True)
        rows.append(run_job(name, args.kills, work, args.seed + i))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (work / "faults.json").write_text(json.dumps(rows, indent=1))
    table = ["| job | kills | inside a write | faulted runs | reached end | identical weights | tracebacks | temp files | bad checkpoints |",
             "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['job']} | {r['kills']} | {r['kills_inside_a_write']} | {r['rounds']} | {r['reached_end']} | "
              f"{r['identical_to_uninterrupted']} | {r['tracebacks']} | {len(r['temp_files_left'])} | "
              f"{len(r['unloadable_checkpoints'])} |" for r in rows]
    (work / "faults.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    ok = all(r["reached_end"] and r["identical_to_uninterrupted"] and not r["tracebacks"] and not r["temp_files_left"]
             and not r["unloadable_checkpoints"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
