"""Translating images of any size with a fully convolutional image-to-image network.

Images larger than ``tile`` are cut into overlapping tiles; each tile's output is weighted by a
window that falls linearly to near zero over the ``overlap`` band and the weighted outputs are
averaged, so tile borders leave no seam (instance norm makes naively tiled outputs seam).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from histosynth.data import to_uint8, to_unit_range


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _window(h: int, w: int, overlap: int) -> torch.Tensor:
    """1 in the middle, falling linearly to 1/(overlap+1) at the edges: 1 x 1 x h x w."""
    def ramp(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32)
        return torch.minimum(torch.minimum(i + 1, n - i), torch.tensor(overlap + 1.0)) / (overlap + 1)
    return (ramp(h)[:, None] * ramp(w)[None, :])[None, None]


@torch.no_grad()
def _run(G: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """G on a batch whose sides are padded (reflect) to multiples of 4, cropped back."""
    h, w = x.shape[2:]
    ph, pw = (-h) % 4, (-w) % 4
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return G(x)[:, :, :h, :w].float()


@torch.no_grad()
def translate_image(G: torch.nn.Module, rgb: np.ndarray, tile: int = 512, overlap: int = 64,
                    batch: int = 4) -> np.ndarray:
    """Translate an ``H x W x 3`` uint8 image of any size; returns the same shape and dtype."""
    dev = next(G.parameters()).device
    x = to_unit_range(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]).to(dev)
    h, w = x.shape[2:]
    if h <= tile and w <= tile:
        return to_uint8(_run(G, x))[0].permute(1, 2, 0).cpu().numpy()
    th, tw = min(tile, h), min(tile, w)
    stride = max(tile - overlap, 1)
    boxes = [(y, xx) for y in _starts(h, th, stride) for xx in _starts(w, tw, stride)]
    win = _window(th, tw, overlap).to(dev)
    out = torch.zeros(1, 3, h, w, device=dev)
    weight = torch.zeros(1, 1, h, w, device=dev)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        y_hat = _run(G, torch.cat([x[:, :, y:y + th, xx:xx + tw] for y, xx in chunk]))
        for (y, xx), patch in zip(chunk, y_hat):
            out[:, :, y:y + th, xx:xx + tw] += patch * win[0]
            weight[:, :, y:y + th, xx:xx + tw] += win[0]
    return to_uint8(out / weight)[0].permute(1, 2, 0).cpu().numpy()
