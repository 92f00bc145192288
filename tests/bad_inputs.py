"""Generate the bad-input corpus (nothing binary is checked in): python tests/bad_inputs.py OUT

OUT/
  images/<class>/       good real tiles plus, in the first class, every kind of bad or odd file:
                        corrupt.jpg, truncated.png, zero.png, not_an_image.png (text), bomb.png
                        (beyond Pillow's decompression-bomb limit), broken_link.png (a symbolic link
                        to nothing), tiny.png (3 x 3 px), nested/extra.png (an image in a sub-folder
                        of a class folder: not read, reported), and readable oddities that must
                        be converted, not skipped: gray16.tif (16-bit), rgb48.tif (16 bits per
                        RGB channel, as microscope cameras export), rgba.png, palette.png, gray.png
  flat/                 the same files without class folders (gan-translate input)
  stems/                a.png, a.jpg, a.tif: three images sharing one stem (gan-translate's output names)
  long/                 an image whose name is 240 characters long
  empty_class/<c>/      class folders, one of them empty
  split/{train,val,test}/<class>/   a train/val/test tree with bad files in train
  unpaired/{a,b}/       CycleGAN paired test folders whose names do not match
  yaml/                 unknown_key.yaml, wrong_type.yaml, negative_lr.yaml, missing_path.yaml,
                        not_a_mapping.yaml, broken.yaml (invalid YAML), alias_bomb.yaml (a
                        billion laughs under a typed key), duplicate_key.yaml, duplicate_section.yaml,
                        deep.yaml (nested 500 levels), latin1.yaml (not UTF-8)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ODD_READABLE = ("gray16.tif", "rgb48.tif", "rgba.png", "palette.png", "gray.png")
UNREADABLE = ("corrupt.jpg", "truncated.png", "zero.png", "not_an_image.png", "bomb.png", "broken_link.png",
              "tiny.png")


def write_rgb48_tiff(path: Path, rgb16: np.ndarray) -> None:
    """An uncompressed baseline TIFF with 16 bits per RGB channel (Pillow cannot write one)."""
    import struct
    h, w, _ = rgb16.shape
    pixels = rgb16.astype("<u2").tobytes()
    n_tags = 10
    ifd_at = 8
    bps_at = ifd_at + 2 + n_tags * 12 + 4          # BitsPerSample's three values follow the IFD
    data_at = bps_at + 6
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bps_at), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, data_at), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(pixels)), (284, 3, 1, 1)]
    out = b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", n_tags)
    for tag, typ, count, value in tags:
        packed = struct.pack("<HH", value, 0) if typ == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    out += struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + pixels
    path.write_bytes(out)


def _bad_files(dst: Path, src_tile: Path) -> None:
    rgb = np.asarray(Image.open(src_tile).convert("RGB"))
    (dst / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    buf = dst / "_full.png"
    Image.fromarray(rgb).save(buf)
    data = buf.read_bytes()
    buf.unlink()
    (dst / "truncated.png").write_bytes(data[: len(data) // 2])
    (dst / "zero.png").write_bytes(b"")
    (dst / "not_an_image.png").write_text("this is a text file with an image extension\n")
    Image.new("1", (20000, 20000)).save(dst / "bomb.png")          # 400 M pixels, a few kB
    gray = rgb.mean(2)
    Image.fromarray((gray * 257).astype(np.uint16)).save(dst / "gray16.tif")
    write_rgb48_tiff(dst / "rgb48.tif", rgb.astype(np.uint16) * 257)
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA").save(dst / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(dst / "palette.png")
    Image.fromarray(gray.astype(np.uint8), "L").save(dst / "gray.png")
    (dst / "broken_link.png").symlink_to(dst / "nowhere" / "gone.png")
    Image.fromarray(rgb[:3, :3]).save(dst / "tiny.png")


def make_corpus(out: str | Path, real: str | Path, n_classes: int = 3, per_class: int = 4) -> Path:
    """Build the corpus under ``out`` from the real class-folder tree ``real``."""
    out, real = Path(out), Path(real)
    classes = sorted(d for d in real.iterdir() if d.is_dir())[:n_classes]
    for c in classes:
        files = sorted(c.iterdir())[:per_class]
        for f in files:
            for d in (out / "images" / c.name, out / "empty_class" / c.name):
                d.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, d / f.name)
        for split, fs in (("train", files[:2]), ("val", files[2:3]), ("test", files[3:4])):
            (out / "split" / split / c.name).mkdir(parents=True, exist_ok=True)
            for f in fs:
                shutil.copy(f, out / "split" / split / c.name / f.name)
    first = out / "images" / classes[0].name
    _bad_files(first, sorted(first.iterdir())[0])
    _bad_files(out / "split" / "train" / classes[0].name, sorted(classes[0].iterdir())[0])
    shutil.rmtree(out / "empty_class" / classes[-1].name)
    (out / "empty_class" / classes[-1].name).mkdir()
    (out / "flat").mkdir()
    for f in (out / "images").rglob("*"):
        if f.is_file():
            shutil.copy(f, out / "flat" / f.name)
    (out / "flat" / "broken_link.png").symlink_to(out / "nowhere" / "gone.png")
    (first / "nested").mkdir()
    shutil.copy(sorted(classes[0].iterdir())[1], first / "nested" / "extra.png")
    tile = Image.open(sorted(classes[0].iterdir())[0]).convert("RGB")
    (out / "stems").mkdir()
    for ext in ("png", "jpg", "tif"):
        tile.save(out / "stems" / f"a.{ext}")
    (out / "long").mkdir()
    tile.save(out / "long" / ("x" * 236 + ".png"))
    for side, names in (("a", ("x1.png", "x2.png")), ("b", ("y1.png", "y2.png"))):
        (out / "unpaired" / side).mkdir(parents=True)
        for n, f in zip(names, sorted(classes[0].iterdir())):
            Image.open(f).convert("RGB").save(out / "unpaired" / side / n)
    y = out / "yaml"
    y.mkdir()
    (y / "unknown_key.yaml").write_text("model:\n  family: sngan\n  chanels: 16\n")
    (y / "wrong_type.yaml").write_text("train:\n  steps: many\n")
    (y / "negative_lr.yaml").write_text("train:\n  lr_g: -0.001\n")
    (y / "missing_path.yaml").write_text("data:\n  root: /nonexistent/histosynth/data\n")
    (y / "not_a_mapping.yaml").write_text("- just\n- a list\n")
    (y / "broken.yaml").write_text("train: {steps: [1, 2\n")
    laughs = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (y / "alias_bomb.yaml").write_text("\n".join(laughs) + "\ntrain:\n  betas: *a8\n")
    (y / "duplicate_key.yaml").write_text("train:\n  steps: 10\n  steps: 5000\n")
    (y / "duplicate_section.yaml").write_text("train: {steps: 10}\nmodel: {ch: 8}\ntrain: {lr_g: 0.1}\n")
    (y / "deep.yaml").write_text("train: " + "[" * 500 + "]" * 500 + "\n")
    (y / "latin1.yaml").write_bytes("# caf\xe9\ntrain: {steps: 10}\n".encode("latin-1"))
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    src = Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).resolve().parents[1] / "data" / "lung_demo" / "train"
    print(make_corpus(sys.argv[1], src))
