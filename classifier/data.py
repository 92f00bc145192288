"""Classification data: the class-folder layout, and a dataset over decoded uint8 tiles (a
:class:`histosynth.data.TileCache` or assembled arrays)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from histosynth.data import normalise
from histosynth.images import scan_image_folder
from histosynth.roles import Sample


class ClassFolders:
    """The :class:`~histosynth.roles.Layout` of classification data: ImageFolder, a sample is one
    image in its class folder."""

    description = "class folders (one sub-folder of images per class)"

    def samples(self, root: Path) -> list[Sample]:
        classes, items = scan_image_folder(root)
        return [Sample((p.relative_to(root).as_posix(),), classes[label]) for p, label in items]


class TileDataset(Dataset):
    """``images``: N x 3 x S x S uint8 (array or memmap); ``labels``: N ints.

    ``transform`` is an albumentations pipeline applied to ``S x S x 3`` uint8 tiles; ``heavy``
    the one of the extra draws of rare classes (the ``class_augment`` sampler). Exposes
    ``get_labels()`` for torchsampler's ImbalancedDatasetSampler.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None, heavy=None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform
        self.heavy = heavy

    def __len__(self) -> int:
        return len(self.labels)

    def get_labels(self) -> list[int]:
        return self.labels.tolist()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.item(i)

    def item(self, i: int, seed: tuple[int, ...] | None = None, heavy: bool = False) -> tuple[torch.Tensor, int]:
        """Tile ``i`` augmented (normalised ``3 x S x S`` float) and its label. ``seed``: the
        augmentation draws come from one numpy and one Python generator seeded by it (the same
        tile and seed always give the same result, in any process); None: the pipeline's own.
        ``heavy``: augmented by ``self.heavy`` instead."""
        img = np.asarray(self.images[i])                      # 3 x S x S uint8
        tf = self.heavy if heavy else self.transform
        if tf is not None and len(tf.transforms):
            if seed is not None:
                s = int(np.random.SeedSequence(seed).generate_state(1)[0])
                tf.set_random_state(np.random.default_rng(s), random.Random(s))
            img = tf(image=np.ascontiguousarray(img.transpose(1, 2, 0)))["image"]
            img = img.transpose(2, 0, 1)
        return normalise(torch.from_numpy(np.ascontiguousarray(img))), int(self.labels[i])
