"""train-gan: train a (class-conditional) GAN or a CycleGAN from one YAML config.

    train-gan --cfg sngan.yaml --out runs/sngan --set train.steps=200
    train-gan --resume runs/sngan            # continue to the configured final step
    train-gan --cfg sngan.yaml --dry-run     # print the resolved config
    train-gan --cfg cyclegan_cpu.yaml --out runs/he2ihc   # CycleGAN: same engine, same run dir

Bare config names are looked up in configs/. Also runs as ``python gans/train_gan.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python gans/train_gan.py` without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gans.config import DATA_ROOTS, RESUME_MAY_CHANGE  # noqa: E402
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
    with contextlib.ExitStack() as stack:
        if dist.main:                   # rank 0 alone writes the folder, and holds its lock throughout
            run = stack.enter_context(engine.open_run_dir(out, resume, overwrite, family.inputs(cfg)))
            if resume:
                check_resumable(cfg, run)
            else:   # first thing in the folder: a kill from here on can be continued with --resume
                atomic_write_text(run.config, configlib.dump_yaml(cfg))
        dist.barrier()
        run = engine.RunDir(Path(out))
        progress = progress and dist.main
        data = _rank0_first(dist, lambda: family.load_data(cfg, progress))
        if dist.main:
            write_provenance(run, family.provenance(cfg, data), resume)
        rt = Runtime.candidates(t.device, t.amp, t.channels_last, cpu_fast_path=family.cpu_bf16,
                                compile=t.compile)
        summary = engine.train(family.name, cfg, lambda rt: family.build_task(cfg, data, rt), run, rt,
                               seed=t.seed, resume=resume, progress=progress)
        if family.finish is not None and dist.main:
            summary["eval"] = family.finish(run.root, progress)
        return summary


def check_resumable(cfg, run: engine.RunDir) -> None:
    """A resume trains what the run trained: only the keys of RESUME_MAY_CHANGE (how long, how
    often to log or save, on which device) may differ from the run's own config.yaml."""
    saved = configlib.build(type(cfg), configlib.read_yaml(run.config), str(run.config))
    old, new = _flat(configlib.to_dict(saved)), _flat(configlib.to_dict(cfg))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and key not in RESUME_MAY_CHANGE and key not in DATA_ROOTS:
            raise configlib.ConfigError(key, f"cannot change on --resume (the run was trained with "
                                             f"{old.get(key)!r}, not {new.get(key)!r}); a resumed run must "
                                             "train what it trained: start a new run instead")


def write_provenance(run: engine.RunDir, info: dict, resume: bool) -> None:
    """RUN/data.json; a resume must find the very files the run was trained on (by sha256): the
    provenance gan-generate passes to the leakage guard is never rewritten to other data."""
    path = run.root / "data.json"
    if resume and path.is_file():
        old = json.loads(path.read_text())
        hashes = [k for k in info if k.startswith("files_sha256")]
        changed = {k: _diff(old.get(k, {}), info[k]) for k in hashes if old.get(k) != info[k]}
        if changed:
            key, (n, example) = next(iter(changed.items()))
            raise configlib.ConfigError("data", f"the training data of {run.root} changed since it started "
                                                f"({n} file(s) added, removed or modified, e.g. {example}); a "
                                                "resumed run must train on the same tiles: restore them, or "
                                                "start a new run")
        if old == info:
            return
    atomic_write_text(path, json.dumps(info, indent=1))


def _diff(old: dict, new: dict) -> tuple[int, str]:
    odd = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return len(odd), odd[0] if odd else "?"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


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
        run = engine.RunDir(Path(args.resume))
        if not run.config.is_file():
            raise engine.RunDirError(f"cannot resume: {args.resume} has no config.yaml (is it a histosynth "
                                     "run directory?)")
        cfg, _ = load_config(run.config, args.set)
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
    last = ", ".join(f"{k} {v:.4g}" for k, v in summary["last"].items() if k.startswith("loss") and "_" not in k[5:])
    best = f"; best KID {summary['best']:.4g} at step {summary['best_step']}" if summary["best"] is not None else ""
    print(f"train-gan: finished step {summary['step']} in {summary['seconds']:.0f} s on "
          f"{summary['device']} ({last}{best}); run directory: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("train-gan", lambda: _main(args), log_dir=args.out or args.resume)


if __name__ == "__main__":
    sys.exit(main())
