"""train-gan: train a (class-conditional) GAN or a CycleGAN from one YAML config.

    train-gan --cfg sngan.yaml --out runs/sngan --set train.steps=200
    train-gan --resume runs/sngan            # continue to the configured final step
    train-gan --cfg sngan.yaml --dry-run     # print the resolved config
    train-gan --cfg cyclegan_cpu.yaml --out runs/he2ihc   # CycleGAN: same engine, same run dir

Bare config names are looked up in configs/. Also runs as ``python gans/train_gan.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python gans/train_gan.py` without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gans.registry import get_family  # noqa: E402
from histosynth import config as configlib  # noqa: E402
from histosynth import engine  # noqa: E402
from histosynth.checkpoint import atomic_write_text  # noqa: E402
from histosynth.cli import run_cli  # noqa: E402
from histosynth.distributed import setup as setup_distributed  # noqa: E402
from histosynth.runtime import Runtime, resolve_device  # noqa: E402


def load_config(path, overrides: list[str], base: dict | None = None):
    """Read a config (file or mapping), apply --set, build the config class of its family."""
    resolved = configlib.resolve_config_path(path) if path is not None else None
    raw = configlib.read_yaml(resolved) if resolved is not None else dict(base or {})
    touched = configlib.apply_overrides(raw, overrides)
    model = raw.get("model")
    name = model.get("family", "sngan") if isinstance(model, dict) else "sngan"
    source = "--set" if "model.family" in touched else (str(resolved) if resolved else None)
    try:
        family = get_family(str(name))
    except configlib.ConfigError as e:
        raise configlib.ConfigError(e.key, e.msg, source) from None
    cfg = configlib.build(family.config, raw, str(resolved) if resolved else None, touched)
    return cfg, resolved


def train_gan(cfg, out: str | Path, resume: bool = False, overwrite: bool = False,
              progress: bool = True) -> dict:
    """Train ``cfg`` (any registered family) into run directory ``out``; returns the engine's summary.

    Under ``torchrun`` every process calls this; rank 0 claims the folder, decodes the data
    first (the others then read its cache) and writes the files."""
    family = get_family(cfg.model.family)
    t = cfg.train
    dist = setup_distributed(resolve_device(t.device).type)
    if dist.main:
        run = engine.prepare_run_dir(out, resume, overwrite)
        if not resume:  # first thing in the folder: a kill from here on can be continued with --resume
            atomic_write_text(run.config, configlib.dump_yaml(cfg))
    dist.barrier()
    run = engine.RunDir(Path(out))
    progress = progress and dist.main
    data = _rank0_first(dist, lambda: family.load_data(cfg, progress))
    if dist.main:
        atomic_write_text(run.root / "data.json", json.dumps(family.provenance(cfg, data), indent=1))
    rt = Runtime.from_choices(t.device, t.amp, t.channels_last, cpu_fast_path=True)
    summary = engine.train(family.name, cfg, lambda rt: family.build_task(cfg, data, rt), run, rt,
                           seed=t.seed, resume=resume, progress=progress)
    if family.finish is not None and dist.main:
        summary["eval"] = family.finish(run.root, progress)
    return summary


def _rank0_first(dist, build):
    """Rank 0 decodes (and fills the disk cache) before the other ranks read it."""
    if dist.main:
        out = build()
    dist.barrier()
    return out if dist.main else build()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train-gan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", help="YAML config (bare names resolve in configs/)")
    p.add_argument("--out", help="run directory (default: runs/<config>-<time>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR to its final step")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _main(args: argparse.Namespace) -> int:
    if args.resume:
        if args.cfg:
            raise configlib.ConfigError("", "--resume uses the run's own config.yaml; drop --cfg "
                                            "(use --set to change a key, e.g. train.steps)")
        engine.prepare_run_dir(args.resume, resume=True, overwrite=False)   # is it a run at all?
        cfg, _ = load_config(Path(args.resume) / "config.yaml", args.set)
        out = args.resume
    else:
        if not args.cfg:
            raise configlib.ConfigError("", "give --cfg CONFIG (e.g. --cfg sngan.yaml) or --resume RUN_DIR")
        cfg, path = load_config(args.cfg, args.set)
        out = args.out or f"runs/{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.dry_run:
        print(configlib.dump_yaml(cfg), end="")
        return 0
    summary = train_gan(cfg, out, resume=bool(args.resume), overwrite=args.overwrite,
                        progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")):         # torchrun: rank 0 reports
        return 0
    last = ", ".join(f"{k} {v:.4g}" for k, v in summary["last"].items() if k in ("loss_d", "loss_g"))
    best = f"; best KID {summary['best']:.4g} at step {summary['best_step']}" if summary["best"] is not None else ""
    print(f"train-gan: finished step {summary['step']} in {summary['seconds']:.0f} s on "
          f"{summary['device']} ({last}{best}); run directory: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("train-gan", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
