"""train-gan: train a (class-conditional) GAN or a CycleGAN from one YAML config.

    train-gan --cfg sngan.yaml --out runs/sngan --set train.steps=200
    train-gan --resume runs/sngan            # continue to the configured final step
    train-gan --cfg sngan.yaml --dry-run     # print the resolved config
    train-gan --cfg cyclegan_cpu.yaml --out runs/he2ihc   # CycleGAN: same loop, same run dir

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

from gans.config import GANConfig  # noqa: E402
from gans.cyclegan import CycleGANConfig  # noqa: E402
from gans.loop import NonFiniteLossError, RunDirError, RunPaths, prepare_run_dir, run_training  # noqa: E402
from histosynth import config as configlib  # noqa: E402
from histosynth.cli import register_user_error, run_cli  # noqa: E402
from histosynth.checkpoint import atomic_write_text, sha256_file  # noqa: E402
from histosynth.data import TileCache, default_cache_dir  # noqa: E402
from histosynth.distributed import setup as setup_distributed  # noqa: E402
from histosynth.images import native_size  # noqa: E402
from histosynth.paths import resolve_data_path  # noqa: E402
from histosynth.runtime import resolve_device  # noqa: E402

register_user_error(RunDirError, NonFiniteLossError)


def _cache_dir(d) -> Path | None:
    if d.cache != "disk":
        return None
    return Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir()


def load_data(cfg: GANConfig, progress: bool = True) -> TileCache:
    d = cfg.data
    ref = str(resolve_data_path(d.stain_reference)) if d.stain_reference else None
    return TileCache.build(resolve_data_path(d.root), d.image_size, d.stain_norm, ref,
                           _cache_dir(d), progress=progress)


def load_domains(cfg: CycleGANConfig, progress: bool = True) -> tuple[TileCache, TileCache]:
    """The two unpaired CycleGAN domains, cached at ``data.load_size`` (0: native size)."""
    d = cfg.data
    out = []
    for key in ("root_a", "root_b"):
        root = resolve_data_path(getattr(d, key))
        size = d.load_size or native_size(root)
        if size < d.image_size:
            raise configlib.ConfigError("data.image_size", f"{d.image_size} is larger than the "
                                        f"images of data.{key} ({size} px); lower it")
        out.append(TileCache.build(root, size, cache_dir=_cache_dir(d), progress=progress, layout="flat"))
    return out[0], out[1]


def config_class(family: str):
    """CycleGAN has its own sections (two domains, cycle losses); every other family is a GAN."""
    return CycleGANConfig if family == "cyclegan" else GANConfig


def load_config(path, overrides: list[str], base: dict | None = None):
    """Read a config (file or mapping), apply --set, build the config class its family needs."""
    resolved = configlib.resolve_config_path(path) if path is not None else None
    raw = configlib.read_yaml(resolved) if resolved is not None else dict(base or {})
    touched = configlib.apply_overrides(raw, overrides)
    model = raw.get("model")
    family = model.get("family", "sngan") if isinstance(model, dict) else "sngan"
    cfg = configlib.build(config_class(str(family)), raw, str(resolved) if resolved else None, touched)
    return cfg, resolved


def train_gan(cfg: GANConfig | CycleGANConfig, out: str | Path, resume: bool = False,
              overwrite: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into run directory ``out``; returns the loop's summary.

    Under ``torchrun`` every process calls this; rank 0 claims the folder, decodes the data
    first (the others then read its cache) and writes the files."""
    dist = setup_distributed(resolve_device(cfg.train.device).type)
    if dist.main:
        paths = prepare_run_dir(out, resume, overwrite)
        if not resume:  # first thing in the folder: a kill from here on can be continued with --resume
            atomic_write_text(paths.config, configlib.dump_yaml(cfg))
    dist.barrier()
    if not dist.main:
        paths = RunPaths(Path(out))
    progress = progress and dist.main
    if isinstance(cfg, CycleGANConfig):
        from gans.cyclegan import CycleGANTask
        from gans.cyclegan_eval import evaluate_run

        data_a, data_b = _rank0_first(dist, lambda: load_domains(cfg, progress))
        if dist.main:
            _write_data_json(paths, {"root_a": str(resolve_data_path(cfg.data.root_a)), "count_a": len(data_a),
                                     "skipped_a": data_a.skipped,
                                     "root_b": str(resolve_data_path(cfg.data.root_b)), "count_b": len(data_b),
                                     "skipped_b": data_b.skipped})
        summary = run_training(cfg, lambda c, rt: CycleGANTask(c, data_a, data_b, rt), paths,
                               "cyclegan", resume=resume, progress=progress)
        if dist.main:
            summary["eval"] = evaluate_run(paths.root, progress=progress)
        return summary
    from gans.losses import GANTask

    data = _rank0_first(dist, lambda: load_data(cfg, progress))
    root = resolve_data_path(cfg.data.root)
    # sha256 of every training file: gan-generate copies them into the synthetic set's
    # source.json, so augment-compare can prove no validation/test image trained the generator
    if dist.main:
        _write_data_json(paths, {"root": str(root.resolve()), "classes": data.classes,
                                 "counts": data.class_counts(), "skipped": data.skipped,
                                 "files_sha256": {f: sha256_file(root / f) for f in data.files}})
    return run_training(cfg, lambda c, rt: GANTask(c, data, rt), paths, cfg.model.family,
                        resume=resume, progress=progress)


def _rank0_first(dist, build):
    """Rank 0 decodes (and fills the disk cache) before the other ranks read it."""
    if dist.main:
        out = build()
    dist.barrier()
    return out if dist.main else build()


def _write_data_json(paths, info: dict) -> None:
    atomic_write_text(paths.root / "data.json", json.dumps(info, indent=1))


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
        prepare_run_dir(args.resume, resume=True, overwrite=False)   # is it a run at all?
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
    print(f"train-gan: finished step {summary['step']} in {summary['seconds']:.0f} s on "
          f"{summary['device']} ({last}); run directory: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("train-gan", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
