"""Reading histology images of any common kind as 8-bit RGB, and finding them in folders.

Conversions (documented in the README, section "Images"):

* 16-bit (``I;16*``, ``I``): linear map of the full 16-bit range to 8 bits (``v / 257``); no
  contrast stretch, so an 8-bit image saved as 16-bit comes back unchanged.
* 32-bit float (``F``): values in [0, 1] are scaled by 255, larger ranges are clipped to [0, 255].
* RGBA / LA / palette with transparency: alpha-composited onto white (the slide background).
* Grayscale / bilevel: the grey value copied to R, G and B.
* CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB.
* EXIF orientation is applied; of a multi-page TIFF only the first page is read.

Unreadable files (truncated, corrupt, not an image, beyond Pillow's decompression-bomb limit)
raise :class:`UnreadableImage`, which callers turn into one skip-and-report warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from histosynth.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message says why."""


class DataError(UserError, ValueError):
    """A data folder is missing, empty or has an empty class; the message says what to fix."""


class SkippedFilesWarning(UserWarning):
    """Some files could not be read and were left out; the message lists them."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        if np.nanmax(a) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(np.round(a)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def open_rgb(path: str | Path) -> Image.Image:
    """Open ``path`` fully decoded as an 8-bit RGB PIL image, or raise UnreadableImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # Pillow's chatter (corrupt EXIF ...) names no file
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage("larger than Pillow's decompression-bomb limit "
                              f"({Image.MAX_IMAGE_PIXELS} pixels)") from None
    except FileNotFoundError:
        if Path(path).is_symlink():
            raise UnreadableImage(f"a broken symbolic link (to {os.readlink(path)})") from None
        raise
    except Exception as e:  # Pillow raises many types for broken files
        msg = str(e).split("\n")[0] or type(e).__name__
        raise UnreadableImage(msg) from None


def read_rgb8(path: str | Path) -> np.ndarray:
    """``H x W x 3`` uint8 array of ``path`` (see the module doc for conversions)."""
    return np.array(open_rgb(path), dtype=np.uint8)


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` by extension, sorted; broken symbolic links are
    listed too, so that reading them reports them as skipped rather than ignoring them."""
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() or p.is_symlink()) and not p.is_dir() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def list_images_recursive(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (any depth), sorted; hidden files and folders are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"input folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted sub-folder names) and (file, class index) pairs of an ImageFolder tree.

    Raises DataError for a missing root, a root without class folders, or an empty class.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data root is not a folder: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = list_images(root)
        hint = (f" It holds {len(loose)} images directly: put them in one sub-folder per class "
                f"(e.g. {root}/tumour/*.png), or in a single sub-folder for an unconditional model."
                if loose else "")
        raise DataError(f"no class sub-folders in {root}: expected one sub-folder per class.{hint}")
    items: list[tuple[Path, int]] = []
    empty = []
    for i, c in enumerate(classes):
        files = list_images(root / c)
        if not files:
            empty.append(c)
        items.extend((f, i) for f in files)
    if empty:
        raise DataError(f"empty class folder(s) in {root}: {', '.join(empty)} (no "
                        f"{'/'.join(IMAGE_EXTENSIONS)} files). Add images or remove the folder.")
    nested = [p for c in classes for d in (root / c).iterdir() if d.is_dir() and not d.name.startswith(".")
              for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    if nested:
        warnings.warn(f"{len(nested)} image(s) in sub-folders of the class folders of {root} are not read (a "
                      f"class is the images directly in its folder), e.g. {nested[0].relative_to(root)}",
                      SkippedFilesWarning, stacklevel=2)
    return classes, items


def scan_flat_folder(root: str | Path) -> list[Path]:
    """Every image directly in ``root`` (an unpaired CycleGAN domain), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    files = list_images(root)
    if not files:
        raise DataError(f"no images in {root} (expected {'/'.join(IMAGE_EXTENSIONS)} files)")
    return files


def native_size(folder: str | Path) -> int:
    """The common square size of the images in ``folder``; an error names the odd ones out."""
    sizes = {}
    for f in scan_flat_folder(folder):
        try:
            with Image.open(f) as img:
                sizes.setdefault(img.size, []).append(f.name)
        except Exception:
            continue                                  # unreadable: reported when decoded
    if not sizes:
        raise DataError(f"no readable image in {folder}")
    if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        desc = "; ".join(f"{w}x{h}: {len(v)} (e.g. {v[0]})" for (w, h), v in sizes.items())
        raise DataError(f"images in {folder} are not all one square size ({desc}); set "
                        "data.load_size to resize them once when cached")
    return next(iter(sizes))[0]


def warn_skipped(skipped: list[tuple[str, str]], where: str) -> None:
    """One warning listing every file that was left out and why."""
    if not skipped:
        return
    lines = "\n".join(f"  {f}: {why}" for f, why in skipped)
    warnings.warn(f"skipped {len(skipped)} unreadable file(s) in {where}:\n{lines}",
                  SkippedFilesWarning, stacklevel=3)
