"""Segmenters from segmentation-models-pytorch, from scratch or from weights that are already here."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch.nn as nn

from histosynth.checkpoint import CheckpointError, safe_load
from segmentation.config import SegmenterModelConfig


@contextlib.contextmanager
def _offline():
    """The Hugging Face hub (where smp keeps its encoder weights) in offline mode for the block:
    the cache or nothing, at once (huggingface_hub reads HF_HUB_OFFLINE when it is imported, so
    its constant is switched too)."""
    from huggingface_hub import constants
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def create_segmenter(cfg: SegmenterModelConfig, classes: int = 1) -> nn.Module:
    """``cfg.arch`` with ``cfg.encoder``; one logit map per class (1: binary)."""
    import segmentation_models_pytorch as smp

    w = cfg.encoder_weights
    try:
        with _offline():
            net = smp.create_model(cfg.arch, encoder_name=cfg.encoder, encoder_weights="imagenet" if w == "imagenet" else None,
                                   in_channels=3, classes=classes)
    except KeyError as e:
        raise CheckpointError(f"downstream.model.encoder: {e}; see segmentation_models_pytorch.encoders") from None
    except Exception as e:             # not in the cache (offline): say where it goes and how to get it
        if w != "imagenet":
            raise
        raise CheckpointError(f"ImageNet weights of {cfg.encoder} are not in the Hugging Face cache "
                              f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}; {type(e).__name__}); "
                              "fetch them once where there is network with python -c \"import "
                              f"segmentation_models_pytorch as smp; smp.Unet('{cfg.encoder}')\", or set "
                              "downstream.model.encoder_weights to a local file or null") from None
    if w not in (None, "imagenet"):
        if not Path(w).is_file():
            raise CheckpointError(f"encoder weights not found: {w} (nothing is downloaded; give a local file, "
                                  "imagenet, or null)")
        state = safe_load(w)
        state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
        missing, unexpected = net.encoder.load_state_dict(state, strict=False)
        if len(missing) > len(state) or not state:
            raise CheckpointError(f"{w} does not fit the {cfg.encoder} encoder ({len(missing)} missing tensors)")
    return net
