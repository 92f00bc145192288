"""piq-report: score a synthetic tile set against real tiles and write a report a person reads.

    piq-report --real data/test --fake synth/ --train data/train --out report/
    piq-report --real A/test --fake translated/ --paired --out report/     # full-reference too
    piq-report --real data/test --generator runs/sngan --per-class 200 --out report/   # draw, then score

Writes ``OUT/report.html`` (self-contained: plots embedded), ``OUT/report.md``,
``OUT/metrics.json`` and the plots as PNGs:

* distribution metrics overall and per class (class folders present in both sets): FID, KID
  (piq), precision, recall, density, coverage (prdc) with subsampling intervals, in the feature
  space of ``--extractor`` (the report names it). With ``--train`` the default is the histology
  space: an EfficientNet trained (once, then cached) on the real training tiles;
* with ``--paired``: PSNR, SSIM, MS-SSIM, HaarPSI, MDSI, MS-GMSD per image (files matched by name);
* with ``--train``: the memorisation check (nearest real training tile in feature and pixel
  space, threshold calibrated on real-vs-real distances, closest pairs shown); ``--filter DIR``
  writes a copy of the synthetic set without the flagged near-copies;
* always: stain statistics (haematoxylin / eosin / DAB optical density) of real vs synthetic.

Features are cached (keyed by the decoded tiles and the extractor), so a second report on the
same real set does not recompute them. Also runs as ``python -m metrics.report``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from classifier.train import checkpoint_info
from histosynth.checkpoint import CheckpointError, atomic_save, atomic_write_csv, atomic_write_text, safe_load
from histosynth.engine import load_checkpoint, run_inputs
from histosynth.cli import run_cli
from histosynth.errors import UserError
from histosynth.data import TileCache, default_cache_dir
from histosynth.paths import check_apart, claim_output_dir
from histosynth.runtime import resolve_device
from histosynth.stain import STAIN_CHANNELS, stain_od
from histosynth.stats import mean_ci
from histosynth.viz import markdown_to_html, save_grid
from metrics.distribution import PRDC_MAX_SAMPLES, distribution_metrics
from metrics.features import ClassifierExtractor, Extractor, InceptionExtractor, PixelExtractor
from metrics.full_reference import FULL_REFERENCE, paired_folder_scores
from metrics.memorisation import memorisation


class ReportError(UserError, RuntimeError):
    """The report cannot be written as asked; the message says what to change."""


DIST_KEYS = ("fid", "kid", "precision", "recall", "density", "coverage")


def load_set(root: str | Path, size: int, progress: bool) -> TileCache:
    """Tiles of a folder: one sub-folder per class, or images directly inside (one class)."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"folder not found: {root}")
    layout = "classes" if any(d.is_dir() and not d.name.startswith(".") for d in root.iterdir()) else "flat"
    return TileCache.build(root, size, cache_dir=default_cache_dir(), progress=progress, layout=layout)


