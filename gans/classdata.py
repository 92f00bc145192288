"""The training data of the class-conditional families (GANs, diffusion): class folders of tiles.

Every family whose config has a ``data`` section of :class:`gans.config.DataConfig` uses these
three: what the run reads (its run directory stays apart from it), the decoded tile cache, and
the provenance recorded in RUN/data.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histosynth.checkpoint import sha256_file
from histosynth.data import TileCache, cache_dir_of
from histosynth.images import scan_image_folder
from histosynth.paths import resolve_data_path
from histosynth.stain import StainNormaliser


def load_data(cfg: Any, progress: bool = True) -> TileCache:
    d = cfg.data
    root = resolve_data_path(d.root)
    stain = None
    if d.stain_norm != "none":
        ref = resolve_data_path(d.stain_reference) if d.stain_reference else scan_image_folder(root)[1][0][0]
        stain = StainNormaliser.from_file(d.stain_norm, ref)
    return TileCache.build(root, d.image_size, stain, cache_dir_of(d), progress=progress)


def inputs(cfg: Any) -> dict[str, Path | None]:
    d = cfg.data
    return {"training data (data.root)": resolve_data_path(d.root),
            "stain reference (data.stain_reference)": resolve_data_path(d.stain_reference) if d.stain_reference else None}


def provenance(cfg: Any, data: TileCache) -> dict:
    """data.json: classes, counts, skipped files and the sha256 of every training file
    (gan-generate copies them into the synthetic set's source.json, so augment-compare can prove
    no validation/test image trained the generator)."""
    root = resolve_data_path(cfg.data.root)
    return {"root": str(root.resolve()), "classes": data.classes, "counts": data.class_counts(),
            "skipped": data.skipped, "files_sha256": {f: sha256_file(root / f) for f in data.files}}
