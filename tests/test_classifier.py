"""classifier/: metrics against scikit-learn and by hand, augmentation, weights, sampler, resume."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from classifier.augment import POLICIES, build_augment
from classifier.config import ClassifierConfig
from classifier.data import TileDataset
from classifier.metrics import classification_metrics
from classifier.model import create_classifier
from classifier.train import checkpoint_info, class_weights, fit
from histosynth import config as configlib
from histosynth.checkpoint import CheckpointError, safe_load
from histosynth.data import TileCache
from histosynth.engine import RunDir
from conftest import conv_weight_shapes


def test_metrics_equal_sklearn_and_hand_computed_values():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    probs = np.array([[.8, .1, .1], [.5, .4, .1], [.2, .7, .1], [.1, .8, .1], [.3, .3, .4],
                      [.1, .1, .8], [.2, .2, .6], [.6, .1, .3], [.1, .5, .4], [.2, .6, .2]])
    m = classification_metrics(y, probs, ["a", "b", "c"])
    pred = probs.argmax(1)            # 0 0 1 1 2 2 2 0 1 1
    assert m["confusion"] == [[2, 1, 0], [0, 2, 1], [1, 1, 2]]
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 4) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    # by hand: class a: TP 2, FN 1, FP 1 (a 'c' predicted a), TN 6
    assert m["per_class"]["a"]["sensitivity"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["specificity"] == pytest.approx(6 / 7)
    assert m["per_class"]["b"]["specificity"] == pytest.approx(5 / 7)    # 2 non-b predicted b
    assert m["per_class"]["c"]["specificity"] == pytest.approx(5 / 6)
    assert m["per_class"]["c"]["support"] == 4


def test_class_weights_are_sklearn_balanced():
    from sklearn.utils.class_weight import compute_class_weight
    y = np.array([0] * 12 + [1] * 4 + [2] * 2)
    expect = compute_class_weight("balanced", classes=np.arange(3), y=y)
    assert torch.allclose(class_weights(y, 3), torch.tensor(expect, dtype=torch.float32))


@pytest.mark.parametrize("policy", POLICIES)
def test_augment_policies_keep_shape_and_are_seeded(policy, crc_mini):
    tiles = TileCache.build(crc_mini, 64, progress=False)
    img = np.ascontiguousarray(tiles.images[0].transpose(1, 2, 0))
    a = [build_augment(policy, seed=3)(image=img)["image"] for _ in range(2)]
    b = build_augment(policy, seed=3)(image=img)["image"]
    assert a[0].shape == img.shape and a[0].dtype == np.uint8
    assert np.array_equal(a[0], b)                      # same seed, same first draw
    if policy == "none":
        assert np.array_equal(a[0], img)
    if policy == "classic":                             # colour/affine actually change pixels
        outs = [build_augment(policy, seed=s)(image=img)["image"] for s in range(4)]
        assert any(np.abs(o.astype(int) - img).mean() > 2 for o in outs)


def test_balanced_sampler_balances_an_imbalanced_split(lung_train):
    from torchsampler import ImbalancedDatasetSampler
    tiles = TileCache.build(lung_train, 32, progress=False)
    counts = np.bincount(tiles.labels)
    assert counts.max() / counts.min() >= 3                   # really imbalanced (1200/400/120)
    torch.manual_seed(0)
    drawn = np.bincount(tiles.labels[list(ImbalancedDatasetSampler(TileDataset(tiles.images, tiles.labels)))],
                        minlength=len(counts))
    share = drawn / drawn.sum()
    assert np.all(np.abs(share - 1 / len(counts)) < 0.05), share


def test_weights_from_a_local_file_keep_the_backbone_and_replace_the_head(tmp_path):
    from efficientnet_pytorch import EfficientNet
    src = EfficientNet.from_name("efficientnet-b0")                   # the library's own layout (ImageNet files)
    torch.save(src.state_dict(), tmp_path / "imagenet.pth")
    net = create_classifier("efficientnet-b0", 3, weights=tmp_path / "imagenet.pth")
    assert net.head.out_features == 3
    assert torch.equal(net.body._conv_stem.weight, src._conv_stem.weight)
    torch.save(net.state_dict(), tmp_path / "mine.pth")                 # a histosynth classifier
    again = create_classifier("efficientnet-b0", 3, weights=tmp_path / "mine.pth")
    assert torch.equal(again.head.weight, net.head.weight)
    torch.save(create_classifier("efficientnet-b1", 3).state_dict(), tmp_path / "b1.pth")
    with pytest.raises(CheckpointError, match="does not fit efficientnet-b0"):
        create_classifier("efficientnet-b0", 3, weights=tmp_path / "b1.pth")
    with pytest.raises(CheckpointError, match="never downloads"):
        create_classifier("efficientnet-b0", 3, weights=tmp_path / "missing.pth")


def test_config_names_the_bad_key():
    with pytest.raises(configlib.ConfigError, match="model.variant.*efficientnet-b0"):
        configlib.load(ClassifierConfig, None, ["model.variant=efficientnet-b00"])
    with pytest.raises(configlib.ConfigError, match="train.lr: must be > 0"):
        configlib.load(ClassifierConfig, None, ["train.lr=-1"])


def _tiny_cfg(**train):
    sets = ["model.image_size=32", "train.batch_size=8", "train.device=cpu", "train.patience=0",
            "train.epochs=3"] + [f"train.{k}={v}" for k, v in train.items()]
    return configlib.load(ClassifierConfig, None, sets)[0]


def _tiles(crc_mini):
    t = TileCache.build(crc_mini, 32, progress=False)
    return t, TileDataset(t.images, t.labels, build_augment("classic", seed=0))


def test_fit_loss_falls_and_keeps_the_best_checkpoint(crc_mini, tmp_path):
    t, ds = _tiles(crc_mini)
    cfg = _tiny_cfg(epochs=8, lr=3e-3)
    res = fit(cfg, ds, t.images, t.labels, t.classes, tmp_path / "run", seed=0, progress=False)
    losses = [h["train_loss"] for h in res["history"]]
    assert len(losses) == 8 and np.mean(losses[-3:]) < np.mean(losses[:3])      # 4 noisy steps an epoch
    best = checkpoint_info(safe_load(RunDir(tmp_path / "run").best))
    assert best["epoch"] == res["best_epoch"] and best["classes"] == t.classes
    assert best["val_balanced_accuracy"] == max(h["val_balanced_accuracy"] for h in res["history"])


@pytest.mark.parametrize("sampler", ["random", "balanced"])
def test_interrupted_fit_resumes_to_the_same_weights(sampler, crc_mini, tmp_path, monkeypatch):
    t, ds = _tiles(crc_mini)
    cfg = _tiny_cfg(epochs=3)
    fit(cfg, ds, t.images, t.labels, t.classes, tmp_path / "whole", 0, sampler, progress=False)

    import classifier.task as ct
    real_predict, calls = ct.predict, {"n": 0}

    def dying_predict(*a, **k):                 # validation of epoch 2 'crashes'
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_predict(*a, **k)

    monkeypatch.setattr(ct, "predict", dying_predict)
    _, ds2 = _tiles(crc_mini)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, ds2, t.images, t.labels, t.classes, tmp_path / "cut", 0, sampler, progress=False)
    ck = safe_load(RunDir(tmp_path / "cut").last)
    assert ck["step"] == ck["info"]["steps_per_epoch"]          # the checkpoint of epoch 1
    monkeypatch.setattr(ct, "predict", real_predict)
    _, ds3 = _tiles(crc_mini)                   # a fresh process: fresh augmentation pipeline
    fit(cfg, ds3, t.images, t.labels, t.classes, tmp_path / "cut", 0, sampler, progress=False)
    a, b = safe_load(RunDir(tmp_path / "whole").best), safe_load(RunDir(tmp_path / "cut").best)
    for k, v in a["modules"]["model"].items():
        assert torch.equal(v, b["modules"]["model"][k]), k
    # every epoch's training loss (to the last bit) and validation scores are the same
    ha = safe_load(RunDir(tmp_path / "whole").last)["engine"]["history"]
    assert ha == safe_load(RunDir(tmp_path / "cut").last)["engine"]["history"] and len(ha) == 3


@pytest.mark.parametrize("name, count", [("none", 1), ("flip", 4), ("flip_rot90", 8)])
def test_one_augment_name_means_the_same_symmetries_for_the_gans_and_the_classifier(name, count):
    """``flip`` (4 symmetries) and ``flip_rot90`` (all 8) draw the same set of images whether the
    GAN loop (tensor flips) or the classifier (albumentations) applies them."""
    from histosynth.data import flip_rot90
    tile = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)            # no symmetry of its own
    g = torch.Generator().manual_seed(0)
    gan = {flip_rot90(torch.from_numpy(tile)[None], g, name)[0].numpy().tobytes() for _ in range(200)}
    hwc = np.ascontiguousarray(tile.transpose(1, 2, 0))
    clf = {build_augment(name, s)(image=hwc)["image"].transpose(2, 0, 1).copy().tobytes() for s in range(200)}
    assert len(gan) == count and gan == clf


@pytest.mark.parametrize("h, w, k, bias, channels_last", [
    (2, 2, 3, True, True), (2, 2, 3, False, False), (1, 1, 5, True, True), (2, 1, 3, True, True),
    (1, 4, 5, False, True)])
def test_depthwise_convolution_as_sums_is_the_library_convolution(h, w, k, bias, channels_last):
    """A depthwise "same" convolution on a map of at most 4 pixels as sums over its pixels equals
    F.conv2d in value and in the gradients of input, weight and bias (float64), in the input's layout."""
    from classifier.model import depthwise_by_sums

    torch.manual_seed(0)
    c = 6
    x = torch.randn(3, c, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(c, 1, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if bias else None
    leaves = [t for t in (x, weight, b) if t is not None]
    runs = []
    for f in (depthwise_by_sums, lambda x, wt, bb: F.conv2d(x, wt, bb, 1, k // 2, 1, c)):
        for t in leaves:
            t.grad = None
        y = f(x, weight, b)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        runs.append((y.detach(), x.grad.clone(), weight.grad.clone(), b.grad.clone() if bias else None))
    (y1, gx1, gw1, gb1), (y2, gx2, gw2, gb2) = runs
    assert y1.shape == y2.shape == x.shape
    assert y1.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.allclose(y1, y2, atol=1e-12) and torch.allclose(gx1, gx2, atol=1e-11)
    assert torch.allclose(gw1, gw2, atol=1e-10) and (not bias or torch.allclose(gb1, gb2, atol=1e-10))


@pytest.mark.parametrize("avx512", [True, False])
def test_efficientnet_same_padding_folded_into_the_convolutions_is_the_library_network(crc_mini, avx512,
                                                                                      monkeypatch):
    """The symmetric "same" padding of efficientnet-pytorch's convolutions is their own zero
    padding (no padded copy), taps that can only meet padding on a small map are skipped, and
    without AVX-512 kernels the depthwise convolutions on 2 x 2 maps run as sums: the library's
    network in value and every gradient, on real tiles (float64); the asymmetric stride-2
    paddings stay as the library has them."""
    from efficientnet_pytorch.utils import Conv2dStaticSamePadding

    import classifier.model
    from classifier.model import set_same_padding
    from histosynth.data import normalise

    monkeypatch.setattr(classifier.model, "cpu_kernels_avx512", lambda: avx512)

    x = normalise(torch.from_numpy(TileCache.build(crc_mini, 64, progress=False).images[:4].copy())).double()
    torch.manual_seed(0)
    model = create_classifier("efficientnet-b0", 3).double().eval()     # eval: BatchNorm's stored statistics
    convs = [m for m in model.modules() if isinstance(m, Conv2dStaticSamePadding)]
    assert sum(tuple(m.padding) != (0, 0) for m in convs) >= 10          # folded by the factory
    runs, kernels = [], []
    for folded in (True, False):
        set_same_padding(model.body, folded)
        model.zero_grad()
        with conv_weight_shapes() as seen:
            out = model(x)
        out.square().sum().backward()
        runs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        kernels.append([shape[-2:] for shape in seen.shapes])
    assert all(tuple(m.padding) == (0, 0) for m in convs)               # unfolded: the library's layers
    if avx512:   # 64 px tiles end on 2 x 2 maps: folded, the 5 x 5 kernels there run cropped to 3 x 3
        assert kernels[0].count((5, 5)) < kernels[1].count((5, 5))
        assert kernels[0].count((3, 3)) > kernels[1].count((3, 3))
        assert len(kernels[0]) == len(kernels[1])
    else:        # the last stage's 4 depthwise convolutions on 2 x 2 maps (3 cropped 5 x 5, one 3 x 3) as sums
        assert len(kernels[1]) - len(kernels[0]) == 4
        assert kernels[1].count((5, 5)) - kernels[0].count((5, 5)) == 3
    (o1, g1), (o2, g2) = runs
    assert torch.allclose(o1, o2, rtol=1e-10, atol=1e-12) and not torch.equal(o1[0], o1[1])
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g1, g2))
