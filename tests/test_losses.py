"""Loss maths against hand-computed values; DiffAugment keeps shapes and gradients."""

import pytest
import torch
import torch.nn as nn

from gans.diffaugment import diff_augment
from gans.losses import AdversarialLoss, gradient_penalty

REAL = torch.tensor([2.0, 0.5])
FAKE = torch.tensor([-0.5, 1.5])


def test_hinge():
    L = AdversarialLoss("hinge")
    # mean(relu(1 - [2, .5])) + mean(relu(1 + [-.5, 1.5])) = 0.25 + 1.5
    assert L.d(REAL, FAKE).item() == pytest.approx(0.25 + 1.5)
    assert L.g(FAKE).item() == pytest.approx(-0.5)


def test_wasserstein():
    L = AdversarialLoss("wasserstein")
    assert L.d(REAL, FAKE).item() == pytest.approx(0.5 - 1.25)
    assert L.g(FAKE).item() == pytest.approx(-0.5)


def test_bce_with_one_sided_label_smoothing():
    sp = lambda x: torch.log1p(torch.exp(x))  # noqa: E731  softplus
    L = AdversarialLoss("bce", label_smoothing=0.1)
    # BCE(target 0.9) = 0.9 * softplus(-x) + 0.1 * softplus(x)
    expect = (0.9 * sp(-REAL) + 0.1 * sp(REAL)).mean() + sp(FAKE).mean()
    assert L.d(REAL, FAKE).item() == pytest.approx(expect.item(), rel=1e-6)
    assert L.g(FAKE).item() == pytest.approx(sp(-FAKE).mean().item(), rel=1e-6)


def test_lsgan():
    L = AdversarialLoss("lsgan")
    expect = 0.5 * ((REAL - 1) ** 2).mean() + 0.5 * (FAKE ** 2).mean()
    assert L.d(REAL, FAKE).item() == pytest.approx(expect.item())


class Linear(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.w = nn.Parameter(torch.full((3, 4, 4), scale / (48 ** 0.5)))  # ||w|| = scale

    def forward(self, x, y=None):
        return (x * self.w).flatten(1).sum(1)


@pytest.mark.parametrize("scale, expect", [(1.0, 0.0), (2.0, 1.0), (3.0, 4.0)])
def test_gradient_penalty_of_a_linear_critic(scale, expect):
    """D(x) = <w, x> has gradient w everywhere: GP = (||w|| - 1)^2."""
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    gp = gradient_penalty(Linear(scale), real, fake, None)
    assert gp.item() == pytest.approx(expect, abs=1e-5)
    gp.backward()                                           # differentiable w.r.t. the critic


def test_diffaugment_shapes_gradients_and_effect():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32, requires_grad=True)
    for policy in (["color"], ["translation"], ["cutout"], ["color", "translation", "cutout"]):
        out = diff_augment(x, policy)
        assert out.shape == x.shape
        assert not torch.equal(out, x)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert g.abs().sum() > 0
    cut = diff_augment(torch.ones(64, 3, 32, 32), ["cutout"])
    frac = (cut == 0).float().mean(dim=(1, 2, 3))             # a 16x16 hole, clipped at borders
    assert (frac <= 0.25 + 1e-6).all() and (frac > 0).all()
    assert (frac == 0.25).any()
