"""Segmentation: pairs data (matching, bad pairs, tiles, cache, val carved by image), metrics
against hand-computed values, mask drawing, pix2pix pairs, and augment-compare with task:
segmentation end to end (real MoNuSeg crops bundled in data/monuseg_demo)."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.augment_compare import run_compare
from experiments.config import CompareConfig
from experiments.splits import resolve_splits
from histosynth import config as configlib
from histosynth.config import PROJECT_ROOT
from histosynth.images import DataError, SkippedFilesWarning
from conftest import calls_of
from segmentation.config import ARCHS
from segmentation.data import PairsLayout, load_pairs, read_mask, tile_starts
from segmentation.masks import MaskDrawer
from segmentation.metrics import aji, dice_iou, panoptic_quality, segmentation_metrics

DEMO = PROJECT_ROOT / "data" / "monuseg_demo"


@pytest.fixture
def pairs(tmp_path) -> Path:
    """A writable copy of the demo pairs (12 train, 4 test with instance maps)."""
    return Path(shutil.copytree(DEMO, tmp_path / "monuseg"))


# ----------------------------------------------------------------------------------------------
# metrics, by hand

TRUTH = np.array([[1, 1, 0, 0, 2, 2],
                  [1, 1, 0, 0, 2, 2],
                  [0, 0, 0, 0, 0, 0],
                  [3, 3, 3, 0, 0, 0],
                  [3, 3, 3, 0, 0, 0],
                  [0, 0, 0, 0, 0, 0]])
PRED = np.array([[1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [0, 0, 0, 0, 0, 0],
                 [2, 2, 0, 0, 4, 4],
                 [2, 2, 0, 0, 4, 4],
                 [0, 0, 0, 0, 0, 0]])


def test_metrics_equal_hand_computed_values():
    # binary: 14 true px, 14 predicted, 8 shared -> Dice 16/28, IoU 8/20, accuracy 24/36
    d, i = dice_iou(PRED > 0, TRUTH > 0)
    assert d == pytest.approx(16 / 28) and i == pytest.approx(8 / 20)
    # AJI: G1~P1 (4 / 6), G3~P2 (4 / 6), G2 unmatched (+4 to the union), P4 unused (+4): 8 / 20
    assert aji(TRUTH, PRED) == pytest.approx(8 / 20)
    # PQ: two matches at IoU 2/3 (SQ 2/3), one false negative, one false positive: RQ 2/3
    assert panoptic_quality(TRUTH, PRED) == pytest.approx({"pq": 4 / 9, "sq": 2 / 3, "rq": 2 / 3})
    m = segmentation_metrics([PRED > 0], [TRUTH > 0], [TRUTH], split="components", min_size=0)
    assert m["dice"] == pytest.approx(16 / 28) and m["pixel_accuracy"] == pytest.approx(24 / 36)
    assert m["aji"] == pytest.approx(8 / 20) and m["pq"] == pytest.approx(4 / 9)
    assert dice_iou(np.zeros((3, 3)), np.zeros((3, 3))) == (1.0, 1.0)        # nothing to find, nothing found
    assert aji(TRUTH, TRUTH) == 1.0 and panoptic_quality(TRUTH, TRUTH)["pq"] == 1.0
    # ids need not be consecutive: gaps (a look-up table) and huge ids (a sort) name the same nuclei
    gaps, huge = TRUTH * 7, np.where(PRED > 0, PRED + 10 ** 9, 0)
    assert aji(gaps, huge) == pytest.approx(8 / 20) and panoptic_quality(gaps, huge)["pq"] == pytest.approx(4 / 9)


def test_watershed_splits_two_touching_nuclei():
    from segmentation.metrics import instances
    yy, xx = np.mgrid[:40, :60]
    two = ((yy - 20) ** 2 + (xx - 20) ** 2 < 12 ** 2) | ((yy - 20) ** 2 + (xx - 41) ** 2 < 12 ** 2)
    assert instances(two, "components").max() == 1 and instances(two, "watershed").max() == 2


def test_watershed_markers_equal_scikit_image_h_maxima():
    """instances() finds the h-maxima without reconstructing the whole image (faster); the
    markers must be scikit-image's own: on real nucleus masks, merged and thinned, on maps with
    plateaus (rounded values), and where a thin object's smoothed peak stays below h."""
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima

    from segmentation.metrics import _h_maxima
    for f in sorted((DEMO / "test" / "masks").iterdir()):
        m = np.asarray(Image.open(f)) > 0
        for mm in (m, ndi.binary_dilation(m, iterations=2), ndi.binary_erosion(m, iterations=2)):
            d = ndi.gaussian_filter(ndi.distance_transform_edt(mm), 1.0)
            for dd in (d, np.round(d, 1)):
                expected = h_maxima(dd, 1.0)
                assert expected.sum() > 10 and np.array_equal(_h_maxima(dd, 1.0), expected), f.name
    line = np.zeros((40, 60), bool)
    line[5, 5:30] = True                                   # peak ~0.4 after smoothing: below h
    line[15:35, 20:45] = True
    d = ndi.gaussian_filter(ndi.distance_transform_edt(line), 1.0)
    assert np.array_equal(_h_maxima(d, 1.0), h_maxima(d, 1.0))
    assert np.array_equal(_h_maxima(np.zeros((5, 5)), 1.0), h_maxima(np.zeros((5, 5)), 1.0))


