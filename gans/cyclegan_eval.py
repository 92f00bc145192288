"""gan-eval: evaluate a CycleGAN run (also run automatically at the end of training).

    gan-eval --run runs/he2ihc [--test-a DIR --test-b DIR]

* Paired (when ``data.test_a`` / ``data.test_b`` hold files with the same names): per-image PSNR
  and SSIM (piq, data range 1) of G_ab(A) against B, beside the classical baselines computed the
  same way: identity (A itself), Reinhard and Macenko normalisation of A to the B domain
  (torchstain, fitted on a mosaic of B *training* images, so no test image is used for fitting).
* Always: cycle consistency PSNR/SSIM (A vs G_ba(G_ab(A)), B vs G_ab(G_ba(B))) and the stain
  statistics (mean optical density of haematoxylin / eosin / DAB by colour deconvolution) of real
  A, real B and G_ab(A). Without test folders the training folders are used, and it says so.

Means come with percentile-bootstrap 95 % CIs. Writes ``RUN/eval.json`` and ``RUN/eval.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import piq
import torch
from tqdm.auto import tqdm

from gans.families.cyclegan import CycleGANConfig
from gans.registry import load_run
from gans.translate import MIN_SIDE
from histosynth import config as configlib
from histosynth.checkpoint import atomic_write_text
from histosynth.cli import run_cli
from histosynth.config import ConfigError
from histosynth.images import UnreadableImage, list_images, read_rgb8, warn_skipped
from histosynth.paths import resolve_data_path
from histosynth.roles import Translator
from histosynth.runtime import resolve_device
from histosynth.stain import STAIN_CHANNELS, MacenkoStain, ReinhardStain, stain_od
from histosynth.stats import mean_ci


def _unit(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0


def paired_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM (piq, data range 1.0) of two ``H x W x 3`` uint8 images."""
    x, y = _unit(pred), _unit(target)
    return {"psnr": float(piq.psnr(x, y, data_range=1.0)), "ssim": float(piq.ssim(x, y, data_range=1.0))}


def pair_by_name(dir_a: Path, dir_b: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Files of ``dir_a`` and ``dir_b`` with the same stem; and the names that have no partner."""
    a = {p.stem: p for p in list_images(dir_a)}
    b = {p.stem: p for p in list_images(dir_b)}
    pairs = [(a[k], b[k]) for k in sorted(a.keys() & b.keys())]
    return pairs, sorted(a.keys() ^ b.keys())


def reference_mosaic(folder: Path, n: int = 16) -> np.ndarray:
    """Up to ``n`` images of ``folder`` (evenly spread) side by side: the baselines' stain target."""
    files = list_images(folder)
    picks = [files[i] for i in np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)]
    tiles = []
    for f in picks:
        try:
            tiles.append(read_rgb8(f))
        except UnreadableImage:
            continue
    h = min(t.shape[0] for t in tiles)
    return np.concatenate([t[:h] for t in tiles], axis=1)


def _read(path: Path, skipped: list[tuple[str, str]]) -> np.ndarray | None:
    """The image, or None with the reason added to ``skipped`` (unreadable, or too small to translate)."""
    try:
        rgb = read_rgb8(path)
    except UnreadableImage as e:
        skipped.append((str(path), str(e)))
        return None
    if min(rgb.shape[:2]) < MIN_SIDE:
        skipped.append((str(path), f"too small to translate ({rgb.shape[1]} x {rgb.shape[0]} px; at least {MIN_SIDE})"))
        return None
    return rgb


def _summary(rows: list[dict[str, float]], keys) -> dict[str, dict[str, float]]:
    return {k: mean_ci([r[k] for r in rows]) for k in keys}


