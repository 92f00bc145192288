"""Stain tools over maintained libraries: Macenko and Reinhard normalisation (torchstain) and
per-stain optical density by colour deconvolution (scikit-image's ``rgb2hed``, Ruifrok 2001)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch


def _chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class MacenkoStain:
    """Macenko normalisation to a reference image (torchstain, torch backend)."""

    def __init__(self, reference: np.ndarray):
        from torchstain.torch.normalizers.macenko import TorchMacenkoNormalizer

        self.norm = TorchMacenkoNormalizer()
        self.norm.fit(_chw(reference))

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Normalise ``H x W x 3`` uint8; raises when the image has too little stained tissue."""
        out, _, _ = self.norm.normalize(_chw(rgb), stains=False)
        return out.clamp(0, 255).to(torch.uint8).numpy()


class ReinhardStain:
    """Reinhard colour transfer (per-channel LAB mean/std) to a reference image (torchstain)."""

    def __init__(self, reference: np.ndarray):
        from torchstain.torch.normalizers.reinhard import TorchReinhardNormalizer

        self.norm = TorchReinhardNormalizer()
        self.norm.fit(_chw(reference))

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self.norm.normalize(_chw(rgb)).numpy()          # H x W x 3 uint8


NORMALISERS = {"macenko": MacenkoStain, "reinhard": ReinhardStain}
STAIN_METHODS = ("none", *NORMALISERS)


class StainNormaliser:
    """``method`` (macenko | reinhard) fitted to ``reference`` (``H x W x 3`` uint8: one image, or
    a mosaic of training tiles). ``key`` identifies it (method + reference pixels) in cache keys.
    Calling it on an image it cannot normalise (too little stained tissue for Macenko's stain
    vectors) raises; callers keep such an image as it is and count it."""

    def __init__(self, method: str, reference: np.ndarray):
        if method not in NORMALISERS:
            raise ValueError(f"unknown stain normalisation {method!r}; choose one of {', '.join(NORMALISERS)}")
        ref = np.ascontiguousarray(reference, dtype=np.uint8)
        self.method, self.reference = method, ref
        self.key = f"{method}:{hashlib.sha256(str(ref.shape).encode() + ref.tobytes()).hexdigest()[:16]}"
        self._fn = NORMALISERS[method](ref)

    @classmethod
    def from_file(cls, method: str, path: str | Path) -> "StainNormaliser":
        from histosynth.images import open_rgb
        return cls(method, np.asarray(open_rgb(path)))

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self._fn(rgb)


def reference_mosaic(tiles: np.ndarray, count: int = 16, side: int = 4) -> np.ndarray:
    """A ``side x side`` mosaic (``H x W x 3`` uint8) of ``count`` tiles spread evenly over
    ``tiles`` (``N x 3 x S x S`` uint8, e.g. the training split): what a normaliser is fitted to
    when it must see the training images only, and more than one of them."""
    n = len(tiles)
    pick = np.linspace(0, n - 1, min(count, n)).round().astype(int)
    chosen = [np.asarray(tiles[i]).transpose(1, 2, 0) for i in pick]
    while len(chosen) < side * side:
        chosen.append(chosen[len(chosen) % len(pick)])
    rows = [np.concatenate(chosen[r * side:(r + 1) * side], axis=1) for r in range(side)]
    return np.concatenate(rows, axis=0)


STAIN_CHANNELS = ("hematoxylin", "eosin", "dab")


def stain_od(rgb: np.ndarray) -> dict[str, float]:
    """Mean optical density of haematoxylin, eosin and DAB over an ``H x W x 3`` uint8 image."""
    from skimage.color import rgb2hed

    hed = rgb2hed(rgb)                                   # H x W x 3, OD-like concentrations
    return {name: float(hed[..., i].mean()) for i, name in enumerate(STAIN_CHANNELS)}
