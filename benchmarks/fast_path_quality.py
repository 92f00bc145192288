"""Does the fast path cost quality? The same short SNGAN run in fp32 NCHW and on the default path.

    python benchmarks/fast_path_quality.py [--steps 300]   # -> benchmarks/results/fast_path_quality.{json,png}

Trains configs/sngan.yaml on the bundled demo tiles twice (train.amp/channels_last off, then
auto: bf16 autocast + channels_last where the device supports it), logging KID every 50 steps,
and plots loss_d, loss_g and KID of both runs side by side with their seconds per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from gans.train_gan import load_config, train_gan
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    series = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, mode in (("fp32 NCHW", "off"), ("default (fast) path", "auto")):
            cfg, _ = load_config("sngan", [f"train.steps={args.steps}", "train.kid_every=50",
                                           f"train.amp={mode}", f"train.channels_last={mode}"])
            run = Path(tmp) / mode
            summary = train_gan(cfg, run, progress=True)
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            series[name] = {"runtime": summary["device"], "seconds": summary["seconds"], "rows": rows}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for name, s in series.items():
        for ax, key in zip(axes, ("loss_d", "loss_g", "kid")):
            pts = [(r["step"], r[key]) for r in s["rows"] if key in r]
            ax.plot(*zip(*pts), label=f"{name}: {s['runtime']}, {s['seconds']:.0f} s", marker="o" if key == "kid" else None)
            ax.set_title(key)
            ax.set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "fast_path_quality.png", dpi=100)
    (out / "fast_path_quality.json").write_text(json.dumps(series, indent=1))
    for name, s in series.items():
        kid = [(r["step"], round(r["kid"], 4)) for r in s["rows"] if "kid" in r]
        print(f"{name} ({s['runtime']}): {s['seconds']:.0f} s; KID {kid}")


if __name__ == "__main__":
    main()
