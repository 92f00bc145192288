"""Augmentation policies for image-mask pairs (albumentations: the mask gets the same geometry,
nearest-neighbour; colour transforms leave it alone). Every policy first cuts the random
training crop.

``none``        the crop as it is
``flip_rot90``  all 8 symmetries of the square
``distort``     flip_rot90 + scale 0.8-1.25 and rotation (affine), elastic deformation, grid
                distortion and optical distortion (barrel and pincushion: both signs of the lens
                coefficient), the deformations of the U-Net papers
``stain``       flip_rot90 + colour and H&E stain jitter
``classic``     distort + colour and H&E stain jitter
"""

from __future__ import annotations

import albumentations as A

from histosynth.augment import REFLECT, colour_jitter, seeded, stain_jitter, symmetries

POLICIES = ("none", "flip_rot90", "distort", "stain", "classic")


def distortions() -> list:
    return [
        A.Affine(scale=(0.8, 1.25), rotate=(-30, 30), border_mode=REFLECT, p=0.5),
        A.OneOf([
            A.ElasticTransform(alpha=40, sigma=6, border_mode=REFLECT, p=1.0),
            A.GridDistortion(num_steps=5, distort_limit=0.3, border_mode=REFLECT, p=1.0),
            A.OpticalDistortion(distort_limit=(-0.3, 0.3), border_mode=REFLECT, p=1.0),
        ], p=0.5),
    ]


def build_pair_augment(policy: str, crop: int, seed: int) -> A.Compose:
    """A seeded pipeline for ``image`` (``H x W x 3`` uint8) and ``mask`` (``H x W``): a random
    ``crop`` x ``crop`` window, then ``policy``."""
    ops = [A.RandomCrop(crop, crop, p=1.0)]
    if policy == "flip_rot90":
        ops += symmetries()
    elif policy == "distort":
        ops += symmetries() + distortions()
    elif policy == "stain":
        ops += symmetries() + colour_jitter() + stain_jitter()
    elif policy == "classic":
        ops += symmetries() + distortions() + colour_jitter() + stain_jitter()
    elif policy != "none":
        raise ValueError(f"unknown augmentation policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return seeded(ops, seed)
