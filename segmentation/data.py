"""Image-mask pairs: found by file name, checked, decoded once into a disk cache.

A pairs folder (a split, or a synthetic set written by a pair generator)::

    images/<name>.png|jpg|tif ...   RGB images
    masks/<name>.png                one 8-bit channel, the same size as its image: 0 background and
                                    255 foreground (binary), or class ids 0..K (class-indexed)
    instances/<name>.png            optional: 16-bit instance label maps (0 background, one id per
                                    object), for instance metrics (AJI, PQ) of test images

Partners are matched by the file name without its extension. A pair that cannot be used is
named with the reason and left out (an image without a mask, a mask without an image, a mask of
another size, an RGB or grey-level mask, values other than 0/255 or class ids, an unreadable
file); nothing else is lost. A folder with no usable pair is an error.

:func:`load_pairs` decodes a folder once into the cache (``$HISTOSYNTH_CACHE``), keyed by the
files, their sizes and times and the preprocessing, the mask beside the image: as fixed tiles of
``tile`` px (training: random crops are cut from them on the fly) or as whole images
(validation and test: predicted whole, scored whole).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from histosynth.checkpoint import atomic_write, atomic_write_text
from histosynth.images import (DataError, UnreadableImage, list_images, open_rgb,
                               warn_skipped)
from histosynth.roles import Sample, TileSet
from histosynth.stain import StainNormaliser

PAIRS = "pairs"                 # the one "class" of a pairs folder (what synthetic ratios count)
CACHE_VERSION = 1
FOLDERS = ("images", "masks", "instances")


@dataclass(frozen=True)
class PairFiles:
    image: str                  # relative to the pairs folder
    mask: str
    instances: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return (self.image, self.mask) + ((self.instances,) if self.instances else ())


def scan_pairs(root: str | Path) -> tuple[list[PairFiles], list[tuple[str, str]]]:
    """The pairs of ``root`` matched by file stem, and (file, reason) for every file left out."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"pairs folder not found: {root}")
    missing = [d for d in ("images", "masks") if not (root / d).is_dir()]
    if missing:
        raise DataError(f"{root} has no {' or '.join(d + '/' for d in missing)} folder; a pairs folder holds "
                        "images/ and masks/ with matching file names (and optionally instances/)")
    skipped: list[tuple[str, str]] = []

    def by_stem(folder: str) -> dict[str, str]:
        out: dict[str, str] = {}
        if not (root / folder).is_dir():
            return out
        for p in list_images(root / folder):
            rel = f"{folder}/{p.name}"
            if p.stem in out:
                skipped.append((rel, f"another {folder[:-1]} has the same name ({out[p.stem]}); "
                                     "partners are matched by name, so a name must be unique"))
                continue
            out[p.stem] = rel
        return out

    images, masks, inst = by_stem("images"), by_stem("masks"), by_stem("instances")
    pairs = []
    for stem in sorted(images):
        if stem not in masks:
            skipped.append((images[stem], f"no mask (expected masks/{stem}.png)"))
            continue
        pairs.append(PairFiles(images[stem], masks[stem], inst.get(stem)))
    skipped += [(m, f"a mask without an image (no images/{stem}.*)") for stem, m in sorted(masks.items())
                if stem not in images]
    skipped += [(m, f"an instance map without an image (no images/{stem}.*)") for stem, m in sorted(inst.items())
                if stem not in images]
    return pairs, skipped


class PairsLayout:
    """The :class:`~histosynth.roles.Layout` of segmentation data: a sample is an image with its
    mask (and instance map)."""

    description = "images/ and masks/ (image-mask pairs matched by file name)"

    def samples(self, root: Path) -> list[Sample]:
        pairs, skipped = scan_pairs(root)
        warn_skipped(skipped, str(root))
        if not pairs:
            raise DataError(f"no image-mask pair in {root} (images/ and masks/ need files of the same name)")
        return [Sample(p.files) for p in pairs]


