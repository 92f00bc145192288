"""Differentiable augmentation of D's inputs (Zhao et al., NeurIPS 2020, "DiffAugment").

The same random transforms are applied to real and fake images before D (never to G's output
seen elsewhere), which keeps D from memorising a small training set. Policies, as in the paper:

* ``color``: random brightness (+-0.5), saturation (x 0..2) and contrast (x 0.5..1.5);
* ``translation``: random shift by up to 1/8 of the image side, zero-filled;
* ``cutout``: one random square of half the image side set to zero.

Every operation is built from differentiable tensor ops, so gradients flow to G. Randomness comes
from torch's global generator, whose state the checkpoints keep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def _color(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    r = lambda: torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype)  # noqa: E731
    x = x + (r() - 0.5)                                        # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r() * 2) + mean                          # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r() + 0.5) + mean                     # contrast


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    iy = torch.arange(h, device=x.device).view(1, h, 1) + dy   # B x H x 1: source row per output row
    ix = torch.arange(w, device=x.device).view(1, 1, w) + dx   # B x 1 x W
    padded = F.pad(x, (1, 1, 1, 1))                            # zero border at index 0 and -1
    iy = (iy + 1).clamp(0, h + 1).expand(b, h, w)
    ix = (ix + 1).clamp(0, w + 1).expand(b, h, w)
    flat = padded.flatten(2)                                   # B x C x (H+2)(W+2)
    idx = (iy * (w + 2) + ix).flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1)
    return flat.gather(2, idx).view_as(x)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    dy, dx = ys - cy, xs - cx                                  # hole: [c - side/2, c + side/2), clipped
    inside = (dy >= -(ch // 2)) & (dy < ch - ch // 2) & (dx >= -(cw // 2)) & (dx < cw - cw // 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_OPS = {"color": _color, "translation": _translation, "cutout": _cutout}


def parse_policy(policy: str) -> list[str]:
    return [p.strip() for p in policy.split(",") if p.strip()]


def diff_augment(x: torch.Tensor, policy: list[str]) -> torch.Tensor:
    """Apply the listed policies, in order, to a ``B x C x H x W`` batch in [-1, 1]."""
    for name in policy:
        x = _OPS[name](x)
    return x
