"""Full-reference image metrics: a registry over piq, and scoring of paired folders.

Every metric is piq's own function called with an explicit ``data_range=1.0`` on float images in
[0, 1]; images are converted to that range from their stored bit depth (8-bit: / 255, 16-bit:
/ 65535), so 16-bit inputs keep their precision and an 8-bit and a 16-bit copy of one image score
the same. Each metric says whether higher is better and the smallest image side it accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import piq
import torch
from PIL import Image
from tqdm.auto import tqdm

from histosynth.images import UnreadableImage, list_images, open_rgb, warn_skipped
from histosynth.stats import mean_ci


@dataclass(frozen=True)
class FRMetric:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x, y) N x 3 x H x W in [0, 1] -> N
    higher_is_better: bool
    min_size: int
    about: str


FULL_REFERENCE: dict[str, FRMetric] = {m.name: m for m in [
    FRMetric("psnr", lambda x, y: piq.psnr(x, y, data_range=1.0, reduction="none"), True, 1,
             "peak signal-to-noise ratio, dB"),
    FRMetric("ssim", lambda x, y: piq.ssim(x, y, data_range=1.0, reduction="none"), True, 11,
             "structural similarity (Wang 2004), 11x11 Gaussian window"),
    FRMetric("ms_ssim", lambda x, y: piq.multi_scale_ssim(x, y, data_range=1.0, reduction="none"),
             True, 161, "multi-scale SSIM (Wang 2003), 5 scales"),
    FRMetric("haarpsi", lambda x, y: piq.haarpsi(x, y, data_range=1.0, reduction="none"), True, 32,
             "Haar wavelet perceptual similarity (Reisenhofer 2018)"),
    FRMetric("mdsi", lambda x, y: piq.mdsi(x, y, data_range=1.0, reduction="none"), False, 32,
             "mean deviation similarity index (Nafchi 2016): 0 for identical images"),
    FRMetric("ms_gmsd", lambda x, y: piq.multi_scale_gmsd(x, y, data_range=1.0, reduction="none"),
             False, 32, "multi-scale gradient magnitude similarity deviation (Zhang 2017)"),
]}


def read_unit_float(path: str | Path) -> np.ndarray:
    """``H x W x 3`` float32 in [0, 1] at the file's own bit depth (16-bit grey: / 65535)."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I;16") or img.mode == "I":
                a = np.asarray(img, dtype=np.float64) / 65535.0
                return np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    except Exception as e:
        raise UnreadableImage(str(e).split("\n")[0]) from None
    return np.asarray(open_rgb(path), dtype=np.float32) / 255.0


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]


def score_pair(x: np.ndarray, y: np.ndarray, names: list[str]) -> dict[str, float]:
    """Each named metric of one pair of ``H x W x 3`` float images in [0, 1]."""
    if x.shape != y.shape:
        raise ValueError(f"image sizes differ: {x.shape[:2]} vs {y.shape[:2]}")
    tx, ty = _tensor(x), _tensor(y)
    out = {}
    for n in names:
        m = FULL_REFERENCE[n]
        out[n] = float(m.fn(tx, ty)[0]) if min(x.shape[:2]) >= m.min_size else float("nan")
    return out


def paired_folder_scores(real_dir: str | Path, fake_dir: str | Path, names: list[str] | None = None,
                         progress: bool = True) -> dict:
    """Score every file of ``fake_dir`` against the file of the same name in ``real_dir``.

    Returns ``{"per_image": [...], "summary": {metric: mean/std/CI}, "unpaired": [...],
    "skipped": [...]}``; metrics the images are too small for are NaN and left out of summaries.
    """
    names = names or list(FULL_REFERENCE)
    unknown = [n for n in names if n not in FULL_REFERENCE]
    if unknown:
        raise KeyError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(FULL_REFERENCE)}")
    real = {p.stem: p for p in list_images(Path(real_dir))}
    fake = {p.stem: p for p in list_images(Path(fake_dir))}
    rows, skipped = [], []
    for stem in tqdm(sorted(real.keys() & fake.keys()), desc="full-reference", unit="pair",
                     disable=not progress):
        try:
            row = score_pair(read_unit_float(fake[stem]), read_unit_float(real[stem]), names)
        except (UnreadableImage, ValueError) as e:
            skipped.append((stem, str(e)))
            continue
        rows.append({"file": stem, **row})
    warn_skipped(skipped, f"{real_dir} / {fake_dir}")
    return {"per_image": rows, "summary": {n: mean_ci([r[n] for r in rows]) for n in names},
            "unpaired": sorted(real.keys() ^ fake.keys()), "skipped": skipped}
