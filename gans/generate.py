"""gan-generate: write N synthetic tiles per class from a trained run as an ImageFolder tree.

    gan-generate --run runs/sngan --per-class 50 --out synth/
    gan-generate --run runs/sngan --per-class 50 --out synth/ --filter confidence --keep 0.5 --train data/train

Writes ``OUT/<class>/<class>_00000.png ...`` and ``OUT/manifest.csv`` with one row per tile: file,
class, seed (the tile's own noise seed: the same seed gives the same tile), checkpoint sha256,
step, family and the tile's own sha256 (so later stages can verify the set is untouched), and
``OUT/source.json``: the generator's run and the sha256 of every file it was trained on (so
augment-compare can refuse a generator that saw validation or test images).
Also runs as ``python -m gans.generate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from gans.registry import load_run
from histosynth import config as configlib
from histosynth.checkpoint import atomic_write_csv, atomic_write_text, sha256_file
from histosynth.cli import run_cli
from histosynth.engine import run_inputs
from histosynth.paths import claim_output_dir, safe_name
from histosynth.roles import Generator
from histosynth.runtime import resolve_device

MANIFEST_FIELDS = ["file", "class", "seed", "checkpoint_sha256", "step", "family", "sha256"]


def generate(run: str | Path, out: str | Path, per_class: int | dict[str, int], seed: int = 0,
             weights: str = "ema", batch_size: int = 64, overwrite: bool = False,
             device: str = "auto", progress: bool = True, checkpoint: str | int = "last",
             options: dict | None = None) -> Path:
    """Write ``per_class`` tiles of every class (or as many per class as a mapping says; classes
    it leaves out get none) into ``out``; returns the manifest path. Tile ``k`` (in class order)
    uses noise seed ``seed + k``.
    ``options`` go to the generator's ``sample`` (a diffusion model's steps, guidance_scale ...)."""
    counts = per_class if isinstance(per_class, dict) else None
    if counts is None and per_class < 1:
        raise configlib.ConfigError("--per-class", f"must be >= 1, got {per_class}")
    if batch_size < 1:
        raise configlib.ConfigError("--batch-size", f"must be >= 1, got {batch_size}")
    gen, ck, ck_path = load_run(run, Generator, checkpoint, weights, resolve_device(device))
    classes = [safe_name(c, "class name (from the checkpoint)") for c in gen.classes]
    out = claim_output_dir(out, overwrite, inputs=run_inputs(run))
    ck_sha = sha256_file(ck_path)
    wanted = [(ci, c, counts.get(c, 0) if counts is not None else per_class) for ci, c in enumerate(classes)]
    jobs = [(ci, c, j) for ci, c, n in wanted for j in range(n)]
    jobs = [(ci, c, j, seed + k) for k, (ci, c, j) in enumerate(jobs)]
    if not jobs:
        raise configlib.ConfigError("--per-class", f"asks for no tile of the generator's classes ({', '.join(classes)})")
    rows = []
    bar = tqdm(total=len(jobs), desc="generating", unit="tile", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        imgs = gen.sample([ci for ci, _, _, _ in chunk], [s for _, _, _, s in chunk], **(options or {}))
        imgs = imgs.permute(0, 2, 3, 1).numpy()                      # B x S x S x 3 uint8
        for (_, c, j, s), img in zip(chunk, imgs):
            rel = Path(c) / f"{c}_{j:05d}.png"
            (out / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(out / rel)
            rows.append({"file": rel.as_posix(), "class": c, "seed": s, "checkpoint_sha256": ck_sha,
                         "step": int(ck["step"]), "family": ck["task"],
                         "sha256": sha256_file(out / rel)})
        bar.update(len(chunk))
    bar.close()
    manifest = out / "manifest.csv"
    atomic_write_csv(manifest, rows, MANIFEST_FIELDS)
    atomic_write_text(out / "source.json", json.dumps(_source(run, ck, ck_sha), indent=1))
    return manifest


def generate_selected(args: argparse.Namespace, options: dict) -> dict:
    """``--filter``: OUT/candidates (every generated tile), OUT/selected (the kept ones)."""
    from metrics.selection import FilterConfig, select_folder

    if not args.train:
        raise configlib.ConfigError("--train", "--filter needs --train: the real training split the scoring "
                                               "classifier learns from (never validation or test)")
    spec = configlib.build(FilterConfig, {"by": args.filter, "keep": None if args.min_confidence is not None else args.keep,
                                          "min_confidence": args.min_confidence})
    out = claim_output_dir(args.out, args.overwrite, inputs={**run_inputs(args.run), "--train": args.train})
    generate(args.run, out / "candidates", spec.candidates(args.per_class), args.seed, args.weights, args.batch_size,
             False, args.device, not args.no_progress, args.checkpoint, options)
    return select_folder(out / "candidates", out / "selected", args.train, spec, progress=not args.no_progress)


def parse_options(items: list[str]) -> dict:
    """``KEY=VALUE`` strings (values read as YAML: 20, 2.5, ddim) as a mapping."""
    out = {}
    for item in items:
        if "=" not in item:
            raise configlib.ConfigError("--option", f"expects KEY=VALUE (e.g. steps=20), got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = configlib.parse_yaml(value) if value.strip() else None
    return out


def _source(run: str | Path, ck: dict, ck_sha: str) -> dict:
    """Provenance of a synthetic set: the generator's run and the sha256 of its training files."""
    info = {"run": str(Path(run).resolve()), "family": ck["task"], "step": int(ck["step"]),
            "checkpoint_sha256": ck_sha}
    data_json = Path(run) / "data.json"
    if data_json.is_file():
        data = json.loads(data_json.read_text())
        info["train_root"] = data.get("root")
        if "files_sha256" in data:
            info["train_files_sha256"] = sorted(set(data["files_sha256"].values()))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gan-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by train-gan")
    p.add_argument("--per-class", type=int, required=True, help="tiles per class")
    p.add_argument("--out", required=True, help="output folder (ImageFolder tree + manifest.csv)")
    p.add_argument("--seed", type=int, default=0, help="first noise seed (tile k uses seed + k)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="EMA generator (default) or the raw trained weights")
    p.add_argument("--checkpoint", default="last", metavar="last|best|STEP",
                   help="which checkpoint of the run: last (default), best (lowest KID, when the run "
                        "evaluated it) or a snapshot's step")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampling option of the family (diffusion: scheduler=ddim, steps=50, "
                        "guidance_scale=3); repeatable")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--filter", choices=["confidence", "centroid", "both"],
                   help="selective augmentation: generate per-class / --keep candidates into OUT/candidates, "
                        "keep the best by a classifier trained on --train into OUT/selected (metrics/selection.py)")
    p.add_argument("--keep", type=float, default=0.5, help="with --filter: share of candidates kept (default 0.5)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="with --filter confidence: keep every tile at least this confident instead of a share")
    p.add_argument("--train", help="with --filter: the real training split the classifier learns from "
                                   "(never validation or test)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    def _run() -> int:
        options = parse_options(args.option)
        if args.filter is None:
            manifest = generate(args.run, args.out, args.per_class, args.seed, args.weights, args.batch_size,
                                args.overwrite, args.device, not args.no_progress, args.checkpoint, options)
            print(f"gan-generate: wrote {args.per_class} tiles per class to {args.out}; manifest {manifest}")
            return 0
        summary = generate_selected(args, options)
        kept = ", ".join(f"{c} {n['kept']}/{n['candidates']}" for c, n in summary["counts"].items())
        print(f"gan-generate: kept {kept} ({summary['filter']}) in {summary['folder']}; candidates in "
              f"{Path(args.out) / 'candidates'}")
        return 0

    return run_cli("gan-generate", _run, log_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
