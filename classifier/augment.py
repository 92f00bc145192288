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

import random
from typing import Literal

import albumentations as A
import cv2
import numpy as np

AugmentPolicy = Literal["none", "flip", "flip_rot90", "stain", "classic"]
POLICIES = ("none", "flip", "flip_rot90", "stain", "classic")


def build_augment(policy: str, seed: int) -> A.Compose:
    """An albumentations pipeline for uint8 ``H x W x 3`` tiles, seeded (reproducible per run)."""
    flip = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    flip_rot90 = [A.SquareSymmetry(p=1.0)]        # uniform over the 8 symmetries
    stain = [A.HEStain(method="macenko", intensity_scale_range=(0.9, 1.1),
                       intensity_shift_range=(-0.05, 0.05), p=0.5)]
    if policy == "none":
        ops = []
    elif policy == "flip":
        ops = flip
    elif policy == "flip_rot90":
        ops = flip_rot90
    elif policy == "stain":
        ops = flip_rot90 + stain
    elif policy == "classic":
        ops = flip_rot90 + [
            A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), translate_percent=(-0.05, 0.05),
                     border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.ElasticTransform(alpha=20, sigma=5, border_mode=cv2.BORDER_REFLECT_101, p=0.25),
            A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.04, p=0.5),
        ] + stain
    else:
        raise ValueError(f"unknown augmentation policy {policy!r}; choose one of {', '.join(POLICIES)}")
    tf = A.Compose(ops)
    # one generator for the whole pipeline: Compose(seed=...) gives every transform its own
    # generator with the SAME seed, so e.g. HorizontalFlip and VerticalFlip always agree (2 of the
    # 4 flips) and the colour and stain jitters draw the same numbers
    tf.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return tf
