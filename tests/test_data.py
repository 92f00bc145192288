"""Images of every common kind become 8-bit RGB; bad files are skipped and reported; the cache."""

import shutil
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from histosynth.data import BatchSampler, TileCache, flip_rot90
from histosynth.stain import StainNormaliser
from histosynth.images import (DataError, SkippedFilesWarning, UnreadableImage, read_rgb8,
                               scan_image_folder)


def _real_tile(folder):
    return next(p for p in sorted(folder.rglob("*")) if p.suffix.lower() in (".png", ".jpg"))


def test_grayscale_becomes_three_equal_channels(tmp_path, crc_mini):
    grey = Image.open(_real_tile(crc_mini)).convert("L")
    grey.save(tmp_path / "g.png")
    rgb = read_rgb8(tmp_path / "g.png")
    assert rgb.shape == (*grey.size[::-1], 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == np.asarray(grey)).all() and (rgb[..., 0] == rgb[..., 2]).all()


def test_rgba_is_composited_on_white(tmp_path, crc_mini):
    rgb = np.asarray(Image.open(_real_tile(crc_mini)).convert("RGB"))
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:10] = 0                                           # top rows fully transparent
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    out = read_rgb8(tmp_path / "a.png")
    assert (out[:10] == 255).all()
    assert (out[10:] == rgb[10:]).all()


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_maps_linearly_to_8bit(tmp_path, crc_mini, ext):
    grey = np.asarray(Image.open(_real_tile(crc_mini)).convert("L")).astype(np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / f"h{ext}")     # I;16 with the full 16-bit range
    out = read_rgb8(tmp_path / f"h{ext}")
    assert (out[..., 1] == grey).all()


def test_48bit_rgb_tiff_maps_each_channel_to_8bit(tmp_path, crc_mini):
    """16 bits per RGB channel (microscope camera exports): every channel of a real tile comes back."""
    from bad_inputs import write_rgb48_tiff
    rgb = np.asarray(Image.open(_real_tile(crc_mini)).convert("RGB"))
    rng = np.random.default_rng(0)                                # low bytes must not matter
    write_rgb48_tiff(tmp_path / "h.tif", rgb.astype(np.uint16) * 256 + rng.integers(0, 256, rgb.shape, dtype=np.uint16))
    assert (read_rgb8(tmp_path / "h.tif") == rgb).all()