def read_mask(path: Path, num_classes: int = 1) -> np.ndarray:
    """``H x W`` uint8 class ids (0 background; binary masks: 1 foreground) of a mask file, or
    UnreadableImage saying what is wrong with it. Binary masks (``num_classes`` 1) hold 0 and 255
    (or 0 and 1); class-indexed masks hold 0..num_classes."""
    try:
        with Image.open(path) as img:
            img.load()
            mode, arr = img.mode, np.asarray(img)
    except Exception as e:
        raise UnreadableImage(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if arr.ndim == 3 or mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
        raise UnreadableImage(f"has colour channels ({mode}); a mask is one channel (8-bit grey or palette) "
                              "holding 0 background and 255 foreground, or class ids")
    if mode == "1":
        arr = arr.astype(np.uint8) * 255
    values = np.unique(arr)
    if num_classes == 1:
        if set(values.tolist()) <= {0, 255}:
            return (arr == 255).astype(np.uint8)
        if set(values.tolist()) <= {0, 1}:
            return arr.astype(np.uint8)
        what = "a grey-level image (e.g. a JPEG or a resized, antialiased mask)" if len(values) > 3 else "other values"
        raise UnreadableImage(f"holds {len(values)} values ({_values(values)}): {what}; a binary mask holds "
                              "only 0 and 255")
    if values.max() > num_classes:
        raise UnreadableImage(f"holds values {_values(values)}; a mask of {num_classes} classes holds class "
                              f"ids 0..{num_classes}")
    return arr.astype(np.uint8)


def _values(v: np.ndarray) -> str:
    return ", ".join(map(str, v[:6].tolist())) + (" ..." if len(v) > 6 else "")


def read_instances(path: Path) -> np.ndarray:
    """``H x W`` int32 instance ids (0 background) of a label-map file."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
    except Exception as e:
        raise UnreadableImage(f"unreadable ({type(e).__name__})") from None
    if arr.ndim != 2:
        raise UnreadableImage("is not a single-channel label map (16-bit, one id per object)")
    return arr.astype(np.int32)


def tile_starts(length: int, tile: int) -> list[int]:
    """Offsets of the fewest ``tile``-long windows that cover ``length``, spread evenly (the
    last one ends at the edge; neighbours overlap a little when ``tile`` does not divide it)."""
    n = -(-length // tile)
    return [int(round(v)) for v in np.linspace(0, length - tile, n)] if n > 1 else [0]


@dataclass
class PairSet:
    """Decoded pairs (a :class:`~histosynth.roles.SplitData`): ``tile`` set: ``images`` N x 3 x T x T
    uint8 and ``masks`` N x T x T uint8 class ids, tiles of the pairs in ``stems`` order; whole
    images: lists of ``3 x H x W`` images, ``H x W`` masks and (where every image has one)
    ``H x W`` int32 instance maps."""

    images: np.ndarray | list[np.ndarray]
    masks: np.ndarray | list[np.ndarray]
    stems: list[str]                        # the pair each tile / image comes from
    files: list[str]                        # every file read, relative to the folder
    skipped: list[tuple[str, str]] = field(default_factory=list)
    instances: list[np.ndarray] | None = None
    classes: list[str] = field(default_factory=lambda: [PAIRS])

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def whole(self) -> bool:
        return isinstance(self.images, list)

    def class_counts(self) -> dict[str, int]:
        return {PAIRS: len(self)}

    def describe(self) -> str:
        if self.whole:
            return f"{len(self)} whole images" + (" with instance maps" if self.instances is not None else "")
        return f"{len(set(self.stems))} images as {len(self)} tiles of {self.images.shape[-1]} px"

    def sample_files(self) -> list[str]:
        return [f for f in self.files if f.startswith("images/")]

    def tileset(self) -> TileSet:
        return TileSet(self.images, np.zeros(len(self), np.int64), list(self.classes), self.masks,
                       np.zeros(len(self), bool))


def load_pairs(root: str | Path, tile: int | None, num_classes: int = 1, stain: StainNormaliser | None = None,
               cache_dir: str | Path | None = None, progress: bool = True) -> PairSet:
    """Decode the pairs of ``root``: as tiles of ``tile`` px (a pair smaller than that is left out,
    named) or, with ``tile`` None, as whole images. ``stain`` normalises every image (one it
    cannot normalise is kept as it is, counted in a warning)."""
    root = Path(root)
    pairs, skipped = scan_pairs(root)
    key = _key(root, pairs, tile, num_classes, stain.key if stain else "none")
    stain_failures = 0
    if cache_dir is not None:
        cached = _open(Path(cache_dir), key)
        if cached is not None:
            warn_skipped(cached.skipped, str(root))
            return cached
    images, masks, inst, stems, files = [], [], [], [], []
    for p in tqdm(pairs, desc=f"decoding {root.name}", unit="pair", disable=not progress, leave=False):
        try:
            rgb = np.asarray(open_rgb(root / p.image))
        except UnreadableImage as e:
            skipped.append((p.image, str(e)))
            continue
        try:
            mask = read_mask(root / p.mask, num_classes)
        except UnreadableImage as e:
            skipped.append((p.mask, str(e)))
            continue
        if mask.shape != rgb.shape[:2]:
            skipped.append((p.mask, f"is {mask.shape[1]} x {mask.shape[0]} px but its image {p.image} is "
                                    f"{rgb.shape[1]} x {rgb.shape[0]}"))
            continue
        ids = None
        if p.instances and tile is None:
            try:
                ids = read_instances(root / p.instances)
            except UnreadableImage as e:
                skipped.append((p.instances, f"{e}; the pair is scored without instance metrics"))
            else:
                if ids.shape != mask.shape:
                    skipped.append((p.instances, f"is {ids.shape[1]} x {ids.shape[0]} px but its image is "
                                                 f"{rgb.shape[1]} x {rgb.shape[0]}; the pair is scored without "
                                                 "instance metrics"))
                    ids = None
        if tile is not None and min(mask.shape) < tile:
            skipped.append((p.image, f"is {rgb.shape[1]} x {rgb.shape[0]} px, smaller than the {tile} px "
                                     "training tiles (downstream.model.tile_size)"))
            continue
        if stain is not None:
            try:
                rgb = stain(rgb)
            except Exception:          # too little stained tissue to fit stain vectors to
                stain_failures += 1
        stem = Path(p.image).stem
        files += [p.image, p.mask] + ([p.instances] if ids is not None else [])
        if tile is None:
            images.append(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
            masks.append(mask)
            inst.append(ids)
            stems.append(stem)
            continue
        for y in tile_starts(mask.shape[0], tile):
            for x in tile_starts(mask.shape[1], tile):
                images.append(rgb[y:y + tile, x:x + tile].transpose(2, 0, 1))
                masks.append(mask[y:y + tile, x:x + tile])
                stems.append(stem)
    warn_skipped(skipped, str(root))
    if stain_failures:
        warnings.warn(f"{stain.method} stain normalisation failed on {stain_failures} image(s) of {root} "
                      "(too little stained tissue); they were kept unnormalised", stacklevel=2)
    if not stems:
        raise DataError(f"no usable image-mask pair in {root}" + (f" ({len(skipped)} left out, see above)"
                                                                   if skipped else ""))
    if tile is not None:
        images, masks = np.stack(images), np.stack(masks)
    instances = inst if tile is None and all(i is not None for i in inst) else None
    out = PairSet(images, masks, stems, files, skipped, instances)
    if cache_dir is not None:
        _save(Path(cache_dir), key, out)
    return out


# ----------------------------------------------------------------------------------------------
# the cache: flat arrays + a record (shapes, files, checksum); the record is written last


def _key(root: Path, pairs: list[PairFiles], tile, num_classes, norm_key) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, "pairs", str(root.resolve()), tile, num_classes,
                                   norm_key]).encode())
    for p in pairs:
        for f in p.files:
            st = (root / f).stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n".encode())
    return "pairs-" + h.hexdigest()[:24]


def _arrays(ps: PairSet) -> dict[str, list[np.ndarray]]:
    out = {"images": list(ps.images), "masks": list(ps.masks)}
    if ps.instances is not None:
        out["instances"] = list(ps.instances)
    return out


def _save(cache: Path, key: str, ps: PairSet) -> None:
    record = {"version": CACHE_VERSION, "stems": ps.stems, "files": ps.files, "skipped": ps.skipped,
              "whole": ps.whole, "arrays": {}}
    for name, arrs in _arrays(ps).items():
        flat = np.concatenate([a.ravel() for a in arrs])
        atomic_write(cache / f"{key}.{name}.npy", lambda f, flat=flat: np.save(f, flat))
        record["arrays"][name] = {"dtype": str(flat.dtype), "shapes": [list(a.shape) for a in arrs],
                                  "blake2b": hashlib.blake2b(flat.tobytes(), digest_size=16).hexdigest()}
    atomic_write_text(cache / f"{key}.json", json.dumps(record))


def _open(cache: Path, key: str) -> PairSet | None:
    """The cached pairs, or None (absent, or damaged: then removed, with a warning)."""
    rec_path = cache / f"{key}.json"
    if not rec_path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text())
        if rec.get("version") != CACHE_VERSION:
            raise ValueError("a record of another version")
        arrays = {}
        for name, info in rec["arrays"].items():
            flat = np.load(cache / f"{key}.{name}.npy")
            if str(flat.dtype) != info["dtype"] or flat.size != sum(int(np.prod(s)) for s in info["shapes"]):
                raise ValueError(f"{name} holds {flat.dtype} x {flat.size}, its record says otherwise")
            if hashlib.blake2b(flat.tobytes(), digest_size=16).hexdigest() != info["blake2b"]:
                raise ValueError(f"{name} does not match its checksum")
            parts, at = [], 0
            for s in info["shapes"]:
                n = int(np.prod(s))
                parts.append(flat[at:at + n].reshape(s))
                at += n
            arrays[name] = parts
    except (OSError, ValueError, KeyError, EOFError) as e:
        warnings.warn(f"the pairs cache {rec_path} is damaged ({e}); decoding again", stacklevel=3)
        for p in cache.glob(f"{key}.*"):
            p.unlink(missing_ok=True)
        return None
    whole = rec["whole"]
    images = arrays["images"] if whole else np.stack(arrays["images"])
    masks = arrays["masks"] if whole else np.stack(arrays["masks"])
    return PairSet(images, masks, rec["stems"], rec["files"], [tuple(s) for s in rec["skipped"]],
                   arrays.get("instances"))


def write_pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray, binary: bool = True) -> tuple[str, str]:
    """Write ``images/<stem>.png`` (``H x W x 3`` uint8) and ``masks/<stem>.png`` (class ids;
    ``binary``: 0/255) under ``root``; returns both relative paths."""
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    img_rel, mask_rel = f"images/{stem}.png", f"masks/{stem}.png"
    Image.fromarray(image).save(root / img_rel)
    m = mask.astype(np.uint8)
    Image.fromarray(m * 255 if binary else m).save(root / mask_rel)
    return img_rel, mask_rel


