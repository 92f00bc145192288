"""Every registered family builds, runs forward and backward at every resolution, (un)conditional."""

import pytest
import torch
import torch.nn as nn

from gans import create_model, get_family, list_families
from gans.registry import RESOLUTIONS, adversarial_families
from histosynth.config import ConfigError
from conftest import conv_weight_shapes


def test_registry_lists_the_families():
    assert set(adversarial_families()) >= {"dcgan", "sngan", "wgan_gp"}
    assert set(list_families()) == set(adversarial_families()) | {"cyclegan", "diffusion", "pix2pix"}


@pytest.mark.parametrize("family", adversarial_families())
@pytest.mark.parametrize("size", RESOLUTIONS)
@pytest.mark.parametrize("num_classes", [0, 3])
def test_forward_backward(family, size, num_classes):
    torch.manual_seed(0)
    G, D = create_model(family, size, num_classes, z_dim=16, ch=8)
    z = torch.randn(4, 16)
    y = torch.tensor([0, 1, 2, 0]) if num_classes else None
    x = G(z, y)
    assert x.shape == (4, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1                       # tanh output
    logits = D(x, y)
    assert logits.shape == (4,)
    logits.mean().backward()
    for name, net in (("G", G), ("D", D)):
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("family", ["sngan", "wgan_gp", "dcgan"])
def test_conditioning_changes_the_output(family):
    torch.manual_seed(0)
    G, D = create_model(family, 32, 3, z_dim=16, ch=8)
    with torch.no_grad():                                     # non-trivial class embeddings
        for m in G.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.normal_()
    G.eval()
    z = torch.randn(1, 16).repeat(2, 1)
    x = G(z, torch.tensor([0, 1]))
    assert not torch.allclose(x[0], x[1])


def test_sngan32_matches_the_reference_size():
    """ch=64 at 32 px is mimicry's SNGAN-32: G 4.3 M and D 1.1 M parameters."""
    G, D = create_model("sngan", 32, 0, z_dim=128, ch=64)
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert n(G) == pytest.approx(4.3, abs=0.05)
    assert n(D) == pytest.approx(1.05, abs=0.05)


def test_sngan_discriminator_is_spectrally_normalised():
    _, D = create_model("sngan", 32, 3, z_dim=16, ch=8)
    D.train()
    for _ in range(30):                                       # let power iteration converge
        D(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    conv = D.blocks[1].conv1
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert sigma == pytest.approx(1.0, abs=0.05)


def test_unknown_family_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'sngan'"):
        get_family("sngn")


def test_unsupported_resolution_is_refused():
    with pytest.raises(ValueError, match="32, 64, 128"):
        create_model("sngan", 48)


@pytest.mark.parametrize("family", adversarial_families())
def test_fresh_discriminator_logits_are_of_order_one_on_real_tiles(family, crc_mini):
    """Guards the papers' initialisations: exploding initial logits make training diverge."""
    from histosynth.data import TileCache, to_unit_range

    cache = TileCache.build(crc_mini, 64, progress=False)
    x = to_unit_range(torch.from_numpy(cache.images[:16].copy()))
    y = torch.from_numpy(cache.labels[:16].copy())
    torch.manual_seed(0)
    _, D = create_model(family, 64, len(cache.classes), z_dim=128, ch=32)
    with torch.no_grad():
        logits = D(x, y)
    assert logits.abs().max() < 10, logits


@pytest.mark.parametrize("family", ["sngan", "wgan_gp"])
@pytest.mark.parametrize("size", RESOLUTIONS)
def test_resampling_folded_into_the_convolutions_is_the_literal_network(family, size, crc_mini):
    """The ResNet blocks upsample and pool folded into their 3x3 convolutions (one 4x4 stride-2
    convolution each): the same map as interpolate/pool-then-convolve, in value and gradient, on
    real tiles; only float rounding may differ (float64 here)."""
    from gans.layers import set_fused
    from histosynth.data import TileCache, to_unit_range

    cache = TileCache.build(crc_mini, size, progress=False)
    real = to_unit_range(torch.from_numpy(cache.images[:4].copy())).double()
    y = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    G, D = (m.double() for m in create_model(family, size, 3, z_dim=16, ch=8))
    z = torch.randn(4, 16, dtype=torch.float64)
    runs = []
    for fused in (True, False):
        set_fused(G, fused), set_fused(D, fused)
        G.zero_grad(), D.zero_grad()
        G.eval(), D.eval()                # spectral norm uses its stored vectors, the same in both runs
        x = G(z, y)
        logits = D(torch.cat([x, real]), torch.cat([y, y]))
        logits.square().sum().backward()
        runs.append((x.detach(), logits.detach(), [p.grad.clone() for p in (*G.parameters(), *D.parameters())]))
    (x1, l1, g1), (x2, l2, g2) = runs
    assert torch.allclose(x1, x2, atol=1e-12) and torch.allclose(l1, l2, rtol=1e-10, atol=1e-10)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g1, g2))
    assert not torch.equal(l1[:4], l1[4:])                      # fakes and real tiles differ: a real check


