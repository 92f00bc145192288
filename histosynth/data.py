"""Tiles decoded once into a uint8 cache, sampled in a resumable order, augmented on the tensor.

Training never decodes an image file: :class:`TileCache` decodes a folder once (optionally Macenko
stain-normalised, resized to a square of ``image_size``) into an ``N x 3 x S x S`` uint8 array.
With ``cache_dir`` set, that array is a ``.npy`` file memory-mapped on later runs (keyed by the
file list, sizes, modification times and the preprocessing settings), so memory stays flat for
large sets and a second run starts at once.

:class:`BatchSampler` draws epochs of seeded permutations; its ``state_dict`` goes into training
checkpoints, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from histosynth.checkpoint import atomic_fill, atomic_write_text
from histosynth.roles import TileSet
from histosynth.stain import StainNormaliser
from histosynth.images import (DataError, UnreadableImage, open_rgb, scan_flat_folder,
                               scan_image_folder, warn_skipped)

CACHE_VERSION = 2


def default_cache_dir() -> Path:
    return Path(os.environ.get("HISTOSYNTH_CACHE", Path.home() / ".cache" / "histosynth"))


def cache_dir_of(data_cfg) -> Path | None:
    """The disk cache a config's ``data`` section asks for (``cache``, ``cache_dir``); None: memory."""
    if data_cfg.cache != "disk":
        return None
    return Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else default_cache_dir()


