"""Augmentation building blocks shared by the downstream tasks, from albumentations (nothing
re-implemented here). An albumentations pipeline applies the same geometry to a ``mask`` as to
the image (nearest-neighbour), so the segmentation policies are the classification ones plus
distortions."""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

REFLECT = cv2.BORDER_REFLECT_101


def flips() -> list:
    """Horizontal and vertical flips: 4 of the 8 symmetries of the square."""
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]


def symmetries() -> list:
    """All 8 symmetries of the square, uniformly (flips and 90-degree rotations: tissue has no 'up')."""
    return [A.SquareSymmetry(p=1.0)]


def stain_jitter() -> list:
    """H&E stain jitter (albumentations' HEStain: Macenko stain vectors of each tile, intensities
    scaled by 0.9-1.1 and shifted by +-0.05; after Tellez et al. 2018's HED jitter)."""
    return [A.HEStain(method="macenko", intensity_scale_range=(0.9, 1.1),
                      intensity_shift_range=(-0.05, 0.05), p=0.5)]


def colour_jitter() -> list:
    return [A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.04, p=0.5)]


def seeded(ops: list, seed: int) -> A.Compose:
    """``ops`` as one pipeline drawing from ONE generator seeded by ``seed`` (Compose(seed=...)
    would give every transform its own generator with the same seed, so e.g. the two flips would
    always agree)."""
    tf = A.Compose(ops)
    tf.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return tf