def make_extractor(name: str, weights: str | None, train: str | None = None, progress: bool = True) -> Extractor:
    auto = name == "auto"
    if auto:
        name = "histology" if (train or weights) else "pixels"
    if name == "pixels":
        return PixelExtractor()
    if name == "histology":
        if weights:          # a histosynth classifier checkpoint (variant and input size inside)
            try:
                info = checkpoint_info(load_checkpoint(weights, {"classifier": None}, ""))
            except CheckpointError:
                raise ReportError(f"{weights} is not a histosynth classifier checkpoint (checkpoints/best.pt "
                                  "of an augment-compare cell or of this extractor); use --extractor "
                                  "efficientnet for a plain EfficientNet state dict") from None
            return ClassifierExtractor(weights, info["variant"], int(info["image_size"]), sphere=True,
                                         note=f"classifier checkpoint, classes {', '.join(info['classes'])}")
        if not train:
            raise ReportError("--extractor histology needs --train (the real training split it learns "
                              "tissue from) or --weights (a histosynth classifier best.pt)")
        from metrics.histology import histology_weights, learned
        try:
            best, note = histology_weights(train, progress)
        except ValueError as e:
            raise ReportError(str(e)) from None
        ck = checkpoint_info(load_checkpoint(best))
        if not learned(ck):
            msg = (f"the histology extractor did not learn to tell the classes of {train} apart "
                   f"(held-out balanced accuracy {ck['val_balanced_accuracy']:.3f}, chance "
                   f"{1 / len(ck['classes']):.3f}): too few training tiles; distances in its space "
                   "would mean nothing")
            if auto:
                warnings.warn(msg + "; using --extractor pixels instead", stacklevel=2)
                return PixelExtractor()
            warnings.warn(msg, stacklevel=2)
        return ClassifierExtractor(best, ck["variant"], int(ck["image_size"]), note=note, sphere=True)
    if not weights:
        raise ReportError(f"--extractor {name} needs --weights FILE (a local state dict; nothing is "
                          "downloaded), or use --extractor pixels")
    return InceptionExtractor(weights) if name == "inception" else ClassifierExtractor(weights)


