"""classify: predictions of a trained classifier for a folder of tiles, to a CSV.

    classify --run runs/clf --input new_tiles/ --out predictions.csv
    classify --run runs/compare/cells/real_only/seed0 --input new_tiles/ --out p.csv

``--run``: a train-classifier output folder, any classifier run directory (an augment-compare
cell), or a checkpoint file; its best weights are used. ``--input``: a folder of tiles, read
recursively (class sub-folders or not). Each tile is centre-cropped and resized to the model's
input size, stain-normalised as the run's training tiles were (the run's reference), and
classified. The CSV has one row per tile: file (relative to the input), predicted class, and the
probability of every class. Unreadable files are skipped and listed in one warning.
Also runs as ``python -m classifier.classify``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from histosynth.checkpoint import CheckpointError, atomic_write_csv
from histosynth.cli import run_cli
from histosynth.data import square_resize
from histosynth.images import DataError, UnreadableImage, list_images_recursive, open_rgb, warn_skipped
from histosynth.paths import check_apart

TASKS = {"classifier": None, "classification": None}       # train-classifier / fit, augment-compare cells


def find_checkpoint(run: Path) -> tuple[Path, Path]:
    """(best.pt, the run directory it belongs to) of ``run``: a file, a run directory, or a
    train-classifier folder (its run/)."""
    if run.is_file():
        return run, run.parent.parent
    for d in (run, run / "run"):
        if (d / "checkpoints" / "best.pt").is_file():
            return d / "checkpoints" / "best.pt", d
    raise CheckpointError(f"{run} holds no classifier checkpoint (checkpoints/best.pt, or run/checkpoints/best.pt "
                          "of a train-classifier folder)")


def stain_of(run_dir: Path, config: dict):
    """The normaliser the run's tiles went through, or None: train-classifier folders and
    augment-compare cells keep the reference mosaic under their output's preprocess/."""
    from histosynth.stain import StainNormaliser
    method = config.get("stain_norm") or (config.get("arm") or {}).get("stain_norm") or "none"
    if method == "none":
        return None
    for root in (run_dir.parent, run_dir.parent.parent.parent):       # OUT/run, OUT/cells/ARM/seedS
        ref = root / "preprocess" / "stain_reference.png"
        if ref.is_file():
            return StainNormaliser.from_file(method, ref)
    raise CheckpointError(f"the run was trained on {method}-normalised tiles but its reference "
                          f"(preprocess/stain_reference.png beside {run_dir}) is missing")


def classify(run: str | Path, folder: str | Path, out: str | Path, batch_size: int = 64, device: str = "auto",
             progress: bool = True) -> list[dict]:
    from classifier.task import predict
    from classifier.train import model_from_checkpoint
    from histosynth.engine import load_checkpoint
    from histosynth.runtime import Runtime

    folder, out = Path(folder), Path(out)
    best, run_dir = find_checkpoint(Path(run))
    check_apart(out, {"--run": run_dir, "--input": folder})
    ck = load_checkpoint(best, TASKS, "it is not a classifier checkpoint")
    model, info = model_from_checkpoint(ck)
    stain = stain_of(run_dir, ck.get("config", {}))
    rt = Runtime.from_choices(device, "auto", "auto")
    files = list_images_recursive(folder)
    if not files:
        raise DataError(f"no images in {folder}")
    size, classes = int(info["image_size"]), list(info["classes"])
    tiles, kept, skipped = [], [], []
    for f in tqdm(files, desc="reading", unit="tile", disable=not progress, leave=False):
        try:
            rgb = np.asarray(open_rgb(f))
        except UnreadableImage as e:
            skipped.append((str(f.relative_to(folder)), str(e)))
            continue
        if stain is not None:
            try:
                rgb = stain(rgb)
            except Exception:           # too little tissue to normalise: as it is
                pass
        tiles.append(square_resize(Image.fromarray(rgb), size).transpose(2, 0, 1))
        kept.append(f.relative_to(folder).as_posix())
    warn_skipped(skipped, str(folder))
    if not tiles:
        raise DataError(f"no readable image in {folder}")
    probs = predict(rt.prepare(model), np.stack(tiles), rt, batch_size, progress, "classifying")
    rows = [{"file": f, "predicted": classes[int(p.argmax())], **{f"p_{c}": round(float(v), 6) for c, v in zip(classes, p)}}
            for f, p in zip(kept, probs)]
    atomic_write_csv(out, rows, ["file", "predicted", *(f"p_{c}" for c in classes)])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="classify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="train-classifier folder, classifier run directory or best.pt")
    p.add_argument("--input", required=True, help="folder of tiles (read recursively)")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    def _run() -> int:
        rows = classify(args.run, args.input, args.out, args.batch_size, args.device, not args.no_progress)
        counts = {}
        for r in rows:
            counts[r["predicted"]] = counts.get(r["predicted"], 0) + 1
        print(f"classify: {len(rows)} tiles ({', '.join(f'{c} {n}' for c, n in sorted(counts.items()))}) -> {args.out}")
        return 0

    return run_cli("classify", _run)


if __name__ == "__main__":
    sys.exit(main())