# ----------------------------------------------------------------------------------------------
# pairs data


def test_decoder_widths_are_built_and_a_bad_choice_is_named():
    """decoder_channels sets the U-Net's five decoder blocks (deepest first); it is refused, by
    key, for an architecture whose decoder it does not describe or with the wrong length."""
    import torch

    from segmentation.config import SegmenterModelConfig
    from segmentation.model import create_segmenter

    net = create_segmenter(SegmenterModelConfig(decoder_channels=[64, 32, 16, 16, 8], image_size=64, tile_size=64))
    assert [b.conv2[0].out_channels for b in net.decoder.blocks] == [64, 32, 16, 16, 8]
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(configlib.ConfigError, match="decoder_channels.*FPN"):
        SegmenterModelConfig(arch="FPN", decoder_channels=[64, 32, 16, 16, 8])
    with pytest.raises(configlib.ConfigError, match="decoder_channels.*five"):
        SegmenterModelConfig(decoder_channels=[64, 32])


def test_tiles_predicted_in_batches_equal_one_at_a_time():
    """Same-sized images within the window go through the U-Net together; a whole image larger
    than the window is predicted in overlapping windows; both give what predicting each image
    alone gives."""
    import torch

    from histosynth.runtime import Runtime
    from segmentation.config import SegmenterModelConfig
    from segmentation.model import create_segmenter
    from segmentation.task import predict_image, predict_images

    torch.manual_seed(0)
    net = create_segmenter(SegmenterModelConfig(decoder_channels=[32, 16, 16, 8, 8], image_size=64, tile_size=64))
    _trained_batchnorm(net)
    rt = Runtime.from_choices("cpu", "off", "off")
    tiles = load_pairs(DEMO / "train", 64, progress=False).images[:11]          # 11 real 64 px tiles
    whole = load_pairs(DEMO / "test", None, progress=False).images[0]           # 384 px
    images = [*tiles[:5], whole, *tiles[5:], whole[:, :80, :80]]
    with calls_of(torch.nn.functional.batch_norm) as seen:
        got = predict_images(net, images, rt, window=256)       # BatchNorms folded into the convolutions
    assert not seen.calls and net.training                      # (on a copy: the model is as it was)
    with calls_of(torch.nn.functional.batch_norm) as seen:
        alone = [predict_image(net.eval(), im, rt, window=256) for im in images]
    assert len(seen.calls) >= 30 * len(images)                   # 30 BatchNorms a pass, a pass or more an image
    assert [g.shape for g in got] == [a.shape for a in alone] == [np.shape(im)[1:] for im in images]
    for g, a in zip(got, alone):
        np.testing.assert_allclose(g, a, atol=1e-5)
    assert 0.0 < got[0].min() < got[0].max() < 1.0


