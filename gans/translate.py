"""gan-translate: translate every image of a folder with a trained CycleGAN, any image size.

    gan-translate --run runs/he2ihc --input slides/he --out slides/ihc --direction a2b

Images larger than ``--tile`` are cut into overlapping tiles; each tile's output is weighted by a
window that falls linearly to near zero over the ``--overlap`` band and the weighted outputs are
averaged, so tile borders leave no seam. Writes ``OUT/<stem>.png`` (same size as the input) and
``OUT/manifest.csv``: source, output, checkpoint sha256, direction, sha256 of the output.
Also runs as ``python -m gans.translate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from gans.registry import load_run
from histosynth import config as configlib
from histosynth.checkpoint import atomic_write, atomic_write_csv, sha256_file
from histosynth.cli import run_cli
from histosynth.engine import RunDirError, run_inputs
from histosynth.images import UnreadableImage, list_images, read_rgb8, warn_skipped
from histosynth.paths import claim_output_dir
from histosynth.roles import Translator
from histosynth.runtime import resolve_device


MIN_SIDE = 16
"""Smallest image side gan-translate accepts (the generator downsamples by 4 and pads by 3)."""


def output_names(files: list[Path]) -> dict[Path, str]:
    """``STEM.png`` for every input; inputs that share a stem (a.png, a.jpg, a.tif) keep their
    extension in the name (a_png.png, a_jpg.png, a_tif.png), so no output replaces another."""
    stems: dict[str, int] = {}
    for f in files:
        stems[f.stem] = stems.get(f.stem, 0) + 1
    names = {f: f"{f.stem}.png" if stems[f.stem] == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower()}.png"
             for f in files}
    taken: set[str] = set()
    for f, name in names.items():               # a file already named like a disambiguated one
        n, base = 1, name[:-4]
        while name in taken:
            name, n = f"{base}_{n}.png", n + 1
        names[f] = name
        taken.add(name)
    return names


def translate_folder(run: str | Path, input_dir: str | Path, out: str | Path, direction: str,
                     tile: int = 512, overlap: int = 64, weights: str = "ema", device: str = "auto",
                     overwrite: bool = False, progress: bool = True, checkpoint: str | int = "last") -> Path:
    if tile < 16 or tile % 4 or not 0 <= overlap < tile // 2:
        raise configlib.ConfigError("--tile", f"tile must be a multiple of 4 >= 16 and overlap in "
                                              f"[0, tile/2); got tile {tile}, overlap {overlap}")
    translator, ck, ck_path = load_run(run, Translator, checkpoint, weights, resolve_device(device))
    if direction not in translator.directions:
        raise configlib.ConfigError("--direction", f"choose one of {', '.join(translator.directions)}, "
                                                   f"got {direction!r}")
    input_dir, out = Path(input_dir), Path(out)
    if not input_dir.is_dir():
        raise RunDirError(f"input folder not found: {input_dir}")
    files = list_images(input_dir)
    if not files:
        raise RunDirError(f"no images in {input_dir}")
    claim_output_dir(out, overwrite, inputs={"--input": input_dir, **run_inputs(run)})
    ck_sha = sha256_file(ck_path)
    names = output_names(files)
    rows, skipped = [], []
    for f in tqdm(files, desc=f"translating {direction}", unit="img", disable=not progress):
        try:
            rgb = read_rgb8(f)
        except UnreadableImage as e:
            skipped.append((str(f), str(e)))
            continue
        if min(rgb.shape[:2]) < MIN_SIDE:
            skipped.append((str(f), f"too small to translate ({rgb.shape[1]} x {rgb.shape[0]} px; at least {MIN_SIDE})"))
            continue
        y = translator.translate(rgb, direction, tile, overlap)
        dst = out / names[f]
        atomic_write(dst, lambda fh: Image.fromarray(y).save(fh, format="PNG"))
        rows.append({"source": str(f), "output": dst.name, "checkpoint_sha256": ck_sha,
                     "direction": direction, "sha256": sha256_file(dst)})
    warn_skipped(skipped, str(input_dir))

    atomic_write_csv(out / "manifest.csv", rows, ["source", "output", "checkpoint_sha256", "direction", "sha256"])
    return out / "manifest.csv"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gan-translate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="CycleGAN run directory written by train-gan")
    p.add_argument("--input", required=True, help="folder of images to translate")
    p.add_argument("--out", required=True, help="output folder (PNGs + manifest.csv)")
    p.add_argument("--direction", required=True, help="a2b or b2a")
    p.add_argument("--tile", type=int, default=512, help="tile side for large images (multiple of 4)")
    p.add_argument("--overlap", type=int, default=None,
                   help="blending band between tiles, pixels (default: tile / 8)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="EMA generators when the run kept them (default), else the trained weights")
    p.add_argument("--checkpoint", default="last", metavar="last|best|STEP",
                   help="which checkpoint of the run: last (default), best, or a snapshot's step")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    def _run_cli() -> int:
        overlap = args.tile // 8 if args.overlap is None else args.overlap
        m = translate_folder(args.run, args.input, args.out, args.direction, args.tile, overlap,
                             args.weights, args.device, args.overwrite, not args.no_progress, args.checkpoint)
        print(f"gan-translate: wrote {sum(1 for _ in open(m)) - 1} images to {args.out}; manifest {m}")
        return 0

    return run_cli("gan-translate", _run_cli, log_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
