"""metrics/: full-reference registry == piq, 16-bit handling, distribution metrics, extractors."""

import socket
import warnings

import numpy as np
import piq
import pytest
import torch
from PIL import Image

from histosynth.data import TileCache
from metrics.distribution import SmallSampleWarning, distribution_metrics
from metrics.features import ClassifierExtractor, InceptionExtractor, PixelExtractor
from metrics.full_reference import FULL_REFERENCE, paired_folder_scores, read_unit_float
from histosynth.checkpoint import CheckpointError


@pytest.fixture
def paired_dirs(tmp_path, lung_train):
    """Real 224 px tiles (A) and a 'rescanned' copy with another tone curve (B), same names."""
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir(), fake.mkdir()
    files = sorted(p for p in (lung_train / "lung_n").iterdir())[:3]
    for f in files:
        rgb = np.asarray(Image.open(f).convert("RGB"))
        Image.fromarray(rgb).save(real / f"{f.stem}.png")
        Image.fromarray(np.clip(255 * (rgb / 255.0) ** 1.25, 0, 255).astype(np.uint8)).save(fake / f"{f.stem}.png")
    return real, fake


def _t(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def test_every_registered_metric_equals_the_direct_piq_call(paired_dirs):
    real, fake = paired_dirs
    res = paired_folder_scores(real, fake, progress=False)
    direct = {"psnr": lambda x, y: piq.psnr(x, y, data_range=1.0),
              "ssim": lambda x, y: piq.ssim(x, y, data_range=1.0),
              "ms_ssim": lambda x, y: piq.multi_scale_ssim(x, y, data_range=1.0),
              "haarpsi": lambda x, y: piq.haarpsi(x, y, data_range=1.0),
              "mdsi": lambda x, y: piq.mdsi(x, y, data_range=1.0),
              "ms_gmsd": lambda x, y: piq.multi_scale_gmsd(x, y, data_range=1.0)}
    assert set(direct) == set(FULL_REFERENCE)
    assert len(res["per_image"]) == 3 and not res["unpaired"]
    for row in res["per_image"]:
        x, y = _t(fake / f"{row['file']}.png"), _t(real / f"{row['file']}.png")
        for name, fn in direct.items():
            assert row[name] == pytest.approx(float(fn(x, y)), rel=1e-5, abs=1e-6), name
    s = res["summary"]["psnr"]
    assert s["n"] == 3 and s["ci_low"] <= s["mean"] <= s["ci_high"]


def test_16bit_copy_scores_like_the_8bit_image(paired_dirs, tmp_path):
    real, fake = paired_dirs
    f = sorted(fake.iterdir())[0]
    grey8 = np.asarray(Image.open(f).convert("L"))
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    a, b = read_unit_float(tmp_path / "g8.png"), read_unit_float(tmp_path / "g16.png")
    assert a.dtype == b.dtype == np.float32 and np.abs(a - b).max() < 1e-6
    # and 16-bit precision is kept: a value between two 8-bit levels survives
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(tmp_path / "mid.png")
    assert read_unit_float(tmp_path / "mid.png")[0, 0, 0] == pytest.approx(1000 / 65535)


def test_unknown_metric_is_named():
    with pytest.raises(KeyError, match="unknown metric.*psnrr"):
        paired_folder_scores(".", ".", ["psnrr"], progress=False)


@pytest.fixture(scope="module")
def crc_features(crc_mini):
    cache = TileCache.build(crc_mini, 64, progress=False)
    x = torch.from_numpy(np.array(cache.images))
    ext = PixelExtractor()
    return ext(x), ext(255 - x)                                   # real, colour-inverted


def test_identical_sets_score_perfectly_and_inverted_clearly_worse(crc_features):
    real, inverted = crc_features
    with pytest.warns(SmallSampleWarning, match="KID"):
        same = distribution_metrics(real, real.clone(), k=3, n_boot=0)
    assert same["precision"]["value"] == 1.0 and same["recall"]["value"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        inv = distribution_metrics(real, inverted, k=3, n_boot=5)
    # identical sets: FID near 0 (the covariance of 32 samples in 192-d is singular, so piq's
    # regularised square root leaves a small residue), far below the inverted set's
    assert same["fid"]["value"] < 0.01 * inv["fid"]["value"]
    # KID's unbiased estimate scatters around 0 (it can be negative) for identical sets
    assert abs(same["kid"]["value"]) < 0.05 * inv["kid"]["value"]
    assert inv["kid"]["value"] > 0.05
    assert inv["precision"]["value"] < 0.5 and inv["coverage"]["value"] < 0.5
    assert inv["fid"]["ci_low"] <= inv["fid"]["ci_high"]


def test_fid_of_small_sets_in_their_own_subspace_equals_the_full_space_value(crc_features):
    """Per-class sets are smaller than the feature dimension: fid() works in the subspace the two
    sets span, which must not change the value (piq on the full space; scipy's exact sqrtm)."""
    from scipy import linalg

    from metrics.distribution import fid
    real, inverted = crc_features                                   # 192-d pixel features of real tiles
    a, b = real[:12].double(), (0.7 * real[12:21] + 0.3 * inverted[12:21]).double()    # 12 + 9 < 192
    m1, m2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    exact = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    value = fid(a, b)
    assert value == pytest.approx(float(piq.FID().compute_metric(a, b)), rel=1e-6)
    assert value == pytest.approx(exact, rel=1e-4) and value > 0.1


def test_kid_on_the_sphere_is_not_ruled_by_a_few_long_feature_vectors(crc_features):
    """An extractor trained from scratch gives some tiles 20-50x the median feature norm; raw KID
    then ranks two halves of the real set as further apart than real and inverted tiles. The
    histology space (features on the sphere of radius sqrt(d)) is unchanged by such lengths."""
    from metrics.distribution import kid
    from metrics.features import on_sphere
    real, inverted = (f.double() for f in crc_features)
    a, b, inv = real[::2].clone(), real[1::2].clone(), inverted[::2]
    assert kid(a, b) < 0.2 * kid(a, inv)                         # raw, ordinary lengths: real halves close
    a[:2] *= 30                                                 # 2 of 16 tiles with 30x longer vectors
    assert kid(a, b) > 0.99 * kid(a, inv)                        # raw: now as far apart as inverted tiles
    sa, sb, si = on_sphere(a), on_sphere(b), on_sphere(inv)
    assert torch.allclose(sa.norm(dim=1), torch.full((len(a),), a.shape[1] ** 0.5, dtype=sa.dtype))
    assert kid(sa, sb) == pytest.approx(kid(on_sphere(real[::2]), sb))       # lengths do not matter
    assert kid(sa, sb) < 0.2 * kid(sa, si)                       # real halves close, inverted far


def test_precision_recall_beyond_the_cap_use_a_seeded_subsample(crc_features, monkeypatch):
    """PRDC's pairwise matrices grow as N^2: above prdc_max it sees a subsample; FID/KID see all."""
    import metrics.distribution as dm
    real, inverted = crc_features
    seen = []
    real_prdc = dm.prdc
    monkeypatch.setattr(dm, "prdc", lambda r, f, k=5: seen.append((len(r), len(f))) or real_prdc(r, f, k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        capped = distribution_metrics(real, inverted, k=3, n_boot=2, prdc_max=20)
        again = distribution_metrics(real, inverted, k=3, n_boot=2, prdc_max=20)
        full = distribution_metrics(real, inverted, k=3, n_boot=0)
    assert seen[:3] == [(20, 20)] * 3 and seen[-1] == (len(real), len(inverted))
    assert capped["precision"]["n_used"] == [20, 20] and capped["fid"]["n_real"] == len(real)
    assert capped["fid"]["value"] == full["fid"]["value"]          # FID: every sample
    assert capped == again                                         # seeded
    assert capped["coverage"]["value"] < 0.5


def test_extractors_never_touch_the_network(monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(CheckpointError, match="never downloads"):
        InceptionExtractor(tmp_path / "missing.pth")
    from torchvision.models import inception_v3
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "inc.pth")
    ext = InceptionExtractor(tmp_path / "inc.pth")
    feats = ext(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and "inc.pth" in ext.describe()
    with pytest.raises(CheckpointError, match="never downloads"):
        ClassifierExtractor(tmp_path / "none.pth")
    from efficientnet_pytorch import EfficientNet
    torch.save(EfficientNet.from_name("efficientnet-b0", num_classes=3).state_dict(), tmp_path / "eff.pth")
    eff = ClassifierExtractor(tmp_path / "eff.pth")
    assert eff(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)).shape == (2, 1280)
    assert "eff.pth" in eff.describe()
