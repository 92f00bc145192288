"""Training throughput of each GAN family (default: 64 px, batch 64, CPU), written as JSON + Markdown.

    python benchmarks/bench_gans.py [--size 64] [--batch 64] [--iters 5] [--out benchmarks/results]

Each family is built from its shipped config (width ``model.ch``, ``n_dis``, loss, DiffAugment) on
the bundled demo tiles, with only size and batch replaced. One iteration = ``n_dis`` D steps + one
G step, exactly what the training loop runs. Medians over ``--iters`` iterations after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gans.config import GANConfig  # noqa: E402
from gans.losses import GANTask  # noqa: E402
from gans.train_gan import load_data  # noqa: E402
from histosynth import config as configlib  # noqa: E402
from histosynth.runtime import Runtime  # noqa: E402


def bench(family: str, size: int, batch: int, iters: int, device: str, ch: int | None) -> dict:
    sets = [f"data.image_size={size}", f"train.batch_size={batch}", f"train.device={device}",
            "data.cache=memory"]
    if ch:
        sets.append(f"model.ch={ch}")
    cfg, _, _ = configlib.load(GANConfig, family, sets)
    rt = Runtime.from_choices(cfg.train.device, cfg.train.amp, cfg.train.channels_last,
                              cpu_fast_path=True)
    torch.manual_seed(0)
    task = GANTask(cfg, load_data(cfg, progress=False), rt)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    d_times, g_times = [], []
    for i in range(iters + 1):
        d = sum(timed(task.d_step) for _ in range(task.n_dis))
        g = timed(task.g_step)
        if i:                                  # first iteration is warm-up
            d_times.append(d)
            g_times.append(g)
    d_med, g_med = statistics.median(d_times), statistics.median(g_times)
    it = d_med + g_med
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in task.modules.items()}
    return {"family": family, "image_size": size, "batch_size": batch, "ch": cfg.model.ch,
            "n_dis": task.n_dis, "loss": cfg.loss.type, "diffaugment": cfg.train.diffaugment,
            "params_G": params["G"], "params_D": params["D"], "runtime": rt.describe(),
            "s_per_d_step": d_med / task.n_dis, "s_per_g_step": g_med, "s_per_iteration": it,
            "real_img_per_s": batch * task.n_dis / it, "generated_img_per_s_in_g_step": batch / g_med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--families", nargs="+", default=["dcgan", "sngan", "wgan_gp"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ch", type=int, default=None, help="override every family's width")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    rows = [bench(f, args.size, args.batch, args.iters, args.device, args.ch) for f in args.families]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "iters": args.iters, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gan_throughput.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    lines = ["| family | size | batch | ch | n_dis | s / D step | s / G step | s / iteration | real img/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['image_size']} | {r['batch_size']} | {r['ch']} | {r['n_dis']} | "
              f"{r['s_per_d_step']:.3f} | {r['s_per_g_step']:.3f} | {r['s_per_iteration']:.3f} | "
              f"{r['real_img_per_s']:.1f} |" for r in rows]
    table = "\n".join(lines)
    (out / "gan_throughput.md").write_text(f"{meta}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
