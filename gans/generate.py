"""gan-generate: write N synthetic tiles per class from a trained run as an ImageFolder tree, or
N image-mask pairs from a pair generator (pix2pix) as a pairs folder.

    gan-generate --run runs/sngan --per-class 50 --out synth/
    gan-generate --run runs/sngan --per-class 50 --out synth/ --filter confidence --keep 0.5 --train data/train
    gan-generate --run runs/pix2pix --per-class 200 --out pairs/ --option masks=place

Writes ``OUT/<class>/<class>_00000.png ...`` and ``OUT/manifest.csv`` with one row per tile: file,
class, seed (the tile's own noise seed: the same seed gives the same tile), checkpoint sha256,
step, family and the tile's own sha256 (so later stages can verify the set is untouched), and
``OUT/source.json``: the generator's run and the sha256 of every file it was trained on (so
augment-compare can refuse a generator that saw validation or test images). A pair generator
writes OUT/images/pair_00000.png and OUT/masks/pair_00000.png (a manifest row for each, class
``pairs``) and OUT/preview.png (drawn mask | painted image | nearest real training tile).
Also runs as ``python -m gans.generate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from gans.registry import load_run
from histosynth import config as configlib
from histosynth.checkpoint import atomic_write_csv, atomic_write_text, sha256_file
from histosynth.cli import run_cli
from histosynth.engine import run_inputs
from histosynth.paths import claim_output_dir, safe_name
from histosynth.roles import Generator, PairGenerator
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
    gen, ck, ck_path = load_run(run, (Generator, PairGenerator), checkpoint, weights, resolve_device(device))
    if isinstance(gen, PairGenerator):
        n = sum(counts.values()) if counts is not None else per_class
        if n < 1:
            raise configlib.ConfigError("--per-class", f"asks for no pair (got {per_class})")
        out = claim_output_dir(out, overwrite, inputs=run_inputs(run))
        return generate_pairs(gen, run, out, n, seed, ck, sha256_file(ck_path), batch_size, progress, options or {})
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


def generate_pairs(gen: PairGenerator, run: str | Path, out: Path, n: int, seed: int, ck: dict, ck_sha: str,
                   batch_size: int, progress: bool, options: dict) -> Path:
    """``n`` image-mask pairs as a pairs folder: OUT/images/pair_00000.png, OUT/masks/..., a
    manifest row per file (pair ``k`` uses seed ``seed + k``: its mask and its painting),
    source.json, and OUT/preview.png: drawn mask | painted image | the nearest real training tile."""
    from segmentation.data import PAIRS, write_pair

    rows, previews = [], []
    bar = tqdm(total=n, desc="generating", unit="pair", disable=not progress)
    for start in range(0, n, batch_size):
        seeds = list(range(seed + start, seed + min(n, start + batch_size)))
        images, masks = gen.sample_pairs(seeds, **options)
        for k, s, img, mask in zip(range(start, start + len(seeds)), seeds, images.permute(0, 2, 3, 1).numpy(),
                                   masks.numpy()):
            for rel in write_pair(out, f"pair_{k:05d}", img, mask):
                rows.append({"file": rel, "class": PAIRS, "seed": s, "checkpoint_sha256": ck_sha,
                             "step": int(ck["step"]), "family": ck["task"], "sha256": sha256_file(out / rel)})
            if len(previews) < PREVIEW_PAIRS:
                previews.append((img, mask))
        bar.update(len(seeds))
    bar.close()
    manifest = out / "manifest.csv"
    atomic_write_csv(manifest, rows, MANIFEST_FIELDS)
    atomic_write_text(out / "source.json", json.dumps(_source(run, ck, ck_sha), indent=1))
    _pair_preview(previews, run, out / "preview.png")
    return manifest


PREVIEW_PAIRS = 6


def _pair_preview(pairs: list[tuple], run: str | Path, path: Path) -> None:
    """Rows of drawn mask | painted image | nearest real training tile (L2 over 32 x 32 RGB
    thumbnails: a painted image that copies a training tile shows it at once)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segmentation.data import load_pairs

    real = None
    info = json.loads((Path(run) / "data.json").read_text()) if (Path(run) / "data.json").is_file() else {}
    side = pairs[0][0].shape[0]
    if info.get("root") and Path(info["root"]).is_dir():
        try:
            real = np.asarray(load_pairs(info["root"], side, progress=False).images)     # N x 3 x S x S
        except Exception:          # the training data moved or changed: no neighbours to show
            real = None

    def thumbs(x: np.ndarray) -> np.ndarray:           # N x 3 x S x S uint8 -> N x (3*32*32) float
        t = torch.nn.functional.interpolate(torch.from_numpy(x).float(), size=32, mode="area")
        return t.flatten(1).numpy()

    cols = 3 if real is not None else 2
    fig, axes = plt.subplots(len(pairs), cols, figsize=(2.4 * cols, 2.4 * len(pairs)), squeeze=False)
    if real is not None:
        tr = thumbs(real)
    for row, (img, mask) in zip(axes, pairs):
        row[0].imshow(mask, cmap="gray", vmin=0, vmax=1)
        row[1].imshow(img)
        if real is not None:
            d = ((tr - thumbs(img.transpose(2, 0, 1)[None])) ** 2).sum(1)
            j = int(d.argmin())
            row[2].imshow(real[j].transpose(1, 2, 0))
            row[2].set_title(f"nearest real (RMS difference {np.sqrt(d[j] / tr.shape[1]):.0f} / 255)", fontsize=7)
    axes[0][0].set_title("drawn mask", fontsize=8)
    axes[0][1].set_title("painted", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def generate_selected(args: argparse.Namespace, options: dict) -> dict:
    """``--filter``: OUT/candidates (every generated tile), OUT/selected (the kept ones)."""
    from metrics.selection import FilterConfig, select_folder

    if not args.train:
        raise configlib.ConfigError("--train", "--filter needs --train: the real training split the scoring "
                                               "classifier learns from (never validation or test)")
    spec = configlib.build(FilterConfig, {"by": args.filter, "keep": None if args.min_confidence is not None else args.keep,
                                          "min_confidence": args.min_confidence})
    pairs = isinstance(load_run(args.run, (Generator, PairGenerator), args.checkpoint)[0], PairGenerator)
    if pairs != (spec.by == "agreement"):
        raise configlib.ConfigError("--filter", f"{args.run} draws {'image-mask pairs' if pairs else 'tiles'}: select "
                                                f"them with {'agreement' if pairs else 'confidence, centroid or both'}")
    out = claim_output_dir(args.out, args.overwrite, inputs={**run_inputs(args.run), "--train": args.train})
    generate(args.run, out / "candidates", spec.candidates(args.per_class), args.seed, args.weights, args.batch_size,
             False, args.device, not args.no_progress, args.checkpoint, options)
    if pairs:       # scored by a U-Net of the default segmenter config, trained on --train into OUT/selector
        from histosynth.data import default_cache_dir
        from segmentation.config import SegmenterConfig
        from segmentation.selection import select_pairs
        return select_pairs(out / "candidates", out / "selected", args.train, spec, SegmenterConfig(),
                            out / "selector", default_cache_dir(), not args.no_progress)
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
    p.add_argument("--per-class", type=int, required=True, help="tiles per class (a pair generator: pairs)")
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
    p.add_argument("--filter", choices=["confidence", "centroid", "both", "agreement"],
                   help="selective augmentation: generate per-class / --keep candidates into OUT/candidates, "
                        "keep the best by a classifier trained on --train into OUT/selected (metrics/selection.py); "
                        "pairs: agreement, by a U-Net trained on --train (segmentation/selection.py)")
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
            print(f"gan-generate: wrote {args.per_class} tiles per class (pairs) to {args.out}; manifest {manifest}")
            return 0
        summary = generate_selected(args, options)
        kept = ", ".join(f"{c} {n['kept']}/{n['candidates']}" for c, n in summary["counts"].items())
        print(f"gan-generate: kept {kept} ({summary['filter']}) in {summary['folder']}; candidates in "
              f"{Path(args.out) / 'candidates'}")
        return 0

    return run_cli("gan-generate", _run, log_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
