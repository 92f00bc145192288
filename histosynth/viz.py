"""Pictures people look at: labelled sample grids and loss curves."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from histosynth.checkpoint import atomic_write


def save_grid(images: torch.Tensor, nrow: int, row_labels: list[str] | None, path: str | Path,
              label_width: int = 110) -> None:
    """Save ``N x 3 x H x W`` images in [-1, 1] as a PNG grid, ``nrow`` per row, labelled rows."""
    from torchvision.utils import make_grid     # here: importing torchvision costs every command ~1.2 s
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


def markdown_to_html(markdown: str, out: str | Path, title: str) -> str:
    """A Markdown report (as histosynth writes them) as one self-contained HTML page: tables as
    tables, headings, bullets, and every ``![](x.png)`` under ``out`` inlined as base64."""
    out = Path(out)
    body = []
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set(line) <= {"|", "-"}:
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            if (out / name).is_file():
                data = base64.b64encode((out / name).read_bytes()).decode()
                body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<p>&bull; {html.escape(line[2:])}</p>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px}th{background:#eef}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
