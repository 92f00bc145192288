"""Which generator is worth its CPU time? Every family trained for the same wall time, scored as it goes.

    python benchmarks/synthesis.py                        # 5 min per family on ../shared/data/lung/train
    python benchmarks/synthesis.py --minutes 2 --families dcgan diffusion --data data/lung_demo/train

For each family (DCGAN, SNGAN, WGAN-GP, ACGAN = SNGAN with an auxiliary classifier, the diffusion
model) at 64 px with its shipped CPU widths: ``train-gan`` runs until ``--minutes`` of wall time
have passed (stopped by SIGTERM, as a scheduler would), keeping a weights snapshot every
``--snapshot`` steps (each family its own pace by default); ``--points`` of them, evenly spread,
are then scored in the **histology feature space** (the EfficientNet trained on the real training
tiles, metrics/histology.py): KID and FID of
``--samples`` generated tiles (equal per class) against up to 1000 real training tiles, beside the
seconds of training it took (from metrics.jsonl). Then the sampling throughput of each final model
(tiles/s; the diffusion model at 5, 10, 20 and 50 DPM-Solver++ steps) and the cost of selective
augmentation per kept tile (metrics/selection.py, keep 0.5; the classifier is trained once per
training split and cached, its cost reported apart).

Writes ``OUT/synthesis.json``, ``synthesis.md`` and ``synthesis.png`` (KID and FID against seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_LUNG = ROOT.parent / "shared" / "data" / "lung" / "train"
FAMILIES = {   # train-gan --cfg, its --set at 64 px, steps between snapshots (~1/10 of 3 min on 2 cores)
    "dcgan": ("dcgan", ["data.image_size=64"], 200),
    "sngan": ("sngan", ["data.image_size=64"], 50),
    "wgan_gp": ("wgan_gp", ["data.image_size=64"], 50),
    "acgan": ("sngan", ["data.image_size=64", "model.conditioning=ac"], 50),
    "diffusion": ("diffusion", ["data.image_size=64", "model.channels=[32, 64, 64, 64]", "train.warmup_steps=100"], 20),
}


def train_for(name: str, data: Path, out: Path, minutes: float, snapshot: int | None, env: dict) -> float:
    """Train ``name`` for ``minutes`` of wall time; returns the seconds it ran."""
    cfg, sets, every = FAMILIES[name]
    snapshot = snapshot or every
    sets = sets + [f"data.root={data}", "train.steps=1000000", f"train.snapshot_every={snapshot}",
                   f"train.checkpoint_every={snapshot}", "train.sample_every=1000000", "train.log_every=5"]
    cmd = [sys.executable, "-m", "gans.train_gan", "--cfg", cfg, "--out", str(out), "--no-progress",
           *sum((["--set", s] for s in sets), [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    if proc.returncode not in (0, 143, -signal.SIGTERM):
        raise RuntimeError(f"{name}: train-gan exited {proc.returncode}: {err[-1500:]}")
    return time.perf_counter() - t0


def elapsed(run: Path) -> dict[int, float]:
    """Seconds of training at every logged step (sum of each interval's steps x seconds/step)."""
    out, total, prev = {}, 0.0, 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "sec_per_step" in row:
            total += row["sec_per_step"] * (row["step"] - prev)
            prev = row["step"]
            out[row["step"]] = total
    return out


def score(run: Path, samples: int, ext, real_feats, options: dict, points: int) -> list[dict]:
    """KID and FID (histology features) of ``points`` snapshots of ``run``, evenly spread, the last included."""
    import torch
    from gans.registry import load_run
    from histosynth.roles import Generator
    from metrics.distribution import fid, kid

    seconds = elapsed(run)
    rows = []
    steps = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))
    if len(steps) > points:
        steps = [steps[round(i * (len(steps) - 1) / (points - 1))] for i in range(points)]
    for step in steps:
        gen, _, _ = load_run(run, Generator, checkpoint=step)
        labels = [i % len(gen.classes) for i in range(samples)]
        t = time.perf_counter()
        tiles = torch.cat([gen.sample(labels[s:s + 64], range(s, min(s + 64, samples)), **options)
                           for s in range(0, samples, 64)])
        rate = samples / (time.perf_counter() - t)
        f = ext(tiles).double()
        rows.append({"step": step, "seconds": seconds.get(step, max(seconds.values(), default=0.0)),
                     "kid": kid(real_feats, f), "fid": fid(real_feats, f), "tiles_per_s": rate})
    return rows


def sampling_rates(run: Path, name: str) -> list[dict]:
    from gans.registry import load_run
    from histosynth.roles import Generator
    gen, _, _ = load_run(run, Generator)
    out = []
    for steps in ((5, 10, 20, 50) if name == "diffusion" else (None,)):
        opts = {"steps": steps, "guidance_scale": 1.5} if steps else {}
        gen.sample([0] * 8, range(8), **opts)                       # warm-up
        t = time.perf_counter()
        gen.sample([i % len(gen.classes) for i in range(64)], range(64), **opts)
        out.append({"family": name, "sampler_steps": steps, "tiles_per_s": 64 / (time.perf_counter() - t)})
    return out