def _trained_batchnorm(net) -> None:
    """Running statistics and affine parameters as training leaves them, not the identity."""
    import torch

    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight.data, 0.5, 1.5),
                              (m.bias.data, -0.2, 0.2)):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_batchnorm_predicts_what_the_model_predicts(arch):
    """fold_batchnorm on every architecture: the copy computes what the model computes (float64),
    with its BatchNorms folded into the convolutions (all of a U-Net's; smp's FPN, Linknet, ...
    cannot be traced whole and are folded part by part); the model is left as it was, and a
    model in training mode is refused."""
    import torch

    from histosynth.runtime import fold_batchnorm
    from segmentation.config import DECODER_ARCHS, SegmenterModelConfig
    from segmentation.model import create_segmenter

    torch.manual_seed(0)
    widths = [32, 16, 16, 8, 8] if arch in DECODER_ARCHS else None
    net = create_segmenter(SegmenterModelConfig(arch=arch, image_size=64, tile_size=64, decoder_channels=widths))
    _trained_batchnorm(net)
    net = net.double().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    count = [sum(isinstance(m, torch.nn.BatchNorm2d) for m in n.modules()) for n in (net, folded)]
    assert type(folded) is type(net) and count[1] < count[0] / 2 and (arch != "Unet" or count[1] == 0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want, got = net(x), folded(x)
    assert want.std() > 0.01
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(net.train())


def test_demo_pairs_load_as_tiles_and_whole_images():
    assert tile_starts(1000, 256) == [0, 248, 496, 744] and tile_starts(256, 256) == [0]
    train = load_pairs(DEMO / "train", 256, progress=False)
    assert train.images.shape == (12 * 4, 3, 256, 256) and train.masks.shape == (48, 256, 256)
    assert set(np.unique(train.masks)) == {0, 1} and 0.1 < train.masks.mean() < 0.5     # nuclei, 0/1
    test = load_pairs(DEMO / "test", None, progress=False)
    assert len(test) == 4 and test.images[0].shape == (3, 384, 384) and test.instances is not None
    assert test.instances[0].max() > 20 and ((test.instances[0] > 0) == (test.masks[0] > 0)).mean() > 0.95
    assert sorted(test.sample_files()) == sorted(f"images/{p.name}" for p in (DEMO / "test" / "images").iterdir())


def test_bad_pairs_each_get_one_line_and_the_good_ones_all_load(pairs):
    root = pairs / "train"
    img = sorted((root / "images").iterdir())[0]
    mask = np.asarray(Image.open(root / "masks" / f"{img.stem}.png"))
    bad = {"size": Image.fromarray(mask[:200, :200]),                            # another size
           "grey": Image.fromarray((np.linspace(0, 255, mask.size) .reshape(mask.shape)).astype(np.uint8)),
           "rgb": Image.fromarray(np.stack([mask] * 3, -1)),                    # an RGB mask
           "odd": Image.fromarray(np.where(mask > 0, 128, 0).astype(np.uint8))}  # values 0/128
    for name, m in bad.items():
        shutil.copy(img, root / "images" / f"{name}.jpg")
        m.save(root / "masks" / f"{name}.png")
    Image.fromarray(mask).save(root / "masks" / "orphan.png")                    # a mask without an image
    shutil.copy(img, root / "images" / "lonely.jpg")                             # an image without a mask
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.warns(SkippedFilesWarning) as caught:
        data = load_pairs(root, 256, progress=False)
    msg = str(caught[0].message)
    for line in ("masks/size.png: is 200 x 200 px but its image images/size.jpg is 384 x 384",
                 "masks/grey.png: holds 256 values", "masks/rgb.png: has colour channels (RGB); a mask is one channel",
                 "masks/odd.png: holds 2 values (0, 128)", "masks/orphan.png: a mask without an image",
                 "images/lonely.jpg: no mask (expected masks/lonely.png)"):
        assert line in msg, (line, msg)
    assert msg.count("\n") == 6                                                   # one line each
    assert sorted(set(data.stems)) == sorted(p.stem for p in (DEMO / "train" / "images").iterdir())
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before        # nothing lost
    with pytest.raises(DataError, match="has no images/ or masks/ folder"):
        load_pairs(pairs, 256, progress=False)


def test_masks_may_hold_class_ids_when_there_are_classes(tmp_path):
    Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", num_classes=3).tolist() == [[0, 1], [2, 3]]
    with pytest.raises(Exception, match="class ids 0..2"):
        read_mask(tmp_path / "m.png", num_classes=2)


def test_the_pairs_cache_is_reused_and_a_damaged_one_is_rebuilt(tmp_path):
    first = load_pairs(DEMO / "test", None, cache_dir=tmp_path, progress=False)
    again = load_pairs(DEMO / "test", None, cache_dir=tmp_path, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(first.images, again.images))
    npy = next(tmp_path.glob("*.images.npy"))
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF
    npy.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged"):
        fixed = load_pairs(DEMO / "test", None, cache_dir=tmp_path, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(first.images, fixed.images))


def test_validation_is_carved_from_train_by_image(pairs, tmp_path):
    cfg = configlib.load(CompareConfig, None, [f"data.root={pairs}", "task=segmentation", "data.val_fraction=0.25"])[0]
    splits = resolve_splits(cfg.data, tmp_path / "out", PairsLayout())
    assert "validation carved from train (by sample" in splits.method and splits.roots["test"] == pairs / "test"
    stems = {s: {p.stem for p in (splits.roots[s] / "images").iterdir()} for s in ("train", "val")}
    assert len(stems["val"]) == 3 and len(stems["train"]) == 9 and not stems["train"] & stems["val"]
    for s in ("train", "val"):                                    # every image went with its mask
        assert stems[s] == {p.stem for p in (splits.roots[s] / "masks").iterdir()}
    rows = list(csv.DictReader(open(tmp_path / "out" / "splits" / "split.csv")))
    assert len(rows) == 12 and {r["split"] for r in rows} == {"train", "val"}


# ----------------------------------------------------------------------------------------------
# new masks and pix2pix pairs


def test_drawn_masks_are_new_binary_and_seeded():
    bank = load_pairs(DEMO / "train", 128, progress=False).masks
    drawer = MaskDrawer(bank)
    for method in ("transform", "place"):
        a = drawer.draw(np.random.default_rng(1), 128, method)
        b = drawer.draw(np.random.default_rng(1), 128, method)
        c = drawer.draw(np.random.default_rng(2), 128, method)
        assert a.shape == (128, 128) and set(np.unique(a)) <= {0, 1} and np.array_equal(a, b)
        assert not np.array_equal(a, c)
        assert not any(np.array_equal(a, m) for m in bank)                       # never a training mask
        assert 0.03 < a.mean() < 0.7, (method, a.mean())


def test_pix2pix_run_generates_verifiable_pairs(tmp_path):
    from gans.generate import generate
    from gans.registry import families
    from gans.train_gan import load_config, train_gan
    from histosynth.checkpoint import sha256_file

    cfg, _ = load_config("pix2pix_monuseg", list(families()["pix2pix"].smoke))
    train_gan(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "samples").is_dir()
    generate(tmp_path / "run", tmp_path / "a", 3, seed=5, progress=False, device="cpu")
    generate(tmp_path / "run", tmp_path / "b", 3, seed=5, progress=False, device="cpu")
    a = load_pairs(tmp_path / "a", 64, progress=False)
    assert a.images.shape == (3, 3, 64, 64) and set(np.unique(a.masks)) <= {0, 1}
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in a.files)  # seeded
    rows = list(csv.DictReader(open(tmp_path / "a" / "manifest.csv")))
    assert {r["file"] for r in rows} == set(a.files) and all(r["sha256"] == sha256_file(tmp_path / "a" / r["file"])
                                                             for r in rows)
    src = json.loads((tmp_path / "a" / "source.json").read_text())
    assert src["family"] == "pix2pix" and len(src["train_files_sha256"]) == 24     # 12 images + 12 masks
    assert (tmp_path / "a" / "preview.png").is_file()

    # the painter runs with its BatchNorms folded into the convolutions, and paints what G paints
    import torch

    from gans.families.pix2pix import MaskPainter
    from gans.registry import load_run
    from histosynth.engine import module_state
    from histosynth.roles import PairGenerator
    from histosynth.runtime import Runtime

    trained, ck, _ = load_run(tmp_path / "run", PairGenerator)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trained.G.modules())
    trained.rt = Runtime.from_choices("cpu", "off", "off")       # fp32 (bf16 where native would round apart)
    folded, masks = trained.sample_pairs([5, 6, 7])
    G = MaskPainter(cfg.model.encoder, cfg.model.noise)
    G.load_state_dict(module_state(ck, "G"))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules()) > 10
    trained.G = trained.rt.prepare(G.eval())
    plain, same_masks = trained.sample_pairs([5, 6, 7])
    assert torch.equal(masks, same_masks) and plain.float().std() > 5
    assert (folded.int() - plain.int()).abs().max() <= 1 and (folded == plain).float().mean() > 0.99