def test_palette_image_reads_as_rgb(tmp_path, crc_mini):
    Image.open(_real_tile(crc_mini)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    assert read_rgb8(tmp_path / "p.png").shape[-1] == 3


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_broken_files_raise_unreadable(tmp_path, content):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(UnreadableImage):
        read_rgb8(tmp_path / "x.png")


def test_truncated_jpeg_is_unreadable(tmp_path, lung_train):
    src = _real_tile(lung_train)
    data = src.read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(UnreadableImage):
        read_rgb8(tmp_path / "t.jpg")


def test_cache_skips_and_reports_corrupt_files(tile_folder):
    cls = sorted(tile_folder.iterdir())[0]
    (cls / "broken.png").write_bytes(b"garbage")
    (cls / "empty.jpg").write_bytes(b"")
    with pytest.warns(SkippedFilesWarning) as rec:
        cache = TileCache.build(tile_folder, 32, progress=False)
    assert len(rec) == 1                                      # one warning listing both
    msg = str(rec[0].message)
    assert "broken.png" in msg and "empty.jpg" in msg and "skipped 2" in msg
    assert len(cache) == 12 and len(cache.skipped) == 2
    # decoded straight into the disk cache (row by row, then cut to the readable files): the
    # same tiles, labels and files as in memory, and nothing left behind but the cache itself
    with pytest.warns(SkippedFilesWarning):
        disk = TileCache.build(tile_folder, 32, cache_dir=tile_folder.parent / "c", progress=False)
    assert np.array_equal(np.asarray(disk.images), cache.images) and disk.images.shape[0] == 12
    assert list(disk.labels) == list(cache.labels) and disk.files == cache.files
    assert sorted(p.suffix for p in (tile_folder.parent / "c").iterdir()) == [".json", ".npy"]


def test_cache_shape_labels_and_disk_reuse(tile_folder, tmp_path):
    a = TileCache.build(tile_folder, 32, cache_dir=tmp_path / "c", progress=False)
    assert a.images.shape == (12, 3, 32, 32) and a.images.dtype == np.uint8
    assert a.class_counts() == {c.name: 4 for c in sorted(tile_folder.iterdir())}
    b = TileCache.build(tile_folder, 32, cache_dir=tmp_path / "c", progress=False)
    assert isinstance(b.images, np.memmap)                    # second run: no decoding
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    # a changed folder is a new cache entry
    shutil.copy(next((tile_folder / a.classes[0]).iterdir()), tile_folder / a.classes[0] / "z.png")
    c = TileCache.build(tile_folder, 32, cache_dir=tmp_path / "c", progress=False)
    assert len(c) == 13


def test_macenko_normalisation_changes_colour_but_not_shape(tile_folder):
    plain = TileCache.build(tile_folder, 32, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = scan_image_folder(tile_folder)[1][0][0]
        norm = TileCache.build(tile_folder, 32, StainNormaliser.from_file("macenko", ref), progress=False)
    assert norm.images.shape == plain.images.shape
    assert np.abs(norm.images.astype(int) - plain.images.astype(int)).mean() > 1.0


def test_empty_class_is_a_clear_error(tile_folder):
    (tile_folder / "zz_empty").mkdir()
    with pytest.raises(DataError, match="empty class folder.*zz_empty"):
        scan_image_folder(tile_folder)


def test_class_with_only_broken_files_is_an_error(tile_folder):
    bad = tile_folder / "zz_bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="no readable image.*zz_bad"), pytest.warns(SkippedFilesWarning):
        TileCache.build(tile_folder, 32, progress=False)


def test_missing_root_and_flat_folder(tmp_path, crc_mini):
    with pytest.raises(DataError, match="not found"):
        scan_image_folder(tmp_path / "nope")
    shutil.copy(_real_tile(crc_mini), tmp_path / "loose.png")
    with pytest.raises(DataError, match="one sub-folder per class"):
        scan_image_folder(tmp_path)


def test_sampler_covers_each_epoch_and_resumes_exactly():
    s = BatchSampler(10, 4, seed=3)
    first = torch.cat([s.next() for _ in range(5)])           # 20 draws = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10))
    assert sorted(first[10:].tolist()) == list(range(10))
    state = s.state_dict()
    ahead = [s.next() for _ in range(3)]
    t = BatchSampler(10, 4, seed=99)
    t.load_state_dict(state)
    assert all(torch.equal(a, t.next()) for a in ahead)


def test_flip_rot90_is_a_symmetry_of_each_tile():
    x = torch.arange(2 * 3 * 4 * 4).view(2, 3, 4, 4).float()
    out = flip_rot90(x, torch.Generator().manual_seed(0), "flip_rot90")
    for i in range(2):
        variants = [x[i].rot90(k, (1, 2)) for k in range(4)] + [x[i].flip(2).rot90(k, (1, 2)) for k in range(4)]
        assert any(torch.equal(out[i], v) for v in variants)
    assert torch.equal(flip_rot90(x, torch.Generator(), "none"), x)


# ----------------------------------------------------------------------------------------------
# property-based: whatever Pillow can write, open_rgb returns 8-bit RGB of the same size; whatever
# bytes a file holds, the loader either reads it or raises UnreadableImage -- nothing else


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "I;16", "1", "CMYK"]),
       w=st.integers(1, 40), h=st.integers(1, 40), ext=st.sampled_from([".png", ".tif", ".bmp", ".webp", ".jpg"]),
       seed=st.integers(0, 2**16))
def test_any_writable_image_reads_as_rgb8(tmp_path, mode, w, h, ext, seed):
    import numpy as np
    from PIL import Image
    from histosynth.images import open_rgb
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / f"x{ext}"
    try:
        img.save(path)
    except (OSError, ValueError, KeyError):
        return                              # this format cannot store this mode: nothing to read
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (w, h)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), ext=st.sampled_from([".png", ".jpg", ".tif", ".bmp"]),
       header=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"BM"]))
def test_arbitrary_bytes_are_read_or_refused_cleanly(tmp_path, data, ext, header):
    from histosynth.images import UnreadableImage, open_rgb
    path = tmp_path / f"y{ext}"
    path.write_bytes(header + data)
    try:
        out = open_rgb(path)
    except UnreadableImage:
        return
    assert out.mode == "RGB"