def filter_cost(run: Path, name: str, data: Path, work: Path, per_class: int = 50) -> dict:
    from gans.generate import generate
    from metrics.selection import FilterConfig, select_folder
    spec = FilterConfig(by="both", keep=0.5)
    t = time.perf_counter()
    generate(run, work / f"{name}-cand", spec.candidates(per_class), progress=False,
             options={"steps": 10, "guidance_scale": 1.5} if name == "diffusion" else None)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = select_folder(work / f"{name}-cand", work / f"{name}-sel", data, spec, progress=False)
    sel_s = time.perf_counter() - t
    kept = sum(c["kept"] for c in summary["counts"].values())
    return {"family": name, "kept": kept, "candidates": sum(c["candidates"] for c in summary["counts"].values()),
            "generate_s_per_kept": gen_s / kept, "select_s_per_kept": sel_s / kept}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED_LUNG if SHARED_LUNG.is_dir() else ROOT / "data/lung_demo/train"))
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--minutes", type=float, default=5.0, help="wall time of training per family")
    ap.add_argument("--snapshot", type=int, default=None,
                    help="steps between snapshots for every family (default: each family's own, see FAMILIES)")
    ap.add_argument("--points", type=int, default=8, help="snapshots scored per family, evenly spread")
    ap.add_argument("--samples", type=int, default=150, help="generated tiles per scored snapshot")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from classifier.train import checkpoint_info
    from histosynth.data import TileCache, default_cache_dir
    from histosynth.engine import load_checkpoint
    from histosynth.runtime import cpu_facts
    from metrics.features import ClassifierExtractor
    from metrics.histology import histology_weights

    data = Path(args.data)
    t = time.perf_counter()
    best, note = histology_weights(data, progress=False)
    extractor_s = time.perf_counter() - t
    info = checkpoint_info(load_checkpoint(best))
    ext = ClassifierExtractor(best, info["variant"], int(info["image_size"]), sphere=True)   # the report's space
    real = TileCache.build(data, 64, cache_dir=default_cache_dir(), progress=False)
    pick = np.random.default_rng(0).permutation(len(real))[:1000]
    with torch.no_grad():
        real_feats = torch.cat([ext(torch.from_numpy(np.array(real.images[np.sort(pick[s:s + 128])])))
                                for s in range(0, len(pick), 128)]).double()
    curves, rates, costs = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for name in args.families:
            print(f"synthesis: {name} for {args.minutes} min ...", file=sys.stderr, flush=True)
            run = Path(tmp) / name
            wall = train_for(name, data, run, args.minutes, args.snapshot, env)
            opts = {"steps": 10, "guidance_scale": 1.5} if name == "diffusion" else {}
            curves[name] = {"wall_s": wall, "points": score(run, args.samples, ext, real_feats, opts, args.points)}
            rates += sampling_rates(run, name)
            costs.append(filter_cost(run, name, data, Path(tmp)))
            print(json.dumps({name: curves[name]["points"][-1:]}), file=sys.stderr, flush=True)
    cpu = cpu_facts()
    meta = {"data": str(data), "minutes": args.minutes, "samples": args.samples, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu["cpu"], "flags": cpu["cpu_flags"],
            "feature_space": note, "extractor_training_s": extractor_s, "time": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthesis.json").write_text(json.dumps({"meta": meta, "curves": curves, "sampling": rates,
                                                    "filter": costs}, indent=1))
    (out / "synthesis.md").write_text(markdown(meta, curves, rates, costs))
    plot(curves, out / "synthesis.png", meta)
    print((out / "synthesis.md").read_text())
    return 0


def markdown(meta, curves, rates, costs) -> str:
    L = [f"{meta['minutes']} min of training per family on {meta['data']} (64 px), {meta['cpu']} "
         f"({', '.join(meta['flags'])}), torch {meta['torch']}, {meta['threads']} threads, {meta['time']}. "
         f"KID / FID of {meta['samples']} tiles against up to 1000 real training tiles in the histology "
         f"feature space ({meta['feature_space']}; trained in {meta['extractor_training_s']:.0f} s, once).", "",
         "| family | steps in the budget | KID at the end | best KID (step) | FID at the end |", "|---|---|---|---|---|"]
    for name, c in curves.items():
        p = c["points"]
        if not p:
            L.append(f"| {name} | no snapshot | | | |")
            continue
        b = min(p, key=lambda r: r["kid"])
        L.append(f"| {name} | {p[-1]['step']} | {p[-1]['kid']:.4g} | {b['kid']:.4g} ({b['step']}) | {p[-1]['fid']:.4g} |")
    L += ["", "| family | sampler steps | tiles/s |", "|---|---|---|"]
    L += [f"| {r['family']} | {r['sampler_steps'] or 'one pass'} | {r['tiles_per_s']:.1f} |" for r in rates]
    L += ["", "| family | candidates -> kept | generation s / kept tile | selection s / kept tile |", "|---|---|---|---|"]
    L += [f"| {c['family']} | {c['candidates']} -> {c['kept']} | {c['generate_s_per_kept']:.3f} | "
          f"{c['select_s_per_kept']:.3f} |" for c in costs]
    return "\n".join(L) + "\n"


def plot(curves, path: Path, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, c in curves.items():
        pts = c["points"]
        for ax, key in zip(axes, ("kid", "fid")):
            ax.plot([p["seconds"] / 60 for p in pts], [p[key] for p in pts], marker="o", ms=3, label=name)
    axes[0].set_yscale("symlog", linthresh=1e-2)     # KID can dip below 0; an untrained model's is huge
    axes[1].set_yscale("log")
    for ax, key in zip(axes, ("KID", "FID")):
        ax.set_xlabel("minutes of training (2 CPU cores)")
        ax.set_title(f"{key}, histology features (lower is better)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
