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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from gans.cyclegan import CycleGANConfig, ResnetGenerator
from gans.loop import RunDirError, generator_state, load_run_checkpoint
from histosynth import config as configlib
from histosynth.checkpoint import atomic_write, atomic_write_csv, sha256_file
from histosynth.cli import register_user_error, run_cli
from histosynth.data import to_uint8, to_unit_range
from histosynth.paths import claim_output_dir
from histosynth.runtime import resolve_device
from histosynth.images import UnreadableImage, list_images, read_rgb8, warn_skipped

register_user_error(RunDirError)

DIRECTIONS = {"a2b": "G_ab", "b2a": "G_ba"}


def load_translators(run: str | Path, weights: str = "ema", device: str = "cpu"):
    """({'a2b': G_ab, 'b2a': G_ba} in eval mode, config, checkpoint, checkpoint path) of a run."""
    ck, ck_path = load_run_checkpoint(run, ["cyclegan"], "gan-translate needs a cyclegan run "
                                                        "(for GAN families use gan-generate)")
    cfg, _, _ = configlib.load(CycleGANConfig, None, base=ck["config"])
    gens = {}
    for direction, name in DIRECTIONS.items():
        G = ResnetGenerator(cfg.model.ngf, cfg.model.n_blocks)
        G.load_state_dict(generator_state(ck, name, weights))
        gens[direction] = G.to(device).eval()
    return gens, cfg, ck, ck_path


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _window(h: int, w: int, overlap: int) -> torch.Tensor:
    """1 in the middle, falling linearly to 1/(overlap+1) at the edges: 1 x 1 x h x w."""
    def ramp(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32)
        return torch.minimum(torch.minimum(i + 1, n - i), torch.tensor(overlap + 1.0)) / (overlap + 1)
    return (ramp(h)[:, None] * ramp(w)[None, :])[None, None]


@torch.no_grad()
def _run(G: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """G on a batch whose sides are padded (reflect) to multiples of 4, cropped back."""
    h, w = x.shape[2:]
    ph, pw = (-h) % 4, (-w) % 4
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return G(x)[:, :, :h, :w].float()


@torch.no_grad()
def translate_image(G: torch.nn.Module, rgb: np.ndarray, tile: int = 512, overlap: int = 64,
                    batch: int = 4) -> np.ndarray:
    """Translate an ``H x W x 3`` uint8 image of any size; returns the same shape and dtype."""
    dev = next(G.parameters()).device
    x = to_unit_range(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]).to(dev)
    h, w = x.shape[2:]
    if h <= tile and w <= tile:
        return to_uint8(_run(G, x))[0].permute(1, 2, 0).cpu().numpy()
    th, tw = min(tile, h), min(tile, w)
    stride = max(tile - overlap, 1)
    boxes = [(y, xx) for y in _starts(h, th, stride) for xx in _starts(w, tw, stride)]
    win = _window(th, tw, overlap).to(dev)
    out = torch.zeros(1, 3, h, w, device=dev)
    weight = torch.zeros(1, 1, h, w, device=dev)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        y_hat = _run(G, torch.cat([x[:, :, y:y + th, xx:xx + tw] for y, xx in chunk]))
        for (y, xx), patch in zip(chunk, y_hat):
            out[:, :, y:y + th, xx:xx + tw] += patch * win[0]
            weight[:, :, y:y + th, xx:xx + tw] += win[0]
    return to_uint8(out / weight)[0].permute(1, 2, 0).cpu().numpy()


def translate_folder(run: str | Path, input_dir: str | Path, out: str | Path, direction: str,
                     tile: int = 512, overlap: int = 64, weights: str = "ema", device: str = "auto",
                     overwrite: bool = False, progress: bool = True) -> Path:
    if direction not in DIRECTIONS:
        raise configlib.ConfigError("--direction", f"choose a2b or b2a, got {direction!r}")
    if tile < 16 or tile % 4 or not 0 <= overlap < tile // 2:
        raise configlib.ConfigError("--tile", f"tile must be a multiple of 4 >= 16 and overlap in "
                                              f"[0, tile/2); got tile {tile}, overlap {overlap}")
    gens, _, ck, ck_path = load_translators(run, weights, resolve_device(device))
    input_dir, out = Path(input_dir), Path(out)
    if not input_dir.is_dir():
        raise RunDirError(f"input folder not found: {input_dir}")
    files = list_images(input_dir)
    if not files:
        raise RunDirError(f"no images in {input_dir}")
    claim_output_dir(out, overwrite)
    ck_sha = sha256_file(ck_path)
    rows, skipped = [], []
    for f in tqdm(files, desc=f"translating {direction}", unit="img", disable=not progress):
        try:
            rgb = read_rgb8(f)
        except UnreadableImage as e:
            skipped.append((str(f), str(e)))
            continue
        y = translate_image(gens[direction], rgb, tile, overlap)
        dst = out / f"{f.stem}.png"
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
    p.add_argument("--direction", required=True, choices=sorted(DIRECTIONS))
    p.add_argument("--tile", type=int, default=512, help="tile side for large images (multiple of 4)")
    p.add_argument("--overlap", type=int, default=None,
                   help="blending band between tiles, pixels (default: tile / 8)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="EMA generators when the run kept them (default), else the trained weights")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    def _run_cli() -> int:
        overlap = args.tile // 8 if args.overlap is None else args.overlap
        m = translate_folder(args.run, args.input, args.out, args.direction, args.tile, overlap,
                             args.weights, args.device, args.overwrite, not args.no_progress)
        print(f"gan-translate: wrote {sum(1 for _ in open(m)) - 1} images to {args.out}; manifest {m}")
        return 0

    return run_cli("gan-translate", _run_cli)


if __name__ == "__main__":
    sys.exit(main())