# ----------------------------------------------------------------------------------------------
# augment-compare with task: segmentation

FAST = ["downstream.model.tile_size=128", "downstream.model.image_size=64", "downstream.train.steps=6",
        "downstream.model.encoder=tu-test_resnet",     # timm's tiny ResNet: the machinery, not the encoder
        "downstream.train.batch_size=4", "downstream.train.evaluate_every=3", "downstream.train.warmup_steps=0",
        "downstream.train.device=cpu", "downstream.eval.window=256",
        "generators.pix2pix.set=[train.steps=4, data.tile_size=128, data.image_size=64, train.batch_size=2, "
        "model.ndf=8, train.device=cpu]"]


def test_segmentation_compare_runs_every_arm_kind_on_unseen_pairs(pairs, tmp_path, monkeypatch):
    """The shipped config, pointed at pairs it has never seen through --set only: real, classic,
    stain-normalised, synthetic and filtered synthetic arms; AJI/PQ from the test instance maps.
    Only what an arm uses is stain-normalised: the splits, not the synthetic sets."""
    import experiments.augment_compare as ac

    loads, load_split = [], ac.load_split
    def recorded(cfg, root, role, progress, stain=None):
        loads.append((role, stain is not None))
        return load_split(cfg, root, role, progress, stain)
    monkeypatch.setattr(ac, "load_split", recorded)
    cfg = configlib.load(CompareConfig, "compare_monuseg", [f"data.root={pairs}", "seeds=[0]", *FAST])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = run_compare(cfg, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["arm"] for r in rows} == {a.name for a in cfg.arms}
    n = {r["arm"]: (int(r["n_train_real"]), int(r["n_train_synthetic"])) for r in rows}
    real = n["real_only"][0]
    assert n["pix2pix_x0.5"] == (real, round(0.5 * real)) and n["pix2pix_x1_filtered"] == (real, real)
    for r in rows:
        for k in ("dice", "iou", "aji", "pq"):
            assert 0 <= float(r[k]) <= 1, (r["arm"], k, r[k])
    for f in ("overlays.png", "per_image_dice.png", "report.html", "preprocess/stain_reference.png",
              "generators/pix2pix/synthetic/preview.png"):
        assert (out / f).is_file(), f
    sel = next((out / "selected").glob("pix2pix-*agreement-keep0.5"))
    table = list(csv.DictReader(open(sel / "selection.csv")))
    kept = [float(r["agreement"]) for r in table if r["kept"] == "True"]
    dropped = [float(r["agreement"]) for r in table if r["kept"] == "False" and r["near_copy"] == "False"]
    assert len(kept) == real and min(kept) >= max(dropped)                    # the best agreement was kept
    assert "test images" in s["verdict"] and "minority" not in s
    md = (out / "report.md").read_text()
    assert "| stain_norm | flip_rot90 | macenko |" in md and "Synthetic pairs of pix2pix" in md
    assert {("train", True), ("val", True), ("test", True), ("synthetic", False)} <= set(loads)
    assert ("synthetic", True) not in loads
