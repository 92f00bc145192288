"""Stain tools over maintained libraries: Macenko and Reinhard normalisation (torchstain) and
per-stain optical density by colour deconvolution (scikit-image's ``rgb2hed``, Ruifrok 2001)."""

from __future__ import annotations

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


STAIN_CHANNELS = ("hematoxylin", "eosin", "dab")


def stain_od(rgb: np.ndarray) -> dict[str, float]:
    """Mean optical density of haematoxylin, eosin and DAB over an ``H x W x 3`` uint8 image."""
    from skimage.color import rgb2hed

    hed = rgb2hed(rgb)                                   # H x W x 3, OD-like concentrations
    return {name: float(hed[..., i].mean()) for i, name in enumerate(STAIN_CHANNELS)}
