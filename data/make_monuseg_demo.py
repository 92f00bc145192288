"""Build data/monuseg_demo from the team's shared MoNuSeg bundle (../shared/data/monuseg).

Deterministic: the first 12 training and the first 4 test images (sorted by name; each a
different patient), one centred 384 x 384 crop of each, with its mask (and, for test, its
instance map, ids renumbered 1..n within the crop). Images are re-encoded as JPEG (quality 92) to
keep the demo under 2 MB; masks and instance maps stay lossless PNG.

    python data/make_monuseg_demo.py [--src ../shared/data/monuseg]
"""

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

COUNTS = {"train": 12, "test": 4}
SIDE = 384


def crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    x, y = (w - SIDE) // 2, (h - SIDE) // 2
    return img.crop((x, y, x + SIDE, y + SIDE))


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(here.parents[1] / "shared" / "data" / "monuseg"))
    ap.add_argument("--dst", default=str(here / "monuseg_demo"))
    args = ap.parse_args()
    src, dst = Path(args.src), Path(args.dst)
    rows = []
    for split, n in COUNTS.items():
        stems = sorted(p.stem for p in (src / split / "images").glob("*.png"))[:n]
        for d in ("images", "masks") + (("instances",) if split == "test" else ()):
            (dst / split / d).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            crop(Image.open(src / split / "images" / f"{stem}.png").convert("RGB")).save(
                dst / split / "images" / f"{stem}.jpg", quality=92)
            mask = crop(Image.open(src / split / "masks" / f"{stem}.png"))
            mask.save(dst / split / "masks" / f"{stem}.png")
            count = ""
            if split == "test":
                ids = np.asarray(crop(Image.open(src / split / "instances" / f"{stem}.png"))).astype(np.int64)
                _, inv = np.unique(ids, return_inverse=True)          # 0 stays 0: it is the smallest id
                Image.fromarray(inv.reshape(ids.shape).astype(np.uint16)).save(dst / split / "instances" / f"{stem}.png")
                count = int(inv.max())
            rows.append({"split": split, "stem": stem, "nucleus_fraction": round(float((np.asarray(mask) > 0).mean()), 4),
                         "instances": count})
    with open(dst / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["split", "stem", "nucleus_fraction", "instances"])
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