@pytest.mark.parametrize("cin, cout, kernel, padding, bias", [
    (16, 3, 7, 0, True),            # CycleGAN's output layer, after its reflection padding
    (8, 3, 3, 1, False),
    (8, 2, (5, 3), (2, 1), True),
    (4, 1, 4, (0, 2), True),
])
def test_column_convolution_is_the_library_convolution(cin, cout, kernel, padding, bias):
    """ColumnConv2d computes by kernel columns (kh x 1 convolutions summed shifted): the map of
    nn.Conv2d with the same parameters, in value and gradient (float64), the same state dict."""
    from gans.layers import ColumnConv2d, set_fused

    torch.manual_seed(0)
    conv = ColumnConv2d(cin, cout, kernel, padding=padding, bias=bias).double()
    plain = nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias).double()
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, cin, 21, 18, dtype=torch.float64, requires_grad=True)
    runs = []
    for layer in (conv, plain):
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        runs.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = runs
    assert y1.shape == y2.shape
    assert torch.allclose(y1, y2, atol=1e-12) and torch.allclose(gx1, gx2, atol=1e-11)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(gp1, gp2))
    kh, kw = plain.kernel_size
    with conv_weight_shapes() as seen:
        conv(x)
    assert seen.shapes == [(cout * kw, cin, kh, 1)]                 # the column form ran, not the library's
    with conv_weight_shapes() as seen:
        set_fused(conv, False)(x)
    assert seen.shapes == [(cout, cin, kh, kw)]


def test_cyclegan_generator_by_columns_is_the_literal_network(crc_mini):
    """CycleGAN's generator with its 7x7 output layer by columns equals the literal network on
    real tiles, in value and gradient (float64), and in bf16 autocast keeps the library's dtype
    and values up to bf16 rounding."""
    from gans.families.cyclegan import ResnetGenerator
    from gans.layers import set_fused
    from histosynth.data import TileCache, to_unit_range

    cache = TileCache.build(crc_mini, 64, progress=False)
    real = to_unit_range(torch.from_numpy(cache.images[:3].copy()))
    torch.manual_seed(0)
    G = ResnetGenerator(ngf=8, n_blocks=2).double()
    runs = []
    for fused in (True, False):
        set_fused(G, fused).zero_grad()
        y = G(real.double())
        y.square().sum().backward()
        runs.append((y.detach(), [p.grad.clone() for p in G.parameters()]))
    (y1, g1), (y2, g2) = runs
    assert torch.allclose(y1, y2, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g1, g2))
    assert y1.std() > 0.01                                          # a real image out, not a constant
    G = G.float()
    outs = []
    for fused in (True, False):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            outs.append(set_fused(G, fused)(real))
    assert outs[0].dtype == outs[1].dtype
    assert (outs[0].float() - outs[1].float()).abs().max() < 0.05
