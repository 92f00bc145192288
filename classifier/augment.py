"""Classic augmentation policies, built from albumentations (nothing re-implemented here).

The geometric names mean what they mean everywhere in histosynth (the GANs' ``data.augment``):

``none``        the tile as it is
``flip``        horizontal and vertical flips: 4 of the 8 symmetries of the square
``flip_rot90``  all 8 symmetries of the square: flips and 90-degree rotations (tissue has no 'up')
``stain``       flip_rot90 + H&E stain jitter (albumentations' HEStain: Macenko stain vectors of each
                tile, intensities scaled by 0.9-1.1 and shifted by +-0.05, after Tellez et al. 2018's
                HED jitter)
``classic``     flip_rot90 + affine (scale 0.9-1.1, rotate +-15 deg, translate 5 %, reflected border)
                + elastic (p 0.25) + brightness/contrast/saturation/hue jitter + the stain jitter
"""

from __future__ import annotations

from typing import Literal

import albumentations as A

from histosynth.augment import REFLECT, colour_jitter, flips, seeded, stain_jitter, symmetries

AugmentPolicy = Literal["none", "flip", "flip_rot90", "stain", "classic"]
POLICIES = ("none", "flip", "flip_rot90", "stain", "classic")


def build_augment(policy: str, seed: int) -> A.Compose:
    """An albumentations pipeline for uint8 ``H x W x 3`` tiles, seeded (reproducible per run)."""
    if policy == "none":
        ops = []
    elif policy == "flip":
        ops = flips()
    elif policy == "flip_rot90":
        ops = symmetries()
    elif policy == "stain":
        ops = symmetries() + stain_jitter()
    elif policy == "classic":
        ops = symmetries() + [
            A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), translate_percent=(-0.05, 0.05), border_mode=REFLECT, p=0.5),
            A.ElasticTransform(alpha=20, sigma=5, border_mode=REFLECT, p=0.25),
        ] + colour_jitter() + stain_jitter()
    else:
        raise ValueError(f"unknown augmentation policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return seeded(ops, seed)
