"""Adversarial losses on discriminator logits and the WGAN-GP gradient penalty (used by
:class:`gans.adversarial.GANTask`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdversarialLoss:
    """D and G objectives on logits. ``kind``: hinge | bce (non-saturating) | wasserstein | lsgan."""

    def __init__(self, kind: str, label_smoothing: float = 0.0):
        self.kind, self.real_target = kind, 1.0 - label_smoothing

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.kind == "hinge":
            return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        if self.kind == "bce":
            return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, self.real_target))
                    + F.softplus(fake).mean())
        if self.kind == "wasserstein":
            return fake.mean() - real.mean()
        if self.kind == "lsgan":
            return 0.5 * ((real - self.real_target) ** 2).mean() + 0.5 * (fake ** 2).mean()
        raise ValueError(self.kind)

    def g(self, fake: torch.Tensor) -> torch.Tensor:
        if self.kind in ("hinge", "wasserstein"):
            return -fake.mean()
        if self.kind == "bce":
            return F.softplus(-fake).mean()
        if self.kind == "lsgan":
            return 0.5 * ((fake - 1) ** 2).mean()
        raise ValueError(self.kind)


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     y: torch.Tensor | None) -> torch.Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2] at random interpolates x_hat (Gulrajani 2017), in fp32."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x_hat = (eps * real.float() + (1 - eps) * fake.float()).requires_grad_(True)
    with torch.autocast(real.device.type, enabled=False):
        out = D(x_hat, y)
    grad, = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
