"""New nucleus masks drawn from training masks, for mask-conditioned synthesis of image-mask pairs.

A pair generator paints an image for a mask; for the pair to ADD something, the mask must be new.
:class:`MaskDrawer` holds a bank of training mask tiles (the training split only: never validation
or test masks) and draws, from a seeded generator:

``transform``  a training tile under a random symmetry of the square, scale (0.8-1.25), rotation
               and an elastic deformation (albumentations; nearest-neighbour, so the mask stays
               binary): the layout of real tissue, never the same twice
``place``      single nuclei cut from the training tiles (with their shapes and sizes) placed
               one by one at random positions, rotated and flipped, without
               overlap, as many as a random training tile holds
``mix``        either, with equal probability
"""

from __future__ import annotations

import functools

import numpy as np

METHODS = ("transform", "place", "mix")


class MaskDrawer:
    """``bank``: ``N x T x T`` uint8 class-id masks (0 background, 1 nucleus)."""

    def __init__(self, bank: np.ndarray):
        if bank.ndim != 3 or len(bank) == 0:
            raise ValueError(f"a mask bank is N x T x T with N >= 1, got shape {bank.shape}")
        self.bank = bank

    @functools.cached_property
    def _nuclei(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The single nuclei of the bank as tight binary crops (connected components that are
        convex enough to be one nucleus -- solidity > 0.85 -- at least 20 px, not cut by the
        tile's edge), and the objects count of each tile."""
        from skimage.measure import label, regionprops

        shapes, counts = [], []
        for m in self.bank:
            regions = regionprops(label(m > 0, connectivity=1))
            counts.append(len(regions))
            for r in regions:
                y0, x0, y1, x1 = r.bbox
                cut = y0 == 0 or x0 == 0 or y1 == m.shape[0] or x1 == m.shape[1]
                if not cut and r.area >= 20 and r.solidity > 0.85:
                    shapes.append(r.image.copy())
        if not shapes:
            raise ValueError("the training masks hold no whole, single nucleus to place")
        return shapes, np.asarray(counts)

    def draw(self, rng: np.random.Generator, size: int, method: str = "transform") -> np.ndarray:
        """One new ``size x size`` uint8 mask (0/1) from ``rng``."""
        if method not in METHODS:
            raise ValueError(f"unknown mask drawing method {method!r}; choose one of {', '.join(METHODS)}")
        if method == "mix":
            method = METHODS[int(rng.integers(2))]
        return self._transform(rng, size) if method == "transform" else self._place(rng, size)

    def _transform(self, rng: np.random.Generator, size: int) -> np.ndarray:
        import random

        import albumentations as A
        import cv2

        src = self.bank[int(rng.integers(len(self.bank)))]
        ops = [A.SquareSymmetry(p=1.0),
               A.Affine(scale=(0.8, 1.25), rotate=(-180, 180), border_mode=cv2.BORDER_REFLECT_101, p=1.0),
               A.ElasticTransform(alpha=30, sigma=6, border_mode=cv2.BORDER_REFLECT_101, p=0.7)]
        if src.shape[0] != size or src.shape[1] != size:
            ops.insert(0, A.RandomCrop(size, size, pad_if_needed=True, border_mode=cv2.BORDER_REFLECT_101, p=1.0))
        tf = A.Compose(ops)
        s = int(rng.integers(2 ** 31))
        tf.set_random_state(np.random.default_rng(s), random.Random(s))
        image = np.zeros((*src.shape, 1), np.uint8)                 # the pipeline wants an image
        return tf(image=image, mask=src)["mask"].astype(np.uint8)

    def _place(self, rng: np.random.Generator, size: int) -> np.ndarray:
        from scipy import ndimage as ndi

        shapes, counts = self._nuclei
        area = self.bank.shape[1] * self.bank.shape[2]
        want = int(round(counts[int(rng.integers(len(counts)))] * size * size / area))
        out = np.zeros((size, size), np.uint8)
        taken = np.zeros((size + 2, size + 2), bool)                # one-pixel gap between nuclei
        placed, tries = 0, 0
        while placed < want and tries < 30 * max(want, 1):
            tries += 1
            shape = np.rot90(shapes[int(rng.integers(len(shapes)))], int(rng.integers(4)))
            if rng.integers(2):
                shape = shape[:, ::-1]
            h, w = shape.shape
            if h >= size or w >= size:
                continue
            y, x = int(rng.integers(size - h)), int(rng.integers(size - w))
            region, body = taken[y:y + h + 2, x:x + w + 2], np.pad(shape, 1)
            if (region & ndi.binary_dilation(body)).any():
                continue
            region |= body
            out[y:y + h, x:x + w] |= shape.astype(np.uint8)
            placed += 1
        return out