def evaluate_run(run: str | Path, test_a: str | None = None, test_b: str | None = None,
                 max_images: int | None = None, progress: bool = True) -> dict:
    run = Path(run)
    translator, ck, _ = load_run(run, Translator, "last", "ema", resolve_device())
    cfg = configlib.build(CycleGANConfig, ck["config"])
    tile = cfg.eval.tile
    max_images = cfg.eval.max_images if max_images is None else max_images
    if (test_a is None) != (test_b is None):
        raise ConfigError("--test-b" if test_b is None else "--test-a",
                          "give both test folders (paired by file name), or neither")
    test_a = test_a or cfg.data.test_a
    test_b = test_b or cfg.data.test_b
    on_train = test_a is None
    dir_a = resolve_data_path(test_a or cfg.data.root_a)
    dir_b = resolve_data_path(test_b or cfg.data.root_b)
    result: dict = {"run": str(run), "step": int(ck["step"]), "image_size": cfg.data.image_size,
                    "domain_a": str(dir_a), "domain_b": str(dir_b),
                    "on_training_images": on_train, "metric_library": f"piq {piq.__version__}"}

    def limit(items):
        return items[:max_images] if max_images else items

    def translate(direction, rgb):
        return translator.translate(rgb, direction, tile=tile, overlap=tile // 8)

    # -- paired: G_ab(A) vs B beside identity / Reinhard / Macenko --------------------------
    skipped: list[tuple[str, str]] = []
    pairs, unpaired = pair_by_name(dir_a, dir_b) if not on_train else ([], [])
    if unpaired:
        warnings.warn(f"{len(unpaired)} test file name(s) have no partner in the other domain and are "
                      f"left out of the paired scores: {', '.join(unpaired[:10])}"
                      f"{' ...' if len(unpaired) > 10 else ''}", stacklevel=2)
    if pairs:
        target = reference_mosaic(resolve_data_path(cfg.data.root_b))
        methods = {"cyclegan": lambda a: translate("a2b", a), "identity": lambda a: a,
                   "reinhard": ReinhardStain(target), "macenko": MacenkoStain(target)}
        per_method: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        failed = {m: 0 for m in methods}
        for fa, fb in tqdm(limit(pairs), desc="paired eval", unit="pair", disable=not progress):
            a, b = _read(fa, skipped), _read(fb, skipped)
            if a is None or b is None:
                continue
            if a.shape != b.shape:
                warnings.warn(f"{fa.name}: A is {a.shape[:2]} but B is {b.shape[:2]}; pair skipped",
                              stacklevel=2)
                continue
            for name, fn in methods.items():
                try:
                    per_method[name].append({"file": fa.name, **paired_scores(fn(a), b)})
                except Exception:      # Macenko fails on tiles with too little stain
                    failed[name] += 1
        result["paired"] = {name: {**_summary(rows, ("psnr", "ssim")), "failed": failed[name],
                                   "per_image": rows} for name, rows in per_method.items()}
        best = {k: max(("identity", "reinhard", "macenko"),
                       key=lambda m: result["paired"][m][k]["mean"]) for k in ("psnr", "ssim")}
        result["beats_baselines"] = {
            k: bool(result["paired"]["cyclegan"][k]["mean"] > result["paired"][best[k]][k]["mean"])
            for k in ("psnr", "ssim")}
        result["best_baseline"] = best

    # -- cycle consistency and stain statistics -------------------------------------------
    cyc: dict[str, list] = {"a": [], "b": []}
    stains: dict[str, list] = {"real_a": [], "real_b": [], "fake_b": [], "fake_a": []}
    for key, folder, fwd, back in (("a", dir_a, "a2b", "b2a"), ("b", dir_b, "b2a", "a2b")):
        for f in tqdm(limit(list_images(folder)), desc=f"cycle {key}", unit="img", disable=not progress):
            x = _read(f, skipped)
            if x is None:
                continue
            y = translate(fwd, x)
            cyc[key].append(paired_scores(translate(back, y), x))
            stains[f"real_{key}"].append(stain_od(x))
            stains["fake_b" if key == "a" else "fake_a"].append(stain_od(y))
    warn_skipped(sorted(set(skipped)), f"{dir_a} / {dir_b}")
    result["skipped"] = sorted(set(skipped))
    result["cycle"] = {f"{k}_to_{k}": _summary(v, ("psnr", "ssim")) for k, v in cyc.items() if v}
    result["stain_od"] = {k: _summary(v, STAIN_CHANNELS) for k, v in stains.items() if v}

    atomic_write_text(run / "eval.json", json.dumps(result, indent=1))
    atomic_write_text(run / "eval.md", render_markdown(result))
    return result


def _fmt(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['mean']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]"


def render_markdown(r: dict) -> str:
    where = "training images (no test folders given)" if r["on_training_images"] else "test images"
    lines = [f"# CycleGAN evaluation — step {r['step']}", "",
             f"A: `{r['domain_a']}`  B: `{r['domain_b']}` ({where}); {r['metric_library']}, "
             "mean [bootstrap 95 % CI].", ""]
    if "paired" in r:
        n = r["paired"]["cyclegan"]["psnr"]["n"]
        lines += [f"## Paired: prediction of B from A ({n} pairs)", "",
                  "| method | PSNR (dB) | SSIM |", "|---|---|---|"]
        for m, s in r["paired"].items():
            fail = f" ({s['failed']} failed)" if s["failed"] else ""
            lines.append(f"| {m}{fail} | {_fmt(s['psnr'])} | {_fmt(s['ssim'], 3)} |")
        beats = r["beats_baselines"]
        lines += ["", f"CycleGAN beats the best baseline on PSNR ({r['best_baseline']['psnr']}): "
                      f"**{'yes' if beats['psnr'] else 'no'}**; on SSIM ({r['best_baseline']['ssim']}): "
                      f"**{'yes' if beats['ssim'] else 'no'}** (comparison of means).", ""]
    else:
        lines += ["No paired test split (data.test_a / data.test_b with matching file names): "
                  "paired PSNR/SSIM not computed.", ""]
    lines += ["## Cycle consistency", "", "| cycle | PSNR (dB) | SSIM |", "|---|---|---|"]
    for k, s in r["cycle"].items():
        lines.append(f"| {k.replace('_to_', ' > ').upper()} | {_fmt(s['psnr'])} | {_fmt(s['ssim'], 3)} |")
    lines += ["", "## Stain statistics (mean optical density by colour deconvolution)", "",
              "| set | " + " | ".join(STAIN_CHANNELS) + " |", "|---" * (len(STAIN_CHANNELS) + 1) + "|"]
    for k, s in r["stain_od"].items():
        lines.append(f"| {k} | " + " | ".join(_fmt(s[c], 4) for c in STAIN_CHANNELS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gan-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="CycleGAN run directory")
    p.add_argument("--test-a", help="domain-A test folder (default: the run's data.test_a)")
    p.add_argument("--test-b", help="domain-B test folder, paired with --test-a by file name")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    def _run() -> int:
        r = evaluate_run(args.run, args.test_a, args.test_b, args.max_images, not args.no_progress)
        print(render_markdown(r))
        print(f"gan-eval: wrote {Path(args.run) / 'eval.json'} and eval.md")
        return 0

    return run_cli("gan-eval", _run, log_dir=args.run)


if __name__ == "__main__":
    sys.exit(main())
