"""Pictures people look at: labelled sample grids and loss curves."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from histosynth.checkpoint import atomic_write


def save_grid(images: torch.Tensor, nrow: int, row_labels: list[str] | None, path: str | Path,
              label_width: int = 110) -> None:
    """Save ``N x 3 x H x W`` images in [-1, 1] as a PNG grid, ``nrow`` per row, labelled rows."""
    grid = make_grid(images.float().clamp(-1, 1), nrow=nrow, padding=2, normalize=True,
                     value_range=(-1, 1), pad_value=1.0)
    arr = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    if row_labels:
        canvas = Image.new("RGB", (img.width + label_width, img.height), "white")
        canvas.paste(img, (label_width, 0))
        draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
        row_h = images.shape[2] + 2
        for i, label in enumerate(row_labels):
            draw.text((4, 2 + i * row_h + row_h // 2 - 6), label[:18], fill="black", font=font)
        img = canvas
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def plot_curves(jsonl: str | Path, path: str | Path, keys: list[str] | None = None) -> None:
    """Loss curves of a run's metrics.jsonl, one panel per key (seaborn style)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        return
    if keys is None:
        keys = []
        for r in rows:
            keys += [k for k in r if k.startswith(("loss", "d_", "gp", "kid")) and k not in keys]
    if not keys:
        return
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, marker="o" if k == "kid" else None, ms=3)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
