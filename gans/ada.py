"""Adaptive discriminator augmentation (ADA, Karras et al., NeurIPS 2020) and LeCam regularisation
(Tseng et al., CVPR 2021): two remedies for a discriminator that memorises a small training set.

ADA augments every image the discriminator sees, real and generated alike, each transform applied
to an image with probability ``p``, and adjusts ``p`` by the overfitting heuristic
``r_t = E[sign(D(real))]``: every ``interval`` discriminator steps, ``p`` moves by
``sign(r_t - target) * images / (kimg * 1000)`` (so it can go from 0 to 1 in ``kimg`` thousand
images) and stays in [0, 1]. The transforms are the paper's 'bgc' groups as differentiable tensor
operations: x-flip, 90-degree rotations, integer translation (blit), isotropic and anisotropic
scaling, rotation and fractional translation (geometric, composed into one affine warp with
reflection padding), brightness, contrast and saturation (colour). Because real and fake images
see the same distribution of transforms, the augmentations do not leak into the generator as
long as ``p`` stays below ~0.8 (the paper's finding).

LeCam: ``||relu(D(real) - ema_fake)||^2 + ||relu(ema_real - D(fake))||^2`` with exponential moving
averages of D's mean outputs; it keeps D's real and fake outputs from drifting apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)      # B x 2 x 2


def augment(x: torch.Tensor, p: float) -> torch.Tensor:
    """Each transform applied to each image of ``x`` (B x 3 x H x W in [-1, 1]) with probability
    ``p``; differentiable; ``p == 0`` returns ``x`` itself."""
    if p <= 0:
        return x
    b, dev = x.shape[0], x.device

    def on(shape=()):                      # which images get this transform
        return (torch.rand(b, *shape, device=dev) < p).float()

    eye = torch.eye(2, device=dev).expand(b, 2, 2)
    # geometric: A maps output to input coordinates (normalised [-1, 1]), t the shift
    A, t = eye.clone(), torch.zeros(b, 2, device=dev)
    flip = 1 - 2 * on()                                                             # x-flip
    A = A @ torch.diag_embed(torch.stack([flip, torch.ones_like(flip)], -1))
    k = torch.randint(0, 4, (b,), device=dev) * on()                                # rotate 90 k times
    A = A @ _rotation(k * math.pi / 2)
    t = t + on((1,)) * torch.round((torch.rand(b, 2, device=dev) * 2 - 1) * 0.125 * x.shape[-1]) * 2 / x.shape[-1]
    s = torch.exp2(torch.randn(b, device=dev) * 0.2 * on())                         # isotropic scale
    A = A @ torch.diag_embed(torch.stack([1 / s, 1 / s], -1))
    p_rot = 1 - math.sqrt(1 - min(p, 1.0))                                          # rotation split in two
    A = A @ _rotation((torch.rand(b, device=dev) * 2 - 1) * math.pi * (torch.rand(b, device=dev) < p_rot).float())
    a = torch.exp2(torch.randn(b, device=dev) * 0.2 * on())                         # anisotropic scale
    A = A @ torch.diag_embed(torch.stack([1 / a, a], -1))
    A = A @ _rotation((torch.rand(b, device=dev) * 2 - 1) * math.pi * (torch.rand(b, device=dev) < p_rot).float())
    t = t + torch.randn(b, 2, device=dev) * 0.125 * 2 * on((1,))                     # fractional translation
    theta = torch.cat([A, t.unsqueeze(-1)], -1).to(x.dtype)                         # B x 2 x 3
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
    # colour
    x = x + (torch.randn(b, 1, 1, 1, device=dev) * 0.2 * on((1, 1, 1))).to(x.dtype)          # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c = torch.exp2(torch.randn(b, 1, 1, 1, device=dev) * 0.5 * on((1, 1, 1))).to(x.dtype)      # contrast
    x = mean + (x - mean) * c
    luma = x.mean(dim=1, keepdim=True)
    sat = torch.exp2(torch.randn(b, 1, 1, 1, device=dev) * on((1, 1, 1))).to(x.dtype)          # saturation
    return luma + (x - luma) * sat


class AdaptiveAugment:
    """ADA's probability ``p`` and the heuristic that steers it; ``state_dict`` keeps both, so a
    resumed run continues with the same ``p`` and the same partial measurement. The signs are
    summed on the device; the host reads them once per ``interval`` steps."""

    def __init__(self, target: float = 0.6, interval: int = 4, kimg: float = 500.0, batch: int = 32):
        self.target, self.interval, self.kimg, self.batch = target, interval, kimg, batch
        self.p, self.r_t, self.steps = 0.0, float("nan"), 0
        self.signs: torch.Tensor | None = None                 # sum of sign(D(real)), count

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return augment(x, self.p)

    def observe(self, real_logits: torch.Tensor) -> None:
        """Account one discriminator step's logits on (augmented) real images; adjust p every
        ``interval`` steps (averaged over torchrun ranks, so every rank keeps the same p)."""
        r = real_logits.detach().float()
        now = torch.stack([r.sign().sum(), torch.tensor(float(r.numel()), device=r.device)])
        self.signs = now if self.signs is None else self.signs.to(r.device) + now
        self.steps += 1
        if self.steps % self.interval:
            return
        signs = self.signs.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(signs)
        total, count = signs.tolist()
        self.r_t = total / max(count, 1.0)
        step = self.batch * self.interval / (self.kimg * 1000)
        self.p = min(1.0, max(0.0, self.p + math.copysign(step, self.r_t - self.target)))
        self.signs = None

    def state_dict(self) -> dict:
        return {"p": self.p, "r_t": self.r_t, "steps": self.steps,
                "signs": self.signs.cpu() if self.signs is not None else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        self.p, self.r_t, self.steps = float(state["p"]), float(state["r_t"]), int(state["steps"])
        self.signs = state["signs"].clone() if state["signs"].numel() else None


class LeCam:
    """The LeCam regulariser with its two moving averages of D's mean outputs (decay 0.99 in
    Tseng et al.), kept on the device."""

    def __init__(self, decay: float = 0.99):
        self.decay = decay
        self.ema: torch.Tensor | None = None                    # real, fake

    def __call__(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        now = torch.stack([real_logits.detach().float().mean(), fake_logits.detach().float().mean()])
        self.ema = (1 - self.decay) * now if self.ema is None else \
            self.decay * self.ema.to(now.device) + (1 - self.decay) * now
        ema_real, ema_fake = self.ema[0], self.ema[1]
        return F.relu(real_logits - ema_fake).pow(2).mean() + F.relu(ema_real - fake_logits).pow(2).mean()

    def state_dict(self) -> dict:
        return {"ema": self.ema.cpu() if self.ema is not None else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"].clone() if state["ema"].numel() else None