def features(cache: TileCache, ext: Extractor, progress: bool, batch: int = 64) -> torch.Tensor:
    """Features of every tile, cached on disk next to the tile cache."""
    tag = hashlib.sha256(ext.describe().encode()).hexdigest()[:12]
    path = default_cache_dir() / f"features-{cache.key}-{tag}.pt"
    if cache.key and path.is_file():
        return safe_load(path)["features"]
    dev = resolve_device()
    ext = ext.to(dev)
    # one preallocated output: per-batch results kept in a list would sit between each batch's
    # large temporaries and fragment the heap (measured: +1.3 GB anonymous memory at 30k tiles)
    feats = None
    for s, x in tqdm(cache.batches(batch), total=-(-len(cache) // batch), desc=f"features ({ext.name})",
                     unit="batch", disable=not progress):
        f = ext(torch.from_numpy(x).to(dev)).float().cpu()
        if feats is None:
            feats = torch.empty(len(cache), f.shape[1])
        feats[s:s + len(f)] = f
    if cache.key:
        atomic_save({"features": feats}, path)
    return feats


def _warn_mismatch(real: str, fake: str, R: TileCache, F: TileCache, size: int) -> None:
    """Say so when the sets are not alike enough for the comparison to mean what it seems to."""
    if len(R.classes) > 1 and len(F.classes) > 1 and not set(R.classes) & set(F.classes):
        warnings.warn(f"--real and --fake share no class folder name (real: {', '.join(R.classes)}; fake: "
                      f"{', '.join(F.classes)}): only the overall rows are computed", stacklevel=2)
    sizes = {name: typical_size(root, s.files) for name, root, s in (("real", real, R), ("synthetic", fake, F))}
    if None not in sizes.values() and sizes["real"] != sizes["synthetic"]:
        (rw, rh), (fw, fh) = sizes["real"], sizes["synthetic"]
        warnings.warn(f"real tiles are {rw} x {rh} px and synthetic {fw} x {fh} px: both are resized to "
                      f"{size} px, so the metrics also see the resizing (generate at the real size, or "
                      "compare at the smaller size with --size)", stacklevel=2)


def typical_size(root: str | Path, files: list[str], n: int = 20) -> tuple[int, int] | None:
    """The most common (width, height) of up to ``n`` files (headers only)."""
    from collections import Counter
    from PIL import Image
    seen = Counter()
    for f in files[:: max(1, len(files) // n)][:n]:
        try:
            with Image.open(Path(root) / f) as img:
                seen[img.size] += 1
        except Exception:
            continue
    return seen.most_common(1)[0][0] if seen else None


def _by_class(real: TileCache, fake: TileCache):
    if len(real.classes) == 1 or len(fake.classes) == 1:
        return []
    common = [c for c in real.classes if c in fake.classes]
    return [(c, real.labels == real.classes.index(c), fake.labels == fake.classes.index(c)) for c in common]


def _stain(cache: TileCache, progress: bool = False) -> dict:
    rows = []
    with tqdm(total=len(cache), desc="stain", unit="img", disable=not progress, leave=False) as bar:
        for _, x in cache.batches():
            rows += [stain_od(tile.transpose(1, 2, 0)) for tile in x]
            bar.update(len(x))
    return {c: mean_ci([r[c] for r in rows]) for c in STAIN_CHANNELS}


def build_report(real: str, fake: str | None, out: str, train: str | None = None, paired: bool = False,
                 extractor: str = "auto", weights: str | None = None, size: int = 128,
                 filter_dir: str | None = None, overwrite: bool = False, progress: bool = True,
                 n_boot: int = 10, prdc_max: int = PRDC_MAX_SAMPLES, generator: str | None = None,
                 per_class: int = 100, checkpoint: str = "last") -> dict:
    """Score ``fake`` against ``real``; or, with ``generator`` (a trained run), first draw
    ``per_class`` tiles per class from it (its Generator role, as gan-generate does) into
    OUT/generated and score those."""
    if (fake is None) == (generator is None):
        raise ReportError("give --fake (a folder of synthetic tiles) or --generator (a trained run), not both")
    if filter_dir and not train:
        raise ReportError("--filter needs --train (the near-copies are found against the training set)")
    inputs = {"--real": real, "--fake": fake, "--train": train, "--weights": weights,
              **({f"--generator {k}": v for k, v in run_inputs(generator).items()} if generator else {})}
    if filter_dir:
        check_apart(filter_dir, {**inputs, "--out": out}, flag="--filter")
    out_p = claim_output_dir(out, overwrite, inputs=inputs)
    if generator is not None:
        from gans.generate import generate
        fake = str(out_p / "generated")
        generate(generator, fake, per_class, progress=progress, checkpoint=checkpoint)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ext = make_extractor(extractor, weights, train, progress)
    caught: list[str] = [str(x.message) for x in w if not issubclass(x.category, DeprecationWarning)]
    for message in caught:
        warnings.warn(message, stacklevel=2)
    R, F = load_set(real, size, progress), load_set(fake, size, progress)
    for name, s in (("--real", R), ("--fake", F)):
        if len(s) < 3:
            raise ReportError(f"{name} has {len(s)} readable tile(s); the distribution metrics need at least 3")
    _warn_mismatch(real, fake, R, F, size)
    fr, ff = features(R, ext, progress), features(F, ext, progress)
    result: dict = {"real": str(real), "fake": str(fake), "extractor": ext.describe(),
                    "tile_size": size, "counts": {"real": len(R), "fake": len(F)}, "prdc_max": prdc_max}
    result["stain"] = {"real": _stain(R, progress), "fake": _stain(F, progress)}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        result["overall"] = distribution_metrics(fr, ff, n_boot=n_boot, prdc_max=prdc_max)
        result["per_class"] = {c: distribution_metrics(fr[torch.from_numpy(mr)], ff[torch.from_numpy(mf)],
                                                       n_boot=n_boot, prdc_max=prdc_max)
                               for c, mr, mf in _by_class(R, F) if mr.sum() >= 3 and mf.sum() >= 3}
        caught += sorted({str(x.message) for x in w if not issubclass(x.category, DeprecationWarning)})
    if paired:
        result["paired"] = paired_folder_scores(real, fake, progress=progress)
    if train:
        T = load_set(train, size, progress)
        pix = PixelExtractor()
        result["memorisation"] = {
            "features": memorisation(ff, features(T, ext, progress)),
            "pixels": memorisation(features(F, pix, progress), features(T, pix, progress))}
        if filter_dir:
            result["filtered"] = _filter(F, Path(fake), Path(filter_dir), result["memorisation"])
    result["warnings"] = caught
    figs = _plots(result, R, F, T if train else None, out_p)
    atomic_write_text(out_p / "metrics.json", json.dumps(_slim(result), indent=1))
    md = render_markdown(result, figs)
    atomic_write_text(out_p / "report.md", md)
    atomic_write_text(out_p / "report.html", render_html(result, figs, out_p))
    return result


def _slim(result: dict) -> dict:
    """metrics.json without per-tile lists longer than a person reads (kept in summary form)."""
    r = json.loads(json.dumps(result))
    for space in (r.get("memorisation") or {}).values():
        for k in ("distances", "nearest_index", "flagged"):
            space.pop(k, None)
    return r


def _filter(F: TileCache, fake_root: Path, dst: Path, mem: dict) -> dict:
    flagged = np.array(mem["features"]["flagged"]) | np.array(mem["pixels"]["flagged"])
    if dst.exists() and any(dst.iterdir()):
        raise ReportError(f"--filter folder {dst} already exists and is not empty")
    kept = [f for f, bad in zip(F.files, flagged) if not bad]
    for rel in kept:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(fake_root / rel, dst / rel)
    manifest = fake_root / "manifest.csv"
    if manifest.is_file():
        keep = set(kept)
        with open(manifest, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("file") in keep]
        if rows:
            atomic_write_csv(dst / "manifest.csv", rows, list(rows[0]))
    source = fake_root / "source.json"
    if source.is_file():        # the same generator's tiles: its provenance holds for the subset
        info = json.loads(source.read_text())
        info["filtered"] = {"from": str(fake_root.resolve()), "by": "piq-report --filter (memorisation "
                            "near-copies removed)", "kept": len(kept), "removed": int(flagged.sum())}
        atomic_write_text(dst / "source.json", json.dumps(info, indent=1))
    return {"folder": str(dst), "kept": len(kept), "removed": int(flagged.sum())}


# ----------------------------------------------------------------------------------------------
# pictures


def _plots(r: dict, R: TileCache, F: TileCache, T: TileCache | None, out: Path) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    figs = {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        figs[name.removesuffix(".png")] = name

    groups = {"overall": r["overall"], **r["per_class"]}
    fig, axes = plt.subplots(1, len(DIST_KEYS), figsize=(3.0 * len(DIST_KEYS), 3.2))
    for ax, key in zip(axes, DIST_KEYS):
        names = list(groups)
        vals = [groups[g][key]["value"] for g in names]
        err = np.array([[v - groups[g][key]["ci_low"], groups[g][key]["ci_high"] - v]
                        for g, v in zip(names, vals)]).T.clip(min=0)
        ax.bar(range(len(names)), vals, yerr=err, color=sns.color_palette("deep", len(names)), capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(key)
    save(fig, "distribution_per_class.png")

    if "paired" in r and r["paired"]["per_image"]:
        rows = r["paired"]["per_image"]
        fig, axes = plt.subplots(1, len(FULL_REFERENCE), figsize=(2.4 * len(FULL_REFERENCE), 3.0))
        for ax, key in zip(axes, FULL_REFERENCE):
            sns.boxplot(y=[row[key] for row in rows], ax=ax, color="#7fa7c9")
            sns.stripplot(y=[row[key] for row in rows], ax=ax, color="k", size=2)
            ax.set_title(key + (" (higher better)" if FULL_REFERENCE[key].higher_is_better else " (lower better)"),
                         fontsize=8)
        save(fig, "full_reference.png")

    if "memorisation" in r:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, space in zip(axes, ("features", "pixels")):
            m = r["memorisation"][space]
            sns.histplot(m["distances"], ax=ax, bins=30, color="#c9707f")
            ax.axvline(m["threshold"], color="k", ls="--", label=f"threshold (real-vs-real {m['quantile']:.0%})")
            ax.set_title(f"nearest training tile, {space}: {m['share_flagged']:.1%} flagged")
            ax.legend(fontsize=7)
        save(fig, "nearest_neighbours.png")
        m = r["memorisation"]["features"]
        pairs = []
        for fi, ti, _ in m["closest"]:
            pairs += [torch.from_numpy(np.array(F.images[fi])), torch.from_numpy(np.array(T.images[ti]))]
        save_grid(torch.stack(pairs).float() / 127.5 - 1, 2, ["synthetic | train"] * len(m["closest"]),
                  out / "closest_pairs.png")
        figs["closest_pairs"] = "closest_pairs.png"

    grid, labels = [], []
    for c in R.classes:
        for name, S in (("real", R), ("synthetic", F)):
            idx = np.flatnonzero(S.labels == S.classes.index(c))[:8] if c in S.classes else []
            if len(idx):
                imgs = torch.from_numpy(np.array(S.images[idx])).float() / 127.5 - 1
                imgs = torch.cat([imgs, torch.ones(8 - len(idx), *imgs.shape[1:])]) if len(idx) < 8 else imgs
                grid.append(imgs)
                labels.append(f"{name} {c}"[:18])
    if grid:
        save_grid(torch.cat(grid), 8, labels, out / "samples.png", label_width=130)
        figs["samples"] = "samples.png"

    fig, ax = plt.subplots(figsize=(6, 3.2))
    data = [(s, c, r["stain"][s][c]["mean"], r["stain"][s][c]["ci_low"], r["stain"][s][c]["ci_high"])
            for s in ("real", "fake") for c in STAIN_CHANNELS]
    xs = np.arange(len(STAIN_CHANNELS))
    for j, s in enumerate(("real", "fake")):
        vals = [d for d in data if d[0] == s]
        ax.bar(xs + 0.38 * j, [d[2] for d in vals], 0.38, label="synthetic" if s == "fake" else "real",
               yerr=np.array([[d[2] - d[3], d[4] - d[2]] for d in vals]).T.clip(min=0), capsize=3)
    ax.set_xticks(xs + 0.19, STAIN_CHANNELS)
    ax.set_ylabel("mean optical density")
    ax.legend()
    save(fig, "stain.png")
    return figs


# ----------------------------------------------------------------------------------------------
# text


def _ci(d: dict, digits: int = 3) -> str:
    v = d.get("value", d.get("mean"))
    return f"{v:.{digits}f} [{d['ci_low']:.{digits}f}, {d['ci_high']:.{digits}f}]"


def render_markdown(r: dict, figs: dict[str, str]) -> str:
    L = [f"# Synthetic vs real: `{r['fake']}` against `{r['real']}`", "",
         f"Feature space: **{r['extractor']}**. Tiles: {r['counts']['real']} real, "
         f"{r['counts']['fake']} synthetic, compared at {r['tile_size']} px.", ""]
    if r["warnings"]:
        L += ["**Warnings**", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    L += ["## Distribution metrics", "",
          "Lower is better for FID and KID; higher for precision (fidelity), recall (diversity), "
          "density and coverage. [2.5-97.5 % over 80 % subsamples]"
          + (f" Precision, recall, density and coverage use a seeded subsample of at most "
             f"{r['prdc_max']} tiles per set (they need all pairwise distances); FID and KID use every tile."
             if max(r["counts"].values()) > r.get("prdc_max", 1 << 62) else ""), "",
          "| set | n real | n synth | " + " | ".join(DIST_KEYS) + " |", "|---" * (len(DIST_KEYS) + 3) + "|"]
    for name, g in {"overall": r["overall"], **r["per_class"]}.items():
        L.append(f"| {name} | {g['fid']['n_real']} | {g['fid']['n_fake']} | "
                 + " | ".join(_ci(g[k]) for k in DIST_KEYS) + " |")
    L += ["", "![per class](distribution_per_class.png)", ""]
    if "paired" in r:
        p = r["paired"]
        L += ["## Full-reference metrics (paired by file name)", "",
              f"{len(p['per_image'])} pairs; {len(p['unpaired'])} unpaired names left out.", "",
              "| metric | better | mean [95 % CI] |", "|---|---|---|"]
        for k, s in p["summary"].items():
            better = "higher" if FULL_REFERENCE[k].higher_is_better else "lower"
            L.append(f"| {k} | {better} | {_ci(s, 4) if s['n'] else 'n/a (images too small)'} |")
        if "full_reference" in figs:
            L += ["", "![full reference](full_reference.png)"]
        L.append("")
    if "memorisation" in r:
        L += ["## Memorisation", ""]
        for space, m in r["memorisation"].items():
            L.append(f"- {space}: **{m['share_flagged']:.1%}** of synthetic tiles ({m['n_flagged']}) are closer "
                     f"to a training tile than {m['threshold']:.4g}, the {m['quantile']:.0%} quantile of "
                     "real-vs-real nearest-neighbour distances.")
        if "filtered" in r:
            f = r["filtered"]
            L.append(f"- Filtered copy: {f['kept']} kept, {f['removed']} removed, in `{f['folder']}`.")
        L += ["", "![nearest neighbours](nearest_neighbours.png)", "", "![closest pairs](closest_pairs.png)", ""]
    L += ["## Stain statistics (mean optical density, colour deconvolution)", "",
          "| stain | real | synthetic |", "|---|---|---|"]
    for c in STAIN_CHANNELS:
        L.append(f"| {c} | {_ci(r['stain']['real'][c], 4)} | {_ci(r['stain']['fake'][c], 4)} |")
    L += ["", "![stain](stain.png)", "", "## Samples", "", "![samples](samples.png)", ""]
    return "\n".join(L)


def render_html(r: dict, figs: dict[str, str], out: Path) -> str:
    """The Markdown report as a self-contained page: tables as tables, images inlined."""
    return markdown_to_html(render_markdown(r, figs), out, "histosynth report")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="piq-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="real tiles (class sub-folders, or flat)")
    p.add_argument("--fake", help="synthetic tiles (same layout)")
    p.add_argument("--generator", metavar="RUN", help="instead of --fake: draw tiles from this trained run "
                                                      "(into OUT/generated, with gan-generate's manifest)")
    p.add_argument("--per-class", type=int, default=100, help="with --generator: tiles per class (default 100)")
    p.add_argument("--checkpoint", default="last", metavar="last|best|STEP",
                   help="with --generator: which checkpoint of the run (default last)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--paired", action="store_true", help="also full-reference metrics, files paired by name")
    p.add_argument("--train", help="real training tiles: run the memorisation check against them")
    p.add_argument("--filter", metavar="DIR", help="write the synthetic set without near-copies to DIR")
    p.add_argument("--extractor", choices=["auto", "pixels", "histology", "inception", "efficientnet"],
                   default="auto",
                   help="feature space: histology (an EfficientNet trained here on --train, cached, or "
                        "a histosynth classifier --weights); pixels; inception / efficientnet (ImageNet, "
                        "need --weights); auto (default): histology with --train or --weights, else pixels")
    p.add_argument("--weights", help="local weights file of the extractor (nothing is downloaded)")
    p.add_argument("--size", type=int, default=128, help="tiles are compared at this size (px)")
    p.add_argument("--boot", type=int, default=10, help="subsamples for the distribution intervals")
    p.add_argument("--prdc-max", type=int, default=PRDC_MAX_SAMPLES, metavar="N",
                   help="precision/recall/density/coverage on at most N tiles per set (their memory "
                        "grows as N^2; default %(default)s)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    def _run() -> int:
        build_report(args.real, args.fake, args.out, args.train, args.paired, args.extractor,
                     args.weights, args.size, args.filter, args.overwrite, not args.no_progress,
                     args.boot, args.prdc_max, args.generator, args.per_class, args.checkpoint)
        print(f"piq-report: wrote {Path(args.out) / 'report.html'}, report.md and metrics.json")
        return 0

    return run_cli("piq-report", _run, log_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