def square_resize(img: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square and resize (bicubic, antialiased) to ``size``; ``S x S x 3`` uint8."""
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


@dataclass
class TileCache:
    """Decoded tiles of an ImageFolder tree: ``images[i]`` is ``3 x S x S`` uint8, ``labels[i]``."""

    images: np.ndarray          # N x 3 x S x S uint8 (maybe a read-only memmap)
    labels: np.ndarray          # N int64
    classes: list[str]
    files: list[str]
    skipped: list[tuple[str, str]]
    key: str = ""               # identifies the decoded content (files, sizes, times, settings)
    targets: np.ndarray | None = None   # per-tile targets of any shape (N x ...), e.g. masks

    def __len__(self) -> int:
        return len(self.labels)

    def tileset(self) -> TileSet:
        """The tiles as a downstream task trains on them (all real)."""
        return TileSet(self.images, self.labels, list(self.classes), self.targets, np.zeros(len(self), bool))

    def batches(self, batch: int = 256):
        """``(start, B x 3 x S x S uint8)`` over every tile in order. A memory-mapped cache is read
        with plain file reads: a pass over a large set then leaves its pages in the kernel's page
        cache, not in this process's resident memory (as touching the mapping would)."""
        if isinstance(self.images, np.memmap) and self.images.filename:
            shape = self.images.shape[1:]
            per = int(np.prod(shape))
            with open(self.images.filename, "rb") as f:
                for s in range(0, len(self), batch):
                    n = min(batch, len(self) - s)
                    f.seek(self.images.offset + s * per)
                    yield s, np.fromfile(f, np.uint8, n * per).reshape(n, *shape)
        else:
            for s in range(0, len(self), batch):
                yield s, np.asarray(self.images[s:s + batch])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}

    def sample_files(self) -> list[str]:
        return list(self.files)

    def describe(self) -> str:
        return f"{len(self)} tiles ({', '.join(f'{c} {n}' for c, n in self.class_counts().items())})"

    @classmethod
    def build(cls, root: str | Path, image_size: int, stain: StainNormaliser | None = None,
              cache_dir: str | Path | None = None, progress: bool = True, layout: str = "classes") -> "TileCache":
        """Decode ``root`` once. ``stain``: normalise every image first (one that cannot be
        normalised is kept as it is, counted in a warning). ``layout``: ``classes`` (ImageFolder:
        one sub-folder per class) or ``flat`` (every image directly in ``root``, one
        pseudo-class named after it)."""
        root = Path(root)
        if layout == "flat":
            classes, items = [root.name], [(p, 0) for p in scan_flat_folder(root)]
        else:
            classes, items = scan_image_folder(root)
        key = _cache_key(root, items, image_size, stain.key if stain else "none")
        npy = json_path = None
        if cache_dir is not None:
            cache_dir = Path(cache_dir)
            npy, json_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
            if npy.is_file() or json_path.is_file():
                try:
                    images, meta = _open_cache(npy, json_path)
                except CacheDamaged as e:
                    warnings.warn(f"the tile cache {npy} is damaged ({e}); decoding {root} again", stacklevel=2)
                    npy.unlink(missing_ok=True)
                    json_path.unlink(missing_ok=True)
                else:
                    skipped = [tuple(s) for s in meta["skipped"]]
                    warn_skipped(skipped, str(root))
                    return cls(images, np.asarray(meta["labels"], dtype=np.int64), meta["classes"],
                               meta["files"], skipped, key)

        shape = (len(items), 3, image_size, image_size)
        min_side = max(2, image_size // 4)        # more than 4x upscaling makes no tile
        labels, files, skipped = [], [], []
        stain_failures = 0

        def decode_into(images: np.ndarray) -> int:
            """Decode every readable file into ``images`` row by row; returns how many."""
            nonlocal stain_failures
            n = 0
            for path, label in tqdm(items, desc=f"decoding {root.name}", unit="img",
                                    disable=not progress, leave=False):
                try:
                    rgb = np.asarray(open_rgb(path))
                except UnreadableImage as e:
                    skipped.append((str(path), str(e)))
                    continue
                if min(rgb.shape[:2]) < min_side:
                    skipped.append((str(path), f"too small ({rgb.shape[1]} x {rgb.shape[0]} px) for {image_size} px "
                                               f"tiles (at least {min_side})"))
                    continue
                if stain is not None:
                    try:
                        rgb = stain(rgb)
                    except Exception:  # background-only tiles have no stain vectors to fit
                        stain_failures += 1
                images[n] = square_resize(Image.fromarray(rgb), image_size).transpose(2, 0, 1)
                labels.append(label)
                files.append(str(path.relative_to(root)))
                n += 1
            return n

        def check() -> None:
            warn_skipped(skipped, str(root))
            if stain_failures:
                warnings.warn(f"{stain.method} stain normalisation failed on {stain_failures} tile(s) of {root} "
                              "(too little stained tissue); they were kept unnormalised", stacklevel=3)
            present = set(labels)
            missing = [c for i, c in enumerate(classes) if i not in present]
            if missing:
                raise DataError(f"no readable image in class folder(s) {', '.join(missing)} of {root}")

        if npy is None:
            images = np.empty(shape, np.uint8)
            images = images[:decode_into(images)]
            check()
        else:
            # decoded straight into the cache file, tile by tile, with plain writes: memory stays
            # flat however many tiles there are (a list + np.stack held every tile twice, and
            # writing through a memory map keeps every written page resident)
            per = int(np.prod(shape[1:]))

            checksum = hashlib.blake2b(digest_size=16)

            def fill(tmp: Path) -> None:
                offset = _npy_header(tmp, shape)
                with open(tmp, "r+b") as f:
                    n = decode_into(_RowWriter(f, offset, per, checksum))
                check()
                if n < len(items):          # skipped files: the array is shorter than the file list
                    part = tmp.with_name(f".{npy.name}.part.{os.getpid()}.tmp")
                    part_offset = _npy_header(part, (n, *shape[1:]))
                    with open(tmp, "rb") as src, open(part, "r+b") as dst:
                        src.seek(offset)
                        dst.seek(part_offset)
                        for i in range(0, n, 1024):
                            dst.write(src.read(per * (min(i + 1024, n) - i)))
                    os.replace(part, tmp)
            atomic_fill(npy, fill)
            meta = {"version": CACHE_VERSION, "root": str(root), "classes": classes,
                    "files": files, "labels": labels, "skipped": skipped,
                    "shape": [len(files), *shape[1:]], "blake2b": checksum.hexdigest()}
            atomic_write_text(json_path, json.dumps(meta))
            images = np.load(npy, mmap_mode="r")
        labels_np = np.asarray(labels, dtype=np.int64)
        return cls(images, labels_np, classes, files, skipped, key)


def _npy_header(path: Path, shape: tuple[int, ...]) -> int:
    """Create ``path`` as a (sparse) uint8 .npy of ``shape``; returns where its data starts."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    offset = arr.offset
    del arr
    return offset


class _RowWriter:
    """``w[i] = tile`` writes tile ``i`` of an .npy file in place, with a plain file write (rows
    come in order, 0, 1, 2 ...: ``checksum`` sees the data as the file will hold it)."""

    def __init__(self, f, offset: int, per: int, checksum):
        self.f, self.offset, self.per, self.checksum = f, offset, per, checksum

    def __setitem__(self, i: int, tile: np.ndarray) -> None:
        data = np.ascontiguousarray(tile, dtype=np.uint8).tobytes()
        self.f.seek(self.offset + i * self.per)
        self.f.write(data)
        self.checksum.update(data)


class CacheDamaged(Exception):
    """A cache file is truncated, corrupt, of another shape or content than its record says."""


def _open_cache(npy: Path, json_path: Path) -> tuple[np.ndarray, dict]:
    """The memory-mapped tiles and their record, after checking the record's version, the array's
    shape and dtype, the file's size and the data's checksum (one streaming read)."""
    try:
        meta = json.loads(json_path.read_text())
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:      # missing, truncated, not an .npy, torn JSON
        raise CacheDamaged(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        raise CacheDamaged("a record of another version")
    if images.dtype != np.uint8 or list(images.shape) != meta.get("shape") or len(meta["labels"]) != len(images):
        raise CacheDamaged(f"holds {images.dtype} {list(images.shape)}, its record says {meta.get('shape')}")
    if npy.stat().st_size != images.offset + images.nbytes:
        raise CacheDamaged(f"{npy.stat().st_size} bytes instead of {images.offset + images.nbytes}")
    h = hashlib.blake2b(digest_size=16)
    with open(npy, "rb") as f:
        f.seek(images.offset)
        while block := f.read(1 << 24):
            h.update(block)
    if h.hexdigest() != meta.get("blake2b"):
        raise CacheDamaged("its content does not match its checksum")
    return images, meta


def _cache_key(root: Path, items, image_size, stain_key: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, str(root.resolve()), image_size, stain_key]).encode())
    for path, label in items:
        # ctime too: a file rewritten with its old size and mtime restored still changes its ctime
        st = path.stat() if path.exists() else None
        h.update(f"{path.relative_to(root)}|{label}|{st and st.st_size}|{st and st.st_mtime_ns}|"
                 f"{st and st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:24]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B x) 3 x H x W`` -> float, ImageNet mean/std (what ImageNet-style encoders expect:
    efficientnet-pytorch, segmentation-models-pytorch)."""
    mean, std = _MEAN.to(x.device), _STD.to(x.device)
    return (x.float() - mean) / std


SAMPLERS = ("random", "balanced", "class_augment")


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per pass over ``n`` tiles (the remainder is dropped: no size-1 BatchNorm
    batch); a set smaller than one batch is one batch."""
    return max(1, n // batch_size)


class StepBatches(Dataset):
    """Item ``k`` is this rank's share of the global batch of training step ``k``: ``data``'s
    items (``data.item(i, seed)``: a classifier's (image, label), a segmenter's (image, mask))
    collated, a deterministic function of (seed, k). A DataLoader over a range of steps
    (``batch_size=None``) prefetches them in workers when there are any.

    Samplers: ``random`` (each epoch a permutation), ``balanced`` (torchsampler's class weights,
    drawn with replacement), ``class_augment`` (every tile once, plus each class topped up to the
    largest with extra draws of its own tiles -- as many as its rarity asks -- that ``data``
    augments heavily: ``data.item(i, seed, heavy=True)``)."""

    def __init__(self, data: Dataset, batch_size: int, seed: int, sampler: str = "random",
                 rank: int = 0, world: int = 1):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self.data, self.seed, self.sampler, self.rank, self.world = data, seed, sampler, rank, world
        n = len(data)
        if sampler == "class_augment":
            labels = np.asarray(data.get_labels())
            self.classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
            n = len(self.classes) * max(len(c) for c in self.classes)
        self.batch_size = min(batch_size, n)
        self.steps_per_epoch = steps_per_epoch(n, batch_size)
        if sampler == "balanced":                # torchsampler's weights: 1 / count of the tile's class
            from torchsampler import ImbalancedDatasetSampler
            self.weights = torch.as_tensor(ImbalancedDatasetSampler(data).weights, dtype=torch.double)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return 2 ** 62          # as many steps as a run asks for

    def order(self, epoch: int) -> torch.Tensor:
        """The tiles of ``epoch`` in the order they are drawn (one generator per epoch); with
        ``class_augment``, ``len(data) + i`` stands for a heavily augmented draw of tile ``i``."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            n = self.steps_per_epoch * self.batch_size
            if self.sampler == "balanced":
                self._order = torch.multinomial(self.weights, n, replacement=True, generator=g)
            elif self.sampler == "class_augment":
                top = max(len(c) for c in self.classes)
                extra = [torch.from_numpy(c)[torch.randint(len(c), (top - len(c),), generator=g)] + len(self.data)
                         for c in self.classes]
                pool = torch.cat([torch.arange(len(self.data)), *extra])
                self._order = pool[torch.randperm(len(pool), generator=g)][:n]
            else:
                self._order = torch.randperm(len(self.data), generator=g)[:n]
            self._epoch = epoch
        return self._order

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(tile indices, positions in the global batch) of this rank's share of ``step``."""
        epoch, j = divmod(step, self.steps_per_epoch)
        idx = self.order(epoch)[j * self.batch_size:(j + 1) * self.batch_size].numpy()
        pos = np.arange(len(idx))
        return idx[self.rank::self.world], pos[self.rank::self.world]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, pos = self.indices(step)
        n = len(self.data)
        return default_collate([self.data.item(int(i), (self.seed, step, int(p))) if i < n else
                                self.data.item(int(i) - n, (self.seed, step, int(p)), heavy=True)
                                for i, p in zip(idx, pos)])


class BatchSampler:
    """Endless batches of indices from seeded epoch permutations; resumable via state_dict.

    Data-parallel: every process draws the same global batch of ``batch_size`` and keeps its
    share (``[rank::world]``), so the stream of samples, and this state, do not depend on the
    number of processes (a run resumes on another world size where it stopped).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("cannot sample from an empty set")
        if batch_size % world:
            raise ValueError(f"a batch of {batch_size} cannot be shared out over {world} processes")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0
        self.epoch = 0

    def next(self) -> torch.Tensor:
        out, need = [], self.batch_size
        while need:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos, self.epoch = 0, self.epoch + 1
            take = min(need, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        return torch.cat(out)[self.rank::self.world]

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos, self.epoch = state["perm"].clone(), int(state["pos"]), int(state["epoch"])


def flip_rot90(x: torch.Tensor, gen: torch.Generator, mode: str, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Random dihedral augmentation of a ``B x C x H x W`` batch (histology has no 'up').

    ``mode``: ``none`` | ``flip`` (horizontal and vertical flips) | ``flip_rot90`` (all 8
    symmetries of the square). Decisions are drawn from ``gen`` on the CPU, so they are
    reproducible and independent of the device ``x`` lives on. ``shard`` (rank, world): ``x`` is
    this process's share of a global batch; the decisions are drawn for the global batch and
    sliced the same way, so they do not depend on the number of processes.
    """
    if mode == "none":
        return x
    b = x.shape[0]
    rank, world = shard
    r = torch.rand(b * world, 3, generator=gen)[rank::world]
    hflip = (r[:, 0] < 0.5).to(x.device).view(b, 1, 1, 1)
    vflip = (r[:, 1] < 0.5).to(x.device).view(b, 1, 1, 1)
    x = torch.where(hflip, x.flip(3), x)
    x = torch.where(vflip, x.flip(2), x)
    if mode == "flip_rot90" and x.shape[2] == x.shape[3]:
        rot = (r[:, 2] < 0.5).to(x.device).view(b, 1, 1, 1)
        x = torch.where(rot, x.transpose(2, 3), x)
    return x


def random_crop(x: torch.Tensor, size: int, gen: torch.Generator,
                shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """An independent random ``size`` x ``size`` crop of each image of a ``B x C x H x W`` batch
    (``shard`` as in :func:`flip_rot90`)."""
    b, _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    rank, world = shard
    ys = torch.randint(0, h - size + 1, (b * world,), generator=gen)[rank::world].tolist()
    xs = torch.randint(0, w - size + 1, (b * world,), generator=gen)[rank::world].tolist()
    return torch.stack([x[i, :, y:y + size, xx:xx + size] for i, (y, xx) in enumerate(zip(ys, xs))])


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (rounded, clamped)."""
    return x.detach().float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)
